"""QTensor: the logical quantized weight, the seam between quantizers and kernels.

w[n, k] = scales[n, G(k)] * (codes[n, k] - zeros[n, G(k)]), G(k) = k // group_size.
Quantizers produce it and know nothing of SIMD layouts; kernels.pack() turns it into the
kernel layout. Scales and zeros are float16 so that the kernel and every reference
dequantize the very same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6)  # the LUT kernels' code widths (csrc/lut_gemm.h kMaxBits)


def default_zero(bits: int, ternary: bool = False) -> float:
    """The implicit zero point of a symmetric QTensor (no `zeros` array)."""
    if ternary:
        return 1.0  # codes {0, 1, 2} stand for {-1, 0, +1}
    return 0.5 if bits == 1 else float(1 << (bits - 1))


def check_group_size(k: int, group_size: int) -> None:
    if group_size <= 0 or (group_size != k and group_size % 8 != 0):
        raise ValueError(
            f"group_size must be a multiple of 8 or equal to k={k}, got {group_size}"
        )


@dataclass(frozen=True)
class QTensor:
    codes: np.ndarray  # uint8 [n, k], each < 2**bits
    scales: np.ndarray  # float16 [n, G]
    zeros: np.ndarray | None  # float16 [n, G], or None: symmetric (default_zero)
    bits: int
    group_size: int
    ternary: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.ternary and (self.bits != 2 or self.zeros is not None):
            raise ValueError("a ternary QTensor has bits=2 and no zeros")
        c = self.codes
        if not isinstance(c, np.ndarray) or c.dtype != np.uint8 or c.ndim != 2:
            raise TypeError("codes must be a uint8 array of shape [n, k]")
        n, k = c.shape
        if n == 0 or k == 0:
            raise ValueError("codes must not be empty")
        check_group_size(k, self.group_size)
        g = -(-k // self.group_size)
        for name, a in (("scales", self.scales), ("zeros", self.zeros)):
            if a is None:
                continue
            if not isinstance(a, np.ndarray) or a.dtype != np.float16:
                raise TypeError(f"{name} must be a float16 array")
            if a.shape != (n, g):
                raise ValueError(f"{name} has shape {a.shape}, expected {(n, g)}")
        if c.size and int(c.max()) >= (3 if self.ternary else 1 << self.bits):
            raise ValueError(f"codes exceed the range of {self.bits}-bit values")

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def k(self) -> int:
        return self.codes.shape[1]

    @property
    def groups(self) -> int:
        return self.scales.shape[1]

    @property
    def zero_const(self) -> float:
        return default_zero(self.bits, self.ternary)

    def zero_points(self) -> np.ndarray:
        """float32 [n, G]: the zeros, or the implicit symmetric zero."""
        if self.zeros is not None:
            return self.zeros.astype(np.float32)
        return np.full(self.scales.shape, self.zero_const, np.float32)

    def dequantize(self) -> np.ndarray:
        """float32 [n, k] weights."""
        n, k = self.shape
        gs = self.group_size
        cols = np.arange(k) // gs  # group of each column
        s = self.scales.astype(np.float32)[:, cols]  # [n, G] -> [n, k]
        z = self.zero_points()[:, cols]  # [n, G] -> [n, k]
        return s * (self.codes.astype(np.float32) - z)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight: codes plus fp16 scales (and zeros)."""
        per_group = 16 * (2 if self.zeros is not None else 1)
        return self.bits + per_group * self.groups / self.k
