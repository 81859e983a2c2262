"""Fixed random feedback matrices for DFA (docs/design.md §4), stored or regenerated from a seed.

Normative definition of a seeded matrix (every backend reproduces it). A counter-based
RNG, Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy
as 1, 2, 3", SC 2011), defines each entry B[p, i, j] (i < dim, j < E = error_dim) by
itself, so a kernel regenerates any entry in place from (seed, p, i, j) and stores nothing:

    idx     = i·E + j                                    (as a 64-bit integer)
    counter = (idx & 0xffffffff, p, idx >> 32, 0)
    key     = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)
    (x0, x1, _, _) = philox4x32_10(counter, key)
    u_a = ((x0 >> 8) + 1)·2⁻²⁴ ∈ (0, 1],   u_b = (x1 >> 8)·2⁻²⁴ ∈ [0, 1)

    dist="normal":  B[p, i, j] = √(−2·L) · C / fl(√E)   (Box–Muller, one output), where
                    L = fl(ln u_a) and C = fl(cos(fl(fl(2π)·u_b))), ln and cos correctly rounded
    dist="uniform": B[p, i, j] = (2·u_b − 1) / fl(√E)                       (U[−1, 1)/√E)

All arithmetic after Philox is IEEE float32 (fl(x) is x rounded to float32), one rounding
per operation, in the order written. ln and cos are the correctly rounded float32 values,
obtained by evaluating them in float64 and rounding (for all 2²⁴ possible arguments this
equals the correctly rounded result; checked against two float64 libraries), never a float32
logf/cosf (those differ between libraries in up to 7% of the arguments). So every backend
reproduces every entry bit for bit, "uniform" and "normal" alike.
E[B] = 0 and Var[B] = 1/E (normal) or 1/(3E) (uniform).

shared=True: one matrix, generated with p = 0, serves every point (as in TinyDFA); all
points share `dim` here, so point p's matrix is exactly point 0's of the unshared spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FeedbackSpec", "materialize_feedback", "philox4x32", "seeded_matrix"]

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)   # round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)   # Weyl key increments (golden ratio, √3 − 1)
_BLOCK = 1 << 20                        # entries generated at a time (bounds int64 temporaries)
MAX_POINTS = _MASK32                    # points < 2³² (p is a counter word; the native ops' range too)
MAX_MATRIX_ENTRIES = 2 ** 63 - 1        # dim·error_dim: the flat index i·E + j is an int64


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a·b, a < 2³² a constant, b int64 holding uint32.

    a·b can reach 2⁶⁴ and overflow int64, so b is split in 16-bit halves: a·b = a·b_lo + 2¹⁶·a·b_hi,
    each partial product < 2⁴⁸."""
    lo_part = a * (b & 0xFFFF)
    hi_part = a * (b >> 16)
    low48 = lo_part + ((hi_part & 0xFFFF) << 16)         # < 2⁴⁹: a·b mod 2⁴⁸ plus a carry
    lo = low48 & _MASK32
    hi = ((hi_part >> 16) + (low48 >> 32)) & _MASK32
    return hi, lo


def _philox(c0, c1, c2, c3, k0, k1, rounds: int):
    for r in range(rounds):
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r < rounds - 1:                                # R rounds, R − 1 key bumps
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


def _as_uint32(x, name: str):
    if isinstance(x, Tensor):
        if x.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor or an int, got {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > _MASK32):
            raise ValueError(f"{name} must hold values in [0, 2**32)")
        return x
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int64 tensor or an int, got {type(x).__name__}")
    if not 0 <= x <= _MASK32:
        raise ValueError(f"{name} must be in [0, 2**32), got {x}")
    return x


