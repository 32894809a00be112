"""Model file loaders: GGUF (our own memory-mapped reader and numpy dequantizers)
and Hugging Face safetensors folders. Everything here returns float32 numpy
arrays in numpy order (a weight is [n_out, n_in]); nothing needs PyTorch."""

from .bundled import gemma3_270m_path, smollm2_path
from .gguf import GGUFFile, GGUFTensorInfo, GGUFValueType
from .gguf_dequant import GGUFError, dequantize, gguf_type_name, gguf_type_sizes
from .safetensors import HFFolder, SafetensorsError, load_safetensors_file, save_safetensors

__all__ = [
    "GGUFError",
    "GGUFFile",
    "GGUFTensorInfo",
    "GGUFValueType",
    "HFFolder",
    "SafetensorsError",
    "dequantize",
    "gemma3_270m_path",
    "gguf_type_name",
    "gguf_type_sizes",
    "load_safetensors_file",
    "save_safetensors",
    "smollm2_path",
]
