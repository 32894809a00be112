"""The report side of bench_ppl.py: the markdown table, llama.cpp's size/quality curve
(its Pareto front, interpolated in log-perplexity), and the perplexity-vs-bits chart."""

from __future__ import annotations

import math
import os
import platform
import sys
import time

from bench_kernels import cpu_name


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def llama_frontier(rows: list[dict]) -> list[tuple[float, float]]:
    """llama.cpp's size/quality curve: the files its quantizer made from the float source
    (not F16, not llama:SOURCE, the published file itself), Pareto-optimal points (no other
    point has fewer bits and lower perplexity), sorted by bits per weight."""
    pts = sorted((r["bpw"], r["ppl"]) for r in rows if r["engine"] == "llama"
                 and r["config"] not in ("llama:F16", "llama:SOURCE") and math.isfinite(r["ppl"]))
    front: list[tuple[float, float]] = []
    for b, p in pts:
        if not front or p < front[-1][1]:
            front.append((b, p))
    return front


def curve_at(front: list[tuple[float, float]], bpw: float) -> float | None:
    """The curve's perplexity at `bpw`: log-linear between neighbours; None outside it."""
    if not front or bpw < front[0][0] or bpw > front[-1][0]:
        return None
    for (b0, p0), (b1, p1) in zip(front, front[1:]):
        if b0 <= bpw <= b1:
            t = 0.0 if b1 == b0 else (bpw - b0) / (b1 - b0)
            return math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0)))
    return front[-1][1]


def is_float(r: dict) -> bool:
    return r["method"] == "float" or r["config"] == "llama:F16"


def fmt_ppl(p: float) -> str:
    if not math.isfinite(p):
        return str(p)
    return f"{p:,.0f}" if p >= 1000 else f"{p:.2f}"


def markdown(rows: list[dict]) -> str:
    out = []
    for tag in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == tag]
        front = llama_frontier(rs)
        out.append(f"\n**{tag}** ({rs[0]['chunks']} chunks of {rs[0]['ctx']} tokens)\n")
        out.append("| engine | weights | PPL | bits/weight (blocks) | file MB | quantize CPU s | block types | "
                   "llama.cpp curve at these bits |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in sorted(rs, key=lambda r: (r["engine"] != "llama", -r["bpw"], r["ppl"])):
            types = ", ".join(f"{k} x{v}" for k, v in sorted(r["types"].items(), key=lambda kv: -kv[1]))
            qs, cpu = r.get("quant_seconds"), r.get("quant_cpu_seconds")
            if is_float(r):
                qs_s = "-"
            elif cpu is not None:
                qs_s = f"{cpu:.1f}"
            else:
                qs_s = "-" if qs is None else f"{qs:.0f} (wall)"
            ccpu = r.get("calib_cpu_seconds") or r.get("calib_seconds")
            if ccpu:
                qs_s += f" (+{ccpu:.0f} imatrix)"
            cmp = "-"
            if r["engine"] == "luthier" and not is_float(r):
                c = curve_at(front, r["bpw"])
                if c is not None:
                    cmp = f"{fmt_ppl(c)} ({'above' if r['ppl'] > c else 'below'}, x{r['ppl'] / c:.2f})"
                else:
                    cmp = "outside"
            fb = f"{'~' if r.get('file_bytes_estimated') else ''}{r['file_bytes'] / 1e6:.1f}"
            out.append(f"| {r['engine']} | {r['label']} | {fmt_ppl(r['ppl'])} | {r['bpw']:.3f} | {fb} | {qs_s} | "
                       f"{types} | {cmp} |")
    return "\n".join(out)


def plot(rows: list[dict], path: str, max_ppl: float | None = None) -> None:
    """Perplexity against bits per weight, one panel per model; points above max_ppl are
    left out (their count is in the title) so that the interesting range stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(tags), figsize=(9 * len(tags), 6.5), squeeze=False)
    markers = {"rtn": "o", "gptq": "s", "awq": "^", "awq+gptq": "v", "mixed": "D", "awq+mixed": "P", "-": "o", "imatrix": "*"}
    for ax, tag in zip(axes[0], tags):
        rs = [r for r in rows if r["model"] == tag and math.isfinite(r["ppl"])]
        hidden = [r for r in rs if max_ppl is not None and r["ppl"] > max_ppl]
        rs = [r for r in rs if r not in hidden]
        for engine, color in (("llama", "tab:red"), ("luthier", "tab:blue")):
            pts = [r for r in rs if r["engine"] == engine and not is_float(r)]
            if not pts:
                continue
            if engine == "llama":
                front = llama_frontier(rs)
                ax.plot([b for b, _ in front], [p for _, p in front], "-", color=color, alpha=0.5)
            for m in dict.fromkeys(r["method"] for r in pts):
                sel = [r for r in pts if r["method"] == m]
                name = "llama.cpp" if engine == "llama" else "luthier"
                lab = f"{name}" + (f" ({m})" if m not in ("-",) else "")
                ax.scatter([r["bpw"] for r in sel], [r["ppl"] for r in sel], color=color,
                           marker=markers.get(m, "o"), label=lab, zorder=3)
            offsets = {"rtn": (5, 3), "gptq": (5, -10), "awq": (-60, 3), "awq+gptq": (-70, -10), "mixed": (5, 3)}
            for r in pts:
                ax.annotate(r["label"].split(" (")[0], (r["bpw"], r["ppl"]), textcoords="offset points",
                            xytext=offsets.get(r["method"], (4, 4)), fontsize=7, color=color)
        for r in rs:
            if is_float(r):
                ax.axhline(r["ppl"], color="tab:red" if r["engine"] == "llama" else "tab:blue", ls="--", lw=0.8,
                           alpha=0.6, label=f"{'llama.cpp F16' if r['engine'] == 'llama' else 'luthier float'}"
                                            f" {r['ppl']:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight of the block linears (all bytes, scales included)")
        ax.set_ylabel("perplexity (WikiText-2 test, log scale)")
        c = rs[0]
        ax.set_title(f"{tag}: {c['chunks']} chunks x {c['ctx']} tokens"
                     + (f" ({len(hidden)} points above PPL {max_ppl:g} not shown)" if hidden else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}"
