"""The reference path: every op in plain PyTorch, written to be read.

Tests compare each backend with these functions, and they are the fallback
when no native or Triton kernel can run.
"""
from .attention import favor_attention, favor_features, linear_attention, random_features

__all__ = ["favor_attention", "favor_features", "linear_attention", "random_features"]
