"""Moved to okadfa.training.demo."""
from ._moved import moved

moved("okadfa.demo", "okadfa.training.demo", __name__)
