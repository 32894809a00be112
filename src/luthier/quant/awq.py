"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration"): scale each input channel of a linear layer by s before quantizing,
w' = w * s, and fold 1/s into the operation that produces the input, so the float model
is unchanged and the salient channels (large mean |x|) get a finer effective grid.

Per block, on calibration activations (inputs computed by the already-quantized blocks
before it, as in calibration.py), four groups of linears sharing an input get one scale
vector each, s = x_mean^alpha (or AutoAWQ's "duo" x_mean^alpha / w_mean^(1-alpha)),
normalized by sqrt(max s * min s), with alpha searched on a grid (0, 1/20, ..., 19/20)
for the smallest output error of the quantized, scaled layers:

  q/k/v     input attn_norm(x)       1/s folded into the attn_norm weight vector
  o         input attention output   1/s folded into v's rows (GQA: one scale per kv head
                                     channel, shared by the query heads that read it)
  gate/up   input ffn_norm(x)        1/s folded into the ffn_norm weight vector
  down      input act(gate) * up     1/s folded into up's rows

The output error of a quantized weight Wq on inputs X is ||X (W - Wq)^T||^2 =
tr(E H E^T), E = W - Wq, H = X^T X: every search runs on the Hessian of the inputs, never
on stored activations. alpha = 0 is plain round-to-nearest, so the chosen scales never
do worse than RTN on that measure. Scales are searched on the block's float activations
(AutoAWQ's choice: all four inputs in one float pass; on the first 8 calibration sequences,
and the loss over at most 512 rows of a group, which keeps the search a fraction of the
whole), then the block is quantized group by
group, each on its actual inputs (through the folded norms and the quantized layers
before it): by RTN after AWQ's weight clipping search (per row and group, the clip ratio
of max |w| in 1, 0.95, ..., 0.55 with the smallest output error of the group's own inputs,
i.e. H's diagonal block; not for q and k, as AutoAWQ), or by GPTQ ("awq+gptq").
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np

from .calibration import (
    DEFAULT_N_SAMPLES,
    DEFAULT_SEQ_LEN,
    CalibOptions,
    HessianAccumulator,
    Progress,
    QuantizeGroup,
    _CalibLinear,
    calibration_factory,
    check_calib_bits,
    gptq_group_quantizer,
    sequential_quantize,
)
from .gptq import DEFAULT_BLOCK_SIZE, DEFAULT_PERCDAMP
from .qtensor import QTensor
from .rtn import quantize_rtn
from .ternary import quantize_ternary

DEFAULT_GRID = 20
DEFAULT_MAX_ROWS = 512  # rows of a group's weights the scale search's loss sums over
DEFAULT_SEARCH_SAMPLES = 8  # calibration sequences the scale search's statistics come from
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5  # ratios 1 - i/20 for i < 10, as AutoAWQ's auto_clip
NO_CLIP = ("attn_q", "attn_k")  # their errors meet in q.k; AutoAWQ does not clip them either

# w [n, k] -> its quantized weights, dequantized [n, k]
Dequant = Callable[[np.ndarray], np.ndarray]
GroupFit = Callable[[int], "int | None"]
# (linear's tensor name, k) -> (bits, group size) it is quantized with
LayerQuant = Callable[[str, int], "tuple[int | str, int | None]"]


def quantizer(bits: int | str, group_size: int | None, symmetric: bool = False) -> Callable[[np.ndarray], QTensor]:
    """Round-to-nearest (or absmean ternary) at fixed bits and group size."""
    if bits == "ternary":
        return lambda w: quantize_ternary(w, group_size)
    return lambda w: quantize_rtn(w, int(bits), group_size or w.shape[1], symmetric)


