"""okadfa: FAVOR+ linear attention and Direct Feedback Alignment kernels for PyTorch.

Every op has four backends ("triton", "cuda", "cpu", "reference") behind one
function; see `okadfa.backends()` for what runs here and DESIGN.md for the math.
"""
from . import reference
from .backends import backends
from .ops import favor_attention, linear_attention
from .reference import favor_features, random_features

__version__ = "0.1.0"

__all__ = ["backends", "favor_attention", "favor_features", "linear_attention", "random_features", "reference"]
