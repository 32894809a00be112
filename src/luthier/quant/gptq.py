"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a weight [n, k] column by column, feeding each
column's rounding error forward into the columns not yet quantized so that the layer's
output error ||X W^T - X Wq^T|| stays small, not the weight error.

With H = 2/N X^T X (X the layer's calibration inputs [N, k]) the error of column j,
err = (w_j - q_j) / [H^-1]_jj, is spread over the later columns by the row j of the upper
Cholesky factor of H^-1 (the inverse Hessian of the remaining columns, all at once).
As in the paper's reference implementation:
- damping: H += percdamp * mean(diag H) * I (5% by default, see DEFAULT_PERCDAMP); dead
  inputs (H_jj = 0): H_jj = 1, w_j = 0;
- lazy batch updates: error feedback inside a block of 128 columns, then one GEMM to the
  columns after the block;
- act-order (optional): columns in order of decreasing H_jj, with "static groups": every
  group's scale/zero is computed up front on the original column order, so the QTensor
  keeps contiguous groups along k and the codes are stored in the original order.
Without act-order, a group's scale/zero is chosen when its first column is reached, from
the weights as updated by every earlier column (exactly, also across lazy blocks).
The grid is round-to-nearest's (quant.rtn) over a range shrunk per row and group to the
one of 12 candidates (100% down to 78% of min/max) that rounds the group with the least
error weighted by diag(H) (the reference's `Quantizer(mse=True)` searches the same way with
an unweighted norm): SmolLM2 W4 g128 perplexity 34.87 -> 34.13 (GPTQ), 33.58 -> 33.34
(AWQ+GPTQ), both at 1% damping; fp16-rounded scales/zeros, and codes computed against
those fp16 values, so QTensor.dequantize() returns exactly what was committed.
bits="ternary": the grid is BitNet b1.58's (quant.ternary): codes {-1, 0, +1} times an
absmean scale per group (from the group's weights as updated when it is reached), or one
scale per tensor (group_size None: mean|w| of the original weights); the column loop and
its error feedback are unchanged.
numpy only: float64 for H and the Cholesky factors, float32 for the activations.
"""

from __future__ import annotations

import numpy as np

from .qtensor import SUPPORTED_BITS, QTensor, check_group_size, default_zero
from .rtn import _to_f16_scale, quantize_rtn

DEFAULT_BLOCK_SIZE = 128
# H += 5% of mean(diag H) on the diagonal: GPTQModel's default (the paper's code used 1%).
# With 32 x 512 tokens of calibration text, 1% lets GPTQ fit that text's activations
# closely; the extra damping pulls the updates towards what holds for other text:
# SmolLM2 W4 g128 AWQ+GPTQ, WikiText-2 perplexity 33.34 at 1%, 31.84 at 5% (benchmarks/README.md).
DEFAULT_PERCDAMP = 0.05


class HessianAccumulator:
    """H = 2/N X^T X over every row x [k] given to add(), accumulated without storing X.

    X^T X is summed in float64 from float32 products of each batch (a batch's sums are
    over at most its rows). The 2/N scale does not change GPTQ's result (the damping is
    relative to mean(diag H)); it keeps H's size independent of the sample count.
    """

    def __init__(self, k: int):
        self.k = int(k)
        self.xtx = np.zeros((self.k, self.k), np.float64)
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.k)  # [..., k] -> [rows, k]
        self.xtx += x.T @ x  # [k, rows] @ [rows, k] -> [k, k]
        self.count += x.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no activations were added")
        return self.xtx * (2.0 / self.count)


def _inverse_cholesky_upper(h: np.ndarray, percdamp: float) -> np.ndarray:
    """U upper triangular with U^T U = (H + damp I)^-1 (the reference's Hinv).
    The damping grows tenfold until H is positive definite (rare: rank-deficient X).

    One Cholesky instead of the reference's two: with J the reversal permutation and
    J H J = L L^T, H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular with a
    positive diagonal, hence H^-1's Cholesky factor."""
    k = h.shape[0]
    mean_diag = float(np.mean(np.diag(h)))
    damp = percdamp * mean_diag if mean_diag > 0 else 1.0
    for _ in range(8):
        try:
            hd = h + damp * np.eye(k)
            lo = np.linalg.cholesky(hd[::-1, ::-1])  # J H J = L L^T
            u = np.linalg.inv(lo)[::-1, ::-1]  # J L^-1 J
            return np.ascontiguousarray(np.triu(u))  # exact zeros below the diagonal
        except np.linalg.LinAlgError:
            damp *= 10.0
    raise np.linalg.LinAlgError("the Hessian stays singular after damping")


def _ternary_scale(absmean: np.ndarray) -> np.ndarray:
    """quant.ternary's fp16 scale of an absmean (floored: a zero scale means nothing)."""
    return np.maximum(np.asarray(absmean, np.float32), 6.1e-5).astype(np.float16)


def _group_params(w: np.ndarray, bits: int | str, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """RTN's (or ternary's) grid for one group of columns w [n, width]: (scale32 [n],
    zero32 [n], scale16 [n], zero16 [n] or None), zero32 the implicit zero when symmetric."""
    if bits == "ternary":  # absmean per row of the group; codes t + 1, zero 1
        s16 = _ternary_scale(np.abs(np.asarray(w, np.float64)).mean(axis=1))  # float64 sums, as quantize_ternary
        return s16.astype(np.float32), np.ones(w.shape[0], np.float32), s16, None
    qt = quantize_rtn(np.asarray(w, np.float32), bits, w.shape[1], symmetric)
    s16 = qt.scales[:, 0]
    z16 = qt.zeros[:, 0] if qt.zeros is not None else None
    z32 = z16.astype(np.float32) if z16 is not None else np.full(w.shape[0], default_zero(bits), np.float32)
    return s16.astype(np.float32), z32, s16, z16


CLIP_SHRINKS = np.linspace(1.0, 0.78, 12)  # candidate ranges, as fractions of min/max


def _clip_search(w: np.ndarray, hd: np.ndarray, bits: int, symmetric: bool):
    """The grid of one group w [n, width] whose range, shrunk by one of CLIP_SHRINKS per
    row, gives the least H-diagonal-weighted squared error sum_j hd_j (dq_j - w_j)^2 (the
    layer-output error of rounding alone, as GPTQ's reference `Quantizer(mse=True)` searches
    with an unweighted norm). Same return as _group_params; fp16 grids as quantize_rtn."""
    w = np.asarray(w, np.float32)
    n = w.shape[0]
    maxq = (1 << bits) - 1
    p = CLIP_SHRINKS.astype(np.float32)[:, None]  # [P, 1]
    if symmetric:
        z = np.float32(default_zero(bits))
        s16 = _to_f16_scale(p * (np.abs(w).max(1)[None, :] * 2.0 / maxq))  # [P, n]
        s = s16.astype(np.float32)[..., None]  # [P, n, 1]
        q = np.clip(np.rint(w[None] / s + z), 0, maxq)  # [P, n, width]
        zz = z
    else:
        lo = np.minimum(w.min(1), 0.0)[None, :] * p  # [P, n]
        hi = np.maximum(w.max(1), 0.0)[None, :] * p
        s16 = _to_f16_scale((hi - lo) / maxq)
        z16 = np.clip(np.rint(-lo / s16.astype(np.float32)), 0, maxq).astype(np.float16)
        s = s16.astype(np.float32)[..., None]
        zz = z16.astype(np.float32)[..., None]
        q = np.clip(np.rint(w[None] / s) + zz, 0, maxq)
    err = (((q - zz) * s - w[None]) ** 2 * np.asarray(hd, np.float32)).sum(-1)  # [P, n]
    best = err.argmin(0)  # [n]
    rows = np.arange(n)
    sb = s16[best, rows]
    if symmetric:
        return sb.astype(np.float32), np.full(n, z, np.float32), sb, None
    zb = z16[best, rows]
    return sb.astype(np.float32), zb.astype(np.float32), sb, zb


def gptq_quantize(
    w: np.ndarray,
    h: np.ndarray,
    bits: int | str,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    static_groups: bool = False,
    return_dequant: bool = False,
    clip_search: bool = True,
):
    """GPTQ of weights w [n, k] with the Hessian h [k, k] of the layer's inputs.

    bits: 1-6, or "ternary" (codes {-1, 0, 1}, absmean scales, no zeros: symmetric is
    ignored). group_size: weights along k per scale (None or >= k: one group per row; for
    ternary, None: one scale for the whole tensor); the last group may be partial.
    act_order implies static_groups. clip_search (bits 2-6): each group's range is the one
    of CLIP_SHRINKS that rounds with the least H-diagonal-weighted error (_clip_search);
    False: RTN's min/max grid. Returns a QTensor, or (QTensor, float32 [n, k] weights
    committed) when return_dequant (equal to qt.dequantize()).
    """
    w0 = np.asarray(w)
    if w0.ndim != 2:
        raise ValueError(f"weights must be 2-D [n, k], got shape {w0.shape}")
    if not np.all(np.isfinite(w0)):
        raise ValueError("weights contain NaN or infinity")
    n, k = w0.shape
    h = np.array(h, dtype=np.float64)  # a copy: modified below
    if h.shape != (k, k):
        raise ValueError(f"Hessian has shape {h.shape}, expected {(k, k)}")
    if bits not in SUPPORTED_BITS + ("ternary",):
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} or 'ternary', got {bits}")
    ternary = bits == "ternary"
    per_tensor = ternary and (group_size is None or group_size <= 0)
    symmetric = symmetric and not ternary  # ternary rounds as quantize_ternary: rint(w/s) + 1
    gs = k if group_size is None or group_size <= 0 or group_size >= k else int(group_size)
    check_group_size(k, gs)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    maxq = 2 if ternary else (1 << bits) - 1
    n_groups = -(-k // gs)
    static_groups = static_groups or act_order or per_tensor

    wt = np.array(w0, dtype=np.float64)  # [n, k] working copy
    dead = np.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0

    scales = np.empty((n, n_groups), np.float16)
    zeros = None if symmetric or ternary else np.empty((n, n_groups), np.float16)
    s32 = np.empty((n, n_groups), np.float32)
    z32 = np.empty((n, n_groups), np.float32)

    hdiag = np.diag(h).copy()  # original column order

    def set_group(g: int, cols: np.ndarray, hd: np.ndarray) -> None:
        if clip_search and bits != "ternary" and bits >= 2:
            s32[:, g], z32[:, g], scales[:, g], z16 = _clip_search(cols, hd, bits, symmetric)
        else:
            s32[:, g], z32[:, g], scales[:, g], z16 = _group_params(cols, bits, symmetric)
        if zeros is not None:
            zeros[:, g] = z16

    if per_tensor:  # one absmean over every weight, as quantize_ternary(w, None)
        scales[:] = _ternary_scale(np.abs(w0.astype(np.float32)).mean())
        s32[:], z32[:] = scales.astype(np.float32), 1.0
    elif static_groups:  # every group's grid from the original weights, original order
        for g in range(n_groups):
            set_group(g, wt[:, g * gs : (g + 1) * gs], hdiag[g * gs : (g + 1) * gs])

    perm = np.argsort(-hdiag, kind="stable") if act_order else np.arange(k)
    if act_order:
        wt = wt[:, perm]  # [n, k] columns in processing order
        h = h[perm][:, perm]
    col_group = perm // gs  # [k]: group (original order) of the column processed j-th

    u = _inverse_cholesky_upper(h, percdamp)  # [k, k] upper, U^T U = H^-1
    codes = np.empty((n, k), np.uint8)  # processing order
    committed = np.empty((n, k), np.float64)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        cnt = i2 - i1
        w1 = np.ascontiguousarray(wt[:, i1:i2].T)  # [cnt, n]: row i = column i1 + i
        err1 = np.empty((cnt, n), np.float64)
        u1 = u[i1:i2, i1:i2]  # [cnt, cnt]
        for i in range(cnt):
            j = i1 + i
            g = col_group[j]
            if not static_groups and j % gs == 0:
                # the group [j, e) as updated by every column before j: the part inside
                # this block is in w1; the part after it still lacks this block's updates
                e = min(j + gs, k)
                cols = w1[i : min(e, i2) - i1].T  # [n, min(e, i2) - j]
                if e > i2:
                    rest = wt[:, i2:e] - err1[:i].T @ u[i1:j, i2:e]  # [n, e - i2]
                    cols = np.concatenate([cols, rest], axis=1)
                set_group(g, cols, hdiag[j:e])
            s, z = s32[:, g], z32[:, g]
            col = w1[i]  # [n]
            c32 = col.astype(np.float32)
            if symmetric:  # the rounding of quantize_rtn, so that an identity H gives RTN
                q = np.rint(c32 / s + z)
            else:
                q = np.rint(c32 / s) + z
            q = np.clip(q, 0, maxq)
            dq = (s * (q - z)).astype(np.float64)  # exactly QTensor.dequantize()'s value
            codes[:, j] = q.astype(np.uint8)
            committed[:, j] = dq
            e_i = (col - dq) / u1[i, i]
            w1[i + 1 :] -= np.outer(u1[i, i + 1 :], e_i)  # [cnt-i-1, n]: feedback in the block
            err1[i] = e_i
        if i2 < k:
            wt[:, i2:] -= err1.T @ u[i1:i2, i2:]  # [n, cnt] @ [cnt, k - i2]: lazy batch update

    if act_order:
        inv = np.argsort(perm)
        codes = codes[:, inv]  # back to the original column order
        committed = committed[:, inv]
    qt = QTensor(np.ascontiguousarray(codes), scales, zeros, 2 if ternary else bits, gs, ternary)
    if return_dequant:
        return qt, committed.astype(np.float32)
    return qt
