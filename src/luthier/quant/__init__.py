"""Quantizers: float weights -> QTensor."""

from .qtensor import QTensor, default_zero
from .rtn import quantize_rtn
from .ternary import quantize_ternary

__all__ = ["QTensor", "default_zero", "quantize_rtn", "quantize_ternary"]
