"""Triton kernels for dfa_feedback (docs/design.md §4), registered as the custom op
okadfa::triton_dfa_feedback (fake tensors and dispatch: okadfa/ops/dfa_feedback.py).

out[p, n, i] = Σ_j e[n, j]·B[p, i, j] for every point p in one launch; B is loaded (stored
feedback) or regenerated tile by tile from (seed, p, i, j) with Philox4x32-10 exactly as
okadfa/feedback.py defines it (seeded: never stored). Products accumulate in float32:
float32 operands use IEEE products (input_precision="ieee", no TF32), two 16-bit operands of
one dtype the native dot (their products are exact in float32). float64 is not supported.
"""
import math
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import INTERPRETED, check_dtypes, check_tensor, dot_f32, fp32_dot, pow2, triton_op, wrap_triton

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover  (triton builds without the backend-dispatching module)
    from triton.language.extra.cuda import libdevice

_MASK32 = 0xFFFFFFFF
_TWO_PI_F32 = tl.constexpr(6.2831854820251465)   # fl(2π)
_TWO_M24 = tl.constexpr(5.9604644775390625e-08)  # 2⁻²⁴


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC 2011) on uint32 tensors. Each of the 10 rounds:
    (hi₀, lo₀) = M₀·c₀, (hi₁, lo₁) = M₁·c₂ (64-bit products, hi by umulhi, lo by the
    wrapping uint32 product); c ← (hi₁ ⊕ c₁ ⊕ k₀, lo₁, hi₀ ⊕ c₃ ⊕ k₁, lo₀);
    k ← k + (W₀, W₁) mod 2³² (the bump after the last round is unused)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _feedback_tile(rows, cols, p, E, k0, k1, sqrt_e, NORMAL: tl.constexpr, LIBDEVICE: tl.constexpr):
    """float32 B[p, i, j] for i in rows, j in cols (a rows×cols tile) from key (k0, k1) (uint32):
    idx = i·E + j (int64), counter = (idx mod 2³², p, idx >> 32, 0), x = Philox4x32-10;
    u_a = ((x₀ >> 8) + 1)·2⁻²⁴, u_b = (x₁ >> 8)·2⁻²⁴;
    normal: √(−2 ln u_a)·cos(fl(2π)·u_b)/fl(√E), uniform: (2u_b − 1)/fl(√E), with ln and cos
    evaluated in float64 and rounded (the normative correctly rounded values).
    LIBDEVICE: CUDA's libdevice and correctly rounded sqrt/division (tl.sqrt and `/` may be
    approximate there); the interpreter's numpy math is already correctly rounded."""
    idx = rows[:, None].to(tl.int64) * E + cols[None, :]
    c0 = idx.to(tl.uint32)                 # idx mod 2³²
    c2 = (idx >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    x0, x1, _, _ = _philox4x32_10(c0, zero + p, c2, zero, k0, k1)
    u_b = (x1 >> 8).to(tl.float32) * _TWO_M24
    if NORMAL:
        u_a = ((x0 >> 8) + 1).to(tl.float32) * _TWO_M24
        angle = (u_b * _TWO_PI_F32).to(tl.float64)
        if LIBDEVICE:   # ln, cos in float64 then rounded: the correctly rounded float32 values
            ln = libdevice.log(u_a.to(tl.float64)).to(tl.float32)
            value = libdevice.sqrt_rn(-2.0 * ln) * libdevice.cos(angle).to(tl.float32)
        else:
            ln = tl.log(u_a.to(tl.float64)).to(tl.float32)
            value = tl.sqrt(-2.0 * ln) * tl.cos(angle).to(tl.float32)
    else:
        value = 2.0 * u_b - 1.0
    if LIBDEVICE:
        value = libdevice.div_rn(value, sqrt_e)
    else:
        value = value / sqrt_e
    return value


@triton.jit(do_not_specialize=["k0", "k1"])
def _feedback_kernel(e_ptr, b_ptr, out_ptr, N, E, D, P_OUT, stride_en, stride_op, stride_on, k0, k1, sqrt_e,
                     STORED: tl.constexpr, NORMAL: tl.constexpr, SHARED: tl.constexpr, LIBDEVICE: tl.constexpr,
                     FP32_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[p, rows, cols] = e[rows, :] B[p, cols, :]ᵀ for one (point, column block) × row block.

    One launch for every point. Grid (points·column blocks, row blocks) rather than a loop over
    points inside a program: axis 0 varies fastest, so the programs that share a row block run
    together and its e tiles come from DRAM about once, then from L2 (as they would for the
    column blocks anyway), while P-fold more programs fill the GPU at small N. SHARED (seeded
    only): axis 0 covers point 0 alone and each tile is stored to all P_OUT points.
    k0, k1: the key words as int32 bit patterns."""
    pid_pd = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_dblocks = tl.cdiv(D, BLOCK_D)
    p = pid_pd // n_dblocks
    cols = (pid_pd % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < D
    key0 = k0.to(tl.uint32, bitcast=True)
    key1 = k1.to(tl.uint32, bitcast=True)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        ks = e0 + tl.arange(0, BLOCK_E)
        k_ok = ks < E
        e = tl.load(e_ptr + rows[:, None].to(tl.int64) * stride_en + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if STORED:
            b = tl.load(b_ptr + (p.to(tl.int64) * D + cols[:, None]) * E + ks[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        else:   # entries beyond E meet e = 0, those beyond D are not stored
            b = _feedback_tile(cols, ks, p.to(tl.uint32), E, key0, key1, sqrt_e, NORMAL, LIBDEVICE)
        acc = dot_f32(e, tl.trans(b), acc, FP32_DOT)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_on + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    value = acc.to(out_ptr.dtype.element_ty)
    if SHARED:
        for _ in range(P_OUT):
            tl.store(out_ptrs, value, mask=out_mask)
            out_ptrs += stride_op
    else:
        tl.store(out_ptrs + p.to(tl.int64) * stride_op, value, mask=out_mask)


def _key_words(seed: int) -> Tuple[int, int]:
    """Key (seed mod 2³², seed >> 32 mod 2³²) of the uint64 seed passed as an int64, each word as
    an int32 with the same bits (one kernel signature for every seed)."""
    words = (seed & _MASK32, (seed >> 32) & _MASK32)
    return words[0] - (words[0] >> 31 << 32), words[1] - (words[1] >> 31 << 32)


def _f32(x: float) -> float:
    """fl(x): x rounded to float32 (fl(√E) = the float32 nearest √E)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def launch_feedback(e: Tensor, feedback: Optional[Tensor], out: Tensor, seed: int, dist: int, shared: bool) -> None:
    """out (P, n, D), a view with unit column stride, = e (n, E) B_pᵀ for every p."""
    P, n, D = out.shape
    E = e.shape[1]
    if n == 0 or P == 0 or D == 0:
        return
    stored = feedback is not None
    shared = shared and not stored
    k0, k1 = _key_words(seed)
    # the interpreter truncates float32 -> 16-bit casts (GPUs round to nearest even): round with torch
    target = out.new_empty(out.shape, dtype=torch.float32) if INTERPRETED and out.dtype != torch.float32 else out
    BLOCK_N, BLOCK_D, BLOCK_E = pow2(n, 16, 64), pow2(D, 16, 64), pow2(E, 16, 32)
    grid = ((1 if shared else P) * triton.cdiv(D, BLOCK_D), triton.cdiv(n, BLOCK_N))
    wrap_triton(_feedback_kernel)[grid](
        e, feedback if stored else e, target, n, E, D, P, e.stride(0), target.stride(0), target.stride(1), k0, k1,
        _f32(math.sqrt(E)),
        STORED=stored, NORMAL=dist == 0, SHARED=shared, LIBDEVICE=not INTERPRETED,
        FP32_DOT=fp32_dot(e.dtype, feedback.dtype) if stored else True,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_E=BLOCK_E)
    if target is not out:
        out.copy_(target)


def signal_shape(feedback: Optional[Tensor], points: int, dim: int) -> Tuple[int, int]:
    return (points, dim) if feedback is None else (feedback.shape[0], feedback.shape[1])


def check_feedback(feedback: Optional[Tensor], points: int, dim: int, dist: int, E: int, like: Tensor) -> None:
    """A stored (P, D, E) feedback tensor on like's device, or the seeded one's points in
    [0, 2³²), dim ≥ 0 (as the native ops: 0 gives an empty result) and dist 0 (normal) or 1 (uniform)."""
    if feedback is not None:
        check_dtypes(feedback=feedback)
        check_tensor(feedback, "feedback", (None, None, E), like)
    elif not 0 <= points < 2 ** 32 or dim < 0:
        raise ValueError(f"okadfa: seeded feedback needs points in [0, 2**32) and dim >= 0, got {points} and {dim}")
    elif dist not in (0, 1):
        raise ValueError(f"okadfa: dist must be 0 (normal) or 1 (uniform), got {dist}")


@triton_op("okadfa::triton_dfa_feedback", mutates_args=())
def triton_dfa_feedback(error: Tensor, feedback: Optional[Tensor], points: int, dim: int, seed: int, dist: int,
                        shared: bool) -> Tensor:
    """out[p] = error B_pᵀ (P, N, dim) in error's dtype, float32 accumulation; feedback stored
    (P, dim, E) or None (seeded by (points, dim, seed, dist, shared), generated in the kernel)."""
    check_dtypes(error=error)
    check_tensor(error, "error", (None, None), error)
    check_feedback(feedback, points, dim, dist, error.shape[1], error)
    P, D = signal_shape(feedback, points, dim)
    out = error.new_empty((P, error.shape[0], D))
    launch_feedback(error, feedback, out, seed, dist, shared)
    return out
