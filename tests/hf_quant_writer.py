"""Writers of Hugging Face GPTQ / AWQ checkpoint tensors from known codes, for the import
tests. Packing is done a different way than luthier's reader unpacks (bit planes through
np.packbits here, shifts and masks there), so the two do not share a mistake.

Layouts as AutoGPTQ / GPTQModel / AutoAWQ write them:
  GPTQ qweight int32 [k*bits/32, n]: each column a little-endian bit stream of codes along k
       qzeros  int32 [G, n*bits/32]: zero points (v1: zero - 1) along n, the same way
       scales  fp16 [G, n]; g_idx int32 [k] (group of each input column)
  AWQ  qweight int32 [k, n/8]: nibble i of a word holds column AWQ_ORDER[i] of its 8
       qzeros  int32 [G, n/8] the same way; scales fp16 [G, n]
"""

from __future__ import annotations

import numpy as np

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """uint [count, c] -> int32 [count*bits/32, c]: each column a little-endian bit stream
    (value t occupies stream bits t*bits .. t*bits+bits-1, low bit first)."""
    count, c = values.shape
    assert (count * bits) % 32 == 0, (count, bits)
    v = np.asarray(values, np.uint32).T  # [c, count]
    planes = ((v[:, :, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)  # [c, count, bits]
    stream = planes.reshape(c, count * bits)  # [c, count, bits] -> [c, stream bits]
    by = np.packbits(stream, axis=1, bitorder="little")  # [c, bytes], stream bit 0 = bit 0 of byte 0
    words = np.ascontiguousarray(by).view("<u4")  # [c, bytes] -> [c, words]
    return np.ascontiguousarray(words.T).view(np.int32)  # [words, c]


def gptq_tensors(
    prefix: str,
    codes: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray,
    bits: int,
    fmt: str,
    g_idx: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """GPTQ tensors of one linear from codes uint8 [n, k] (checkpoint column order), fp16
    scales [n, G], real integer zeros [n, G], and the group of each column (g_idx)."""
    mask = (1 << bits) - 1
    stored = np.asarray(zeros).astype(np.int64) - (1 if fmt == "gptq" else 0)  # v1 stores zero - 1
    stored = stored & mask  # v1: a real zero of 0 wraps, as AutoGPTQ's packing did
    out = {
        prefix + ".qweight": pack_stream(codes.T, bits),  # codes along k: [k, n] -> [k*bits/32, n]
        # zeros along n: [n, G] -> [n*bits/32, G] -> [G, n*bits/32]
        prefix + ".qzeros": np.ascontiguousarray(pack_stream(stored, bits).T),
        prefix + ".scales": np.ascontiguousarray(scales.T.astype(np.float16)),  # [n, G] -> [G, n]
    }
    if g_idx is not None:
        out[prefix + ".g_idx"] = np.asarray(g_idx, np.int32)
    return out


def awq_pack(values: np.ndarray) -> np.ndarray:
    """uint [r, c] -> int32 [r, c/8] with AutoAWQ's nibble interleave."""
    r, c = values.shape
    v = np.asarray(values, np.uint32).reshape(r, c // 8, 8)  # [r, c] -> [r, c/8, 8]
    nib = v[:, :, AWQ_ORDER]  # nibble i holds column AWQ_ORDER[i]
    word = (nib << (4 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32)  # [r, c/8]
    return word.view(np.int32)


def awq_tensors(prefix: str, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> dict[str, np.ndarray]:
    """AWQ GEMM tensors of one linear from codes uint8 [n, k], fp16 scales and integer zeros [n, G]."""
    return {
        prefix + ".qweight": awq_pack(np.ascontiguousarray(codes.T)),  # [k, n] -> [k, n/8]
        prefix + ".qzeros": awq_pack(np.ascontiguousarray(np.asarray(zeros).T)),  # [G, n] -> [G, n/8]
        prefix + ".scales": np.ascontiguousarray(scales.T.astype(np.float16)),  # [n, G] -> [G, n]
    }


def act_order_layout(codes_p: np.ndarray, perm: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A QTensor's codes in permuted order (column i is original column perm[i]) -> codes in
    checkpoint order and g_idx, as a desc_act GPTQ checkpoint stores them."""
    k = codes_p.shape[1]
    codes = np.empty_like(codes_p)
    codes[:, perm] = codes_p
    g_idx = np.empty(k, np.int32)
    g_idx[perm] = np.arange(k) // group_size
    return codes, g_idx


def random_act_order(k: int, group_size: int, rng: np.random.Generator) -> np.ndarray:
    """A perm as GPTQ's act-order makes it: columns dealt to groups at random; within a
    group in increasing column order (what a stable sort of g_idx gives back)."""
    g_idx = rng.permutation(np.arange(k) // group_size)
    return np.argsort(g_idx, kind="stable").astype(np.int32)
