"""Perplexity with exactly the definition of llama.cpp's perplexity tool (tools/perplexity),
so that luthier's numbers and llama.cpp's compare directly; DEFINITION below states it
(it is also the `luthier ppl --help` text).

The log-softmax is computed here in float64 (llama.cpp sums exp in double from float
logits); the difference is far below the statistical error.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .qfile import METHODS, MIXED_METHODS
from .quant.calibration import check_calib_bits

DEFINITION = """\
1. Tokenize the whole text once, as llama.cpp does (common_tokenize(ctx, text, true)):
   BOS first when the model's tokenizer adds BOS; special-token text is not parsed;
   tokenizers that add EOS are refused.
2. Split the tokens into n = len(tokens) // ctx non-overlapping chunks of ctx tokens (a
   trailing remainder is dropped; at least 2 * ctx tokens are required); --chunks N
   keeps the first min(N, n).
3. Evaluate each chunk from an empty KV cache at positions 0..ctx-1; when the model
   adds BOS, the chunk's first input token is replaced by BOS (targets are unchanged).
4. Score only the second half of each chunk: with first = ctx // 2, the logits at
   positions j = first .. ctx-2 score the token at j + 1, i.e. ctx - 1 - first tokens
   per chunk (255 at ctx 512).
5. PPL = exp(mean NLL) over all scored tokens of all chunks, NLL = -log softmax(logits)[target];
   the +/- printed is llama.cpp's: sqrt(var(NLL) / (count - 1)) * PPL."""

# rows of logits converted to float64 at a time: bounds the memory of the log-softmax
_LSE_ROWS = 64


