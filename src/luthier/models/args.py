"""ModelArgs: every hyperparameter the forward pass needs, read from GGUF metadata or
from a Hugging Face config.json.

The transformer families differ in a handful of switches (biases, q/k norms, sandwich
norms, GeGLU, sliding windows, RoPE layout), so one dataclass with explicit switches is
simpler than a class per family: the forward pass reads switches, never family names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import numpy as np

RopeStyle = Literal["interleaved", "neox"]
Activation = Literal["silu", "gelu_tanh"]

# GGUF architecture names this module understands.
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
# Hugging Face `model_type` values -> the family they behave like.
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}

# Gemma 3 local (sliding-window) layers use a fixed RoPE base, not the global one.
GEMMA3_LOCAL_ROPE_BASE = 10_000.0
# Gemma 3: 5 local layers, then 1 global one (llama.cpp and HF hard-code this pattern).
GEMMA3_SLIDING_PATTERN = 6


@dataclass(frozen=True)
class RopeScaling:
    """Context-extension of RoPE frequencies.

    kind "linear": every frequency divided by `factor` (position interpolation).
    kind "llama3": long wavelengths divided by `factor`, short ones kept, a smooth
    blend in between (Llama 3.1 / 3.2).
    """

    kind: Literal["linear", "llama3"]
    factor: float
    original_context_length: int = 8192
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass(frozen=True)
class ModelArgs:
    """Hyperparameters of a decoder-only transformer (llama / qwen2 / qwen3 / gemma3)."""

    arch: str
    dim: int  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int  # 0 = unknown until the embedding is seen
    norm_eps: float
    max_seq_len: int
    rope_base: float
    # Which RoPE layout the Q/K weights expect: GGUF "llama" files hold Q/K rows
    # permuted by llama.cpp's converter (pairs (2i, 2i+1) rotate together); Hugging
    # Face weights and GGUF qwen/gemma files rotate halves (i, i + d/2) ("neox").
    rope_style: RopeStyle = "neox"
    rope_dim: int = 0  # rotated dims per head; 0 = head_dim
    rope_scaling: RopeScaling | None = None
    rope_base_local: float | None = None  # sliding layers' base (gemma3); None = rope_base
    activation: Activation = "silu"
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim of q and k before RoPE (qwen3, gemma3)
    post_norms: bool = False  # norms after attention and FFN too (gemma "sandwich")
    sliding_window: int | None = None
    # True for layers that use the sliding window; empty = no layer does.
    layer_sliding: tuple[bool, ...] = field(default_factory=tuple)
    attn_scale: float = 0.0  # softmax scale; 0 = 1/sqrt(head_dim)
    embed_scale: float = 1.0  # embeddings multiplied by this (gemma: sqrt(dim))
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Added to every RMSNorm weight at load. Gemma computes x*(1+w): llama.cpp's
    # converter already stored 1+w in the GGUF (offset 0); HF checkpoints hold w (offset 1).
    norm_weight_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.layer_sliding and len(self.layer_sliding) != self.n_layers:
            raise ValueError(f"layer_sliding has {len(self.layer_sliding)} entries for {self.n_layers} layers")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"rope_dim {self.rope_dim} must be even and <= head_dim {self.head_dim}")

    @property
    def n_rot(self) -> int:
        """Rotated dims per head."""
        return self.rope_dim or self.head_dim

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_sliding) and self.layer_sliding[layer] and self.sliding_window is not None

    def layer_rope_base(self, layer: int) -> float:
        if self.is_sliding(layer) and self.rope_base_local is not None:
            return self.rope_base_local
        return self.rope_base

    def layer_rope_scaling(self, layer: int) -> RopeScaling | None:
        # Gemma 3 scales only its global layers (HF: rope_parameters["full_attention"],
        # llama.cpp: freq_scale of SWA layers fixed to 1).
        if self.arch == "gemma3" and self.is_sliding(layer):
            return None
        return self.rope_scaling

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> ModelArgs:
        """Read ModelArgs from GGUF metadata (key -> value, as `gguf` or luthier's loader gives)."""
        arch = _scalar(meta.get("general.architecture"))
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(
                f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )
        a = str(arch)

        def get(key: str, default: Any = None) -> Any:
            return _scalar(meta.get(f"{a}.{key}", default))

        def need(key: str) -> Any:
            value = get(key)
            if value is None:
                raise ValueError(f"GGUF metadata lacks {a}.{key}")
            return value

        dim = int(need("embedding_length"))
        n_layers = int(need("block_count"))
        n_heads = _per_layer_int(need("attention.head_count"), "attention.head_count")
        n_kv_heads = _per_layer_int(get("attention.head_count_kv", n_heads), "attention.head_count_kv")
        head_dim = int(get("attention.key_length", dim // n_heads))
        value_dim = int(get("attention.value_length", head_dim))
        if value_dim != head_dim:
            raise ValueError(f"key_length {head_dim} != value_length {value_dim} is not supported")
        vocab = get("vocab_size")
        if vocab is None and "tokenizer.ggml.tokens" in meta:
            vocab = len(meta["tokenizer.ggml.tokens"])
        rope_dim = int(get("rope.dimension_count", head_dim))

        common: dict[str, Any] = dict(
            arch=a,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_dim=_per_layer_int(need("feed_forward_length"), "feed_forward_length"),
            vocab_size=int(vocab or 0),
            norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            max_seq_len=int(get("context_length", 2048)),
            rope_base=float(get("rope.freq_base", 10_000.0)),
            rope_dim=0 if rope_dim == head_dim else rope_dim,
            rope_scaling=_gguf_rope_scaling(get),
            attn_logit_softcap=_opt_float(get("attn_logit_softcapping")),
            final_logit_softcap=_opt_float(get("final_logit_softcapping")),
        )
        scale = _opt_float(get("attention.scale"))
        if scale:
            common["attn_scale"] = scale

        if a == "llama":
            # llama.cpp's converter permuted Q/K rows of llama models (see rope_style).
            return cls(rope_style="interleaved", **common)
        if a == "qwen2":
            return cls(rope_style="neox", qkv_bias=True, **common)
        if a == "qwen3":
            return cls(rope_style="neox", qk_norm=True, **common)
        # gemma3
        window = get("attention.sliding_window")
        pattern = meta.get(f"{a}.attention.sliding_window_pattern")
        if "attn_scale" not in common:
            # llama.cpp: Gemma 3 27B uses query_pre_attn_scalar = dim / n_heads, the
            # others head_dim; GGUF does not store the scalar, 62 layers identify 27B.
            pre_attn = dim // n_heads if n_layers == 62 else head_dim
            common["attn_scale"] = 1.0 / math.sqrt(pre_attn)
        return cls(
            rope_style="neox",
            rope_base_local=float(get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)),
            activation="gelu_tanh",
            qk_norm=True,
            post_norms=True,
            sliding_window=int(window) if window else None,
            layer_sliding=_sliding_layers(pattern, n_layers) if window else (),
            embed_scale=math.sqrt(dim),
            **common,
        )

    # ------------------------------------------------------------ HF config
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelArgs:
        """Read ModelArgs from a Hugging Face config.json dict.

        The weights that go with it are HF's: Q/K rows not permuted (rope_style "neox")
        and Gemma norm weights without the +1 (norm_weight_offset 1).
        """
        model_type = config.get("model_type")
        if model_type == "gemma3" and "text_config" in config:
            config = {**config["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        family = HF_MODEL_TYPES.get(str(model_type))
        if family is None:
            raise ValueError(
                f"unsupported Hugging Face model_type {model_type!r}; supported: {', '.join(HF_MODEL_TYPES)}"
            )
        dim = int(config["hidden_size"])
        n_heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or dim // n_heads)
        rope = _hf_rope_parameters(config, family)
        common: dict[str, Any] = dict(
            arch=family,
            dim=dim,
            n_layers=int(config["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            ffn_dim=int(config["intermediate_size"]),
            vocab_size=int(config.get("vocab_size") or 0),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
            rope_base=float(rope.get("rope_theta", 10_000.0)),
            rope_style="neox",
            rope_dim=_hf_rope_dim(head_dim, rope.get("partial_rotary_factor")),
            rope_scaling=_hf_rope_scaling(rope),
            attn_logit_softcap=_opt_float(config.get("attn_logit_softcapping")),
            final_logit_softcap=_opt_float(config.get("final_logit_softcapping")),
        )
        if family == "llama":
            window = config.get("sliding_window") if model_type == "mistral" else None
            n = common["n_layers"]
            return cls(
                qkv_bias=bool(config.get("attention_bias", False)),
                sliding_window=int(window) if window else None,
                layer_sliding=(True,) * n if window else (),
                **common,
            )
        if family == "qwen2":
            return cls(qkv_bias=True, **common)
        if family == "qwen3":
            return cls(qkv_bias=bool(config.get("attention_bias", False)), qk_norm=True, **common)
        # gemma3
        n = common["n_layers"]
        window = config.get("sliding_window")
        types = config.get("layer_types")
        if types is not None:
            sliding = tuple(t == "sliding_attention" for t in types)
        else:
            sliding = _sliding_layers(config.get("sliding_window_pattern"), n)
        local = _hf_rope_parameters(config, family, "sliding_attention")
        return cls(
            rope_base_local=float(local.get("rope_theta", config.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_BASE))),
            activation="gelu_tanh",
            qkv_bias=bool(config.get("attention_bias", False)),
            qk_norm=True,
            post_norms=True,
            sliding_window=int(window) if window else None,
            layer_sliding=sliding if window else (),
            attn_scale=1.0 / math.sqrt(float(config.get("query_pre_attn_scalar", head_dim))),
            embed_scale=math.sqrt(dim),
            norm_weight_offset=1.0,
            **common,
        )


# ---------------------------------------------------------------- helpers
def _scalar(value: Any) -> Any:
    """GGUF readers give some scalars as 1-element arrays/lists; unwrap them."""
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return value[0]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _per_layer_int(value: Any, what: str) -> int:
    """Some GGUFs store head counts per layer; luthier needs them uniform."""
    if isinstance(value, (list, tuple, np.ndarray)):
        values = {int(v) for v in value}
        if len(values) != 1:
            raise ValueError(f"per-layer {what} {sorted(values)} is not supported")
        return values.pop()
    return int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None or value == 0 else float(value)


def _sliding_layers(pattern: Any, n_layers: int) -> tuple[bool, ...]:
    """Which layers slide. `pattern` is a period P (layers i with (i+1) % P != 0 slide),
    a per-layer list of flags, or None for Gemma 3's period of 6."""
    if isinstance(pattern, (list, tuple, np.ndarray)):
        flags = tuple(bool(p) for p in pattern)
        if len(flags) != n_layers:
            raise ValueError(f"sliding_window_pattern has {len(flags)} entries for {n_layers} layers")
        return flags
    if pattern is None:
        pattern = GEMMA3_SLIDING_PATTERN
    period = int(pattern)
    if period <= 0:
        raise ValueError(f"sliding_window_pattern {period} must be positive")
    return tuple((i + 1) % period != 0 for i in range(n_layers))


def _gguf_rope_scaling(get: Any) -> RopeScaling | None:
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(get("rope.scaling.factor", 1.0))
    orig = int(get("rope.scaling.original_context_length", 8192))
    if kind == "linear":
        return None if factor == 1.0 else RopeScaling("linear", factor, orig)
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            factor,
            orig,
            float(get("rope.scaling.low_freq_factor", 1.0)),
            float(get("rope.scaling.high_freq_factor", 4.0)),
        )
    raise ValueError(f"unsupported RoPE scaling type {kind!r} (supported: linear, llama3)")


def _hf_rope_parameters(config: Mapping[str, Any], family: str, layer_type: str = "full_attention") -> dict[str, Any]:
    """RoPE settings as one flat dict, from either the transformers>=5 `rope_parameters`
    (flat, or per layer type for Gemma 3) or the older `rope_theta` + `rope_scaling`."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and layer_type in params:
        params = params[layer_type]
    out: dict[str, Any] = dict(params or {})
    if "rope_theta" not in out:
        if family == "gemma3":
            default = 1_000_000.0 if layer_type == "full_attention" else GEMMA3_LOCAL_ROPE_BASE
            key = "rope_theta" if layer_type == "full_attention" else "rope_local_base_freq"
            out["rope_theta"] = config.get(key, default)
        else:
            out["rope_theta"] = config.get("rope_theta", 10_000.0)
    scaling = config.get("rope_scaling")
    if scaling and layer_type == "full_attention" and "rope_type" not in out:
        out.update(scaling)
    if "partial_rotary_factor" not in out and "partial_rotary_factor" in config:
        out["partial_rotary_factor"] = config["partial_rotary_factor"]
    return out


def _hf_rope_dim(head_dim: int, partial: Any) -> int:
    if partial is None or float(partial) == 1.0:
        return 0
    return int(head_dim * float(partial))


def _hf_rope_scaling(rope: Mapping[str, Any]) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    factor = float(rope.get("factor", 1.0))
    orig = int(rope.get("original_max_position_embeddings", 8192))
    if kind == "linear":
        return None if factor == 1.0 else RopeScaling("linear", factor, orig)
    if kind == "llama3":
        return RopeScaling(
            "llama3", factor, orig, float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
        )
    raise ValueError(f"unsupported RoPE scaling type {kind!r} (supported: linear, llama3)")
