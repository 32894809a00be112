"""LUT matmul kernel benchmark: microseconds, GB/s of packed bytes, % of read bandwidth.

Decode (m = 1) is measured out of cache by cycling through enough distinct copies of the
packed weight to exceed the last-level cache several times over; cache-hot figures (the
same matrix again and again) are reported apart. Baselines in the same run: numpy float32
matmul (BLAS) and our own dequantize-then-multiply path (numpy dequantize + BLAS).

    python benchmarks/bench_kernels.py                 # full sweep (~15 min on 2 cores)
    python benchmarks/bench_kernels.py --quick         # the 4096x14336 decode targets only
    python benchmarks/bench_kernels.py --json out.json

%bw of the cold rows is PAIRED: --rounds times, one read of the probe's 1 GiB buffer and
then ~0.1 s of the kernel, back to back; the column is the median of the per-round ratios
(kernel GB/s / probe GB/s), with their spread in the JSON. On a shared VM the read
bandwidth itself drifts by 20-30% within minutes, so a ratio to a probe taken at another
moment (the header's best-of-5) says more about the drift than about the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from luthier import _core, kernels
from luthier.quant import QTensor

SHAPES = {  # n x k
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)],
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-8b-ffn": [(4096, 14336)],
}


def llc_bytes() -> int:
    """The last-level cache size from sysfs (the largest cache cpu0 sees), else 32 MiB."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for d in os.listdir(base) if os.path.isdir(base) else []:
        try:
            txt = open(os.path.join(base, d, "size")).read().strip()  # e.g. "266240K"
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        best = max(best, int(txt.rstrip("KMG")) * mult)
    return best or 32 << 20


LLC_BYTES = llc_bytes()
COLD_FACTOR = 4  # cycle through >= 4x the LLC


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def timeit(fn, min_time: float = 0.25, min_reps: int = 5) -> float:
    """Median seconds per call over batches of calls lasting >= min_time in total."""
    fn()  # warm up (pool threads, page faults)
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) > 2000:
            break
    return float(np.median(times))


_PROBE_BUF: list[np.ndarray] = []


def probe_once(threads: int, size: int = 1 << 30) -> float:
    """GB/s of one read of a 1 GiB buffer (allocated once), wide loads, 8 accumulators."""
    if not _PROBE_BUF or _PROBE_BUF[0].size != size:
        _PROBE_BUF[:] = [np.ones(size, np.uint8)]
    t0 = time.perf_counter()
    _core.read_probe(_PROBE_BUF[0], threads)
    return size / (time.perf_counter() - t0) / 1e9


def probe_bandwidth(threads: int, size: int = 1 << 30) -> float:
    """GB/s reading a 1 GiB buffer (best of 5)."""
    probe_once(threads, size)  # page faults
    return max(probe_once(threads, size) for _ in range(5))


