"""Error of the LUT table modes on real layer activations, next to the quantization error.

Runs float SmolLM2 over WikiText-2 text, captures the input of every linear layer, and for
each layer compares (relative Frobenius norms over the captured tokens):
  quant = ||x W_q^T - x W^T||      the weight quantization error itself
  exact = ||LUT_exact(x) - x W_q^T||  int8 activations per group, exact int16 tables
  fast  = ||LUT_fast(x)  - x W_q^T||  int8 tables of float activations

    python benchmarks/bench_table_modes.py [--tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import cpu_name, git_commit  # noqa: E402

from luthier import kernels  # noqa: E402
from luthier.engine import QuantConfig, _fit_group, load_model  # noqa: E402
from luthier.quant import quantize_rtn, quantize_ternary  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext2_test.txt")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--text", default=DATA)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    captured: dict[str, list] = {}

    def capture_factory(name, w):
        wf = np.ascontiguousarray(w, np.float32)
        captured[name] = [wf, None]

        def lin(x):
            captured[name][1] = x.copy()
            return x @ wf.T

        return lin

    lm = load_model(None, QuantConfig(bits=16, head_bits=16), n_threads=2, native=False)
    from luthier.models import Transformer

    ref = lm.extra["reference"]
    from luthier.loaders.gguf import GGUFFile

    f = GGUFFile(lm.path)
    weights = {n: f.load_float(n) for n in f.tensors}
    model = Transformer(ref.args, weights, capture_factory)
    text = open(a.text, encoding="utf-8").read()[:20000]
    ids = lm.tokenizer.encode(text)[: a.tokens]
    model.forward(np.asarray(ids), model.new_cache(len(ids) + 1), 0)

    configs = [(4, 128), (2, 64), ("ternary", 64)]
    print(f"# {cpu_name()}, commit {git_commit()}; SmolLM2-135M, {len(ids)} WikiText-2 tokens; "
          "errors relative to ||x W^T||, summed over all linear layers")
    print(f"{'weights':<14} {'quant err':>10} {'exact err':>10} {'fast err':>10} "
          f"{'exact/quant':>12} {'fast/quant':>11}")
    rows = []
    for bits, gs in configs:
        tot = {"ref": 0.0, "quant": 0.0, "exact": 0.0, "fast": 0.0}
        for name, (w, x) in captured.items():
            if x is None:
                continue
            g = _fit_group(w.shape[1], gs)
            qt = quantize_ternary(w, g) if bits == "ternary" else quantize_rtn(w, bits, g, symmetric=False)
            pw = kernels.pack(qt)
            y = x @ w.T
            yq = x @ qt.dequantize().T
            tot["ref"] += float((y**2).sum())
            tot["quant"] += float(((yq - y) ** 2).sum())
            for mode in ("exact", "fast"):
                yl = kernels.lut_linear(np.ascontiguousarray(x, np.float32), pw, mode, n_threads=2)
                tot[mode] += float(((yl - yq) ** 2).sum())
        r = {k: float(np.sqrt(v / tot["ref"])) for k, v in tot.items() if k != "ref"}
        r["weights"] = (f"ternary-g{gs}" if bits == "ternary" else f"{bits}b-g{gs}")
        rows.append(r)
        print(f"{r['weights']:<14} {r['quant']:>10.4f} {r['exact']:>10.4f} {r['fast']:>10.4f} "
              f"{r['exact'] / r['quant']:>12.3f} {r['fast'] / r['quant']:>11.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
