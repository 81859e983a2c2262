"""The reference path: every op in plain PyTorch, written to be read.

Tests compare each backend with these functions, and they are the fallback
when no native or Triton kernel can run.
"""
from .attention import favor_attention, favor_features, linear_attention, random_features
from .dfa import dfa_feedback, dfa_head
from .feedback import FeedbackSpec, materialize_feedback
from .ortho import OrthoSchedule, orthogonality_loss

__all__ = ["FeedbackSpec", "OrthoSchedule", "dfa_feedback", "dfa_head", "favor_attention", "favor_features",
           "linear_attention", "materialize_feedback", "orthogonality_loss", "random_features"]
