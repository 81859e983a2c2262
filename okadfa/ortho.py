"""Orthogonality regularisation (docs/design.md §5) of a model's attention and MLP weights.

L_ortho = λ(t)·Σ_W ‖WᵀW − I‖²_F over the Q/K/V/O projections and MLP matrices of
every KOA block (`orthogonality_loss`, with the smaller Gram side for non-square
W), λ(t) from `OrthoSchedule` (linear warm-up).

The Gram matrices are computed in float32 (float64 for float64 weights) even under
`torch.autocast`: near orthogonality the diagonal of WᵀW is 1 + δ with small δ, and
rounding it to bfloat16 (spacing 2⁻⁷ above 1) would erase the deviation the penalty
measures (‖QᵀQ − I‖²_F of an orthogonal 64×64 Q: ~1e-12 in float32, ~4e-4 in bf16).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
from torch import Tensor, nn

from .validation import check_matrix

__all__ = ["OrthoSchedule", "orthogonality_loss", "ortho_weights", "model_orthogonality_loss"]


def _violation(w: Tensor) -> Tensor:
    """‖G − I‖²_F with G the smaller Gram matrix of w (out, in): WᵀW (in×in) if out ≥ in, else WWᵀ."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))    # half types: Gram sums in float32
    kind = w.device.type
    # autocast would run the products in its half dtype (module docstring); it is off here
    with torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext():
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum()


def orthogonality_loss(weights: Tensor | Iterable[Tensor], *, per_head: bool = False,
                       num_heads: int | None = None) -> Tensor:
    """L = Σ_W ‖WᵀW − I‖²_F over 2-D weights W (out, in), with the smaller Gram side.

    A tall W (out ≥ in) is penalised through WᵀW (in×in; zero iff its columns are
    orthonormal), a wide W through WWᵀ (out×out; zero iff its rows are orthonormal).
    With per_head=True each W is split into num_heads row blocks W_h (out/num_heads, in),
    as a Q/K/V projection splits into heads, and L = Σ_W Σ_h ‖·‖²_F of each block.

    Args:
        weights: one tensor (out, in) or an iterable of them, floating point.
        per_head: penalise each head's row block separately (needs num_heads).
        num_heads: number of row blocks; must divide every W's row count.
    Returns:
        A differentiable 0-d tensor, float32 for half-precision weights, else their
        (promoted) dtype.

    Example:
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8))
        >>> round(orthogonality_loss([q, 2 * q]).item(), 3)        # 0 + 8·(4 − 1)²
        72.0
    """
    ws = [weights] if isinstance(weights, Tensor) else list(weights)
    if not ws:
        raise ValueError("weights must contain at least one matrix")
    if not isinstance(per_head, bool):
        raise TypeError(f"per_head must be a bool, got {type(per_head).__name__}")
    if per_head and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
        raise ValueError(f"per_head=True needs num_heads, a positive int, got {num_heads!r}")
    for i, w in enumerate(ws):
        check_matrix(w, f"weights[{i}]", "(out, in)")
        if per_head and w.shape[0] % num_heads:
            raise ValueError(f"weights[{i}] has {w.shape[0]} rows, not divisible by num_heads={num_heads}")
    terms = []
    for w in ws:
        blocks = w.chunk(num_heads, dim=0) if per_head else (w,)
        terms.extend(_violation(block) for block in blocks)
    return sum(terms[1:], terms[0])


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


class OrthoSchedule:
    """λ(t) = λ_max·min(1, t/t_warmup): a linear warm-up from 0 to λ_max, then constant.

    warmup_steps = 0 gives λ_max from step 0.

    Example:
        >>> sched = OrthoSchedule(0.1, 100)
        >>> sched(0), sched(50), sched(100), sched(1000)
        (0.0, 0.05, 0.1, 0.1)
    """

    def __init__(self, lambda_max: float, warmup_steps: int):
        if isinstance(lambda_max, bool) or not isinstance(lambda_max, (int, float)):
            raise TypeError(f"lambda_max must be a float, got {type(lambda_max).__name__}")
        if not (math.isfinite(lambda_max) and lambda_max >= 0):
            raise ValueError(f"lambda_max must be finite and >= 0, got {lambda_max}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
            raise TypeError(f"warmup_steps must be an int, got {type(warmup_steps).__name__}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.lambda_max, self.warmup_steps = float(lambda_max), warmup_steps

    def __call__(self, step):
        """λ at `step`: an int gives a float; a 0-d tensor (a step counter buffer) gives a
        tensor, computed without reading its value (so torch.compile needs no graph break)."""
        if isinstance(step, torch.Tensor):
            if self.warmup_steps == 0:
                return torch.full_like(step, self.lambda_max, dtype=torch.float32)
            return self.lambda_max * (step.float() / self.warmup_steps).clamp(0.0, 1.0)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return self.lambda_max
        return self.lambda_max * step / self.warmup_steps

    def __repr__(self) -> str:
        return f"OrthoSchedule(lambda_max={self.lambda_max}, warmup_steps={self.warmup_steps})"
