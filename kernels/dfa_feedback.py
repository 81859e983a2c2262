"""Triton kernels for dfa_feedback and dfa_head (DESIGN.md §4), registered as the custom
ops okadfa::triton_dfa_feedback and okadfa::triton_dfa_head.

dfa_feedback: out[p, n, i] = Σ_j e[n, j]·B[p, i, j] for every point p in one launch; B is
loaded (stored feedback) or regenerated tile by tile from (seed, p, i, j) with
Philox4x32-10 exactly as okadfa/reference/feedback.py defines it (seeded: never stored).

dfa_head, row chunk by row chunk (c = chunk_size rows, workspace Y of c×V float32):
    Y = h_c W_decᵀ                                   (_mm_kernel)
    lse_n = log Σ_v exp(Y_nv) by an online log-sum-exp over V tiles, row_loss_n = lse_n − Y_n,t_n,
    Y ← dy = (exp(Y − lse) − onehot(t))/Nv in place, rows with t = ignore_index set to 0
                                                     (_softmax_xent_kernel)
    grad_h[c] = dy W_dec;  grad_W_dec += dyᵀ h_c      (_mm_kernel; fp32 accumulators)
    error="logits": signals[:, c] = dy B_pᵀ           (_feedback_kernel, E = V)
then error="hidden": signals = grad_h B_pᵀ (float32 grad_h, all rows at once, E = d).
Only c×V logits exist at a time, as in Liger-Kernel's fused linear cross-entropy
(Hsu et al. 2024); Cut Cross-Entropy (Wijmans et al. 2024) avoids even that by recomputing
logit tiles, at the price of atomics. Here every output element is written by one program
and the chunks run in order, so the results are deterministic (bitwise repeatable).

All matrix products accumulate in float32; float32 operands use IEEE products
(input_precision="ieee", no TF32), two 16-bit operands of one dtype use the native dot
(their products are exact in float32). float64 is not supported.
"""
import math
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover  (triton builds without the backend-dispatching module)
    from triton.language.extra.cuda import libdevice