@dataclass
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, nats
    n_tokens: int  # scored tokens: n_chunks * (ctx - 1 - ctx // 2)
    n_chunks: int
    seconds: float
    stderr: float = 0.0  # llama.cpp's "+/-": sqrt(var(NLL) / (n_tokens - 1)) * ppl
    ctx: int = 0
    chunk_ppl: list[float] = field(default_factory=list)  # running PPL after each chunk


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] in float64; logits [t, vocab], targets [t] -> [t]."""
    t = logits.shape[0]
    out = np.empty(t, np.float64)
    for r0 in range(0, t, _LSE_ROWS):
        r1 = min(t, r0 + _LSE_ROWS)
        x = logits[r0:r1].astype(np.float64)  # [rows, vocab]
        mx = x.max(axis=1)  # [rows]
        lse = mx + np.log(np.exp(x - mx[:, None]).sum(axis=1))
        out[r0:r1] = lse - x[np.arange(r1 - r0), targets[r0:r1]]
    return out


def tokenize_like_llama_cpp(tokenizer: Any, text: str) -> tuple[list[int], bool, int | None]:
    """(tokens, add_bos, bos_id): the text tokenized with the model's special tokens
    (BOS when it adds BOS), special-token text not parsed, no EOS."""
    add_bos = bool(getattr(tokenizer, "add_bos", False))
    if getattr(tokenizer, "add_eos", False):
        # llama.cpp asserts !add_eos: an EOS at the end of the whole text is meaningless here
        raise ValueError("perplexity needs a tokenizer that does not add EOS")
    ids = tokenizer.encode(text, add_bos=add_bos, special=False, add_eos=False)
    return list(ids), add_bos, getattr(tokenizer, "bos_id", None)


def perplexity(
    lm: Any,
    text: str,
    ctx: int = 512,
    max_chunks: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    model: Any = None,
) -> PerplexityResult:
    """Perplexity of `text` under `lm` (a LoadedModel, or anything with `.model` and
    `.tokenizer`) with llama.cpp's definition (module docstring).

    model: the forward to use (`forward(tokens, cache, 0)` -> logits [m, vocab] and
    `new_cache(n)`); default lm.model. progress(done, total, ppl_so_far) after each chunk.
    """
    if ctx < 4:
        raise ValueError(f"ctx must be at least 4, got {ctx}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"max_chunks must be positive, got {max_chunks}")
    model = model if model is not None else lm.model
    tokens, add_bos, bos_id = tokenize_like_llama_cpp(lm.tokenizer, text)
    if len(tokens) < 2 * ctx:
        raise ValueError(
            f"perplexity with ctx={ctx} needs at least {2 * ctx} tokens; the text has {len(tokens)}"
        )
    if add_bos and bos_id is None:
        raise ValueError("the tokenizer adds BOS but has no BOS id")
    toks = np.asarray(tokens, dtype=np.int64)
    n_chunks = len(toks) // ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    first = ctx // 2
    t0 = time.perf_counter()
    nll_sum = nll2_sum = 0.0
    count = 0
    chunk_ppl: list[float] = []
    for c in range(n_chunks):
        chunk = toks[c * ctx : (c + 1) * ctx].copy()  # [ctx]
        if add_bos:
            chunk[0] = bos_id  # input only: the targets below are the original tokens
        cache = model.new_cache(ctx)  # an empty KV cache per chunk
        logits = model.forward(chunk, cache, 0)  # [ctx, vocab]
        if logits.shape[0] != ctx:
            raise ValueError(f"model returned {logits.shape[0]} rows of logits for {ctx} tokens")
        # logits at j = first .. ctx-2 score token j + 1 (a target of this chunk)
        targets = toks[c * ctx + first + 1 : (c + 1) * ctx]  # [ctx - 1 - first]
        v = token_nll(logits[first : ctx - 1], targets)
        if not np.all(np.isfinite(v)):
            raise FloatingPointError(f"non-finite log-likelihood in chunk {c + 1}")
        nll_sum += float(v.sum())
        nll2_sum += float((v * v).sum())
        count += v.size
        chunk_ppl.append(math.exp(nll_sum / count))
        if progress:
            progress(c + 1, n_chunks, chunk_ppl[-1])
    nll = nll_sum / count
    ppl = math.exp(nll)
    var = nll2_sum / count - nll * nll
    stderr = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return PerplexityResult(ppl, nll, count, n_chunks, time.perf_counter() - t0, stderr, ctx, chunk_ppl)


# ----------------------------------------------------------------------------- command line

_HELP = "perplexity of a text file, with llama.cpp's definition"


def add_ppl_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `luthier ppl [MODEL] --text FILE [--ctx 512] [--chunks N]` to `subparsers`."""
    from .cli import _common

    p = subparsers.add_parser(
        "ppl",
        help=_HELP,
        description=f"Perplexity of a text file. Definition (llama.cpp's perplexity tool):\n\n{DEFINITION}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help="GGUF file or Hugging Face folder (default: SmolLM2-135M)")
    p.add_argument("--text", "-f", required=True, help="text file to evaluate (e.g. wikitext-2 test)")
    p.add_argument("--chunks", type=int, default=None, help="evaluate only the first N chunks")
    p.add_argument("--method", choices=list(METHODS), default="rtn",
                   help="quantizer of the linear layers: rtn; gptq (--bits 1-6 or ternary: "
                        "error feedback); awq (activation-aware scales folded into the norms, "
                        "then RTN with clipping); awq+gptq; mixed (bits per layer from measured "
                        "sensitivity under --bpw-budget, GPTQ); awq+mixed (AWQ's scales at each "
                        "layer's chosen bits, then mixed). All but rtn need --calib")
    p.add_argument("--calib", default=None, help="calibration text file (GPTQ, AWQ, mixed)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="calibration sequences (default 32)")
    p.add_argument("--calib-len", type=int, default=None,
                   help="tokens per calibration sequence (default 512)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: columns in order of decreasing H_ii (default on: W4 g128 on SmolLM2, "
                        "WikiText-2 PPL 37.2 without, 34.0 with)")
    p.add_argument("--percdamp", type=float, default=None,
                   help="GPTQ damping, a fraction of mean(diag H) (default 0.05)")
    p.add_argument("--awq-grid", type=int, default=None, help="AWQ: alphas searched (default 20)")
    p.add_argument("--no-awq-clip", action="store_true", help="AWQ: no weight clipping search")
    p.add_argument("--no-awq-duo", action="store_true",
                   help="AWQ: search only s = mean|x|^alpha (not also AutoAWQ's x/w ratio)")
    p.add_argument("--bpw-budget", type=float, default=None,
                   help="mixed: average bits per weight of the block linears, scales and zeros "
                        "counted (e.g. 3.0)")
    p.add_argument("--mixed-bits", default="auto",
                   help="mixed: candidates, bits at --group-size or BITSgGROUP (e.g. 3g128,4g128,4g64,4g32); "
                        "auto (default): bits 2-6 at groups 128/64/32 within -1.25/+1.0 bits/weight of the budget")
    p.add_argument("--mixed-rtn", action="store_true",
                   help="mixed: round-to-nearest at the chosen bits instead of GPTQ")
    p.add_argument("--backend", choices=["auto", "native", "numpy"], default="auto",
                   help="forward used: native (C++ runtime), numpy (BLAS); auto = numpy when "
                        "a linear layer is float (the native float path is slow at prefill)")
    _common(p)
    for act in p._actions:  # the shared --ctx means the window here, default 512 like llama.cpp
        if act.dest == "ctx":
            act.default = 512
            act.help = "tokens per chunk (llama.cpp's -c; default 512)"
        if act.dest == "head_bits":  # --bits 16 alone evaluates the source model unquantized
            act.default = None
            act.help = "output head bits (default: 8 or 16 as --bits when it is 8 or 16, else 8)"
    p.set_defaults(fn=cmd_ppl)
    return p


def _uses_float_linear(lm: Any) -> bool:
    from .engine import FloatLinear

    return any(isinstance(l, FloatLinear) for l in lm.extra.get("linears", []))


def quantize_calibrated(a: argparse.Namespace, progress: Callable[[int, int, str], None] | None = None):
    """The LoadedModel of a calibrated --method (gptq, awq, awq+gptq, mixed) from parsed
    arguments, and a one-line summary of the quantization."""
    from .engine import AUTO, AUTO_FLOAT_BITS, resolve_model_path
    from .quant.calibration import DEFAULT_N_SAMPLES, DEFAULT_SEQ_LEN
    from .quant.gptq import DEFAULT_PERCDAMP

    if not a.calib:
        raise ValueError(f"--method {a.method} needs --calib FILE (calibration text)")
    path = resolve_model_path(a.model)
    common = dict(n_samples=a.calib_samples or DEFAULT_N_SAMPLES, seq_len=a.calib_len or DEFAULT_SEQ_LEN,
                  head_bits=a.head_bits, embd_bits=getattr(a, "embd_bits", None), symmetric=a.symmetric,
                  mode=a.mode, n_threads=a.threads, ctx=a.ctx,
                  act_order=a.act_order, percdamp=a.percdamp if a.percdamp is not None else DEFAULT_PERCDAMP,
                  native=getattr(a, "backend", "auto") != "numpy", progress=progress)
    if a.method in MIXED_METHODS:
        from .quant.mixed import parse_candidates, quantize_model_mixed

        if a.bpw_budget is None:
            raise ValueError(f"--method {a.method} needs --bpw-budget (average bits per weight, e.g. 3.0)")
        cand = parse_candidates(a.mixed_bits, a.bpw_budget, a.symmetric)
        lm = quantize_model_mixed(path, a.bpw_budget, a.group_size, a.calib, candidate_bits=cand,
                                  use_gptq=not a.mixed_rtn, awq=a.method == "awq+mixed", **common)
        m = lm.extra["mixed"]
        counts = ", ".join(f"{n} at {b} bits" if isinstance(b, int) else f"{n} at {b}"
                           for b, n in m["counts"].items())
        return lm, (f"{a.method}: {m['layers']} layers, {m['bpw']:.4f} bits/weight (budget {m['budget']}): {counts}; "
                    f"{m['seconds']:.1f} s (sensitivity {m['sensitivity_seconds']:.1f} s)")
    if a.bits == AUTO:  # the calibrated methods requantize: auto is their default width
        a.bits = AUTO_FLOAT_BITS
    check_calib_bits(a.bits, f"--method {a.method}")  # before loading, named as the user wrote it
    if a.method == "gptq":
        from .quant.calibration import quantize_model_gptq

        lm = quantize_model_gptq(path, a.bits, a.group_size, a.calib, **common)
        g = lm.extra["gptq"]
    else:
        from .quant.awq import DEFAULT_GRID, quantize_model_awq

        lm = quantize_model_awq(path, a.bits, a.group_size, a.calib, grid=a.awq_grid or DEFAULT_GRID,
                                duo=not a.no_awq_duo, clip=not a.no_awq_clip, use_gptq=a.method == "awq+gptq",
                                **common)
        g = lm.extra["awq"]
    return lm, (f"{a.method}: {g['layers']} layers in {g['seconds']:.1f} s "
                f"({g['calib_tokens']} calibration tokens)")


def cmd_ppl(a: argparse.Namespace) -> int:
    from .cli import _load, _progress_bar
    from .engine import FLOAT_BITS, QuantConfig

    if a.head_bits is None:  # a float model keeps a float head; else the engine's default
        a.head_bits = a.bits if a.bits in FLOAT_BITS else QuantConfig().head_bits
    try:
        with open(a.text, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise FileNotFoundError(f"cannot read --text {a.text}: {e.strerror or e}") from None
    if a.method != "rtn":
        cb, close = _progress_bar()
        try:
            lm, summary = quantize_calibrated(a, cb)
        finally:
            close()
        print(summary, file=sys.stderr)
    else:
        lm = _load(a)
    model = lm.model
    use_numpy = a.backend == "numpy" or (a.backend == "auto" and _uses_float_linear(lm))
    if use_numpy:
        model = lm.extra["reference"]
    q = lm.quant  # what the model holds: a quantized file's own settings, not the options
    method = lm.extra.get("method") or a.method
    print(f"ppl: {lm.path}  bits={q.bits} group={q.group_label} head_bits={q.head_bits} "
          f"method={method} ctx={a.ctx} backend={'numpy' if use_numpy else 'native'}", file=sys.stderr)

    def progress(done: int, total: int, ppl: float) -> None:
        # llama.cpp's running output: [chunk]ppl,
        print(f"[{done}]{ppl:.4f},", end="\n" if done == total else "", flush=True, file=sys.stderr)

    r = perplexity(lm, text, ctx=a.ctx, max_chunks=a.chunks, progress=progress, model=model)
    print(f"{r.n_chunks} chunks of {r.ctx} tokens, {r.n_tokens} scored tokens, "
          f"{r.seconds:.1f} s ({r.n_chunks * r.ctx / r.seconds:.1f} tok/s)", file=sys.stderr)
    print(f"PPL = {r.ppl:.4f} +/- {r.stderr:.5f}")
    return 0
