"""Model definitions: hyperparameters (ModelArgs), RoPE and the transformer forward pass."""

from .args import GGUF_ARCHITECTURES, HF_MODEL_TYPES, ModelArgs, RopeScaling
from .rope import Rope, permute_qk_interleaved, rope_inv_freq, unpermute_qk_interleaved
from .transformer import LinearFactory, LinearFn, Transformer, attention, float_linear

__all__ = [
    "GGUF_ARCHITECTURES",
    "HF_MODEL_TYPES",
    "LinearFactory",
    "LinearFn",
    "ModelArgs",
    "Rope",
    "RopeScaling",
    "Transformer",
    "attention",
    "float_linear",
    "permute_qk_interleaved",
    "rope_inv_freq",
    "unpermute_qk_interleaved",
]