# torch < 2.6 has no triton_op/wrap_triton: a plain custom op launching the kernels directly
_triton_op = getattr(torch.library, "triton_op", None) or torch.library.custom_op
_wrap_triton = getattr(torch.library, "wrap_triton", lambda kernel: kernel)

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


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a·b in float32: IEEE float32 products (no TF32), or the native dot of two 16-bit operands."""
    if FP32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


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
        acc = _dot(e, tl.trans(b), acc, FP32_DOT)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_on + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    value = acc.to(out_ptr.dtype.element_ty)
    if SHARED:
        for _ in range(P_OUT):
            tl.store(out_ptrs, value, mask=out_mask)
            out_ptrs += stride_op
    else:
        tl.store(out_ptrs + p.to(tl.int64) * stride_op, value, mask=out_mask)


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm,
               ACCUMULATE: tl.constexpr, FP32_DOT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C (+)= A B with float32 accumulation, A (M×K) and B (K×N) of any strides (a transpose
    is a stride swap), C (M×N) float32 with unit column stride. One program per C tile,
    K reduced in order: deterministic."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * s_am + rk[None, :].to(tl.int64) * s_ak,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rk[:, None].to(tl.int64) * s_bk + rn[None, :].to(tl.int64) * s_bn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = _dot(a, b, acc, FP32_DOT)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * s_cm + rn[None, :]
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc, mask=c_mask)


@triton.jit
def _softmax_xent_kernel(y_ptr, t_ptr, nv_ptr, loss_ptr, R, V, ignore_index,
                         BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Rows of the float32 logits Y (R×V, contiguous) become dy in place; row_loss = lse − y_t.

    Pass 1, online log-sum-exp over V tiles: m' = max(m, max_v y), s' = s·e^{m−m'} + Σ_v e^{y−m'},
    lse = m + ln s. Pass 2: dy = (e^{y−lse} − [v = t])/Nv, 0 on ignored rows (each element is
    read once, then overwritten, by its own program). Nv = max(count of kept targets, 1)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    t = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    kept = (t != ignore_index) & row_ok
    nv = tl.maximum(tl.load(nv_ptr), 1).to(tl.float32)
    y_rows = y_ptr + rows[:, None].to(tl.int64) * V
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    y_t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        y = tl.load(y_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        y = tl.where(col_ok[None, :], y, float("-inf"))     # every tile has a column < V: m stays finite
        m_new = tl.maximum(m, tl.max(y, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[:, None]), axis=1)
        y_t += tl.sum(tl.where(cols[None, :] == t[:, None], y, 0.0), axis=1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(loss_ptr + rows, tl.where(kept, lse - y_t, 0.0), mask=row_ok)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols[None, :] < V)
        y = tl.load(y_rows + cols[None, :], mask=mask, other=0.0)
        dy = tl.exp(y - lse[:, None]) - tl.where(cols[None, :] == t[:, None], 1.0, 0.0)
        tl.store(y_rows + cols[None, :], tl.where(kept[:, None], dy / nv, 0.0), mask=mask)


_INTERPRETED = not isinstance(_mm_kernel, triton.runtime.JITFunction)   # TRITON_INTERPRET=1


def _block(n: int, lo: int, hi: int) -> int:
    return min(max(triton.next_power_of_2(max(n, 1)), lo), hi)


def _fp32_dot(*dtypes: torch.dtype) -> bool:
    """False when every operand has one 16-bit dtype (native dot, exact products), except under
    the interpreter, whose dot multiplies bfloat16 operands as their raw uint16 bits."""
    return _INTERPRETED or not (len(set(dtypes)) == 1 and dtypes[0] in (torch.float16, torch.bfloat16))


def _key_words(seed: int) -> Tuple[int, int]:
    """Key (seed mod 2³², seed >> 32 mod 2³²) of the uint64 seed passed as an int64, each word as
    an int32 with the same bits (one kernel signature for every seed)."""
    words = (seed & _MASK32, (seed >> 32) & _MASK32)
    return words[0] - (words[0] >> 31 << 32), words[1] - (words[1] >> 31 << 32)


def _f32(x: float) -> float:
    """fl(x): x rounded to float32 (fl(√E) = the float32 nearest √E)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"okadfa triton kernels support float32/float16/bfloat16 {name}, got {t.dtype}")


def _launch_feedback(e: Tensor, feedback: Optional[Tensor], out: Tensor, seed: int, dist: int, shared: bool) -> None:
    """out (P, n, D), a view with unit column stride, = e (n, E) B_pᵀ for every p."""
    P, n, D = out.shape
    E = e.shape[1]
    if n == 0 or P == 0 or D == 0:
        return
    stored = feedback is not None
    if stored:
        _check_float("feedback", feedback)
    elif dist not in (0, 1):
        raise ValueError(f"okadfa: dist must be 0 (normal) or 1 (uniform), got {dist}")
    shared = shared and not stored
    k0, k1 = _key_words(seed)
    # the interpreter truncates float32 -> 16-bit casts (GPUs round to nearest even): round with torch
    target = out.new_empty(out.shape, dtype=torch.float32) if _INTERPRETED and out.dtype != torch.float32 else out
    BLOCK_N, BLOCK_D, BLOCK_E = _block(n, 16, 64), _block(D, 16, 64), _block(E, 16, 32)
    grid = ((1 if shared else P) * triton.cdiv(D, BLOCK_D), triton.cdiv(n, BLOCK_N))
    _wrap_triton(_feedback_kernel)[grid](
        e, feedback if stored else e, target, n, E, D, P, e.stride(0), target.stride(0), target.stride(1), k0, k1,
        _f32(math.sqrt(E)),
        STORED=stored, NORMAL=dist == 0, SHARED=shared, LIBDEVICE=not _INTERPRETED,
        FP32_DOT=_fp32_dot(e.dtype, feedback.dtype) if stored else True,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_E=BLOCK_E)
    if target is not out:
        out.copy_(target)


