"""Orthogonality regularisation of a model's attention and MLP weights.

L_ortho = λ(t)·Σ_W ‖WᵀW − I‖²_F over the Q/K/V/O projections and MLP matrices of
every KOA block (`orthogonality_loss`, with the smaller Gram side for non-square
W), λ(t) from `OrthoSchedule` (linear warm-up).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .reference.ortho import OrthoSchedule, orthogonality_loss

__all__ = ["OrthoSchedule", "orthogonality_loss", "ortho_weights", "model_orthogonality_loss"]


def ortho_weights(model: nn.Module) -> dict[str, Tensor]:
    """{"<block name>.<matrix>": W} for every module that defines `ortho_weights()`."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "ortho_weights") and module is not model:
            for key, w in module.ortho_weights().items():
                found[f"{name}.{key}"] = w
    return found


def model_orthogonality_loss(model: nn.Module, *, per_head: bool = False) -> Tensor:
    """Σ ‖WᵀW − I‖²_F over `ortho_weights(model)`; per_head splits the Q/K/V
    projections into their heads' row blocks."""
    total = None
    for name, w in ortho_weights(model).items():
        heads = getattr(_owner(model, name), "num_heads", None)
        split = per_head and name.rsplit(".", 1)[-1] in ("q", "k", "v") and heads is not None
        term = orthogonality_loss(w, per_head=split, num_heads=heads if split else None)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the model has no weights to regularise (no module defines ortho_weights())")
    return total


def _owner(model: nn.Module, name: str):
    block = model.get_submodule(name.rsplit(".", 1)[0])
    return getattr(block, "attn", None)
