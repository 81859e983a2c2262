"""The reference path: every op in plain PyTorch, written to be read.

Tests compare each backend with these functions, and they are the fallback
when no native or Triton kernel can run. They take arguments already checked
by okadfa.validation (the ops validate once, before dispatch).
"""
from .attention import (favor_attention, favor_attention_naive, favor_attention_recurrent, favor_features,
                        linear_attention, linear_attention_naive, linear_attention_recurrent, random_features)
from .dfa import dfa_feedback, dfa_head

__all__ = ["dfa_feedback", "dfa_head", "favor_attention", "favor_attention_naive", "favor_attention_recurrent",
           "favor_features", "linear_attention", "linear_attention_naive", "linear_attention_recurrent",
           "random_features"]