def _mm(a: Tensor, b: Tensor, c: Tensor, accumulate: bool) -> None:
    """c (+)= a @ b; a, b any strides, c float32 with unit column stride."""
    (M, K), N = a.shape, b.shape[1]
    BM, BN, BK = _block(M, 16, 64), _block(N, 16, 64), _block(K, 16, 32)
    _wrap_triton(_mm_kernel)[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
        ACCUMULATE=accumulate, FP32_DOT=_fp32_dot(a.dtype, b.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)


def _signal_shape(feedback: Optional[Tensor], points: int, dim: int) -> Tuple[int, int]:
    return (points, dim) if feedback is None else (feedback.shape[0], feedback.shape[1])


@_triton_op("okadfa::triton_dfa_feedback", mutates_args=())
def triton_dfa_feedback(error: Tensor, feedback: Optional[Tensor], points: int, dim: int, seed: int, dist: int,
                        shared: bool) -> Tensor:
    """out[p] = error B_pᵀ (P, N, dim) in error's dtype, float32 accumulation; feedback stored
    (P, dim, E) or None (seeded by (points, dim, seed, dist, shared), generated in the kernel)."""
    _check_float("error", error)
    P, D = _signal_shape(feedback, points, dim)
    out = error.new_empty((P, error.shape[0], D))
    _launch_feedback(error, feedback, out, seed, dist, shared)
    return out


@_triton_op("okadfa::triton_dfa_head", mutates_args=())
def triton_dfa_head(h: Tensor, w_dec: Tensor, targets: Tensor, feedback: Optional[Tensor], points: int, dim: int,
                    seed: int, dist: int, shared: bool, ignore_index: int, logits_error: bool,
                    chunk_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_h, grad_w_dec, signals) of reference.dfa_head, chunk_size rows at a time
    (module docstring); loss float32, grad_h and signals in h's dtype, grad_w_dec in w_dec's."""
    _check_float("h", h)
    _check_float("w_dec", w_dec)
    if chunk_size < 1:
        raise ValueError(f"okadfa: chunk_size must be positive, got {chunk_size}")
    (N, d), V = h.shape, w_dec.shape[0]
    P, D = _signal_shape(feedback, points, dim)
    f32 = torch.float32
    n_valid = (targets != ignore_index).sum()
    row_loss = h.new_zeros((N,), dtype=f32)
    grad_h = h.new_empty((N, d), dtype=f32)
    grad_w = h.new_zeros((V, d), dtype=f32)
    signals = h.new_empty((P, N, D))
    chunk = max(min(chunk_size, N), 1)
    y = h.new_empty((chunk, V), dtype=f32)
    BLOCK_R, BLOCK_V = 4, _block(V, 16, 1024)
    for r0 in range(0, N, chunk):
        r1 = min(r0 + chunk, N)
        y_c, h_c = y[: r1 - r0], h[r0:r1]
        _mm(h_c, w_dec.t(), y_c, accumulate=False)
        _wrap_triton(_softmax_xent_kernel)[(triton.cdiv(r1 - r0, BLOCK_R),)](
            y_c, targets[r0:r1], n_valid, row_loss[r0:r1], r1 - r0, V, ignore_index,
            BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V)
        _mm(y_c, w_dec, grad_h[r0:r1], accumulate=False)
        _mm(y_c.t(), h_c, grad_w, accumulate=True)
        if logits_error:
            _launch_feedback(y_c, feedback, signals[:, r0:r1], seed, dist, shared)
    if not logits_error:
        _launch_feedback(grad_h, feedback, signals, seed, dist, shared)
    loss = row_loss.sum() / n_valid.clamp(min=1)
    return loss, grad_h.to(h.dtype), grad_w.to(w_dec.dtype), signals


@triton_dfa_feedback.register_fake
def _(error, feedback, points, dim, seed, dist, shared):
    P, D = _signal_shape(feedback, points, dim)
    return error.new_empty((P, error.shape[0], D))


@triton_dfa_head.register_fake
def _(h, w_dec, targets, feedback, points, dim, seed, dist, shared, ignore_index, logits_error, chunk_size):
    P, D = _signal_shape(feedback, points, dim)
    return (h.new_empty((), dtype=torch.float32), torch.empty_like(h), torch.empty_like(w_dec),
            h.new_empty((P, h.shape[0], D)))
