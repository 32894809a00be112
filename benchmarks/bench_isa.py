"""The LUT kernels of two or more ISAs on the same packed weights and tables, interleaved.

Cache-hot timings (the same matrix and tables again and again) of `kernels.lut_gemm` per
ISA, median of --rounds rounds that alternate the ISAs, so each ratio compares the kernels
at the same moment on a machine whose speed drifts. Fast tables, group 64 (2-bit, ternary)
or 128 (3-, 4-bit), zero points on.

    python benchmarks/bench_isa.py                                  # avx2 vs avx512
    python benchmarks/bench_isa.py --isas generic,avx2 --m 1,16 --bits 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import cpu_name, git_commit  # noqa: E402

from luthier import kernels  # noqa: E402
from luthier.quant import quantize_rtn, quantize_ternary  # noqa: E402

SHAPES = [(1536, 576), (576, 1536), (4096, 4096)]  # n x k: SmolLM2's FFN, a 7B square


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isas", default="avx2,avx512", help="first / last: the ratio column")
    ap.add_argument("--m", default="1,16,128")
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    isas = a.isas.split(",")
    have = kernels.available_isas()
    missing = [i for i in isas if i not in have]
    if missing:
        ap.error(f"not available on this CPU/build: {', '.join(missing)} (available: {', '.join(have)})")
    print(f"# {cpu_name()}, commit {git_commit()}, {a.threads} thread(s); command: python "
          + " ".join(sys.argv), flush=True)
    print("| n x k | bits | m | " + " | ".join(f"{i} us (GMAC/s)" for i in isas) + f" | {isas[0]} / {isas[-1]} |")
    print("|---|---|---|" + "---|" * (len(isas) + 1))
    rng = np.random.default_rng(0)
    recs = []
    for n, k in SHAPES:
        w = rng.standard_normal((n, k)).astype(np.float32)
        for b in a.bits.split(","):
            qt = quantize_ternary(w, 64) if b == "ternary" else quantize_rtn(w, int(b), 128 if int(b) >= 3 else 64, symmetric=False)
            pw = kernels.pack(qt)
            for m in (int(v) for v in a.m.split(",")):
                t = kernels.build_tables(rng.standard_normal((m, k)).astype(np.float32), pw.group_size, "fast")
                reps = max(3, int(2e6 / (n * k * m)))
                secs: dict[str, list[float]] = {i: [] for i in isas}
                for _ in range(a.rounds):
                    for i in isas:
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            kernels.lut_gemm(t, pw, n_threads=a.threads, isa=i)
                        secs[i].append((time.perf_counter() - t0) / reps)
                us = {i: float(np.median(v)) * 1e6 for i, v in secs.items()}
                gmac = {i: n * k * m / (us[i] * 1e3) for i in isas}
                print(f"| {n} x {k} | {b} | {m} | " + " | ".join(f"{us[i]:.1f} ({gmac[i]:.0f})" for i in isas)
                      + f" | {us[isas[0]] / us[isas[-1]]:.2f} |", flush=True)
                recs.append({"n": n, "k": k, "bits": b, "m": m, "threads": a.threads, "us": us})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"commit": git_commit(), "cpu": cpu_name(), "records": recs}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
