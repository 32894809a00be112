"""Rotary position embeddings (RoPE).

Two layouts of the rotated pairs exist, and which one a model needs depends on how its
Q/K weights were stored, not on the model family:

- "interleaved" (GPT-J, llama.cpp's ROPE_TYPE_NORM): pairs (x[2i], x[2i+1]).
  llama.cpp's converter permutes the Q/K rows of "llama" GGUFs into this layout.
- "neox" (GPT-NeoX, Hugging Face `rotate_half`): pairs (x[i], x[i + d/2]).
  HF checkpoints and GGUF qwen2/qwen3/gemma3 files use it.

Pair i rotates by angle pos * inv_freq[i], inv_freq[i] = base^(-2i/d).
"""

from __future__ import annotations

import math

import numpy as np

from .args import RopeScaling, RopeStyle


def rope_inv_freq(
    n_rot: int,
    base: float,
    scaling: RopeScaling | None = None,
    freq_factors: np.ndarray | None = None,
) -> np.ndarray:
    """Inverse frequencies [n_rot/2], float64.

    freq_factors: llama.cpp's `rope_freqs.weight` tensor (the GGUF form of Llama 3.1's
    scaling): every frequency is divided by its factor. It replaces `scaling`.
    """
    half = n_rot // 2
    # [half]: exponent 2i/d, computed in float64 so angles stay exact at long positions
    inv = 1.0 / (base ** (np.arange(0, n_rot, 2, dtype=np.float64) / n_rot))
    if freq_factors is not None:
        factors = np.asarray(freq_factors, dtype=np.float64).reshape(-1)  # [half]
        if factors.shape[0] != half:
            raise ValueError(f"rope_freqs has {factors.shape[0]} factors, expected {half}")
        return inv / factors
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    if scaling.kind == "llama3":
        # Same formula as Meta's reference and HF's _compute_llama3_parameters.
        low_wavelen = scaling.original_context_length / scaling.low_freq_factor
        high_wavelen = scaling.original_context_length / scaling.high_freq_factor
        wavelen = 2.0 * math.pi / inv
        smooth = (scaling.original_context_length / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1.0 - smooth) * inv / scaling.factor + smooth * inv
        out = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, blended, out)
    raise ValueError(f"unsupported RoPE scaling kind {scaling.kind!r}")


class Rope:
    """Applies RoPE to [m, heads, head_dim] activations at given positions."""

    def __init__(self, head_dim: int, inv_freq: np.ndarray, style: RopeStyle) -> None:
        if style not in ("interleaved", "neox"):
            raise ValueError(f"unknown RoPE style {style!r}")
        self.head_dim = head_dim
        self.n_rot = 2 * inv_freq.shape[0]
        if self.n_rot > head_dim:
            raise ValueError(f"RoPE rotates {self.n_rot} dims of a {head_dim}-dim head")
        self.inv_freq = inv_freq.astype(np.float64)
        self.style = style

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin of the angles, each [m, n_rot/2] float32."""
        # [m, 1] * [1, half] -> [m, half]
        angles = positions.astype(np.float64)[:, None] * self.inv_freq[None, :]
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def apply(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate x [m, heads, head_dim]; cos/sin [m, n_rot/2]. Returns a new array."""
        half = self.n_rot // 2
        c = cos[:, None, :]  # [m, 1, half]: broadcast over heads
        s = sin[:, None, :]
        out = x.copy()
        if self.style == "neox":
            x1 = x[..., :half]  # [m, heads, half]
            x2 = x[..., half : self.n_rot]
            out[..., :half] = x1 * c - x2 * s
            out[..., half : self.n_rot] = x2 * c + x1 * s
        else:
            # [m, heads, n_rot] -> [m, heads, half, 2]: pair i is (x[2i], x[2i+1])
            pairs = x[..., : self.n_rot].reshape(*x.shape[:-1], half, 2)
            x1, x2 = pairs[..., 0], pairs[..., 1]  # [m, heads, half]
            rotated = np.stack((x1 * c - x2 * s, x2 * c + x1 * s), axis=-1)  # [m, heads, half, 2]
            out[..., : self.n_rot] = rotated.reshape(*x.shape[:-1], self.n_rot)  # -> [m, heads, n_rot]
        return out


def permute_qk_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF (neox) Q/K weight rows -> llama.cpp GGUF (interleaved) rows, as its converter does.

    w: [n_heads * head_dim, k]. Within each head, row j*(d/2) + i moves to row 2i + j,
    so that pair (2i, 2i+1) holds what neox pairs as (i, i + d/2).
    """
    n, k = w.shape
    d = n // n_heads
    # [n, k] -> [heads, 2, d/2, k] -> swap -> [heads, d/2, 2, k] -> [n, k]
    return w.reshape(n_heads, 2, d // 2, k).swapaxes(1, 2).reshape(n, k)


def unpermute_qk_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_qk_interleaved`: GGUF llama Q/K rows -> HF (neox) rows."""
    n, k = w.shape
    d = n // n_heads
    # [n, k] -> [heads, d/2, 2, k] -> swap -> [heads, 2, d/2, k] -> [n, k]
    return w.reshape(n_heads, d // 2, 2, k).swapaxes(1, 2).reshape(n, k)
