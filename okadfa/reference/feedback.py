"""Fixed random feedback matrices for DFA, stored or regenerated from a seed.

A seeded matrix is defined element by element by a counter-based RNG, Philox4x32-10
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), so every
backend can regenerate any entry in place from (seed, p, i, j) and store nothing:

    counter = (idx mod 2³², p, idx div 2³², 0) with idx = i·E + j,  key = (seed mod 2³², seed div 2³²)
    (x0, x1, ·, ·) = philox4x32_10(counter, key)
    u_a = ((x0 >> 8) + 1)·2⁻²⁴ ∈ (0, 1],   u_b = (x1 >> 8)·2⁻²⁴ ∈ [0, 1)
    normal:  B[p, i, j] = √(−2 ln u_a)·cos(2π u_b) / √E      (Box–Muller, float32 arithmetic)
    uniform: B[p, i, j] = (2 u_b − 1) / √E                     (U[−1, 1)/√E)

shared=True uses point 0's matrix for every point (one matrix, as TinyDFA does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FeedbackSpec", "materialize_feedback", "philox4x32"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """32×32 → 64-bit product of the constant a and b (int64 holding uint32), as (hi, lo).
    Split b in 16-bit halves so no intermediate leaves int64."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_part = a * b_lo                       # < 2^48
    hi_part = a * b_hi                       # < 2^48, weight 2^16
    lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & _MASK32
    carry = (lo_part + ((hi_part & 0xFFFF) << 16)) >> 32
    hi = ((hi_part >> 16) + carry) & _MASK32
    return hi, lo


def philox4x32(counter, key, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values; returns 4 such tensors."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = (int(k) & _MASK32 for k in key)
    for r in range(rounds):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r < rounds - 1:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


@dataclass(frozen=True)
class FeedbackSpec:
    """Feedback for `points` feedback points, each B_p ∈ R^{dim×error_dim}.

    dist: "normal" (N(0, 1/E)) or "uniform" (U[−1, 1)/√E); shared: one matrix for
    all points; storage: "seeded" (regenerated from `seed`, nothing stored) or
    "stored" (a buffer, see `materialize_feedback`).
    """
    points: int
    dim: int
    error_dim: int
    seed: int = 0
    dist: str = "normal"
    shared: bool = False
    storage: str = "seeded"

    def __post_init__(self):
        for name in ("points", "dim", "error_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FeedbackSpec.{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 64:
            raise ValueError(f"FeedbackSpec.seed must be an int in [0, 2**64), got {self.seed!r}")
        if self.dist not in ("normal", "uniform"):
            raise ValueError(f"FeedbackSpec.dist must be 'normal' or 'uniform', got {self.dist!r}")
        if self.storage not in ("seeded", "stored"):
            raise ValueError(f"FeedbackSpec.storage must be 'seeded' or 'stored', got {self.storage!r}")
        if not isinstance(self.shared, bool):
            raise ValueError(f"FeedbackSpec.shared must be a bool, got {self.shared!r}")


def materialize_feedback(spec: FeedbackSpec, *, device=None, dtype=torch.float32) -> Tensor:
    """The matrices of `spec` as a tensor (P, dim, error_dim), per the module's definition."""
    if not isinstance(spec, FeedbackSpec):
        raise TypeError(f"spec must be a FeedbackSpec, got {type(spec).__name__}")
    P, d, E = spec.points, spec.dim, spec.error_dim
    idx = torch.arange(d * E, dtype=torch.int64)
    key = (spec.seed & _MASK32, spec.seed >> 32)
    mats = []
    for p in range(1 if spec.shared else P):
        x0, x1, _, _ = philox4x32((idx & _MASK32, torch.full_like(idx, p), idx >> 32, torch.zeros_like(idx)), key)
        u_b = (x1 >> 8).to(torch.float32) * 2.0 ** -24
        if spec.dist == "normal":
            u_a = ((x0 >> 8) + 1).to(torch.float32) * 2.0 ** -24
            values = torch.sqrt(-2.0 * torch.log(u_a)) * torch.cos((2.0 * math.pi) * u_b)
        else:
            values = 2.0 * u_b - 1.0
        mats.append((values / math.sqrt(E)).reshape(d, E))
    out = torch.stack(mats) if not spec.shared else mats[0].expand(P, d, E)
    return out.to(device=device, dtype=dtype)