def fake_quantizer(bits: int | str, group_size: int | None, symmetric: bool = False) -> Dequant:
    """w [n, k] -> quantizer(...)(w).dequantize(), fused for the searches' many calls:
    quantize_rtn's arithmetic (fp16 scales and zeros) without building a QTensor. Falls
    back to the QTensor path where the fused one does not apply (ternary, 1 bit, groups
    that do not divide k)."""
    q = quantizer(bits, group_size, symmetric)
    if bits == "ternary" or int(bits) < 2:
        return lambda w: q(w).dequantize()
    maxq = (1 << int(bits)) - 1

    def dq(w: np.ndarray) -> np.ndarray:
        n, k = w.shape
        gs = group_size or k
        if k % gs:
            return q(w).dequantize()
        wg = w.reshape(n, k // gs, gs)  # [n, k] -> [n, G, gs]
        if symmetric:
            s = _f16_scale(np.abs(wg).max(-1) * 2.0 / maxq)[..., None]  # [n, G, 1]
            z = np.float32(1 << (int(bits) - 1))
            c = np.clip(np.rint(wg / s + z), 0, maxq)
        else:
            lo = np.minimum(wg.min(-1), 0.0)
            hi = np.maximum(wg.max(-1), 0.0)
            s = _f16_scale((hi - lo) / maxq)
            z = np.clip(np.rint(-lo / s), 0, maxq).astype(np.float16).astype(np.float32)[..., None]
            s = s[..., None]  # [n, G] -> [n, G, 1]
            c = np.clip(np.rint(wg / s) + z, 0, maxq)
        return (s * (c - z)).reshape(n, k)  # [n, G, gs] -> [n, k]

    return dq


def _f16_scale(s: np.ndarray) -> np.ndarray:
    """quant.rtn's fp16 rounding of scales (floored), back in float32."""
    s16 = s.astype(np.float16)
    return np.where(np.abs(s16) < np.float16(6.1e-5), np.float16(6.1e-5), s16).astype(np.float32)


def output_error(e: np.ndarray, h: np.ndarray) -> float:
    """tr(E H E^T): the squared output error on the inputs whose Hessian is h."""
    return float(np.einsum("ij,ij->", e @ h, e))  # [n, k] @ [k, k] -> [n, k]


def _tied_mean(v: np.ndarray, tie: np.ndarray | None) -> np.ndarray:
    """v [k] averaged over the channels that share a scale: [number of scales]."""
    if tie is None:
        return v
    return np.bincount(tie, weights=v) / np.maximum(np.bincount(tie), 1)


def row_subset(n: int, max_rows: int | None) -> np.ndarray | None:
    """The fixed random subset (sorted indices) of n stacked rows that the scale search's
    loss sums over, or None for all of them."""
    if not max_rows or n <= max_rows:
        return None
    return np.sort(np.random.default_rng(0).choice(n, max_rows, replace=False))


def search_scale(
    w: np.ndarray,
    h: np.ndarray,
    x_mean: np.ndarray,
    dequant: Dequant,
    grid: int = DEFAULT_GRID,
    tie: np.ndarray | None = None,
    group_size: int | None = None,
    duo: bool = True,
    max_rows: int | None = DEFAULT_MAX_ROWS,
) -> tuple[np.ndarray, dict]:
    """AWQ's scale search for the linears stacked in w [n, k] that share inputs with
    Hessian h [k, k] and mean |x| x_mean [k]. tie [k] (optional): the scale index of each
    input channel (channels with one index get one scale, e.g. o's input channels read
    from one v row). Returns (scales [number of scales], {"alpha", "duo", "loss", "loss_rtn"}),
    the loss being tr(E H E^T) of the scaled, quantized weights. max_rows: the loss is
    summed over at most this many rows (a fixed random subset; every row is quantized on
    its own, so the subset's loss estimates the whole one at a fraction of the cost)."""
    w = np.asarray(w, np.float32)
    h32 = np.asarray(h, np.float32)
    n, k = w.shape
    rows = row_subset(n, max_rows)
    if rows is not None:
        w = w[rows]  # [max_rows, k]
        n = max_rows
    xm = np.maximum(_tied_mean(np.asarray(x_mean, np.float64), tie), 0.0)
    families = [("x", None)]
    if duo:
        # AutoAWQ's w_mean: |w| relative to its group's max, averaged over the output rows
        gs = group_size if group_size and k % group_size == 0 else k
        wa = np.abs(w).reshape(n, k // gs, gs)  # [n, k] -> [n, G, gs]
        wn = (wa / (wa.max(-1, keepdims=True) + 1e-6)).reshape(n, k)  # [n, G, gs] -> [n, k]
        families.append(("duo", _tied_mean(wn.mean(0).astype(np.float64), tie)))
    best = (np.inf, None, 0.0, False)
    loss_rtn = None
    for fam, wm in families:
        for i in range(grid):
            alpha = i / grid
            if fam == "x":
                s = np.maximum(xm**alpha, 1e-4)
            else:  # at alpha 0 this still scales by 1/w_mean: a point of its own
                s = np.maximum(xm**alpha / (wm ** (1.0 - alpha) + 1e-4), 1e-4)
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
            sf = s[tie] if tie is not None else s  # [k]
            e = w - dequant(w * sf) / sf
            loss = output_error(e, h32)
            if fam == "x" and i == 0:
                loss_rtn = loss
            if loss < best[0]:
                best = (loss, s, alpha, fam == "duo")
    loss, s, alpha, is_duo = best
    return s, {"alpha": alpha, "duo": is_duo, "loss": loss, "loss_rtn": loss_rtn}


def search_clip(
    w: np.ndarray,
    h: np.ndarray,
    dequant: Dequant,
    group_size: int,
    grid: int = CLIP_GRID,
    max_shrink: float = CLIP_MAX_SHRINK,
) -> np.ndarray:
    """AWQ's weight clipping: per row and group, clip w to +-r max|w| with the ratio r
    (1, 1 - 1/grid, ...) whose quantized weights give the smallest output error on the
    group's own inputs (the diagonal block of h). Returns the clipped w [n, k]."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    gs = group_size if group_size and k % group_size == 0 else k
    g = k // gs
    h32 = np.asarray(h, np.float32)
    hb = np.stack([h32[j * gs : (j + 1) * gs, j * gs : (j + 1) * gs] for j in range(g)])  # [G, gs, gs]
    wg = w.reshape(n, g, gs)  # [n, k] -> [n, G, gs]
    mx = np.abs(wg).max(-1, keepdims=True)  # [n, G, 1]
    best_err = np.full((n, g), np.inf, np.float32)
    best_r = np.ones((n, g), np.float32)
    for i in range(int(max_shrink * grid)):
        r = np.float32(1.0 - i / grid)
        c = np.clip(wg, -mx * r, mx * r)
        e = (wg - dequant(c.reshape(n, k)).reshape(n, g, gs)).transpose(1, 0, 2)  # [n, k] -> [G, n, gs]
        err = (np.matmul(e, hb) * e).sum(-1).T  # [G, n, gs] @ [G, gs, gs] -> [G, n] -> [n, G]
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_r = np.where(better, r, best_r)
    lim = mx * best_r[..., None]  # [n, G, 1]
    return np.clip(wg, -lim, lim).reshape(n, k)  # [n, G, gs] -> [n, k]


# ------------------------------------------------------------------------------ folding
BLOCK_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_ATTR = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
         "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}


def o_tie(args: Any) -> np.ndarray:
    """int [n_heads * head_dim]: the v row (kv head, channel) that o's input column
    (query head, channel) reads, as attention() maps query head h to kv head h // g."""
    hd, g = args.head_dim, args.n_heads // args.n_kv_heads
    heads = np.arange(args.n_heads * hd) // hd  # [nq]
    return (heads // g) * hd + np.arange(args.n_heads * hd) % hd


def fold_block(t: dict[str, np.ndarray], scales: dict[str, np.ndarray], tie: np.ndarray) -> dict[str, np.ndarray]:
    """Fold AWQ scales into one block's float tensors t: "attn_norm", "ffn_norm" (the
    effective norm vectors), the linears by BLOCK_LINEARS name [n, k], optional "bv".
    scales: "qkv" [dim], "o" [n_kv * head_dim] (expanded by tie), "ffn" [dim], "down" [ffn]
    (any subset). Returns new tensors computing the same function."""
    out = dict(t)
    if "qkv" in scales:
        s = scales["qkv"]
        out["attn_norm"] = out["attn_norm"] / s
        for name in ("attn_q", "attn_k", "attn_v"):
            out[name] = out[name] * s[None, :]
    if "o" in scales:
        s = scales["o"]
        out["attn_v"] = out["attn_v"] / s[:, None]  # v's outputs, hence o's inputs, divided
        if out.get("bv") is not None:
            out["bv"] = out["bv"] / s
        out["attn_output"] = out["attn_output"] * s[tie][None, :]
    if "ffn" in scales:
        s = scales["ffn"]
        out["ffn_norm"] = out["ffn_norm"] / s
        for name in ("ffn_gate", "ffn_up"):
            out[name] = out[name] * s[None, :]
    if "down" in scales:
        s = scales["down"]
        out["ffn_up"] = out["ffn_up"] / s[:, None]  # act(gate) * up is linear in up
        out["ffn_down"] = out["ffn_down"] * s[None, :]
    return {k: (v.astype(np.float32) if v is not None else None) for k, v in out.items()}


def fold_into_weights(args: Any, weights: dict[str, np.ndarray], block_scales: dict[int, dict[str, np.ndarray]]) -> dict:
    """A copy of GGUF-named float weights with AWQ scales folded in, block by block
    (block_scales: {block: fold_block's scales}); the model they define is unchanged."""
    out = dict(weights)
    off = np.float32(args.norm_weight_offset)
    tie = o_tie(args)
    for i, scales in block_scales.items():
        p = f"blk.{i}."
        t = {name: np.asarray(weights[p + name + ".weight"], np.float32) for name in BLOCK_LINEARS}
        t["attn_norm"] = np.asarray(weights[p + "attn_norm.weight"], np.float32) + off
        t["ffn_norm"] = np.asarray(weights[p + "ffn_norm.weight"], np.float32) + off
        t["bv"] = weights.get(p + "attn_v.bias")
        f = fold_block(t, scales, tie)
        for name in BLOCK_LINEARS:
            out[p + name + ".weight"] = f[name]
        out[p + "attn_norm.weight"] = f["attn_norm"] - off
        out[p + "ffn_norm.weight"] = f["ffn_norm"] - off
        if f["bv"] is not None:
            out[p + "attn_v.bias"] = f["bv"]
    return out


# ------------------------------------------------------------------------ calibration
class _Capture:
    """Hessian and mean |x| of one linear's inputs, while it runs in float."""

    def __init__(self, w: np.ndarray, record: bool):
        self.wt = np.ascontiguousarray(np.asarray(w, np.float32).T)  # [n, k] -> [k, n]
        self.acc = HessianAccumulator(w.shape[1]) if record else None
        self.abs_sum = np.zeros(w.shape[1], np.float64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.acc is not None:
            self.acc.add(x)
            self.abs_sum += np.abs(x).sum(0)
        return x @ self.wt  # [m, k] @ [k, n] -> [m, n]

    @property
    def x_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.acc.count, 1)


class AWQBlockHook:
    """sequential_quantize's block_hook: AWQ's scale search on the block's float
    activations, folded into the block's calibration linears and norm vectors."""

    def __init__(self, args: Any, fit: GroupFit, bits: int | str, symmetric: bool, grid: int = DEFAULT_GRID,
                 duo: bool = True, search_samples: int | None = DEFAULT_SEARCH_SAMPLES,
                 layer_quant: LayerQuant | None = None):
        self.args, self.fit, self.bits, self.symmetric = args, fit, bits, symmetric
        # (bits, group size) of each linear by name; mixed precision gives each its own
        self.layer_quant = layer_quant or (lambda name, k: (bits, fit(k)))
        self.grid, self.duo, self.search_samples = grid, duo, search_samples
        self.tie = o_tie(args)
        self.scales: dict[int, dict[str, np.ndarray]] = {}
        self.search: dict[str, dict] = {}

    def __call__(self, i: int, layer: Any, run: Callable[[Any, int], np.ndarray], n_samples: int) -> None:
        lins: dict[str, _CalibLinear] = {name: getattr(layer, _ATTR[name]) for name in BLOCK_LINEARS}
        inputs = {"qkv": "attn_q", "o": "attn_output", "ffn": "ffn_gate", "down": "ffn_down"}
        flt = copy.copy(layer)  # the same block with float linears that record their inputs
        caps = {}
        for name, lin in lins.items():
            caps[name] = _Capture(lin.w, record=name in inputs.values())
            setattr(flt, _ATTR[name], caps[name])
        for s in range(min(n_samples, self.search_samples or n_samples)):
            run(flt, s)
        members = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",),
                   "ffn": ("ffn_gate", "ffn_up"), "down": ("ffn_down",)}
        scales = {}
        for key, names in members.items():
            cap = caps[inputs[key]]
            w = np.concatenate([lins[n].w for n in names])  # rows sharing the input: [sum n, k]
            k = w.shape[1]
            quants = [self.layer_quant(f"blk.{i}.{n}.weight", k) for n in names]
            if len(set(quants)) == 1:
                dequant = fake_quantizer(*quants[0], self.symmetric)
            else:  # members at their own bits: the search's row subset taken here, split by member
                sub = row_subset(w.shape[0], DEFAULT_MAX_ROWS)
                ends = np.cumsum([lins[n].w.shape[0] for n in names])
                if sub is not None:
                    w = w[sub]  # sorted, so the members stay contiguous: [max_rows, k]
                    ends = np.searchsorted(sub, ends)
                dequant = self._dequant(quants, ends)
            s, info = search_scale(w, cap.acc.hessian, cap.x_mean, dequant,
                                   self.grid, self.tie if key == "o" else None, quants[0][1], self.duo)
            scales[key] = s
            self.search[f"blk.{i}.{key}"] = info
        t = {name: lin.w for name, lin in lins.items()}
        t.update(attn_norm=layer.attn_norm, ffn_norm=layer.ffn_norm, bv=layer.bv)
        f = fold_block(t, scales, self.tie)
        for name, lin in lins.items():
            lin.w = f[name]
        layer.attn_norm, layer.ffn_norm, layer.bv = f["attn_norm"], f["ffn_norm"], f["bv"]
        self.scales[i] = scales

    def _dequant(self, quants: list[tuple[int | str, int | None]], ends: np.ndarray) -> Dequant:
        """The fake quantizer of linears stacked by rows (member j: rows [ends[j-1], ends[j])),
        each at its own (bits, group size); rows are quantized independently."""
        parts = [fake_quantizer(b, g, self.symmetric) for b, g in quants]

        def dq(w: np.ndarray) -> np.ndarray:
            if w.shape[0] != ends[-1]:
                raise ValueError(f"expected {ends[-1]} stacked rows, got {w.shape[0]}")
            return np.concatenate([f(p) for f, p in zip(parts, np.split(w, ends[:-1]), strict=True) if len(p)])

        return dq


def rtn_clip_group_quantizer(bits: int | str, fit: GroupFit, symmetric: bool, clip: bool = True) -> QuantizeGroup:
    """quantize_group for AWQ + RTN: each layer clipped (AWQ's clipping search, not q/k)
    on its actual inputs' Hessian, then rounded to nearest."""

    def quantize_group(group: list[_CalibLinear], acc: HessianAccumulator) -> list[QTensor]:
        h = acc.hessian.astype(np.float32)
        out = []
        for lin in group:
            gs = fit(lin.w.shape[1])
            q = quantizer(bits, gs, symmetric)
            w = lin.w
            if clip and lin.name.split(".")[2] not in NO_CLIP:
                w = search_clip(w, h, fake_quantizer(bits, gs, symmetric), gs or w.shape[1])
            out.append(q(w))
        return out

    return quantize_group


def awq_model_layers(
    model: Any,
    tokens: np.ndarray,
    bits: int | str,
    group_size: GroupFit,
    symmetric: bool = False,
    *,
    grid: int = DEFAULT_GRID,
    duo: bool = True,
    clip: bool = True,
    use_gptq: bool = False,
    search_samples: int | None = DEFAULT_SEARCH_SAMPLES,
    act_order: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    progress: Progress | None = None,
) -> tuple[dict[str, QTensor], dict[int, dict[str, np.ndarray]], dict]:
    """AWQ of every block linear of `model` (built with calibration_factory; its norm
    vectors and v biases are modified in place: the scales are folded into them), then RTN
    (with clipping) or GPTQ. Returns ({name: QTensor}, {block: scales}, stats)."""
    hook = AWQBlockHook(model.args, group_size, bits, symmetric, grid, duo, search_samples)
    if use_gptq:
        qg = gptq_group_quantizer(bits, group_size, symmetric, act_order, block_size, percdamp)
    else:
        qg = rtn_clip_group_quantizer(bits, group_size, symmetric, clip)
    qts, stats = sequential_quantize(model, tokens, qg, progress, block_hook=hook,
                                     label="awq+gptq" if use_gptq else "awq")
    gains = [v["loss"] / v["loss_rtn"] for v in hook.search.values() if v["loss_rtn"] > 0]
    stats.update(search=hook.search, mean_loss_over_rtn=float(np.mean(gains)) if gains else 1.0)
    return qts, hook.scales, stats


def quantize_model_awq(
    path: str | None,
    bits: int | str,
    group_size: int,
    calib_file: str,
    n_samples: int = DEFAULT_N_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    *,
    grid: int = DEFAULT_GRID,
    duo: bool = True,
    clip: bool = True,
    use_gptq: bool = False,
    search_samples: int | None = DEFAULT_SEARCH_SAMPLES,
    **options: Any,
):
    """Load a float model, AWQ-scale and quantize its block linears (RTN with clipping, or
    GPTQ when use_gptq) on `calib_file`, and return an engine.LoadedModel running them on
    the LUT kernels, the scales folded into its norm vectors and v/up rows (no run-time
    cost). Same shape as calibration.quantize_model_gptq (options: CalibOptions' fields);
    lm.extra["awq"] holds the stats, lm.extra["weights"] the float weights with the folded
    norms."""
    from .. import engine
    from ..models import Transformer

    o = CalibOptions(n_samples=n_samples, seq_len=seq_len, **options)
    check_calib_bits(bits, "AWQ")
    path, args, weights, tok, meta, tokens, load_s = o.load(path, calib_file)
    calib_model = Transformer(args, weights, calibration_factory())
    fit = lambda k: engine._fit_group(k, group_size) if group_size else None  # noqa: E731
    qts, scales, stats = awq_model_layers(calib_model, tokens, bits, fit, o.symmetric, grid=grid, duo=duo, clip=clip,
                                          use_gptq=use_gptq, search_samples=search_samples,
                                          act_order=o.act_order, block_size=o.block_size,
                                          percdamp=o.percdamp, progress=o.progress)
    del calib_model
    folded = fold_into_weights(args, weights, scales)  # the norms and v biases the QTensors expect
    lm = o.build(path, args, folded, tok, meta, qts, bits, group_size, load_s, stats,
                 method="awq+gptq" if use_gptq else "awq", calib_file=calib_file, grid=grid, duo=duo,
                 clip=clip and not use_gptq, search_samples=search_samples)
    lm.extra.update(awq=stats, awq_scales=scales)
    return lm
