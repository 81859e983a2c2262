"""Moved to okadfa.training.compare."""
from ._moved import moved

moved("okadfa.compare", "okadfa.training.compare", __name__)
