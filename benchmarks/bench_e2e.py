"""End-to-end prefill / decode speed of luthier and llama.cpp (llama-cpp-python) side by side.

Both engines quantize from the same float weights: luthier quantizes the dequantized GGUF
tensors; llama.cpp requantizes the same file with llama_model_quantize (allow_requantize),
which dequantizes to float first. llama.cpp is optional: `pip install ".[bench]"`.

    python benchmarks/bench_e2e.py                        # SmolLM2, 1 and 2 threads
    python benchmarks/bench_e2e.py --synthetic            # ~1B Llama-shaped random model too
    python benchmarks/bench_e2e.py --json out.json --plot e2e.png
    python benchmarks/bench_e2e.py --pairs source:SOURCE  # the file's own types in both engines

`source:SOURCE` runs the model file as it is in both engines: luthier with `--bits source`
(its quantized linears' codes kept, loaders/gguf_codes.py), llama.cpp without requantizing.

    python benchmarks/bench_e2e.py --synthetic --no-smollm2 --no-llama --pairs 2g64: --threads 2 --probe 12

--probe R (luthier rows): R rounds of [32 decode steps, one read of bench_kernels' 1 GiB
probe] at each thread count; the "%probe" column is the median over rounds of the decode
GB/s (weights read per token x tok/s) over that round's probe GB/s, so the ratio compares
the two at the same moment on a machine whose bandwidth drifts (issue 3's 85% target).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import cpu_name, git_commit, probe_once  # noqa: E402

from luthier.engine import QuantConfig, load_model  # noqa: E402
from luthier.loaders.bundled import smollm2_path  # noqa: E402

# our bits and group size, and the llama.cpp types to compare with
DEFAULT_PAIRS = "4g128:Q4_0,2g64:Q2_K,tg64:TQ2_0+TQ1_0"


def parse_pairs(text: str) -> list[tuple]:
    """'5g64:Q5_0+Q5_K_M,tg64:TQ2_0' -> [(5, 64, ['Q5_0', 'Q5_K_M']), ('ternary', 64, ['TQ2_0'])]:
    our bits (t: ternary) and group size, then the llama.cpp types to run beside them;
    'source:SOURCE' -> [('source', 0, ['SOURCE'])]: the file as it is in both."""
    out = []
    for item in text.split(","):
        ours, _, theirs = item.strip().partition(":")
        if ours.lower() == "source":
            out.append(("source", 0, [t for t in theirs.split("+") if t]))
            continue
        b, _, g = ours.lower().partition("g")
        try:
            out.append(("ternary" if b == "t" else int(b), int(g), [t for t in theirs.split("+") if t]))
        except ValueError:
            raise SystemExit(f"--pairs items are BITSgGROUP:TYPE[+TYPE] (e.g. 5g64:Q5_0), got {item!r}") from None
    return out


def probe_ratio(m, prompt, threads: int, bytes_per_token: int, rounds: int, steps: int = 32) -> dict:
    """rounds x (steps decode steps, one probe read): median decode GB/s / probe GB/s."""
    ratios, probes = [], []
    probe_once(threads)  # page faults of the buffer
    cache = m.new_cache()
    m.forward(prompt[:1], cache, 0)
    pos = 1
    for _ in range(rounds):
        if pos + steps >= cache.max_seq_len:
            cache, pos = m.new_cache(), 0
        t0 = time.perf_counter()
        for _ in range(steps):
            m.forward(prompt[pos % len(prompt) : pos % len(prompt) + 1], cache, pos, last_only=True)
            pos += 1
        gbps = steps * bytes_per_token / (time.perf_counter() - t0) / 1e9
        probes.append(probe_once(threads))
        ratios.append(gbps / probes[-1])
    return {"probe_ratio": float(np.median(ratios)), "probe_ratio_min": float(min(ratios)),
            "probe_ratio_max": float(max(ratios)), "probe_gbps": float(np.median(probes))}


def bench_luthier(path, bits, gs, threads_list, n_prompt, n_gen, head_bits=4, probe_rounds=0) -> list[dict]:
    """One load and quantization, measured at every thread count."""
    lm = load_model(path, QuantConfig(bits=bits, group_size=gs, head_bits=head_bits),
                    n_threads=threads_list[0], ctx=n_prompt + n_gen + 8)
    m = lm.model
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, m.vocab_size, n_prompt)
    out = []
    for threads in threads_list:
        lm.set_threads(threads)
        m.forward(prompt[:8], m.new_cache(), 0)  # warm up the pool and caches
        best_pp, best_tg = 0.0, 0.0
        for _ in range(3):
            cache = m.new_cache()
            t0 = time.perf_counter()
            m.forward(prompt, cache, 0, last_only=True)
            best_pp = max(best_pp, n_prompt / (time.perf_counter() - t0))
            cache = m.new_cache()
            m.forward(prompt[:1], cache, 0)
            t0 = time.perf_counter()
            for i in range(n_gen):
                m.forward(prompt[i % n_prompt : i % n_prompt + 1], cache, i + 1, last_only=True)
            best_tg = max(best_tg, n_gen / (time.perf_counter() - t0))
        label = "source" if bits == "source" else f"ternary-g{gs}" if bits == "ternary" else f"{bits}b-g{gs}"
        out.append({"engine": "luthier", "type": label, "threads": threads, "pp": best_pp,
                    "tg": best_tg, "weight_mb": lm.weight_bytes_per_token / 1e6,
                    "gbps": best_tg * lm.weight_bytes_per_token / 1e9,
                    "quantize_s": lm.quantize_seconds})
        if probe_rounds:
            out[-1].update(probe_ratio(m, prompt, threads, lm.weight_bytes_per_token, probe_rounds))
    return out


class _quiet_stderr:
    """llama.cpp logs every tensor to fd 2 from C: send it to /dev/null while it runs."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 2)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        os.close(self.null)


