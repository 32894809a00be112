"""The `luthier` command line: run, chat, info, bench. Formats output; computes nothing."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _progress_bar():
    from tqdm import tqdm

    bar = {"b": None}

    def cb(i: int, total: int, what: str) -> None:
        if bar["b"] is None or bar["b"].total != total:
            if bar["b"] is not None:
                bar["b"].close()
            bar["b"] = tqdm(total=total, file=sys.stderr, leave=False, unit="tensor",
                            disable=not sys.stderr.isatty() and os.environ.get("LUTHIER_PROGRESS") != "1")
        bar["b"].n = i
        bar["b"].set_description(what.split(" ")[0])
        bar["b"].refresh()

    def close():
        if bar["b"] is not None:
            bar["b"].close()

    return cb, close


def _common(p: argparse.ArgumentParser) -> None:
    from .engine import parse_bits, parse_embd_bits

    p.add_argument("--bits", type=parse_bits, default="auto",
                   help="linear layer bits: 1-6, ternary (LUT kernels), 8 (int8), 16 (float); source: a GGUF's "
                        "quantized linears as stored (Q4_0-Q8_0, K-quants, TQ1_0/TQ2_0); auto (default): source "
                        "for such a GGUF, else 4")
    p.add_argument("--group-size", type=int, default=128, help="weights per scale along k")
    p.add_argument("--head-bits", type=parse_bits, default=8,
                   help="output head bits (8: int8 kernel; 1-6: LUT; 16: float)")
    p.add_argument("--embd-bits", type=parse_embd_bits, default=None,
                   help="token embedding bits: 8 (int8 rows; a tied int8 head's own table, stored "
                        "once) or 16 (as the source stores it); default 16 with --head-bits 16, else 8")
    p.add_argument("--symmetric", action="store_true", help="no zero points")
    p.add_argument("--mode", choices=["exact", "fast"], default="fast",
                   help="LUT tables: fast = int8 tables of float activations (default), "
                        "exact = exact int16 tables of int8 activations")
    p.add_argument("--threads", "-t", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache", choices=["f16", "f32"], default="f16",
                   help="KV cache type (f16: half the memory and attention reads; default)")


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--lookup", type=int, default=0, metavar="N",
                   help="prompt lookup decoding: draft up to N tokens from earlier text and check them in "
                        "one batched forward (same output; faster where the output repeats the input)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--grammar", default=None, help="the output must match this GBNF grammar (as llama.cpp's)")
    g.add_argument("--grammar-file", default=None, help="--grammar read from a file")
    g.add_argument("--json-schema", "-j", default=None,
                   help="the output must be JSON matching this schema (a JSON string; {} for any JSON object)")


def _load(a, n_seq: int = 1):
    from .engine import QuantConfig, load_model

    cfg = QuantConfig(bits=a.bits, group_size=a.group_size, head_bits=a.head_bits,
                      embd_bits=getattr(a, "embd_bits", None), mode=a.mode, symmetric=a.symmetric)
    cb, close = _progress_bar()
    try:
        lm = load_model(a.model, cfg, a.threads, a.ctx, progress=cb, n_seq=n_seq, kv=a.kv_cache)
    finally:
        close()
    from .qfile_cli import ignored_options_note

    note = ignored_options_note(a, lm)  # a quantized file keeps its own bits
    if note:
        print(note, file=sys.stderr)
    return lm


def _sampler(a, lm):
    from .grammar import GrammarSampler, from_request
    from .sample import Sampler

    s = Sampler(temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                repetition_penalty=a.repeat_penalty, seed=a.seed)
    grammar = a.grammar
    if a.grammar_file is not None:
        with open(a.grammar_file, encoding="utf-8") as f:
            grammar = f.read()
    schema = a.json_schema
    if schema is not None and schema.strip() in ("", "{}"):
        schema = '{"type": "object"}'
    spec = from_request({"grammar": grammar, "json_schema": schema})
    return s if spec is None else GrammarSampler(s, lm, spec)


def _print_stats(st, file=sys.stderr) -> None:
    cached = f" ({st.cached_tokens} cached)" if st.cached_tokens else ""
    # with lookup drafts a forward yields several tokens: weights per token no longer apply
    tail = (f"{st.accepted_tokens}/{st.draft_tokens} drafted tokens accepted" if st.draft_tokens
            else f"{st.decode_gbps:.2f} GB/s of weights")
    print(f"\n[prompt {st.prompt_tokens} tok{cached}, {st.prefill_tps:.1f} tok/s | "
          f"generated {st.completion_tokens} tok, {st.decode_tps:.1f} tok/s, {tail}]", file=file)


def _lookup(a):
    if not getattr(a, "lookup", 0):
        return None
    from .lookup import PromptLookupDecoding

    return PromptLookupDecoding(num_pred_tokens=a.lookup)


def cmd_run(a) -> int:
    from .generate import generate_stream

    rest = a.args
    if len(rest) == 1:
        a.model, prompt = None, rest[0]
    elif len(rest) == 2:
        a.model, prompt = rest
    else:
        print("usage: luthier run [MODEL] PROMPT", file=sys.stderr)
        return 2
    lm = _load(a)
    tok = lm.tokenizer
    if a.chat:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt)
    sampler = _sampler(a, lm)  # a bad --grammar fails before anything is printed
    sys.stdout.write("" if a.chat else prompt)
    for ch in generate_stream(lm, ids, a.max_tokens, sampler, stop=a.stop, ctx=a.ctx, lookup=_lookup(a)):
        sys.stdout.write(ch.text)
        sys.stdout.flush()
        if ch.finish_reason:
            sys.stdout.write("\n")
            if not a.quiet:
                _print_stats(ch.stats)
    return 0


def cmd_chat(a) -> int:
    from .generate import PromptCache, generate_stream

    lm = _load(a)
    kept = PromptCache()  # each turn feeds only what the conversation added since the last
    tok = lm.tokenizer
    messages = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    print("luthier chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = tok.encode_chat(messages)
        parts = []
        for ch in generate_stream(lm, ids, a.max_tokens, _sampler(a, lm), stop=a.stop, ctx=a.ctx,
                                  prompt_cache=kept, lookup=_lookup(a)):
            sys.stdout.write(ch.text)
            sys.stdout.flush()
            parts.append(ch.text)
            if ch.finish_reason and a.verbose:
                _print_stats(ch.stats)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(parts)})
    return 0


def cmd_info(a) -> int:
    from .engine import resolve_model_path
    from .loaders.gguf import GGUFFile

    path = resolve_model_path(a.model)
    if os.path.isdir(path):
        return _info_hf_folder(path)
    f = GGUFFile(path)
    print(f"file: {path}")
    print(f"architecture: {f.architecture}")
    for k, v in f.metadata.items():
        if isinstance(v, (list, tuple)) and len(v) > 8:
            v = f"[{len(v)} items]"
        elif isinstance(v, str) and len(v) > 80:
            v = v[:77].replace("\n", "\\n") + "..."
        print(f"  {k} = {v}")
    counts: dict[str, int] = {}
    for t in f.tensors.values():
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    print(f"tensors: {len(f.tensors)} (" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")")
    _info_source_codes(f)
    return 0


def _info_source_codes(f) -> None:
    """Which block linears `--bits source` would keep as they are (loaders/gguf_codes.py)."""
    from .loaders.gguf_codes import FLOAT_TYPE_NAMES, IMPORTABLE_TYPES, block_linears
    from .qfile import FORMAT_KEY

    if FORMAT_KEY in f.metadata:  # a luthier file runs as stored anyway
        return
    lin = block_linears(f.tensors)
    kept = [t for t in lin if t.ggml_type in IMPORTABLE_TYPES]
    if not lin or all(t.type_name in FLOAT_TYPE_NAMES for t in lin):
        return
    types = sorted({t.type_name for t in kept})
    print(f"--bits source: keeps {len(kept)} of {len(lin)} block linears as stored"
          + (f" ({', '.join(types)})" if types else "")
          + ("; the others are read as floats" if len(kept) < len(lin) else "")
          + "; other --bits requantize the dequantized weights")


def _info_hf_folder(path: str) -> int:
    from .loaders.hf_quant import quantization_config
    from .loaders.safetensors import HFFolder

    with HFFolder(path) as f:
        cfg = f.config
        print(f"folder: {path}")
        print(f"architecture: {cfg.get('model_type', '?')} ({', '.join(cfg.get('architectures') or [])})")
        for k, v in cfg.items():
            if not isinstance(v, (dict, list)):
                print(f"  {k} = {v}")
        q = quantization_config(cfg, path)
        print(f"quantization: {q.describe() if q else 'none (float weights; luthier quantizes them)'}")
        counts: dict[str, int] = {}
        for t in f.tensors.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
        print(f"tensors: {len(f.tensors)} (" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")")
    return 0


def cmd_bench(a) -> int:
    import numpy as np

    lm = _load(a)
    q = lm.quant  # a quantized file's own settings, else the options
    from . import kernels

    print(f"# {os.path.basename(lm.path)}  bits={q.bits} group={q.group_label} "
          f"head_bits={q.head_bits} mode={q.mode} threads={lm.n_threads} kernels={kernels.active_isa()}")
    print(f"# load {lm.load_seconds:.2f} s, quantize {lm.quantize_seconds:.2f} s, "
          f"linear weights {lm.linear_bytes / 1e6:.1f} MB")
    model = lm.model
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, lm.tokenizer.vocab_size, a.prompt_tokens)
    cache = model.new_cache(a.prompt_tokens + a.gen_tokens + 1)
    t0 = time.perf_counter()
    model.forward(prompt, cache, 0, last_only=True)
    pp = a.prompt_tokens / (time.perf_counter() - t0)
    cache2 = model.new_cache(a.gen_tokens + 2)
    model.forward(np.array([1]), cache2, 0)
    t0 = time.perf_counter()
    for i in range(a.gen_tokens):
        model.forward(np.array([int(prompt[i % len(prompt)])]), cache2, i + 1)
    tg = a.gen_tokens / (time.perf_counter() - t0)
    gbps = tg * lm.weight_bytes_per_token / 1e9
    print(f"pp{a.prompt_tokens}: {pp:.1f} tok/s   tg{a.gen_tokens}: {tg:.1f} tok/s   "
          f"({gbps:.2f} GB/s of weights)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="luthier", description="Low-bit LLM inference on CPUs by table lookup.")
    p.add_argument("--version", action="version", version=f"luthier {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="complete a prompt: luthier run [MODEL] PROMPT")
    r.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    r.add_argument("--quiet", "-q", action="store_true", help="no statistics line")
    _common(r)
    _sampling(r)
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    c.add_argument("model", nargs="?")
    c.add_argument("--system", default=None)
    c.add_argument("--verbose", "-v", action="store_true")
    _common(c)
    _sampling(c)
    c.set_defaults(fn=cmd_chat)

    i = sub.add_parser("info", help="metadata and tensors of a model file")
    i.add_argument("model", nargs="?")
    i.set_defaults(fn=cmd_info)

    b = sub.add_parser("bench", help="prefill and decode speed")
    b.add_argument("model", nargs="?")
    b.add_argument("--prompt-tokens", "-p", type=int, default=128)
    b.add_argument("--gen-tokens", "-g", type=int, default=128)
    _common(b)
    b.set_defaults(fn=cmd_bench)

    from .ppl import add_ppl_parser
    from .server import add_serve_parser

    add_serve_parser(sub)
    add_ppl_parser(sub)
    from .qfile_cli import add_qfile_parsers

    add_qfile_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (OSError, ValueError, TypeError) as e:  # OSError: FileNotFoundError, qfile.WriteError, ...
        print(f"luthier: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
