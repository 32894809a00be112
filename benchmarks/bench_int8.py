"""int8 kernel benchmark (output heads, 8-bit embeddings and linears): microseconds, us per
row and GMAC/s of `_core.int8_linear` on int8 panels (csrc/int8_gemm.h), next to numpy
float32 matmul (BLAS) of the same shape. The head of a decode step at m = 1 and of a
batched (server) step at m = 4 / 16.

    python benchmarks/bench_int8.py                      # SmolLM2's head, 49152 x 576
    python benchmarks/bench_int8.py --shapes 262144x640  # Gemma 3's
    python benchmarks/bench_int8.py --json out.json

The weights are random codes; the same matrix is used again and again, so at m = 1 part of
it may be served from the last-level cache (a real decode step reads the other layers in
between): m = 1 is an upper bound here, m >= 4 is compute-bound and representative.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import cpu_name, git_commit, timeit  # noqa: E402

from luthier import _core, kernels  # noqa: E402
from luthier.int8 import q8_panels  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="49152x576", help="comma list of NxK")
    ap.add_argument("--m", default="1,4,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cpus; isa={kernels.active_isa()}; commit {git_commit()}")
    print("# command: python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])))
    print(f"{'n x k':>14} {'m':>4} {'thr':>3} {'us':>10} {'us/row':>9} {'GMAC/s':>7} {'xF32':>6}")
    records = []
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        codes = rng.integers(-127, 128, (n, -(-k // 32) * 32), dtype=np.int8)
        scales = (rng.random((n, codes.shape[1] // 32), dtype=np.float32) * 0.01).astype(np.float16).view(np.uint16)
        wp, sp = q8_panels(codes, scales)
        wf = rng.standard_normal((k, n)).astype(np.float32)  # the float32 baseline's w.T
        for m in (int(v) for v in a.m.split(",")):
            x = rng.standard_normal((m, k)).astype(np.float32)
            y = np.empty((m, n), np.float32)
            for threads in (int(v) for v in a.threads.split(",")):
                s = timeit(lambda: _core.int8_linear(wp, sp, n, k, x, y, None, 1e-6, threads, ""))
                f32 = timeit(lambda: x @ wf)  # BLAS uses its own thread count
                r = dict(n=n, k=k, m=m, threads=threads, us=s * 1e6, us_per_row=s * 1e6 / m,
                         gmacs=m * n * k / s / 1e9, speedup_numpy_f32=f32 / s)
                records.append(r)
                print(f"{n:>6}x{k:<7} {m:>4} {threads:>3} {r['us']:>10.1f} {r['us_per_row']:>9.1f} "
                      f"{r['gmacs']:>7.1f} {r['speedup_numpy_f32']:>6.2f}", flush=True)
    if a.json:
        meta = {"cpu": cpu_name(), "isa": kernels.active_isa(), "commit": git_commit()}
        with open(a.json, "w") as f:
            json.dump([dict(r, **meta) for r in records], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
