"""Slow numpy versions of every kernel, on the logical layout: the spec and test oracle.

Nothing here knows the packed layout (that lives only in csrc/pack.cpp).
Table modes (see csrc/lut_gemm.h):
  "exact": activations quantized to int8 per weight group (scale max|x| / 127); the
           lookup tables of those integers are exact, so the kernel equals
           x_q @ dequantize(w).T up to float rounding.
  "fast":  float tables quantized to int8 per group (scale max|T| / 127).
"""

from __future__ import annotations

import numpy as np

from .quant.qtensor import QTensor

G = 4  # activations per table


def _padded_groups(x: np.ndarray, group_size: int) -> np.ndarray:
    """x [m, k] -> [m, G, gsp] with zeros past k; gsp = group_size rounded up to 8."""
    m, k = x.shape
    groups = -(-k // group_size)
    gsp = -(-group_size // 8) * 8
    out = np.zeros((m, groups, gsp), np.float64)
    for g in range(groups):
        seg = x[:, g * group_size : min(k, (g + 1) * group_size)]
        out[:, g, : seg.shape[1]] = seg
    return out


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _act_int8(xg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 activations per group in float32 arithmetic, as csrc/tables.cpp does it.

    xg [..., gsp] -> (xq [..., gsp] integers as float64, scale [...] float32).
    """
    x32 = xg.astype(np.float32)
    amax = np.abs(x32).max(-1)
    sc = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    inv = (np.float32(1) / sc).astype(np.float32)
    xq = np.clip(np.rint(x32 * inv[..., None]), -127, 127)
    return xq.astype(np.float64), sc


def quantize_activations(x: np.ndarray, group_size: int) -> np.ndarray:
    """The int8-per-group activations of "exact" mode, dequantized: float64 [m, k]."""
    m, k = x.shape
    xq, sc = _act_int8(_padded_groups(x, group_size))  # [m, G, gsp], [m, G]
    return (xq * sc[..., None]).reshape(m, -1)[:, :k]  # [m, G, gsp] -> [m, G*gsp] -> [m, k]


def tables(x: np.ndarray, group_size: int, mode: str = "exact"):
    """Lookup tables on the logical layout.

    Returns (T int32 [m, kp/4, 16], ts float [m, G], xsum float [m, G]) with
    T[.., j, c] = sum_t (2 bit_t(c) - 1) x[4j + t] in units of ts.
    """
    xg = _padded_groups(np.asarray(x, np.float32).astype(np.float64), group_size)  # [m,G,gsp]
    m, ng, gsp = xg.shape
    signs = np.array([[2 * ((c >> t) & 1) - 1 for t in range(G)] for c in range(16)])  # [16,4]
    xk = xg.reshape(m, ng, gsp // G, G)  # [m, G, gsp/4, 4]
    if mode == "exact":
        xq, ts = _act_int8(xg)
        xq = xq.reshape(xk.shape)  # [m, G, gsp] -> [m, G, gsp/4, 4]
        t = np.einsum("mgjt,ct->mgjc", xq, signs)
        xsum = ts * xq.sum((-1, -2))
    elif mode == "fast":
        amax = np.abs(xk).sum(-1).max(-1)  # max |T| per group: [m, G]
        ts = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        tf = np.einsum("mgjt,ct->mgjc", xk, signs)
        half = np.clip(np.rint(tf[..., :8] / ts[..., None, None]), -127, 127)
        t = np.concatenate([half, -half[..., ::-1]], -1)  # symmetry: T[15-c] = -T[c]
        xsum = xg.sum(-1)
    else:
        raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
    return t.reshape(m, -1, 16).astype(np.int32), ts.astype(np.float32), xsum  # [m,G,gsp/4,16] -> [m,kp/4,16]


def lut_matmul(x: np.ndarray, qt: QTensor, mode: str = "exact") -> np.ndarray:
    """The LUT method on the logical layout: y[m, n] from bit planes and tables (float64)."""
    x = np.atleast_2d(np.asarray(x, np.float32))
    t, ts, xsum = tables(x, qt.group_size, mode)
    m = x.shape[0]
    n, k = qt.shape
    ng = qt.groups
    gsp = -(-qt.group_size // 8) * 8
    codes = np.zeros((n, ng, gsp), np.int64)
    for g in range(ng):
        seg = qt.codes[:, g * qt.group_size : min(k, (g + 1) * qt.group_size)]
        codes[:, g, : seg.shape[1]] = seg
    ck = codes.reshape(n, ng, gsp // G, G)  # [n, G, gsp/4, 4]
    tg = t.reshape(m, ng, gsp // G, 16)  # [m, kp/4, 16] -> [m, G, gsp/4, 16]
    lsum = np.zeros((m, n, ng), np.float64)
    for i in range(qt.bits):
        idx = (((ck >> i) & 1) << np.arange(G)).sum(-1)  # plane i's 4-bit indices [n, G, gsp/4]
        for g in range(ng):
            # lookups T[m, g, j, idx[n, g, j]] summed over j
            look = np.take_along_axis(
                tg[:, None, g, :, :].repeat(n, 1), idx[None, :, g, :, None].repeat(m, 0), -1
            )[..., 0]
            lsum[:, :, g] += (1 << i) * look.sum(-1)
    cb = 0.5 * ((1 << qt.bits) - 1)
    s = qt.scales.astype(np.float64)[None]  # [1, n, G]
    z = qt.zero_points().astype(np.float64)[None]
    y = s * (0.5 * ts[:, None, :] * lsum + (cb - z) * xsum[:, None, :])
    return y.sum(-1)


def matmul(x: np.ndarray, qt: QTensor, mode: str | None = None) -> np.ndarray:
    """Dequantize-then-matmul oracle (float64). mode "exact" quantizes x like the kernel."""
    x = np.atleast_2d(np.asarray(x, np.float32)).astype(np.float64)
    if mode == "exact":
        x = quantize_activations(x, qt.group_size)
    return x @ qt.dequantize().astype(np.float64).T
