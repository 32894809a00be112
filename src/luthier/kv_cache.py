"""Key/value cache for incremental decoding.

Preallocated once, [layers, ctx, kv_heads, head_dim] per tensor, so decoding never
reallocates and the memory cost is known up front. Keys are stored after RoPE, so a
cached key is never rotated again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .models.args import ModelArgs


class KVCacheFullError(ValueError):
    """Raised when tokens would be written past the cache's context length."""


class KVCache:
    """Per-layer keys and values of the tokens seen so far.

    `length` is the number of valid positions, the same for every layer once a forward
    pass has finished. Positions [0, length) are valid; writing at `start < length`
    overwrites (rewinds) the tail, writing past `length` would leave a gap and is refused.
    """

    def __init__(
        self,
        n_layers: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: np.dtype | type = np.float32,
    ) -> None:
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"KV cache dtype must be float32 or float16, got {dtype}")
        if min(n_layers, max_seq_len, n_kv_heads, head_dim) <= 0:
            raise ValueError("KV cache dimensions must be positive")
        shape = (n_layers, max_seq_len, n_kv_heads, head_dim)
        self.k = np.zeros(shape, dtype=dtype)  # [layers, ctx, kv_heads, head_dim]
        self.v = np.zeros(shape, dtype=dtype)
        self.length = 0

    @classmethod
    def for_model(cls, args: ModelArgs, max_seq_len: int | None = None, dtype: np.dtype | type = np.float32) -> KVCache:
        """A cache shaped for `args`; max_seq_len defaults to the model's context length."""
        ctx = args.max_seq_len if max_seq_len is None else max_seq_len
        return cls(args.n_layers, ctx, args.n_kv_heads, args.head_dim, dtype)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def clear(self) -> None:
        """Forget every position. The storage is kept; stale values are never read
        because reads stop at `length`."""
        self.length = 0

    def check_write(self, start: int, m: int) -> None:
        """Raise unless m tokens may be written at positions [start, start + m)."""
        if start < 0 or m < 0:
            raise ValueError(f"invalid cache write: start {start}, {m} tokens")
        if start > self.length:
            raise ValueError(f"cache holds {self.length} positions; writing at {start} would leave a gap")
        if start + m > self.max_seq_len:
            raise KVCacheFullError(
                f"context full: {start} + {m} tokens exceed the KV cache's {self.max_seq_len} positions"
            )

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v [m, kv_heads, head_dim] of one layer at positions [start, start + m)."""
        m = k.shape[0]
        self.check_write(start, m)
        self.k[layer, start : start + m] = k
        self.v[layer, start : start + m] = v

    def read(self, layer: int, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values [end - begin, kv_heads, head_dim] as float32."""
        k = self.k[layer, begin:end]
        v = self.v[layer, begin:end]
        if k.dtype != np.float32:
            # float16 storage halves memory; attention itself stays float32
            k, v = k.astype(np.float32), v.astype(np.float32)
        return k, v

    def advance(self, end: int) -> None:
        """Mark positions [0, end) valid (after every layer wrote them)."""
        if not 0 <= end <= self.max_seq_len:
            raise KVCacheFullError(f"cache length {end} outside [0, {self.max_seq_len}]")
        self.length = end

    def __repr__(self) -> str:
        layers, ctx, heads, hd = self.k.shape
        return f"KVCache(layers={layers}, ctx={ctx}, kv_heads={heads}, head_dim={hd}, dtype={self.dtype}, length={self.length})"
