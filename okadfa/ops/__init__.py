"""Registered ops with autograd and backend dispatch (one module per op)."""
from .dfa_feedback import dfa_feedback
from .dfa_head import dfa_head
from .favor_attention import favor_attention
from .favor_sdpa import favor_sdpa
from .linear_attention import linear_attention

__all__ = ["dfa_feedback", "dfa_head", "favor_attention", "favor_sdpa", "linear_attention"]
