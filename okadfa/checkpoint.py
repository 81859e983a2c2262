"""Moved to okadfa.training.checkpoint."""
from ._moved import moved

moved("okadfa.checkpoint", "okadfa.training.checkpoint", __name__)
