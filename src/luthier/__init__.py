"""luthier: low-bit LLM inference on CPUs by table-lookup matrix multiplication.

Submodules import lazily so that pure-Python parts (loaders, tokenizer) work without the
native core being built.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .quant import QTensor, quantize_rtn, quantize_ternary  # noqa: E402

__all__ = ["Llama", "PromptLookupDecoding", "QTensor", "quantize_rtn", "quantize_ternary", "QLinear", "pack", "__version__"]


def __getattr__(name: str):
    if name == "Llama":
        from .api import Llama

        return Llama
    if name in ("PromptLookupDecoding", "LlamaPromptLookupDecoding"):  # the latter: llama-cpp-python's name
        from .lookup import PromptLookupDecoding

        return PromptLookupDecoding
    if name in ("QLinear", "pack", "unpack", "lut_linear", "build_tables", "lut_gemm"):
        from . import kernels

        return getattr(kernels, name)
    raise AttributeError(f"module 'luthier' has no attribute {name!r}")
