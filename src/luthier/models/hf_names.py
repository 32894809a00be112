"""Hugging Face checkpoint tensor names -> the GGUF names `Transformer` reads.

    model.embed_tokens.weight                      token_embd.weight
    model.layers.{i}.input_layernorm.weight        blk.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.*      blk.{i}.attn_{q,k,v}.*   (weight, bias)
    model.layers.{i}.self_attn.o_proj.*            blk.{i}.attn_output.*
    model.layers.{i}.self_attn.{q,k}_norm.weight    blk.{i}.attn_{q,k}_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight blk.{i}.ffn_{gate,up,down}.weight
    model.norm.weight                              output_norm.weight
    lm_head.weight                                 output.weight (absent when tied)

The one name whose meaning depends on the family is `post_attention_layernorm`:
llama / qwen2 / qwen3 use it as the norm *before* the MLP (GGUF ffn_norm); Gemma 3
has sandwich norms, where it is the norm *after* attention (post_attention_norm) and
`pre_feedforward_layernorm` / `post_feedforward_layernorm` are ffn_norm / post_ffw_norm.

Values are not changed: HF Q/K rows rotate halves, which is what
`ModelArgs.from_hf_config` declares (rope_style "neox"), and HF Gemma norm weights lack
the +1, which `args.norm_weight_offset` (1 for HF Gemma) adds when the model is built.
Only if `args` asks for llama.cpp's interleaved layout are Q/K rows permuted into it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import numpy as np

from .args import ModelArgs
from .rope import permute_qk_interleaved

__all__ = ["hf_layer_names", "hf_to_gguf_weights"]

# Where the decoder lives: plain CausalLM checkpoints, then the two layouts of Gemma 3's
# multimodal (ForConditionalGeneration) checkpoints (older and newer transformers).
_DECODER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
_LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


class _Folder(Protocol):
    config: Mapping[str, Any]

    @property
    def tensor_names(self) -> list[str]: ...

    def load_float(self, name: str) -> np.ndarray: ...


def hf_layer_names(args: ModelArgs) -> dict[str, str]:
    """GGUF per-layer suffix -> HF per-layer suffix (both without the layer prefix), for
    the family `args.arch`; biases are not listed (see `hf_to_gguf_weights`)."""
    names = {
        "attn_norm.weight": "input_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    if args.qk_norm:
        names["attn_q_norm.weight"] = "self_attn.q_norm.weight"
        names["attn_k_norm.weight"] = "self_attn.k_norm.weight"
    if args.post_norms:  # gemma3: sandwich norms
        names["post_attention_norm.weight"] = "post_attention_layernorm.weight"
        names["ffn_norm.weight"] = "pre_feedforward_layernorm.weight"
        names["post_ffw_norm.weight"] = "post_feedforward_layernorm.weight"
    else:  # llama / qwen2 / qwen3: the norm after attention is the MLP's input norm
        names["ffn_norm.weight"] = "post_attention_layernorm.weight"
    return names


# GGUF bias suffix -> HF bias suffix; q/k/v ones are required when args.qkv_bias.
_BIASES = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
}
# Stored by some checkpoints (llama mlp_bias=True) but not computed by Transformer:
# dropping them would silently give wrong outputs.
_UNSUPPORTED = ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")


def _tied(config: Mapping[str, Any]) -> bool | None:
    """tie_word_embeddings of the config (or of a multimodal text_config); None if unset."""
    for c in (config, config.get("text_config")):
        if isinstance(c, Mapping) and isinstance(c.get("tie_word_embeddings"), bool):
            return c["tie_word_embeddings"]
    return None


def hf_to_gguf_weights(
    folder: _Folder,
    args: ModelArgs,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, np.ndarray]:
    """Load the float32 weights of an HF folder (`loaders.safetensors.HFFolder`) under the
    GGUF names `Transformer(args, weights)` expects, [n_out, n_in] like the GGUF path.

    A tensor the model needs and the folder lacks raises KeyError naming both names;
    tensors the model does not use (rotary_emb.inv_freq, a vision tower) are ignored,
    except MLP biases, which it cannot compute (ValueError).
    """
    available = set(folder.tensor_names)
    prefix = next((p for p in _DECODER_PREFIXES if p + "embed_tokens.weight" in available), None)
    where = getattr(folder, "path", "the folder")
    if prefix is None:
        raise KeyError(
            f"missing tensor 'model.embed_tokens.weight' (GGUF token_embd.weight) in {where}; "
            f"it holds {len(available)} tensors, e.g. {sorted(available)[:5]}"
        )

    plan: dict[str, str] = {"token_embd.weight": prefix + "embed_tokens.weight"}  # GGUF -> HF
    optional: dict[str, str] = {}
    layer_names = hf_layer_names(args)
    for i in range(args.n_layers):
        hp, gp = f"{prefix}layers.{i}.", f"blk.{i}."
        for g, h in layer_names.items():
            plan[gp + g] = hp + h
        for g, h in _BIASES.items():
            if args.qkv_bias and g != "attn_output.bias":
                plan[gp + g] = hp + h
            else:
                optional[gp + g] = hp + h
        for h in _UNSUPPORTED:
            if hp + h in available:
                raise ValueError(f"{hp + h}: MLP biases are not supported ({args.arch})")
    plan["output_norm.weight"] = prefix + "norm.weight"
    head = next((h for h in _LM_HEADS if h in available), None)
    if head is not None and _tied(folder.config) is not True:
        # A tied checkpoint may still store lm_head; HF then uses the embedding, as here.
        plan["output.weight"] = head
    elif head is None and _tied(folder.config) is False:
        raise KeyError(f"missing tensor 'lm_head.weight' (GGUF output.weight) in {where}: "
                       "config.json says tie_word_embeddings is false")

    missing = [(g, h) for g, h in plan.items() if h not in available]
    if missing:
        g, h = missing[0]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise KeyError(f"missing tensor {h!r} (GGUF {g}) in {where}{more}")
    plan.update({g: h for g, h in optional.items() if h in available})

    weights: dict[str, np.ndarray] = {}
    for n, (g, h) in enumerate(plan.items()):
        if progress:
            progress(n, len(plan), f"loading {h}")
        w = folder.load_float(h)
        if args.rope_style == "interleaved" and g.split(".")[-2] in ("attn_q", "attn_k"):
            heads = args.n_heads if ".attn_q." in g else args.n_kv_heads
            w = _to_interleaved(w, heads, args.head_dim, args.n_rot)
        weights[g] = w
    return weights


def _to_interleaved(w: np.ndarray, n_heads: int, head_dim: int, n_rot: int) -> np.ndarray:
    """HF (neox) Q/K rows or bias -> llama.cpp's interleaved layout, per head."""
    if n_rot != head_dim:
        raise ValueError("interleaved RoPE layout with partial rotation is not supported for HF weights")
    w2 = w.reshape(w.shape[0], -1)  # a bias [n] -> [n, 1]
    return np.ascontiguousarray(permute_qk_interleaved(w2, n_heads).reshape(w.shape))