def llama_quantize(src: str, dst: str, type_name: str) -> None:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {type_name} failed ({rc})")


def bench_llama(path, type_name, threads, n_prompt, n_gen, tmp) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    q = path if type_name == "SOURCE" else os.path.join(tmp, f"{os.path.basename(path)}.{type_name}.gguf")
    with _quiet_stderr():
        if not os.path.exists(q):
            llama_quantize(path, q, type_name)
        llm = llama_cpp.Llama(q, n_ctx=n_prompt + n_gen + 8, n_threads=threads,
                              n_threads_batch=threads, n_batch=n_prompt, verbose=False)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, llm.n_vocab(), n_prompt)]
    best_pp, best_tg = 0.0, 0.0
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        best_pp = max(best_pp, n_prompt / (time.perf_counter() - t0))
        llm.reset()
        llm.eval(prompt[:1])
        t0 = time.perf_counter()
        for i in range(n_gen):
            llm.eval([prompt[i % n_prompt]])
        best_tg = max(best_tg, n_gen / (time.perf_counter() - t0))
    size = os.path.getsize(q)
    return {"engine": "llama.cpp", "type": type_name, "threads": threads, "pp": best_pp,
            "tg": best_tg, "weight_mb": size / 1e6, "gbps": best_tg * size / 1e9}


