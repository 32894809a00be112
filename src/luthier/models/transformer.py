"""The forward pass of decoder-only transformers (llama, qwen2, qwen3, gemma3), numpy float32.

Weights come keyed by GGUF tensor names, [n_out, n_in] like nn.Linear.weight. Every
matrix multiply by a weight goes through a `LinearFn` made by `linear_factory`, so the
float matmul used here can be swapped for the native LUT kernel without touching the
model code; everything else (norms, RoPE, attention) is small and stays in numpy.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ..kv_cache import KVCache
from .args import ModelArgs
from .rope import Rope, rope_inv_freq

# x [m, k] float32 -> y [m, n] float32
LinearFn = Callable[[np.ndarray], np.ndarray]
# (GGUF tensor name, weight [n, k]) -> LinearFn
LinearFactory = Callable[[str, np.ndarray], LinearFn]

# Queries per attention block: bounds the [heads, block, ctx] score matrix in long prefills.
ATTN_QUERY_BLOCK = 256


def float_linear(name: str, w: np.ndarray) -> LinearFn:
    """Default LinearFn: y = x @ w.T in float32 (BLAS)."""
    wf = np.ascontiguousarray(w, dtype=np.float32)  # [n, k]
    if wf.ndim != 2:
        raise ValueError(f"{name}: linear weight must be 2-D, got shape {wf.shape}")

    def linear(x: np.ndarray) -> np.ndarray:
        return x @ wf.T  # [m, k] @ [k, n] -> [m, n]

    return linear


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * w."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)  # [..., 1], float32 like x
    return x * (1.0 / np.sqrt(ms + np.float32(eps))) * w


def silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x) written with tanh: no overflow warnings from exp(-x) at large |x|
    return x * (0.5 + 0.5 * np.tanh(0.5 * x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    # tanh approximation of GELU (HF "gelu_pytorch_tanh"), as Gemma was trained with
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    return np.float32(cap) * np.tanh(x / np.float32(cap))


class _Layer:
    """One block's callables and small float32 tensors. luthier.native reads these
    attribute names (wq..w_down, the norms, the biases) to build its C++ decoder."""

    def __init__(self, i: int, args: ModelArgs, weights: Mapping[str, np.ndarray], make: LinearFactory) -> None:
        p = f"blk.{i}."

        def norm(name: str, size: int) -> np.ndarray:
            w = _get(weights, p + name)
            if w.shape != (size,):
                raise ValueError(f"{p + name}: shape {w.shape}, expected ({size},)")
            return (np.asarray(w, dtype=np.float32) + np.float32(args.norm_weight_offset)).astype(np.float32)

        def linear(name: str, n: int, k: int) -> LinearFn:
            w = _get(weights, p + name + ".weight")
            if w.shape != (n, k):
                raise ValueError(f"{p + name}.weight: shape {w.shape}, expected ({n}, {k})")
            return make(p + name + ".weight", w)

        def bias(name: str, n: int) -> np.ndarray | None:
            key = p + name + ".bias"
            if key not in weights:
                if args.qkv_bias and name in ("attn_q", "attn_k", "attn_v"):
                    raise KeyError(f"missing tensor {key!r} ({args.arch} has q/k/v biases)")
                return None
            b = np.asarray(weights[key], dtype=np.float32)
            if b.shape != (n,):
                raise ValueError(f"{key}: shape {b.shape}, expected ({n},)")
            return b

        d, hd = args.dim, args.head_dim
        nq, nkv = args.n_heads * hd, args.n_kv_heads * hd
        self.attn_norm = norm("attn_norm.weight", d)
        self.wq = linear("attn_q", nq, d)
        self.wk = linear("attn_k", nkv, d)
        self.wv = linear("attn_v", nkv, d)
        self.wo = linear("attn_output", d, nq)
        self.bq, self.bk, self.bv = bias("attn_q", nq), bias("attn_k", nkv), bias("attn_v", nkv)
        self.bo = bias("attn_output", d)
        self.q_norm = norm("attn_q_norm.weight", hd) if args.qk_norm else None
        self.k_norm = norm("attn_k_norm.weight", hd) if args.qk_norm else None
        self.ffn_norm = norm("ffn_norm.weight", d)
        self.w_gate = linear("ffn_gate", args.ffn_dim, d)
        self.w_up = linear("ffn_up", args.ffn_dim, d)
        self.w_down = linear("ffn_down", d, args.ffn_dim)
        self.post_attn_norm = norm("post_attention_norm.weight", d) if args.post_norms else None
        self.post_ffn_norm = norm("post_ffw_norm.weight", d) if args.post_norms else None
        self.sliding = args.is_sliding(i)


class Transformer:
    """A decoder-only transformer over numpy float32.

    weights: GGUF tensor names -> arrays [n_out, n_in] (norms and biases 1-D). Q/K rows
    must be in the layout `args.rope_style` says (GGUF llama: interleaved; HF: neox).
    linear_factory(name, w) -> callable(x[m, k]) -> y[m, n]; defaults to `float_linear`.
    The output head is built from "output.weight", or from "token_embd.weight" when the
    file ties them (then the factory is called with that name).
    An optional "rope_freqs.weight" (llama.cpp's Llama 3.1 frequency factors) is honoured.
    """

    def __init__(
        self,
        args: ModelArgs,
        weights: Mapping[str, np.ndarray],
        linear_factory: LinearFactory | None = None,
    ) -> None:
        make = linear_factory or float_linear
        self.args = args
        emb = _get(weights, "token_embd.weight")
        if emb.ndim != 2 or emb.shape[1] != args.dim:
            raise ValueError(f"token_embd.weight: shape {emb.shape}, expected (vocab, {args.dim})")
        # The embedding's rows are the truth: tokenizer lists and configs may pad or not.
        self.vocab_size = emb.shape[0]
        # Embedding rows are gathered, never multiplied, so they stay in the given dtype.
        self.tok_embd = emb
        self.layers = [_Layer(i, args, weights, make) for i in range(args.n_layers)]
        out_norm = _get(weights, "output_norm.weight")
        self.output_norm = (np.asarray(out_norm, dtype=np.float32) + np.float32(args.norm_weight_offset)).astype(
            np.float32
        )
        if "output.weight" in weights:
            head_name, head = "output.weight", weights["output.weight"]
        else:
            head_name, head = "token_embd.weight", emb
        if head.shape != (self.vocab_size, args.dim):
            raise ValueError(f"{head_name}: shape {head.shape}, expected ({self.vocab_size}, {args.dim})")
        self.output = make(head_name, head)
        self.head_tied = head_name == "token_embd.weight"
        freq_factors = weights.get("rope_freqs.weight")
        # One Rope per distinct (base, scaling): gemma3 has two, other families one.
        self._ropes: dict[tuple, Rope] = {}
        self._layer_rope: list[Rope] = []
        for i in range(args.n_layers):
            key = (args.layer_rope_base(i), args.layer_rope_scaling(i))
            if key not in self._ropes:
                inv = rope_inv_freq(args.n_rot, key[0], key[1], freq_factors)
                self._ropes[key] = Rope(args.head_dim, inv, args.rope_style)
            self._layer_rope.append(self._ropes[key])

    def layer_rope(self, i: int) -> Rope:
        """The RoPE (inverse frequencies, layout) of layer i."""
        return self._layer_rope[i]

    def new_cache(self, max_seq_len: int | None = None, dtype: np.dtype | type = np.float32) -> KVCache:
        return KVCache.for_model(self.args, max_seq_len, dtype)

    def forward(self, tokens: np.ndarray, cache: KVCache, start_pos: int, last_only: bool = False,
                hidden: bool = False) -> np.ndarray:
        """Run m tokens at positions [start_pos, start_pos + m); returns logits [m, vocab]
        (or [1, vocab] for the last token when last_only), or with `hidden` the final norm's
        output [m or 1, dim] (embeddings). Writes their K/V into the cache and sets
        cache.length = start_pos + m."""
        args = self.args
        tokens = np.asarray(tokens).reshape(-1)  # [m]
        m = tokens.shape[0]
        if m == 0:
            raise ValueError("forward needs at least one token")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be integers, got {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        if cache.k.shape[0] != args.n_layers or cache.k.shape[2:] != (args.n_kv_heads, args.head_dim):
            raise ValueError(f"{cache!r} does not fit this model")
        cache.check_write(start_pos, m)

        x = np.asarray(self.tok_embd[tokens], dtype=np.float32)  # [m, dim]
        if args.embed_scale != 1.0:
            x = x * np.float32(args.embed_scale)
        positions = np.arange(start_pos, start_pos + m)
        trig = {id(r): r.cos_sin(positions) for r in self._ropes.values()}
        for i, layer in enumerate(self.layers):
            rope = self._layer_rope[i]
            x = self._block(i, layer, x, rope, trig[id(rope)], cache, start_pos)
        cache.advance(start_pos + m)

        if last_only:
            x = x[-1:]  # [1, dim]
        x = rms_norm(x, self.output_norm, args.norm_eps)
        if hidden:
            return np.asarray(x, dtype=np.float32)  # [m, dim]
        logits = self.output(x)  # [m, vocab]
        if args.final_logit_softcap:
            logits = softcap(logits, args.final_logit_softcap)
        return np.asarray(logits, dtype=np.float32)

    __call__ = forward

    def _block(
        self,
        i: int,
        layer: _Layer,
        x: np.ndarray,
        rope: Rope,
        trig: tuple[np.ndarray, np.ndarray],
        cache: KVCache,
        start_pos: int,
    ) -> np.ndarray:
        args = self.args
        m, hd = x.shape[0], args.head_dim
        h = rms_norm(x, layer.attn_norm, args.norm_eps)
        q, k, v = layer.wq(h), layer.wk(h), layer.wv(h)  # [m, heads*hd], [m, kv*hd], [m, kv*hd]
        if layer.bq is not None:
            q = q + layer.bq
        if layer.bk is not None:
            k = k + layer.bk
        if layer.bv is not None:
            v = v + layer.bv
        q = q.reshape(m, args.n_heads, hd)  # [m, heads*hd] -> [m, heads, hd]
        k = k.reshape(m, args.n_kv_heads, hd)  # [m, kv*hd] -> [m, kv, hd]
        v = v.reshape(m, args.n_kv_heads, hd)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, args.norm_eps)
            k = rms_norm(k, layer.k_norm, args.norm_eps)
        q = rope.apply(q, *trig)
        k = rope.apply(k, *trig)
        cache.write(i, start_pos, k, v)

        end = start_pos + m
        window = args.sliding_window if layer.sliding else None
        # Keys older than the window of the first query are never needed.
        begin = max(0, start_pos - window + 1) if window else 0
        keys, values = cache.read(i, begin, end)  # [t, kv, hd] each
        attn = attention(q, keys, values, start_pos, begin, args.softmax_scale, window, args.attn_logit_softcap)
        out = layer.wo(attn.reshape(m, args.n_heads * hd))  # [m, heads, hd] -> [m, heads*hd] -> [m, dim]
        if layer.bo is not None:
            out = out + layer.bo
        if layer.post_attn_norm is not None:
            out = rms_norm(out, layer.post_attn_norm, args.norm_eps)
        x = x + out

        h = rms_norm(x, layer.ffn_norm, args.norm_eps)
        act = gelu_tanh if args.activation == "gelu_tanh" else silu
        out = layer.w_down(act(layer.w_gate(h)) * layer.w_up(h))  # [m, ffn] -> [m, dim]
        if layer.post_ffn_norm is not None:
            out = rms_norm(out, layer.post_ffn_norm, args.norm_eps)
        return (x + out).astype(np.float32, copy=False)


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_start: int,
    k_start: int,
    scale: float,
    window: int | None = None,
    logit_softcap: float | None = None,
) -> np.ndarray:
    """Causal grouped-query attention.

    q [m, heads, hd] at positions q_start + [0, m); k, v [t, kv_heads, hd] at positions
    k_start + [0, t). Query head h reads kv head h // (heads / kv_heads), as HF's
    repeat_kv does. With `window`, a query at p sees keys at p - window < pos <= p.
    Returns [m, heads, hd].
    """
    m, n_heads, hd = q.shape
    t, n_kv, _ = k.shape
    g = n_heads // n_kv
    kt = k.transpose(1, 2, 0)  # [t, kv, hd] -> [kv, hd, t]
    vt = v.transpose(1, 0, 2)  # [t, kv, hd] -> [kv, t, hd]
    k_pos = k_start + np.arange(t)  # [t]
    out = np.empty((m, n_heads, hd), dtype=np.float32)
    for b0 in range(0, m, ATTN_QUERY_BLOCK):
        b1 = min(m, b0 + ATTN_QUERY_BLOCK)
        mb = b1 - b0
        # [mb, heads, hd] -> [mb, kv, g, hd] -> [kv, mb, g, hd] -> [kv, mb*g, hd]
        qb = q[b0:b1].reshape(mb, n_kv, g, hd).transpose(1, 0, 2, 3).reshape(n_kv, mb * g, hd)
        scores = (qb @ kt) * np.float32(scale)  # [kv, mb*g, t]
        if logit_softcap:
            scores = softcap(scores, logit_softcap)
        scores = scores.reshape(n_kv, mb, g, t)  # [kv, mb*g, t] -> [kv, mb, g, t]
        q_pos = (q_start + np.arange(b0, b1))[:, None]  # [mb, 1]
        masked = k_pos[None, :] > q_pos  # [mb, t]: future keys
        if window:
            masked |= k_pos[None, :] <= q_pos - window
        # Every query sees at least itself, so no row is fully masked (no NaN).
        scores = np.where(masked[None, :, None, :], np.float32(-np.inf), scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        ob = probs.reshape(n_kv, mb * g, t) @ vt  # [kv, mb, g, t] -> [kv, mb*g, t]; @ -> [kv, mb*g, hd]
        # [kv, mb*g, hd] -> [kv, mb, g, hd] -> [mb, kv, g, hd] -> [mb, heads, hd]
        out[b0:b1] = ob.reshape(n_kv, mb, g, hd).transpose(1, 0, 2, 3).reshape(mb, n_heads, hd)
    return out


def _get(weights: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return weights[name]
    except KeyError:
        raise KeyError(f"missing tensor {name!r}") from None
