"""`luthier quantize` and `luthier convert`: the command-line side of qfile.py."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from .qfile import METHODS, convert_to_file, quantize_to_file

_QUANTIZE_HELP = """\
Quantize once into one file (GGUF container) that every other command loads memory-mapped
as stored: luthier run OUT.gguf "prompt". Given such a file, commands ignore --bits,
--group-size, --head-bits and --symmetric (with a note); --mode and --threads apply."""

_CONVERT_HELP = """\
Write a GGUF model dequantized as an f16/f32 GGUF llama.cpp reads (its metadata and tensor
names; 1-D tensors stay f32), so both engines quantize from the same float weights. GGUF
sources only: for a Hugging Face folder use llama.cpp's convert_hf_to_gguf.py."""


def add_qfile_parsers(sub: Any) -> None:
    """Add `luthier quantize` and `luthier convert` to the CLI's subparsers."""
    from .engine import parse_bits, parse_embd_bits

    raw = argparse.RawDescriptionHelpFormatter
    q = sub.add_parser("quantize", help="write a quantized model file (loads in well under a second)",
                       description=_QUANTIZE_HELP, formatter_class=raw)
    q.add_argument("model", nargs="?", help="GGUF file or Hugging Face folder (default: SmolLM2-135M)")
    c = sub.add_parser("convert", help="write a GGUF model as an f16/f32 GGUF for llama.cpp",
                       description=_CONVERT_HELP, formatter_class=raw)
    c.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M)")
    c.add_argument("--to", choices=["f16", "f32"], default="f16", help="float type of the output (default f16)")
    for p in (q, c):
        p.add_argument("-o", "--output", required=True, help="output file (OUT.gguf)")
        p.add_argument("--force", "-f", action="store_true", help="overwrite an existing output file")
    q.add_argument("--bits", type=parse_bits, default=4, help="linear layer bits: 1-6, ternary (LUT kernels), 8 (int8), 16 (float), "
                   "or source: a GGUF's quantized linears as stored")
    q.add_argument("--group-size", type=int, default=128, help="weights per scale along k")
    q.add_argument("--head-bits", type=parse_bits, default=8, help="output head bits (8: int8 kernel)")
    q.add_argument("--embd-bits", type=parse_embd_bits, default=None,
                   help="token embedding bits: 8 (int8 rows; a tied int8 head's table, stored once) or 16 "
                        "(as the source stores it); default 16 with --head-bits 16, else 8")
    q.add_argument("--symmetric", action="store_true", help="no zero points")
    q.add_argument("--mode", choices=["exact", "fast"], default="fast",
                   help="LUT table mode recorded in the file (a runtime choice: --mode when running wins)")
    q.add_argument("--method", choices=list(METHODS), default="rtn",
                   help="rtn: round to nearest; gptq, awq, awq+gptq: calibrated on --calib text; mixed: "
                        "bits (and group size) per layer under --bpw-budget, GPTQ; awq+mixed: AWQ's scales first")
    q.add_argument("--calib", default=None, help="calibration text file (gptq, awq, mixed)")
    q.add_argument("--calib-samples", type=int, default=None, help="GPTQ calibration sequences (default 32)")
    q.add_argument("--calib-len", type=int, default=None, help="tokens per calibration sequence (default 512)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: columns in order of decreasing H_ii (default on: W4 g128 on SmolLM2, "
                        "WikiText-2 PPL 37.2 without, 34.0 with)")
    q.add_argument("--percdamp", type=float, default=None, help="GPTQ damping, a fraction of mean(diag H) (default 0.05)")
    q.add_argument("--bpw-budget", type=float, default=None,
                   help="mixed: average bits per weight of the block linears, scales and zeros counted (e.g. 4.2)")
    q.add_argument("--mixed-bits", default="auto",
                   help="mixed: candidates, bits at --group-size or BITSgGROUP (e.g. 3g128,4g128,4g64,4g32); "
                        "auto (default): bits 2-6 at groups 128/64/32 within -1.25/+1.0 bits/weight of the budget")
    q.set_defaults(fn=cmd_quantize)
    c.set_defaults(fn=cmd_convert)


def _with_progress_bar(fn: Callable[..., dict], *args: Any) -> dict:
    from .cli import _progress_bar

    cb, close = _progress_bar()
    try:
        return fn(*args, progress=cb)
    finally:
        close()


def cmd_quantize(a: argparse.Namespace) -> int:
    from .engine import SOURCE, QuantConfig
    from .quant.calibration import DEFAULT_N_SAMPLES, DEFAULT_SEQ_LEN
    from .quant.gptq import DEFAULT_PERCDAMP

    cfg = QuantConfig(bits=a.bits, group_size=a.group_size, head_bits=a.head_bits, embd_bits=a.embd_bits,
                      mode=a.mode, symmetric=a.symmetric)
    calib = dict(file=a.calib, samples=a.calib_samples or DEFAULT_N_SAMPLES, len=a.calib_len or DEFAULT_SEQ_LEN,
                 act_order=a.act_order, percdamp=DEFAULT_PERCDAMP if a.percdamp is None else a.percdamp,
                 budget=a.bpw_budget, candidates=a.mixed_bits)
    if a.method == "rtn" and a.calib:
        print("note: --calib is used by the calibrated methods only (gptq, awq, mixed)", file=sys.stderr)
    st = _with_progress_bar(quantize_to_file, a.model, a.output, cfg, a.method, calib, a.force)
    how = "source codes" if a.bits == SOURCE else a.method
    print(f"wrote {st['path']}: {st['file_bytes'] / 1e6:.1f} MB; block linears {st['block_bytes'] / 1e6:.1f} MB "
          f"= {st['bits_per_weight']:.3f} bits/weight; {how} {st['quantize_seconds']:.1f} s, "
          f"total {st['seconds']:.1f} s", file=sys.stderr)
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    st = _with_progress_bar(convert_to_file, a.model, a.output, a.to, a.force)
    print(f"wrote {st['path']}: {st['file_bytes'] / 1e6:.1f} MB ({a.to}) in {st['seconds']:.1f} s", file=sys.stderr)
    return 0


def ignored_options_note(a: argparse.Namespace, lm: Any) -> str | None:
    """The note a command prints when it loaded a luthier file but was given quantization
    options (ones that differ from both the defaults and the file's; the file wins)."""
    from .engine import AUTO, QuantConfig

    if lm.extra.get("qfile") is None:
        return None
    d, q = QuantConfig(), lm.quant
    given = [f"--{attr.replace('_', '-')}" for attr in ("bits", "group_size", "head_bits", "embd_bits", "symmetric")
             if getattr(a, attr, None) not in (None, AUTO, getattr(d, attr), getattr(q, attr))]
    return (f"note: {lm.path} is a quantized luthier file (bits {q.bits}, group {q.group_label}, head "
            f"{q.head_bits}, {lm.extra.get('method')}): {', '.join(given)} ignored") if given else None