def paired(fn, nbytes: int, threads: int, rounds: int) -> dict:
    """rounds x (one probe read, then ~0.1 s of fn): the median seconds per call, the
    median probe GB/s and the median, min and max of the per-round bandwidth ratios."""
    secs, probes, ratios = [], [], []
    for _ in range(rounds):
        bw = probe_once(threads)
        sec = timeit(fn, min_time=0.1, min_reps=5)
        secs.append(sec)
        probes.append(bw)
        ratios.append(nbytes / sec / 1e9 / bw)
    return {"sec": float(np.median(secs)), "probe": float(np.median(probes)),
            "ratio": float(np.median(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def random_qtensor(n: int, k: int, bits: int | str, group_size: int, rng) -> QTensor:
    ternary = bits == "ternary"
    b = 2 if ternary else int(bits)
    gs = k if ternary else group_size
    hi = 3 if ternary else 1 << b
    codes = rng.integers(0, hi, size=(n, k), dtype=np.uint8)
    g = -(-k // gs)
    scales = (rng.random((n, g), np.float32) * 0.02 + 0.001).astype(np.float16)
    if ternary:
        scales[:] = scales[0, 0]
    return QTensor(codes, scales, None, b, gs, ternary=ternary)


def bench_one(n, k, bits, gs, m, threads, mode, rng, baselines, bw, rounds=7):
    qt = random_qtensor(n, k, bits, gs, rng)
    pw = kernels.pack(qt)
    nbytes = pw.nbytes
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = np.empty((m, n), np.float32)
    recs = []
    # cold: distinct copies whose total exceeds the LLC several times
    copies = max(2, -(-COLD_FACTOR * LLC_BYTES // nbytes))
    pws = [pw] + [
        kernels.PackedWeight(pw.n, pw.k, pw.bits, pw.group_size, pw.ternary, pw.w.copy(),
                             pw.s.copy(), None, pw.zero_const)
        for _ in range(copies - 1)
    ]
    state = {"i": 0}

    def cold():
        p = pws[state["i"] % copies]
        state["i"] += 1
        kernels.lut_linear(x, p, mode, threads, out=y)

    def hot():
        kernels.lut_linear(x, pw, mode, threads, out=y)

    for cache, fn in (("cold", cold), ("hot", hot)):
        pair = None
        if cache == "cold" and rounds > 0:
            pair = paired(fn, nbytes, threads, rounds)
            sec = pair["sec"]
        else:
            sec = timeit(fn, min_time=0.3 if m == 1 else 0.5, min_reps=3 if m > 1 else 10)
        gbps = nbytes / sec / 1e9
        key = (n, k, m, threads)
        rec = {
            "m": m, "n": n, "k": k, "bits": bits, "group_size": qt.group_size,
            "threads": threads, "cache": cache, "mode": mode, "us": sec * 1e6,
            "us_per_token": sec * 1e6 / m, "gbps": gbps,
            "bw_frac": pair["ratio"] if pair else gbps / bw[threads],
            "packed_bytes": nbytes,
        }
        if pair:
            rec.update(paired_probe_gbps=pair["probe"], bw_frac_min=pair["ratio_min"],
                       bw_frac_max=pair["ratio_max"], rounds=rounds)
        if key in baselines:
            rec["speedup_numpy_f32"] = baselines[key]["numpy_f32"] / sec
            rec["speedup_dequant"] = baselines[key]["dequant"] / sec
        recs.append(rec)
    return recs, qt


def baseline(n, k, m, qt, rng):
    """numpy float32 matmul and our dequantize-then-multiply, seconds (BLAS threads as set)."""
    w = qt.dequantize()
    x = rng.standard_normal((m, k)).astype(np.float32)
    f32 = timeit(lambda: x @ w.T, min_time=0.2, min_reps=3)
    deq = timeit(lambda: x @ qt.dequantize().T, min_time=0.2, min_reps=2)
    return {"numpy_f32": f32, "dequant": deq}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2,llama2-7b,llama3-8b-ffn")
    ap.add_argument("--bits", default="1,2,3,4,ternary")
    ap.add_argument("--m", default="1,8,128")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--modes", default="exact,fast")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="4096x14336, m=1, the decode targets")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--rounds", type=int, default=7,
                    help="cold rows: probe/kernel pairs for %%bw (0: ratio to the header's probe)")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    if a.quick:
        a.shapes, a.m = "llama3-8b-ffn", "1"
    shapes = [s for name in a.shapes.split(",") for s in SHAPES[name]]
    bits_list = [b if b == "ternary" else int(b) for b in a.bits.split(",")]
    ms = [int(v) for v in a.m.split(",")]
    threads_list = [int(v) for v in a.threads.split(",")]
    modes = a.modes.split(",")
    rng = np.random.default_rng(0)

    bw = {t: probe_bandwidth(t) for t in threads_list}
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cpus; isa={kernels.active_isa()}; "
          f"commit {git_commit()}")
    print("# read bandwidth probe (1 GiB, wide loads, best of 5): "
          + ", ".join(f"{t} thread(s) {bw[t]:.1f} GB/s" for t in threads_list)
          + (f"; cold %bw paired with the probe over {a.rounds} rounds (median)" if a.rounds else ""))
    print("# command: python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])))
    hdr = f"{'n x k':>12} {'m':>4} {'bits':>7} {'gs':>5} {'thr':>3} {'mode':>5} {'cache':>5} " \
          f"{'us':>10} {'us/tok':>8} {'GB/s':>6} {'%bw':>5} {'xF32':>6} {'xDeq':>6}"
    print(hdr)
    records = []
    baselines: dict = {}
    for (n, k) in shapes:
        for m in ms:
            for threads in threads_list:
                for bits in bits_list:
                    for mode in modes:
                        recs, qt = bench_one(n, k, bits, a.group_size, m, threads, mode, rng,
                                             baselines, bw, a.rounds)
                        key = (n, k, m, threads)
                        if not a.no_baselines and key not in baselines:
                            baselines[key] = baseline(n, k, m, qt, rng)
                            for r in recs:
                                r["speedup_numpy_f32"] = baselines[key]["numpy_f32"] / (r["us"] / 1e6)
                                r["speedup_dequant"] = baselines[key]["dequant"] / (r["us"] / 1e6)
                        for r in recs:
                            records.append(r)
                            print(f"{n:>5}x{k:<6} {m:>4} {str(bits):>7} {r['group_size']:>5} "
                                  f"{threads:>3} {mode:>5} {r['cache']:>5} {r['us']:>10.1f} "
                                  f"{r['us_per_token']:>8.1f} {r['gbps']:>6.1f} "
                                  f"{100 * r['bw_frac']:>4.0f}% "
                                  f"{r.get('speedup_numpy_f32', float('nan')):>6.2f} "
                                  f"{r.get('speedup_dequant', float('nan')):>6.2f}"
                                  + (f"  %bw {100 * r['bw_frac_min']:.0f}-{100 * r['bw_frac_max']:.0f} "
                                     f"(probe {r['paired_probe_gbps']:.1f})" if "bw_frac_min" in r else ""),
                                  flush=True)
    if a.json:
        meta = {"cpu": cpu_name(), "isa": kernels.active_isa(), "commit": git_commit()}
        for r in records:
            r.update(meta, probe_gbps=bw[r["threads"]])
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
