"""Registered ops with autograd and backend dispatch (one module per op)."""
from .favor_attention import favor_attention
from .linear_attention import linear_attention

__all__ = ["favor_attention", "linear_attention"]
