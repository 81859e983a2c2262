"""Orthogonality regularisation: λ(t)·Σ ‖WᵀW − I‖²_F with a linear warm-up."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

__all__ = ["orthogonality_loss", "OrthoSchedule"]


def _violation(w: Tensor) -> Tensor:
    # The smaller Gram side: WᵀW (in×in) for tall W, WWᵀ for wide W.
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum()


def orthogonality_loss(weights: Tensor | Iterable[Tensor], *, per_head: bool = False,
                       num_heads: int | None = None) -> Tensor:
    """Σ_W ‖WᵀW − I‖²_F over 2-D weights (out, in), using the smaller Gram side.

    per_head=True splits each W's output rows into num_heads blocks and penalises
    each block separately. Differentiable; returns a 0-d tensor.
    """
    ws = [weights] if isinstance(weights, Tensor) else list(weights)
    if not ws:
        raise ValueError("weights must contain at least one matrix")
    if per_head and (not isinstance(num_heads, int) or num_heads < 1):
        raise ValueError(f"per_head=True needs num_heads >= 1, got {num_heads!r}")
    total = None
    for i, w in enumerate(ws):
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise TypeError(f"weights[{i}] must be a floating-point tensor")
        if w.dim() != 2:
            raise ValueError(f"weights[{i}] must be 2-D (out, in), got shape {tuple(w.shape)}")
        if per_head:
            if w.shape[0] % num_heads:
                raise ValueError(f"weights[{i}] has {w.shape[0]} rows, not divisible by num_heads={num_heads}")
            term = sum(_violation(block) for block in w.chunk(num_heads, dim=0))
        else:
            term = _violation(w)
        total = term if total is None else total + term
    return total


class OrthoSchedule:
    """λ(t) = λ_max·min(1, t/t_warmup); warmup_steps = 0 gives λ_max from step 0."""

    def __init__(self, lambda_max: float, warmup_steps: int):
        if lambda_max < 0:
            raise ValueError(f"lambda_max must be >= 0, got {lambda_max}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.lambda_max, self.warmup_steps = float(lambda_max), warmup_steps

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.warmup_steps == 0:
            return self.lambda_max
        return self.lambda_max * min(1.0, step / self.warmup_steps)

    def __repr__(self):
        return f"OrthoSchedule(lambda_max={self.lambda_max}, warmup_steps={self.warmup_steps})"