def philox4x32(counter, key, rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-R (Salmon et al. 2011) element-wise on int64 tensors holding uint32 values.

    Each round: (hi₀, lo₀) = M₀·c₀, (hi₁, lo₁) = M₁·c₂ (64-bit products);
    c ← (hi₁ ⊕ c₁ ⊕ k₀, lo₁, hi₀ ⊕ c₃ ⊕ k₁, lo₀); then k ← k + (W₀, W₁) mod 2³².

    Args:
        counter: 4 int64 tensors (broadcastable) or ints, values in [0, 2³²).
        key: 2 ints or int64 tensors, values in [0, 2³²).
        rounds: 10 for Philox4x32-10 (the variant the feedback matrices use).
    Returns:
        4 int64 tensors of the broadcast shape, values in [0, 2³²).

    Example:
        >>> [hex(int(x)) for x in philox4x32((0, 0, 0, 0), (0, 0))]
        ['0x6627e8d5', '0xe169c58d', '0xbc57ac4c', '0x9b00dbd8']
    """
    if len(counter) != 4 or len(key) != 2:
        raise ValueError(f"counter must have 4 words and key 2, got {len(counter)} and {len(key)}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    words = [torch.as_tensor(_as_uint32(c, f"counter[{n}]"), dtype=torch.int64) for n, c in enumerate(counter)]
    words = torch.broadcast_tensors(*words)
    k0, k1 = (_as_uint32(k, f"key[{n}]") for n, k in enumerate(key))
    return _philox(*words, k0, k1, rounds)


def _seeded_values(seed: int, p, idx: Tensor, error_dim: int, dist: str) -> Tensor:
    """float32 entries at flat indices idx = i·E + j (int64) of point p (an int, or an int64 tensor
    of idx's shape), per the module definition."""
    zero = torch.zeros_like(idx)
    x0, x1, _, _ = _philox(idx & _MASK32, zero + p, idx >> 32, zero, seed & _MASK32, (seed >> 32) & _MASK32, 10)
    f32 = torch.float32
    u_b = (x1 >> 8).to(f32) * 2.0 ** -24                  # exact: 24-bit integer times a power of two
    if dist == "normal":
        u_a = ((x0 >> 8) + 1).to(f32) * 2.0 ** -24
        two_pi = torch.tensor(2.0 * math.pi, dtype=f32, device=idx.device)
        ln = torch.log(u_a.double()).float()               # correctly rounded (module docstring)
        cos = torch.cos((two_pi * u_b).double()).float()
        radius = torch.sqrt((-2.0 * ln).double()).float()  # correctly rounded (torch's float32 sqrt is not)
        values = radius * cos
    else:
        values = 2.0 * u_b - 1.0                          # exact in float32
    return values / torch.tensor(math.sqrt(error_dim), dtype=f32, device=idx.device)


@dataclass(frozen=True)
class FeedbackSpec:
    """Feedback matrices B_p ∈ R^{dim×error_dim}, p = 0..points−1, for DFA (Nøkland 2016).

    Args:
        points: P, the number of feedback points.
        dim: d, the width of each point's activations (rows of B_p).
        error_dim: E, the width of the error e (d for error="hidden", V for "logits").
        seed: in [0, 2⁶⁴); with (p, i, j) it defines every entry (module docstring).
        dist: "normal" (N(0, 1/E)) or "uniform" (U[−1, 1)/√E).
        shared: one matrix for every point (point 0's).
        storage: "seeded" (regenerated from the seed, nothing stored) or "stored"
            (the caller keeps `materialize_feedback(spec)` as a buffer).

    Example:
        >>> spec = FeedbackSpec(12, 768, 768, seed=1)
        >>> materialize_feedback(spec).shape
        torch.Size([12, 768, 768])
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
        if not isinstance(self.shared, bool):
            raise ValueError(f"FeedbackSpec.shared must be a bool, got {self.shared!r}")
        if self.storage not in ("seeded", "stored"):
            raise ValueError(f"FeedbackSpec.storage must be 'seeded' or 'stored', got {self.storage!r}")
        # The definition's own range: p is one 32-bit counter word, idx = i·E + j a 64-bit integer.
        if self.points > MAX_POINTS:
            raise ValueError(f"FeedbackSpec.points must be at most 2**32 - 1 = {MAX_POINTS} (p is a 32-bit word of "
                             f"the Philox counter), got {self.points}")
        if self.dim * self.error_dim > MAX_MATRIX_ENTRIES:
            raise ValueError(f"FeedbackSpec.dim × FeedbackSpec.error_dim must be at most 2**63 - 1 (the flat index "
                             f"i·E + j is an int64), got {self.dim} × {self.error_dim} = {self.dim * self.error_dim}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(P, dim, error_dim), the shape of `materialize_feedback(self)`."""
        return (self.points, self.dim, self.error_dim)


def materialize_feedback(spec: FeedbackSpec, *, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Every matrix of `spec` as one tensor B of shape (P, dim, error_dim).

    Entries follow the module definition (computed in float32 on the CPU, so the result
    does not depend on `device`), then are cast to `dtype` and moved to `device`.
    With shared=True every B[p] equals B[0]; the result is a real (contiguous) copy,
    safe to register as a buffer (only B[0] is generated).

    The size is checked first: a B that could never be allocated (more entries than an int64
    counts, or more bytes than `device`'s total memory) raises ValueError before anything is
    generated. Entries are generated 2²⁰ at a time straight into B, so the memory used is B's.
    """
    from . import validation                                # validation imports this module
    if not isinstance(spec, FeedbackSpec):
        raise TypeError(f"spec must be a FeedbackSpec, got {type(spec).__name__}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    P, d, E = spec.shape
    validation.check_allocation(f"materialize_feedback: the matrices (points={P}, dim={d}, error_dim={E})",
                                (P, d, E), dtype, device,
                                hint="; use fewer points, a narrower dim or error_dim, or storage='seeded'")
    if spec.shared:
        return _fill(spec, 0, torch.empty(1, d, E, dtype=dtype, device=device)).expand(P, d, E).contiguous()
    return _fill(spec, 0, torch.empty(P, d, E, dtype=dtype, device=device))


def seeded_matrix(spec: FeedbackSpec, p: int) -> Tensor:
    """B_p alone (dim, error_dim), float32 on the CPU: generated with point 0 if spec.shared."""
    from . import validation
    d, E = spec.dim, spec.error_dim
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < spec.points:
        raise ValueError(f"p must be an int in [0, {spec.points}), got {p!r}")
    validation.check_allocation(f"seeded_matrix: B_p (dim={d}, error_dim={E})", (d, E), torch.float32, "cpu",
                                hint="; use a narrower dim or error_dim")
    return _fill(spec, p, torch.empty(1, d, E, dtype=torch.float32))[0]


def _fill(spec: FeedbackSpec, first: int, out: Tensor) -> Tensor:
    """Write the matrices of points first, first + 1, … (point 0 for each if spec.shared) into
    out (n, dim, error_dim), contiguous, any floating dtype and device; returns out. The entries
    are computed on the CPU _BLOCK at a time over the flat (point, i, j) index, so many small
    matrices cost one vectorised pass, not one Python step each."""
    n, d, E = out.shape
    per_point, flat = d * E, out.view(-1)
    total = n * per_point
    for start in range(0, total, _BLOCK):
        f = torch.arange(start, min(start + _BLOCK, total), dtype=torch.int64, device="cpu")
        if spec.shared or n == 1:
            p, idx = (0 if spec.shared else first), f
        else:
            p, idx = f // per_point + first, f % per_point
        flat[start:start + f.numel()] = _seeded_values(spec.seed, p, idx, E, spec.dist)
    return out
