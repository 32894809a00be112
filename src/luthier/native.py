"""The native decode step: a models.Transformer's weights handed to csrc/runtime/decoder.cpp.

`NativeModel` has the interface of `Transformer` that generation uses (`forward`,
`new_cache`, `args`, `vocab_size`), so either can run a model; the numpy Transformer is
the oracle the native one is tested against. A native model holds `n_seq` KV slots:
`new_cache(slot=...)` hands one out for the single-sequence interface, and
`forward_batch` runs rows of several sequences as one batch (continuous batching in the
server).
"""

from __future__ import annotations

import numpy as np

from . import _core
from .kernels import PackedWeight, QLinear

_LINEARS = (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o"),
            ("w_gate", "gate"), ("w_up", "up"), ("w_down", "down"))
_VECTORS = (("attn_norm", "attn_norm"), ("ffn_norm", "ffn_norm"),
            ("post_attn_norm", "post_attn_norm"), ("post_ffn_norm", "post_ffn_norm"),
            ("q_norm", "q_norm"), ("k_norm", "k_norm"),
            ("bq", "bq"), ("bk", "bk"), ("bv", "bv"), ("bo", "bo"))


class NativeCache:
    """Handle on one KV slot of the native decoder (for the Transformer-like interface)."""

    def __init__(self, dec, max_seq_len: int, slot: int = 0):
        self._dec = dec
        self.max_seq_len = max_seq_len
        self.slot = slot
        dec.release(slot)

    @property
    def length(self) -> int:
        return self._dec.slot_length(self.slot)


def _set_linear(dec, layer: int, name: str, lin, perms: dict | None = None) -> None:
    perm = getattr(lin, "perm", None)  # act-order import (loaders/hf_quant.PermutedQLinear)
    if isinstance(lin, QLinear) or (perm is not None and isinstance(getattr(lin, "packed", None), PackedWeight)):
        p = lin.packed
        dec.set_lut(layer, name, p.n, p.k, p.bits, p.group_size, p.w, p.s, p.z, p.zero_const)
        if perm is not None:
            # equal perms (q/k/v, gate/up of one GPTQ layer) as one array: the decoder then
            # gathers the input once and builds one set of tables for all of them
            key = np.ascontiguousarray(perm, np.int32)
            if perms is not None:
                key = perms.setdefault(key.tobytes(), key)
            dec.set_perm(layer, name, key)
    elif hasattr(lin, "q") and hasattr(lin, "scale"):  # int8.Int8Linear (panels)
        dec.set_int8(layer, name, lin.n, lin.k, lin.q, lin.scale)
    elif hasattr(lin, "wt"):  # engine.FloatLinear holds w.T [k, n]
        dec.set_float(layer, name, np.ascontiguousarray(lin.wt.T))  # [k, n] -> [n, k]
    else:
        raise TypeError(f"{name}: the native decoder takes QLinear, Int8Linear or FloatLinear layers, "
                        f"got {type(lin).__name__}")