def write_synthetic(path: str, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=5632,
                    vocab=49152, seed=0) -> None:
    """A Llama-shaped F16 GGUF with random weights; every row a multiple of 256."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    w.add_file_type(1)
    # SmolLM2's byte-level BPE tokenizer (its vocabulary is 49152 too): both engines load it
    from luthier.loaders.gguf import GGUFFile

    with GGUFFile(smollm2_path()) as src:
        meta = src.metadata
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types([int(t) for t in meta["tokenizer.ggml.token_type"]])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def mat(n, k):
        return (rng.standard_normal((n, k), np.float32) * (1.0 / np.sqrt(k))).astype(np.float16)

    hd = hidden // heads
    w.add_tensor("token_embd.weight", mat(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "attn_q.weight", mat(heads * hd, hidden))
        w.add_tensor(p + "attn_k.weight", mat(kv_heads * hd, hidden))
        w.add_tensor(p + "attn_v.weight", mat(kv_heads * hd, hidden))
        w.add_tensor(p + "attn_output.weight", mat(hidden, heads * hd))
        w.add_tensor(p + "ffn_gate.weight", mat(ffn, hidden))
        w.add_tensor(p + "ffn_up.weight", mat(ffn, hidden))
        w.add_tensor(p + "ffn_down.weight", mat(hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def plot(records, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "tg", "decode tok/s"), (axes[1], "pp", "prefill tok/s")):
        labels = [f"{r['model']}\n{r['engine']} {r['type']}\n{r['threads']}t" for r in records]
        colors = ["tab:blue" if r["engine"] == "luthier" else "tab:gray" for r in records]
        ax.bar(range(len(records)), [r[key] for r in records], color=colors)
        ax.set_xticks(range(len(records)), labels, fontsize=6, rotation=90)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--synthetic", action="store_true", help="also the ~1B random Llama model")
    ap.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2 (with --synthetic)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--pairs", default=DEFAULT_PAIRS,
                    help=f"our BITSgGROUP (t: ternary) and llama.cpp types, e.g. 5g64:Q5_0,6g64:Q6_K "
                         f"(default {DEFAULT_PAIRS})")
    ap.add_argument("--probe", type=int, default=0, metavar="R",
                    help="luthier rows: R rounds of decode steps interleaved with a read-bandwidth probe")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    # (name, path, our head bits): SmolLM2 8 bits like llama.cpp's Q8_0 head; the synthetic
    # model 4-bit groups of 32 with zeros (5 bits), under llama.cpp's Q6_K (6.56 bits)
    name = os.path.basename(a.model).split(".")[0][:14] if a.model else "smollm2-135m"
    models = [] if a.no_smollm2 else [(name, a.model or str(smollm2_path()), 8)]
    tmp = tempfile.mkdtemp(prefix="luthier-e2e-")  # removed at the end (GB of GGUFs)
    if a.synthetic:
        syn = os.path.join(tmp, "synthetic-1b-f16.gguf")
        write_synthetic(syn)
        models.append(("synthetic-1b", syn, 4))
    print(f"# {cpu_name()}, commit {git_commit()}; command: python benchmarks/bench_e2e.py "
          + " ".join(argv or sys.argv[1:]))
    print(f"{'model':<14} {'engine':<9} {'type':<12} {'thr':>3} {'pp tok/s':>9} {'tg tok/s':>9} "
          f"{'MB/tok':>7} {'GB/s':>6}" + ("  %probe (rounds)" if a.probe else ""))
    records = []
    for name, path, head_bits in models:
        for bits, gs, ltypes in parse_pairs(a.pairs):
            runs = bench_luthier(path, bits, gs, threads, a.prompt, a.gen, head_bits, a.probe)
            if not a.no_llama:
                for lt in ltypes:
                    for t in threads:
                        r = bench_llama(path, lt, t, a.prompt, a.gen, tmp)
                        if r:
                            runs.append(r)
            for r in runs:
                r["model"] = name
                records.append(r)
                pr = (f" {100 * r['probe_ratio']:>5.0f}% of {r['probe_gbps']:.1f} GB/s "
                      f"({100 * r['probe_ratio_min']:.0f}-{100 * r['probe_ratio_max']:.0f}%)") if "probe_ratio" in r else ""
                print(f"{name:<14} {r['engine']:<9} {r['type']:<12} {r['threads']:>3} {r['pp']:>9.1f} "
                      f"{r['tg']:>9.1f} {r['weight_mb']:>7.1f} {r['gbps']:>6.2f}{pr}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    if a.plot:
        plot(records, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
