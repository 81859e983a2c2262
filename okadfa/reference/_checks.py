"""Argument checks shared by the reference functions."""
from torch import Tensor


def check_matrix(x, name: str, layout: str) -> None:
    """A 2-D floating-point tensor, else TypeError/ValueError naming `name`."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
