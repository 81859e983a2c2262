"""Moved to okadfa.training.train."""
from ._moved import moved

moved("okadfa.train", "okadfa.training.train", __name__)