class NativeModel:
    def __init__(self, model, ctx: int, n_threads: int = 1, mode: str = "exact", n_seq: int = 1,
                 kv: str = "f32"):
        a = model.args
        self.args = a
        self.vocab_size = model.vocab_size
        dec = _core.Decoder(
            dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
            head_dim=a.head_dim, ffn_dim=a.ffn_dim, vocab=model.vocab_size, n_rot=a.n_rot,
            ctx=int(ctx), sliding_window=int(a.sliding_window or 0), norm_eps=float(a.norm_eps),
            attn_scale=float(a.softmax_scale), embed_scale=float(a.embed_scale),
            attn_softcap=float(a.attn_logit_softcap or 0.0),
            final_softcap=float(a.final_logit_softcap or 0.0),
            neox=a.rope_style == "neox", gelu=a.activation == "gelu_tanh", mode=mode,
            n_threads=int(n_threads), n_seq=int(n_seq), kv=kv)
        emb = model.tok_embd
        if hasattr(emb, "q") and hasattr(emb, "scale"):  # int8.Int8Rows (panels)
            dec.set_embedding_q8(emb.q, emb.scale)
        elif emb.dtype == np.float16:
            dec.set_embedding_f16(np.ascontiguousarray(emb).view(np.uint16))
        else:
            dec.set_embedding_f32(np.ascontiguousarray(emb, dtype=np.float32))
        dec.set_vector(-1, "out_norm", np.ascontiguousarray(model.output_norm, np.float32))
        _set_linear(dec, -1, "head", model.output)
        freqs: dict[bytes, np.ndarray] = {}
        for i, layer in enumerate(model.layers):
            perms: dict = {}
            for attr, name in _LINEARS:
                _set_linear(dec, i, name, getattr(layer, attr), perms)
            for attr, name in _VECTORS:
                v = getattr(layer, attr, None)
                if v is not None:
                    dec.set_vector(i, name, np.ascontiguousarray(v, np.float32))
            # one array per distinct RoPE base: the decoder computes cos/sin once per
            # forward for each array it sees, not once per layer
            inv = np.ascontiguousarray(model.layer_rope(i).inv_freq, np.float32)
            dec.set_vector(i, "inv_freq", freqs.setdefault(inv.tobytes(), inv))
            dec.set_sliding(i, bool(a.is_sliding(i)))
        dec.check()
        self._dec = dec
        self.ctx = int(ctx)
        self.n_seq = int(n_seq)
        self.kv = kv
        self._owner: dict[int, NativeCache] = {}  # slot -> the NativeCache handed out for it

    @property
    def n_threads(self) -> int:
        return self._dec.n_threads

    @n_threads.setter
    def n_threads(self, n: int) -> None:
        self._dec.n_threads = n

    def new_cache(self, max_seq_len: int | None = None, dtype=None, slot: int = 0) -> NativeCache:
        """Slot `slot`, emptied (its previous sequence is forgotten)."""
        n = self.ctx if max_seq_len is None else int(max_seq_len)
        if n > self.ctx:
            raise ValueError(f"a cache of {n} tokens exceeds the native context of {self.ctx}")
        if not 0 <= slot < self.n_seq:
            raise ValueError(f"slot {slot} out of range (the model has {self.n_seq} KV slots)")
        cache = NativeCache(self._dec, n, slot)
        self._owner[slot] = cache
        return cache

    def owns(self, cache: NativeCache) -> bool:
        """Whether `cache` is still the handle of its slot (no later new_cache or release
        of the slot emptied it): a PromptCache reuses the slot's KV only then."""
        return self._owner.get(cache.slot) is cache

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Slot dst's cache becomes the first n cached positions of slot src's (a prompt
        prefix the two sequences share is computed once). dst's handle, if any, is void."""
        self._owner.pop(int(dst), None)
        self._dec.copy_prefix(int(src), int(dst), int(n))

    def release(self, slot: int) -> None:
        """Forget slot's sequence and return its KV memory to the OS."""
        self._owner.pop(int(slot), None)
        self._dec.release(int(slot))

    def forward_batch(self, tokens, slots, positions, out_rows, out: np.ndarray | None = None) -> np.ndarray:
        """Row i is token tokens[i] of sequence slots[i] at positions[i] (a slot's rows are
        consecutive positions, starting at most at its cached length); returns the logits
        of rows out_rows: [len(out_rows), vocab], in `out` if given (float32, C-contiguous:
        a reused buffer spares the page faults of a fresh multi-MB array every step)."""
        t = np.ascontiguousarray(tokens, np.int32).reshape(-1)  # [m]
        s = np.ascontiguousarray(slots, np.int32).reshape(-1)
        p = np.ascontiguousarray(positions, np.int32).reshape(-1)
        r = np.ascontiguousarray(out_rows, np.int32).reshape(-1)
        if out is None:
            out = np.empty((r.size, self.vocab_size), np.float32)
        self._dec.forward_batch(t, s, p, r, out)
        return out

    def forward(self, tokens, cache: NativeCache, start_pos: int, last_only: bool = False,
                hidden: bool = False) -> np.ndarray:
        """As models.Transformer.forward: logits [m or 1, vocab], or with `hidden` the
        final norm's output [m or 1, dim]."""
        t = np.ascontiguousarray(np.asarray(tokens).reshape(-1), dtype=np.int32)  # [m]
        if t.size == 0:
            raise ValueError("forward needs at least one token")
        if start_pos + t.size > cache.max_seq_len:
            raise ValueError(f"context full: {start_pos + t.size} tokens > {cache.max_seq_len}")
        if hidden:
            rows = np.arange(t.size - 1 if last_only else 0, t.size, dtype=np.int32)  # [1 or m]
            out = np.empty((rows.size, self.args.dim), np.float32)
            self._dec.forward_batch(t, np.full(t.size, cache.slot, np.int32),
                                    np.arange(start_pos, start_pos + t.size, dtype=np.int32), rows, out, True)
            return out
        out = np.empty((1 if last_only else t.size, self.vocab_size), np.float32)
        self._dec.forward(t, int(start_pos), out, not last_only, cache.slot)
        return out

    __call__ = forward
