"""Moved to okadfa.training.data."""
from ._moved import moved

moved("okadfa.data", "okadfa.training.data", __name__)
