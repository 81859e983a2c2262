"""Triton kernels for dfa_head (docs/design.md §4), registered as the custom op okadfa::triton_dfa_head
(fake tensors and dispatch: okadfa/ops/dfa_head.py).

Row chunk by row chunk (c = chunk_size rows, workspace Y of c×V float32):
    Y = h_c W_decᵀ                                   (_mm_kernel)
    lse_n = log Σ_v exp(Y_nv) by an online log-sum-exp over V tiles, row_loss_n = lse_n − Y_n,t_n,
    Y ← dy = (exp(Y − lse) − onehot(t))/Nv in place, rows with t = ignore_index set to 0
                                                     (_softmax_xent_kernel)
    grad_h[c] = dy W_dec;  grad_W_dec += dyᵀ h_c      (_mm_kernel; fp32 accumulators)
    error="logits": signals[:, c] = dy B_pᵀ           (okadfa.kernels.dfa_feedback, E = V)
then error="hidden": signals = grad_h B_pᵀ (float32 grad_h, all rows at once, E = d).
Only c×V logits exist at a time, as in Liger-Kernel's fused linear cross-entropy
(Hsu et al. 2024); Cut Cross-Entropy (Wijmans et al. 2024) avoids even that by recomputing
logit tiles, at the price of atomics. Here every output element is written by one program
and the chunks run in order, so the results are deterministic (bitwise repeatable).
Products accumulate in float32 as in okadfa.kernels.dfa_feedback; float64 is not supported.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import (check_dtypes, check_positive, check_tensor, dot_f32, fp32_dot, holds_data, pow2, triton_op,
                     wrap_triton)
from .dfa_feedback import check_feedback, launch_feedback, signal_shape


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
        acc = dot_f32(a, b, acc, FP32_DOT)
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


def _mm(a: Tensor, b: Tensor, c: Tensor, accumulate: bool) -> None:
    """c (+)= a @ b; a, b any strides, c float32 with unit column stride."""
    (M, K), N = a.shape, b.shape[1]
    BM, BN, BK = pow2(M, 16, 64), pow2(N, 16, 64), pow2(K, 16, 32)
    wrap_triton(_mm_kernel)[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
        ACCUMULATE=accumulate, FP32_DOT=fp32_dot(a.dtype, b.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)


@triton_op("okadfa::triton_dfa_head", mutates_args=())
def triton_dfa_head(h: Tensor, w_dec: Tensor, targets: Tensor, feedback: Optional[Tensor], points: int, dim: int,
                    seed: int, dist: int, shared: bool, ignore_index: int, logits_error: bool,
                    chunk_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_h, grad_w_dec, signals) of reference.dfa_head, chunk_size rows at a time
    (module docstring); loss float32, grad_h and signals in h's dtype, grad_w_dec in w_dec's."""
    check_dtypes(h=h, w_dec=w_dec)
    check_tensor(h, "h", (None, None), h)
    check_tensor(w_dec, "w_dec", (None, h.shape[1]), h)
    check_tensor(targets, "targets", (h.shape[0],), h)
    if targets.dtype != torch.int64:
        raise TypeError(f"okadfa: targets must be int64, got {targets.dtype}")
    check_positive("chunk_size", chunk_size)
    (N, d), V = h.shape, w_dec.shape[0]
    check_feedback(feedback, points, dim, dist, V if logits_error else d, h)
    if holds_data(targets):      # one host sync; out-of-range targets would give a loss
        kept = targets[targets != ignore_index]
        bad = kept[(kept < 0) | (kept >= V)]
        if bad.numel():
            raise ValueError(f"okadfa: targets must be in [0, {V}) or equal ignore_index={ignore_index}, "
                             f"found {bad[0].item()}")
    P, D = signal_shape(feedback, points, dim)
    f32 = torch.float32
    n_valid = (targets != ignore_index).sum()
    row_loss = h.new_zeros((N,), dtype=f32)
    grad_h = h.new_empty((N, d), dtype=f32)
    grad_w = h.new_zeros((V, d), dtype=f32)
    signals = h.new_empty((P, N, D))
    chunk = max(min(chunk_size, N), 1)
    y = h.new_empty((chunk, V), dtype=f32)
    BLOCK_R, BLOCK_V = 4, pow2(V, 16, 1024)
    for r0 in range(0, N, chunk):
        r1 = min(r0 + chunk, N)
        y_c, h_c = y[: r1 - r0], h[r0:r1]
        _mm(h_c, w_dec.t(), y_c, accumulate=False)
        wrap_triton(_softmax_xent_kernel)[(triton.cdiv(r1 - r0, BLOCK_R),)](
            y_c, targets[r0:r1], n_valid, row_loss[r0:r1], r1 - r0, V, ignore_index,
            BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V)
        _mm(y_c, w_dec, grad_h[r0:r1], accumulate=False)
        _mm(y_c.t(), h_c, grad_w, accumulate=True)
        if logits_error:
            launch_feedback(y_c, feedback, signals[:, r0:r1], seed, dist, shared)
    if not logits_error:
        launch_feedback(grad_h, feedback, signals, seed, dist, shared)
    loss = row_loss.sum() / n_valid.clamp(min=1)
    return loss, grad_h.to(h.dtype), grad_w.to(w_dec.dtype), signals
