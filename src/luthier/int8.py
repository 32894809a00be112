"""8-bit weights: token embeddings and output heads (and 8-bit linears of mixed files).

Symmetric int8 codes with one fp16 scale per block of 32 along k (GGUF's Q8_0 grid), held
in the native kernel's panels of 8 rows (csrc/int8_gemm.h), which is also what a luthier
file stores: codes [P, 8 * kp] = [P, kp / 4, 8, 4] and scales [P, 8 * kp / 32] =
[P, kp / 32, 8], P = ceil(n / 8), kp = k rounded up to 32, rows past n zero.
"""

from __future__ import annotations

import numpy as np


def q8_width(k: int) -> int:
    """kp: k rounded up to 32, the row width of int8 codes (csrc/int8_gemm.h's int8_kp)."""
    return -(-int(k) // 32) * 32


def q8_panel_count(n: int) -> int:
    """P: rows rounded up to panels of 8 (csrc/int8_gemm.h's int8_panels)."""
    return -(-int(n) // 8)


def quantize_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w float [n, k] -> (int8 codes [n, kp], fp16 scale bits uint16 [n, kp / 32]) as rows,
    kp = q8_width(k) (zero padded): symmetric, one scale per block of 32, like Q8_0."""
    w = np.asarray(w)
    n, k = w.shape
    kp = q8_width(k)
    q = np.empty((n, kp), np.int8)
    s = np.empty((n, kp // 32), np.float16)
    # rows in chunks of ~1 MiB of floats: a 262144-row table quantized whole made four
    # table-sized temporaries (2.7 GB peak for Gemma 3's) and ran 4x slower out of cache
    step = max(1, (1 << 18) // kp)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        wp = np.zeros((r1 - r0, kp), np.float32)
        wp[:, :k] = w[r0:r1]
        wb = wp.reshape(r1 - r0, kp // 32, 32)  # [rows, kp] -> [rows, blocks, 32]
        sc = (np.abs(wb).max(-1) / 127.0).astype(np.float16)
        sc = np.where(sc > 0, sc, np.float16(1.0)).astype(np.float16)  # codes against fp16 scales
        s[r0:r1] = sc
        qb = np.clip(np.rint(wb / sc.astype(np.float32)[..., None]), -127, 127).astype(np.int8)
        q[r0:r1] = qb.reshape(r1 - r0, kp)  # [rows, blocks, 32] -> [rows, kp]
    return q, s.view(np.uint16)


def q8_panels(q: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (codes [n, kp], scales [n, kp / 32]) -> panels (codes [P, 8 * kp], scales
    [P, 8 * kp / 32]), the layout of csrc/int8_gemm.h."""
    n, kp = q.shape
    p = q8_panel_count(n)
    qr = np.zeros((p * 8, kp), np.int8)
    qr[:n] = q
    sr = np.zeros((p * 8, kp // 32), np.uint16)
    sr[:n] = scale
    qp = qr.reshape(p, 8, kp // 4, 4).transpose(0, 2, 1, 3)  # [8P, kp] -> [P, 8, kp/4, 4] -> [P, kp/4, 8, 4]
    sp = sr.reshape(p, 8, kp // 32).transpose(0, 2, 1)  # [8P, blocks] -> [P, 8, blocks] -> [P, blocks, 8]
    return np.ascontiguousarray(qp).reshape(p, 8 * kp), np.ascontiguousarray(sp).reshape(p, kp // 4)


def _check_panels(q: np.ndarray, scale: np.ndarray, n: int, k: int, what: str) -> None:
    p, kp = q8_panel_count(n), q8_width(k)
    if q.dtype != np.int8 or q.shape != (p, 8 * kp) or scale.shape != (p, kp // 4):
        raise ValueError(f"{what}: codes {q.dtype}{list(q.shape)} and scales {list(scale.shape)} are "
                         f"not the int8 panels of [{n}, {k}] ([{p}, {8 * kp}] and [{p}, {kp // 4}])")


def _panel_rows(q: np.ndarray, scale: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Rows `rows` (integer array of any shape) of panels, dequantized: [*rows.shape, k]."""
    p, kp = q.shape[0], q.shape[1] // 8
    qr = q.reshape(p, kp // 4, 8, 4)[rows // 8, :, rows % 8, :]  # [..., kp / 4, 4]
    sr = scale.reshape(p, kp // 32, 8)[rows // 8, :, rows % 8]  # [..., blocks]
    x = qr.reshape(*rows.shape, kp // 32, 32) * sr.view(np.float16).astype(np.float32)[..., None]
    return x.reshape(*rows.shape, kp)[..., :k]  # [..., blocks, 32] -> [..., kp] -> [..., k]


class Int8Rows:
    """Token embeddings as int8 panels: indexing dequantizes only the rows asked for. A tied
    model with an int8 head shares the head's arrays, so the file and the memory hold one
    table, as llama.cpp's."""

    ndim = 2
    dtype = np.dtype(np.float32)  # what indexing returns

    def __init__(self, q: np.ndarray, scale: np.ndarray, vocab: int, dim: int):
        _check_panels(q, scale, vocab, dim, "int8 embedding")
        self.q, self.scale, self.dim = q, scale, int(dim)
        self.shape = (int(vocab), int(dim))
        self.nbytes = q.nbytes + scale.nbytes

    @classmethod
    def from_float(cls, w: np.ndarray) -> "Int8Rows":
        return cls(*q8_panels(*quantize_q8(w)), *w.shape)

    def __getitem__(self, tokens) -> np.ndarray:
        """float32 rows [*tokens.shape, dim] of integer token ids of any shape."""
        t = np.asarray(tokens)
        if t.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got {t.dtype}")
        if t.size and (t.min() < -self.shape[0] or t.max() >= self.shape[0]):
            raise IndexError(f"token id out of range for a vocabulary of {self.shape[0]}")
        return _panel_rows(self.q, self.scale, t % self.shape[0], self.dim)

    def dequantize(self) -> np.ndarray:
        return self[np.arange(self.shape[0])]


class Int8Linear:
    """8-bit weights times int8 activations (per block of 32) by the native int8 kernel
    (csrc/int8_gemm.h): the default for embeddings and heads. Reproduces a Q8_0 source
    exactly."""

    def __init__(self, w: np.ndarray, n_threads: int = 1):
        n, k = np.shape(w)
        self._set(*q8_panels(*quantize_q8(w)), n, k, n_threads)

    @classmethod
    def from_panels(cls, q: np.ndarray, scale: np.ndarray, n: int, k: int, n_threads: int = 1) -> "Int8Linear":
        """Over stored panels (a luthier file), without quantizing."""
        _check_panels(q, scale, n, k, "int8 linear")
        lin = cls.__new__(cls)
        lin._set(q, scale, n, k, n_threads)
        return lin

    def _set(self, q: np.ndarray, scale: np.ndarray, n: int, k: int, n_threads: int) -> None:
        from . import _core

        self.q, self.scale = q, scale  # panels: int8 [P, 8 kp], fp16 bits [P, 8 kp / 32]
        self.n, self.k, self.n_threads = int(n), int(k), n_threads
        self.nbytes = q.nbytes + scale.nbytes
        self._core = _core

    def dequantize(self) -> np.ndarray:
        return _panel_rows(self.q, self.scale, np.arange(self.n), self.k)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x2 = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        y = np.empty((x2.shape[0], self.n), np.float32)
        self._core.int8_linear(self.q, self.scale, self.n, self.k, x2, y, None, 1e-6, self.n_threads, "")
        return y
