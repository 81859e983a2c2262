"""okadfa: FAVOR+ linear attention and Direct Feedback Alignment kernels for PyTorch.

Every op has four backends ("triton", "cuda", "cpu", "reference") behind one
function; see `okadfa.backends()` for what runs here and docs/design.md for the math.
"""
from . import nn, reference     # okadfa.nn: the modules (FavorAttention, replace_attention, ...)
from .backends import backends
from .decoding import FavorState, KVCache
from .ops import dfa_feedback, dfa_head, favor_attention, favor_sdpa, linear_attention
from .feedback import FeedbackSpec, materialize_feedback
from .ortho import OrthoSchedule, orthogonality_loss
from .reference import favor_features, random_features

__version__ = "0.1.0"

# attn_implementation="okadfa_favor" for transformers, without importing it (integrations/_autoregister.py)
from .integrations import _autoregister
_autoregister.install()

__all__ = ["FavorState", "FeedbackSpec", "KVCache", "OrthoSchedule", "backends", "dfa_feedback", "dfa_head", "favor_attention", "favor_features",
           "favor_sdpa", "linear_attention", "materialize_feedback", "nn", "orthogonality_loss", "random_features", "reference"]
