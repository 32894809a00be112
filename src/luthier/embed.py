"""Embeddings: a text's vector from the model's final hidden states (the final norm's
output, what the head would read), mean-pooled over the text's tokens and L2-normalized.

That is what llama-server (`--embeddings --pooling mean`), Ollama's /api/embed and
llama-cpp-python's `embed` give for a generative model. "last" pooling (the last token's
state) is the other common choice for decoder models and is available by name. The
vectors are only as good as the model is at this: a chat model is no retrieval model,
but the API is the one every client expects.
"""

from __future__ import annotations

import base64

import numpy as np

POOLINGS = ("mean", "last")
CHUNK = 128  # tokens per forward: bounds the activation memory of a long input


def embed_ids(lm, ids: list[int], pooling: str = "mean", normalize: bool = True) -> np.ndarray:
    """float32 [dim]: the pooled final hidden states of token ids `ids` (at most the
    model's context; the model's KV slot 0 is used and left holding them)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if not ids:
        raise ValueError("the input is empty (no tokens)")
    model = lm.model
    cache = model.new_cache(len(ids))  # raises ValueError past the context
    total = np.zeros(lm.args.dim, np.float64)
    last = None
    for s in range(0, len(ids), CHUNK):
        part = np.asarray(ids[s : s + CHUNK], np.int64)  # [m]
        h = model.forward(part, cache, s, hidden=True)  # [m, dim]
        total += h.sum(axis=0, dtype=np.float64)
        last = h[-1]
    v = total / len(ids) if pooling == "mean" else last.astype(np.float64)
    if normalize:
        v = v / max(float(np.linalg.norm(v)), 1e-12)
    return v.astype(np.float32)


def fit_context(ids: list[int], n_ctx: int, truncate: bool) -> list[int]:
    """ids, cut to the context when `truncate` (Ollama's default), else a ValueError."""
    if len(ids) <= n_ctx:
        return ids
    if truncate:
        return ids[:n_ctx]
    raise ValueError(f"the input has {len(ids)} tokens; the context holds {n_ctx}")


def as_base64(v: np.ndarray) -> str:
    """OpenAI's encoding_format "base64": the float32 little-endian bytes."""
    return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode("ascii")
