"""The chunked attention kernels behind favor_attention and linear_attention (docs/design.md §3), the
Triton counterpart of csrc/chunked_attention.h; the ops are registered in
okadfa.kernels.favor_attention and okadfa.kernels.linear_attention.

One kernel family serves both ops, by its FEATURE_MAP (a tl.constexpr): FAVOR computes the
FAVOR+ features of Choromanski et al. 2021 ("Rethinking Attention with Performers") from q, k
and the projection W inside the kernel; GIVEN uses the caller's features as they are (linear
attention, Katharopoulos et al. 2020). A new feature map is one more case in _query_features,
_key_logits, _key_features, _initial_reference, _finish and _input_grads.

Per (batch·head, block of BLOCK_DV value columns) one program walks
the sequence in chunks of BLOCK_T positions, as in the chunkwise form of flash-linear-attention
(Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training"):
inside a chunk a masked (Φ_Q Φ_Kᵀ)V product, across chunks a carried state S (M × BLOCK_DV) and
z (M), all in float32. With lq = √s·q Wᵀ, lk = √s·k Wᵀ − s‖k‖²/2 (s = scale):

    fq_t = exp(lq_t − aq_t), aq_t = max_m lq_tm         (a per-row factor: cancels)
    c_t  = max(c_{t−1}, max_m lk_tm)  (causal: a running maximum over s ≤ t only;
                                       non-causal: the maximum over the sequence)
    fk_s = exp(lk_s − c_s) ≤ 1,  a_ts = fq_t·fk_s·exp(c_s − c_t)   (s ≤ t when causal)
    out_t = Σ_s a_ts v_s / den'_t,  den'_t = Σ_s a_ts,  lognorm_t = log den'_t + aq_t + c_t

exactly the stabilisers of okadfa/reference/attention.py and csrc/chunked_attention.h: the state
is kept relative to P, the c of the last folded key, and rescaled by exp(P − P') ≤ 1. The guard:
a row with den' < float32's min_normal^0.8 (given features: den' = 0) is 0, lognorm −inf, and
passes no gradient. Key padding (HAS_MASK, a (BH, T) bool mask, true = a real key): a masked
key's logits are −inf (given features: 0) and its values 0, so it leaves every sum and the
running maximum; c is floored at KEY_FLOOR (okadfa/reference/attention.py), so that rows before
the first real key keep finite shifts; masked query rows take the guard's 0 and −inf. lognorm is the log of the true normaliser up to log M + ‖q̂‖²/2, the same
statistic the native kernels return.

Backward (memory linear in T, features recomputed): with den' = exp(lognorm − aq − c),
ge_t = g_t/den'_t and dz_t = −(g_t·out_t)/den'_t, the weight gradient is B_ts = ge_t·v_s + dz_t;
dfq_t = Σ_{s≤t} B_ts e^{c_s−c_t} fk_s comes from a forward pass carrying (S, z),
dfk_s = Σ_{t≥s} B_ts e^{c_s−c_t} fq_t and dv_s = Σ_{t≥s} a_ts ge_t from a reverse pass carrying
the suffix sums R = Σ e^{P−c_t} fq_t ge_tᵀ, r = Σ e^{P−c_t} fq_t dz_t. Causal programs keep each
chunk's reference P_j in a (programs × chunks) scratch for the reverse pass. Then
dlogit = f ⊙ df, dx = √s·dlogit W (keys: − s·(Σ_m dlogit)·k), dW = √s·Σ dlogitᵀ x. Programs of
one head that own other value columns add partial dq, dk (summed in torch, deterministic);
dW is reduced from per-program partials, also in torch.

float32 inputs use IEEE float32 products (input_precision="ieee"), float16/bfloat16 inputs
TF32 products of their float32 upcast (no more rounding than the inputs already carry); all
sums are float32. float64 is not supported (TypeError before launch). chunk_size gives
BLOCK_T = the power of two ≥ chunk_size, clamped to [16, 128] (tl.dot needs ≥ 16) and to
4096/max(M, Dk) (see Launch). No autotuning: one configuration (num_warps=4, num_stages=1:
the chunk loop carries the state, software pipelining its loads only costs shared memory)
per (M, Dk, Dv, chunk), never depending on T.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import check_positive, pow2, wrap_triton

# FEATURE_MAP values
GIVEN = tl.constexpr(0)   # features computed by the caller (linear_attention)
FAVOR = tl.constexpr(1)   # positive random features exp(w·x̂ − ‖x̂‖²/2), fused (favor_attention)
# float32's min_normal^0.8 ≈ 1e-31 (okadfa.reference.attention.underflow_threshold(float32))
_TINY = torch.finfo(torch.float32).tiny ** 0.8
# Elements per (BLOCK_T × M) feature tile and per (M × BLOCK_DV) state: bounds the block sizes.
_TILE = 4096
KEY_FLOOR = tl.constexpr(-1e30)   # okadfa.reference.attention.KEY_FLOOR


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile(ptr, rows, cols, n_rows, n_cols):
    """x[rows, cols] of a row-major (n_rows, n_cols) matrix in float32, 0 outside."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _real(m_ptr, rows, T, HAS_MASK: tl.constexpr):
    """[rows] whether each row is a position < T that key_mask (if any) keeps."""
    valid = rows < T
    if HAS_MASK:
        valid = valid & (tl.load(m_ptr + rows, mask=valid, other=0) != 0)
    return valid


@triton.jit
def _query_features(q_ptr, w_ptr, rows, T, M, DQ, sqrt_scale,
                    FEATURE_MAP: tl.constexpr, M_PAD: tl.constexpr, DQ_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """(x, fq, aq): FAVOR, x = q rows, fq = exp(lq − aq) with aq = max_m lq, lq = √s·x Wᵀ;
    otherwise x = fq = the given features and aq = 0. fq is 0 outside the valid rows and features."""
    fm = tl.arange(0, M_PAD)
    if FEATURE_MAP == FAVOR:
        x = _tile(q_ptr, rows, tl.arange(0, DQ_PAD), T, DQ)
        w = _tile(w_ptr, fm, tl.arange(0, DQ_PAD), M, DQ)
        lq = tl.where(fm[None, :] < M, _dot(x, tl.trans(w), PRECISION) * sqrt_scale, float("-inf"))
        aq = tl.max(lq, axis=1)
        fq = tl.where(rows[:, None] < T, tl.exp(lq - aq[:, None]), 0.0)
    else:
        x = _tile(q_ptr, rows, fm, T, M)
        fq = x
        aq = tl.zeros_like(rows).to(tl.float32)
    return x, fq, aq


@triton.jit
def _key_logits(k_ptr, w_ptr, rows, real, T, M, DQ, sqrt_scale,
                FEATURE_MAP: tl.constexpr, M_PAD: tl.constexpr, DQ_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """(x, lk, rmax): FAVOR, lk = √s·x Wᵀ − s‖x‖²/2 (−inf outside the real rows, _real, and the
    features) and rmax its row maximum; otherwise x = lk = the given features (0 outside the real
    rows) and rmax = 0."""
    fm = tl.arange(0, M_PAD)
    if FEATURE_MAP == FAVOR:
        x = _tile(k_ptr, rows, tl.arange(0, DQ_PAD), T, DQ)
        w = _tile(w_ptr, fm, tl.arange(0, DQ_PAD), M, DQ)
        lk = _dot(x, tl.trans(w), PRECISION) * sqrt_scale \
            - (0.5 * sqrt_scale * sqrt_scale) * tl.sum(x * x, axis=1)[:, None]
        lk = tl.where(real[:, None] & (fm[None, :] < M), lk, float("-inf"))
        rmax = tl.max(lk, axis=1)
    else:
        x = tl.where(real[:, None], _tile(k_ptr, rows, fm, T, M), 0.0)
        lk = x
        rmax = tl.zeros_like(rows).to(tl.float32)
    return x, lk, rmax


@triton.jit
def _key_features(lk, rmax, P, RUNNING: tl.constexpr, FEATURE_MAP: tl.constexpr, BLOCK_T: tl.constexpr):
    """(c, fk): the per-key shift c and fk = exp(lk − c) ≤ 1. RUNNING: c_t = max(P, max_{s≤t} rmax_s)
    (BLOCK_T² compares, no scan); otherwise every row gets max(P, max_s rmax_s); both floored at
    KEY_FLOOR. Given features:
    c = 0 and fk = lk."""
    if FEATURE_MAP == FAVOR:
        if RUNNING:
            t = tl.arange(0, BLOCK_T)
            before = tl.where(t[None, :] <= t[:, None], rmax[None, :], float("-inf"))
            c = tl.maximum(tl.maximum(tl.max(before, axis=1), P), KEY_FLOOR)
        else:
            c = tl.zeros_like(rmax) + tl.maximum(tl.maximum(tl.max(rmax, axis=0), P), KEY_FLOOR)
        fk = tl.exp(lk - c[:, None])
    else:
        c = tl.zeros_like(rmax)
        fk = lk
    return c, fk


@triton.jit
def _causal_weights(c, BLOCK_T: tl.constexpr):
    """D_ts = exp(c_s − c_t) ≤ 1 for s ≤ t (c is non-decreasing), 0 above the diagonal."""
    t = tl.arange(0, BLOCK_T)
    return tl.exp(tl.where(t[None, :] <= t[:, None], c[None, :] - c[:, None], float("-inf")))


@triton.jit
def _lower_product(a, v, PRECISION: tl.constexpr):
    """a v for a lower-triangular a [BLOCK_T, BLOCK_T], row t reading only the values of rows
    s ≤ t: in a plain product a later row's NaN/Inf times its exact-0 weight is NaN. The finite
    values go through the product; the non-finite ones are summed in down the rows (as a product
    with positive weights sums them), so rows before them are untouched."""
    finite = (v == v) & (tl.abs(v) < float("inf"))
    return _dot(a, tl.where(finite, v, 0.0), PRECISION) + tl.cumsum(tl.where(finite, 0.0, v), axis=0)


@triton.jit
def _initial_reference(FEATURE_MAP: tl.constexpr, BLOCK_T: tl.constexpr):
    """The state's reference P before any key, as a float32 scalar: −inf for FAVOR+ logits,
    0 for given features (their shift c is 0 throughout)."""
    if FEATURE_MAP == FAVOR:
        value = float("-inf")
    else:
        value = 0.0
    return tl.max(tl.full([BLOCK_T], value, tl.float32), axis=0)


@triton.jit
def _fold_keys(S, z, P, fk, c, v, PRECISION: tl.constexpr):
    """Fold a chunk into the state at the new reference P' = max_t c_t:
    S' = e^{P−P'} S + Σ_s e^{c_s−P'} fk_s v_sᵀ, z' likewise with v_s = 1. Returns (S', z', P')."""
    p_new = tl.maximum(tl.max(c, axis=0), P)
    kw = fk * tl.exp(c - p_new)[:, None]
    decay = tl.exp(P - p_new)
    return S * decay + _dot(tl.trans(kw), v, PRECISION), z * decay + tl.sum(kw, axis=0), p_new


@triton.jit
def _fold_all_keys(k_ptr, w_ptr, v_ptr, m_ptr, cols, T, M, DQ, DV, sqrt_scale, S, z, P, FEATURE_MAP: tl.constexpr,
                   HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, M_PAD: tl.constexpr, DQ_PAD: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Non-causal: every key of the sequence folded into (S, z) at one reference, the running
    maximum of all chunks (forward and backward both start with it). Returns (S', z', P')."""
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)                                    # [BLOCK_T]
        real = _real(m_ptr, rows, T, HAS_MASK)
        _, lk, rmax = _key_logits(k_ptr, w_ptr, rows, real, T, M, DQ, sqrt_scale, FEATURE_MAP, M_PAD, DQ_PAD,
                                  PRECISION)                                 # lk [BLOCK_T, M_PAD]
        c, fk = _key_features(lk, rmax, P, False, FEATURE_MAP, BLOCK_T)     # c [BLOCK_T], fk [BLOCK_T, M_PAD]
        S, z, P = _fold_keys(S, z, P, fk, c, _values(v_ptr, rows, cols, real, T, DV), PRECISION)
    return S, z, P


@triton.jit
def _values(v_ptr, rows, cols, real, T, DV):
    """The value tile, 0 outside the real rows (a masked key's NaN reaches nothing)."""
    return tl.where(real[:, None], _tile(v_ptr, rows, cols, T, DV), 0.0)


@triton.jit
def _finish(out_ptr, ln_ptr, rows, cols, num, den, shift, real, T, DV, tiny, ln_rows, FEATURE_MAP: tl.constexpr):
    """out = num/den, lognorm = log den + shift (stored for rows < ln_rows: T in the program of
    column block 0, else 0). Guard: den < tiny (given features: den = 0) or a row that is not
    real (a masked query) gives out = 0 and lognorm = −inf."""
    if FEATURE_MAP == FAVOR:
        bad = (den < tiny) | ~real
    else:
        bad = (den == 0.0) | ~real
    safe = tl.where(bad, 1.0, den)
    out = tl.where(bad[:, None], 0.0, num / safe[:, None])
    mask = (rows[:, None] < T) & (cols[None, :] < DV)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * DV + cols[None, :], out, mask=mask)
    tl.store(ln_ptr + rows, tl.where(bad, float("-inf"), tl.log(safe) + shift), mask=rows < ln_rows)


@triton.jit
def _output_grads(g_ptr, ln_ptr, delta_ptr, rows, cols, shift, T, DV, owner):
    """(ge, dz) = (g/den', −δ/den') with den' = exp(lognorm − shift) and δ = g·out; dz only for the
    owner of column block 0 (the normaliser is shared by all columns); 0 on guarded rows."""
    ln = tl.load(ln_ptr + rows, mask=rows < T, other=float("-inf"))
    inv = tl.where(ln != float("-inf"), tl.exp(shift - ln), 0.0)
    delta = tl.load(delta_ptr + rows, mask=rows < T, other=0.0)
    return _tile(g_ptr, rows, cols, T, DV) * inv[:, None], tl.where(owner, -delta * inv, 0.0)


@triton.jit
def _input_grads(x, f, df, real, w_ptr, dx_ptr, dw, rows, T, M, DQ, sqrt_scale, KEY: tl.constexpr,
                 FEATURE_MAP: tl.constexpr, DW: tl.constexpr, M_PAD: tl.constexpr, DQ_PAD: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Store dx for feature gradients df and return dW + its contribution. Fused: dlogit = f ⊙ df,
    dx = √s·dlogit W − [KEY] s·(Σ_m dlogit)·x, dW += √s·dlogitᵀ x (queries need no norm term:
    out is invariant to a query row's scale, so Σ_m dlogit = 0 over all column blocks).
    Given features: dx = df. Rows that are not real (masked) get none: their features were set."""
    df = tl.where(real[:, None], df, 0.0)
    if FEATURE_MAP == FAVOR:
        fm = tl.arange(0, M_PAD)
        cols = tl.arange(0, DQ_PAD)
        dl = f * df
        dx = _dot(dl, _tile(w_ptr, fm, cols, M, DQ), PRECISION) * sqrt_scale
        if KEY:
            dx -= (sqrt_scale * sqrt_scale) * tl.sum(dl, axis=1)[:, None] * x
        if DW:
            dw += _dot(tl.trans(dl), x, PRECISION) * sqrt_scale
    else:
        cols = tl.arange(0, M_PAD)
        dx = df
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * DQ + cols[None, :], dx,
             mask=(rows[:, None] < T) & (cols[None, :] < DQ))
    return dw


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, w_ptr, m_ptr, out_ptr, ln_ptr, T, M, DQ, DV, sqrt_scale, tiny,
                FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
                M_PAD: tl.constexpr, DQ_PAD: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """out (BH, T, DV) and lognorm (BH, T), float32; grid (BH, column blocks). q, k: (BH, T, DQ),
    DQ = Dk (FAVOR, w: (M, Dk)) or M (GIVEN features); m: the (BH, T) key mask (HAS_MASK)."""
    bh = tl.program_id(0).to(tl.int64)
    ln_rows = tl.where(tl.program_id(1) == 0, T, 0)
    cols = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q_ptr += bh * T * DQ
    k_ptr += bh * T * DQ
    v_ptr += bh * T * DV
    out_ptr += bh * T * DV
    ln_ptr += bh * T
    m_ptr += bh * T
    S = tl.zeros((M_PAD, BLOCK_DV), dtype=tl.float32)                   # [M_PAD, BLOCK_DV] state
    z = tl.zeros((M_PAD,), dtype=tl.float32)                            # [M_PAD] normaliser state
    P = _initial_reference(FEATURE_MAP, BLOCK_T)                        # scalar reference of the state
    if CAUSAL:
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)                           # [BLOCK_T]
            real = _real(m_ptr, rows, T, HAS_MASK)                      # [BLOCK_T]
            _, fq, aq = _query_features(q_ptr, w_ptr, rows, T, M, DQ, sqrt_scale, FEATURE_MAP, M_PAD, DQ_PAD,
                                        PRECISION)                      # fq [BLOCK_T, M_PAD], aq [BLOCK_T]
            _, lk, rmax = _key_logits(k_ptr, w_ptr, rows, real, T, M, DQ, sqrt_scale, FEATURE_MAP, M_PAD, DQ_PAD,
                                      PRECISION)                        # lk [BLOCK_T, M_PAD]
            c, fk = _key_features(lk, rmax, P, True, FEATURE_MAP, BLOCK_T)   # c [BLOCK_T], fk [BLOCK_T, M_PAD]
            v = _values(v_ptr, rows, cols, real, T, DV)                 # [BLOCK_T, BLOCK_DV]
            t = tl.arange(0, BLOCK_T)
            # Selected, not multiplied, to 0 above the diagonal: a later key's NaN/Inf times 0 is
            # NaN, and would reach earlier queries.
            a = tl.where(t[None, :] <= t[:, None], _dot(fq, tl.trans(fk), PRECISION) * _causal_weights(c, BLOCK_T),
                         0.0)                                           # [BLOCK_T, BLOCK_T]
            carry = tl.exp(P - c)                                       # [BLOCK_T], e^{P − c_t} ≤ 1
            num = _lower_product(a, v, PRECISION) + carry[:, None] * _dot(fq, S, PRECISION)   # [BLOCK_T, BLOCK_DV]
            den = tl.sum(a, axis=1) + carry * tl.sum(fq * z[None, :], axis=1)    # [BLOCK_T]
            _finish(out_ptr, ln_ptr, rows, cols, num, den, aq + c, real, T, DV, tiny, ln_rows, FEATURE_MAP)
            S, z, P = _fold_keys(S, z, P, fk, c, v, PRECISION)
    else:
        S, z, P = _fold_all_keys(k_ptr, w_ptr, v_ptr, m_ptr, cols, T, M, DQ, DV, sqrt_scale, S, z, P,
                                 FEATURE_MAP, HAS_MASK, BLOCK_T, M_PAD, DQ_PAD, PRECISION)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            _, fq, aq = _query_features(q_ptr, w_ptr, rows, T, M, DQ, sqrt_scale, FEATURE_MAP, M_PAD, DQ_PAD, PRECISION)
            num = _dot(fq, S, PRECISION)
            den = tl.sum(fq * z[None, :], axis=1)
            _finish(out_ptr, ln_ptr, rows, cols, num, den, aq + P, _real(m_ptr, rows, T, HAS_MASK), T, DV, tiny,
                    ln_rows, FEATURE_MAP)


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, v_ptr, w_ptr, m_ptr, g_ptr, ln_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, dw_ptr, p_ptr,
                BH, T, M, DQ, DV, sqrt_scale, n_chunks,
                FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DW: tl.constexpr,
                BLOCK_T: tl.constexpr,
                M_PAD: tl.constexpr, DQ_PAD: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Gradients (module docstring); grid (BH, column blocks), float32 outputs: dq, dk partials
    (blocks, BH, T, DQ), dv (BH, T, DV), dW partials (BH·blocks, M, Dk); p_ptr: (BH·blocks, n_chunks)
    scratch for the chunk references of the causal reverse pass."""
    bh = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    owner = block == 0
    program = bh * tl.num_programs(1) + block
    cols = block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q_ptr += bh * T * DQ
    k_ptr += bh * T * DQ
    v_ptr += bh * T * DV
    g_ptr += bh * T * DV
    ln_ptr += bh * T
    m_ptr += bh * T
    delta_ptr += bh * T
    dq_ptr += (block * BH + bh) * T * DQ
    dk_ptr += (block * BH + bh) * T * DQ
    dv_ptr += bh * T * DV
    p_ptr += program * n_chunks
    dw = tl.zeros((M_PAD, DQ_PAD), dtype=tl.float32)      # [M_PAD, DQ_PAD] this program's dW partial
    S = tl.zeros((M_PAD, BLOCK_DV), dtype=tl.float32)     # [M_PAD, BLOCK_DV] prefix state Σ fk vᵀ
    z = tl.zeros((M_PAD,), dtype=tl.float32)              # [M_PAD] prefix Σ fk
    R = tl.zeros((M_PAD, BLOCK_DV), dtype=tl.float32)     # [M_PAD, BLOCK_DV] suffix state Σ fq geᵀ
    r = tl.zeros((M_PAD,), dtype=tl.float32)              # [M_PAD] suffix Σ fq dz
    P = _initial_reference(FEATURE_MAP, BLOCK_T)
    if CAUSAL:
        # Forward order: dfq_t = Σ_{s≤t in chunk} B_ts D_ts fk_s + e^{P−c_t} (S ge_t + z dz_t).
        for j in range(0, n_chunks):
            rows = j * BLOCK_T + tl.arange(0, BLOCK_T)
            tl.store(p_ptr + j, P)
            real = _real(m_ptr, rows, T, HAS_MASK)
            qx, fq, aq = _query_features(q_ptr, w_ptr, rows, T, M, DQ, sqrt_scale, FEATURE_MAP, M_PAD, DQ_PAD,
                                         PRECISION)
            _, lk, rmax = _key_logits(k_ptr, w_ptr, rows, real, T, M, DQ, sqrt_scale, FEATURE_MAP, M_PAD, DQ_PAD,
                                      PRECISION)
            c, fk = _key_features(lk, rmax, P, True, FEATURE_MAP, BLOCK_T)
            v = _values(v_ptr, rows, cols, real, T, DV)
            ge, dz = _output_grads(g_ptr, ln_ptr, delta_ptr, rows, cols, aq + c, T, DV, owner)
            b = (_dot(ge, tl.trans(v), PRECISION) + dz[:, None]) * _causal_weights(c, BLOCK_T)
            dfq = _dot(b, fk, PRECISION) + tl.exp(P - c)[:, None] * (
                _dot(ge, tl.trans(S), PRECISION) + dz[:, None] * z[None, :])
            dw = _input_grads(qx, fq, dfq, real, w_ptr, dq_ptr, dw, rows, T, M, DQ, sqrt_scale, False, FEATURE_MAP, DW,
                              M_PAD, DQ_PAD, PRECISION)
            S, z, P = _fold_keys(S, z, P, fk, c, v, PRECISION)
        tl.debug_barrier()   # the stored references are read back below
        # Reverse order; R, r hold the later chunks' queries at reference ref = P_{j+1}.
        ref = P
        for i in range(0, n_chunks):
            j = n_chunks - 1 - i
            rows = j * BLOCK_T + tl.arange(0, BLOCK_T)
            p_j = tl.load(p_ptr + j)
            real = _real(m_ptr, rows, T, HAS_MASK)
            _, fq, aq = _query_features(q_ptr, w_ptr, rows, T, M, DQ, sqrt_scale, FEATURE_MAP, M_PAD, DQ_PAD, PRECISION)
            kx, lk, rmax = _key_logits(k_ptr, w_ptr, rows, real, T, M, DQ, sqrt_scale, FEATURE_MAP, M_PAD, DQ_PAD,
                                       PRECISION)
            c, fk = _key_features(lk, rmax, p_j, True, FEATURE_MAP, BLOCK_T)
            v = _values(v_ptr, rows, cols, real, T, DV)
            ge, dz = _output_grads(g_ptr, ln_ptr, delta_ptr, rows, cols, aq + c, T, DV, owner)
            weights = _causal_weights(c, BLOCK_T)
            a = _dot(fq, tl.trans(fk), PRECISION) * weights
            b = (_dot(ge, tl.trans(v), PRECISION) + dz[:, None]) * weights
            up = tl.exp(c - ref)[:, None]                           # e^{c_s − P_{j+1}} ≤ 1
            dfk = _dot(tl.trans(b), fq, PRECISION) + up * (_dot(v, tl.trans(R), PRECISION) + r[None, :])
            dv = _dot(tl.trans(a), ge, PRECISION) + up * _dot(fk, R, PRECISION)
            tl.store(dv_ptr + rows[:, None].to(tl.int64) * DV + cols[None, :], dv,
                     mask=(rows[:, None] < T) & (cols[None, :] < DV))
            dw = _input_grads(kx, fk, dfk, real, w_ptr, dk_ptr, dw, rows, T, M, DQ, sqrt_scale, True, FEATURE_MAP, DW,
                              M_PAD, DQ_PAD, PRECISION)
            fq_j = fq * tl.exp(p_j - c)[:, None]                    # this chunk's queries at reference P_j
            decay = tl.exp(p_j - ref)
            R = R * decay + _dot(tl.trans(fq_j), ge, PRECISION)
            r = r * decay + tl.sum(fq_j * dz[:, None], axis=0)
            ref = p_j
    else:
        S, z, P = _fold_all_keys(k_ptr, w_ptr, v_ptr, m_ptr, cols, T, M, DQ, DV, sqrt_scale, S, z, P,
                                 FEATURE_MAP, HAS_MASK, BLOCK_T, M_PAD, DQ_PAD, PRECISION)
        # Queries: dfq_t = S ge_t + z dz_t; R = Σ_t fq_t ge_tᵀ, r = Σ_t fq_t dz_t (all at reference P).
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            real = _real(m_ptr, rows, T, HAS_MASK)
            qx, fq, aq = _query_features(q_ptr, w_ptr, rows, T, M, DQ, sqrt_scale, FEATURE_MAP, M_PAD, DQ_PAD,
                                         PRECISION)
            ge, dz = _output_grads(g_ptr, ln_ptr, delta_ptr, rows, cols, aq + P, T, DV, owner)
            dfq = _dot(ge, tl.trans(S), PRECISION) + dz[:, None] * z[None, :]
            dw = _input_grads(qx, fq, dfq, real, w_ptr, dq_ptr, dw, rows, T, M, DQ, sqrt_scale, False, FEATURE_MAP, DW,
                              M_PAD, DQ_PAD, PRECISION)
            R += _dot(tl.trans(fq), ge, PRECISION)
            r += tl.sum(fq * dz[:, None], axis=0)
        # Keys: dfk_s = R v_s + r, dv_s = Rᵀ fk_s.
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            real = _real(m_ptr, rows, T, HAS_MASK)
            kx, lk, rmax = _key_logits(k_ptr, w_ptr, rows, real, T, M, DQ, sqrt_scale, FEATURE_MAP, M_PAD, DQ_PAD,
                                       PRECISION)
            c, fk = _key_features(lk, rmax, P, False, FEATURE_MAP, BLOCK_T)
            v = _values(v_ptr, rows, cols, real, T, DV)
            dfk = _dot(v, tl.trans(R), PRECISION) + r[None, :]
            tl.store(dv_ptr + rows[:, None].to(tl.int64) * DV + cols[None, :], _dot(fk, R, PRECISION),
                     mask=(rows[:, None] < T) & (cols[None, :] < DV))
            dw = _input_grads(kx, fk, dfk, real, w_ptr, dk_ptr, dw, rows, T, M, DQ, sqrt_scale, True, FEATURE_MAP, DW,
                              M_PAD, DQ_PAD, PRECISION)
    if DW:
        fm = tl.arange(0, M_PAD)
        dcols = tl.arange(0, DQ_PAD)
        tl.store(dw_ptr + program * M * DQ + fm[:, None] * DQ + dcols[None, :], dw,
                 mask=(fm[:, None] < M) & (dcols[None, :] < DQ))


class Launch:
    """Shapes, block sizes and the launch grid shared by the forward and backward of one call.

    q, k: (B, H, T, DQ) with DQ = Dk (FAVOR, projection (M, Dk)) or M (GIVEN features);
    v: (B, H, T, Dv); all contiguous. M and DQ are padded to powers of two ≥ 16; BLOCK_T (from
    chunk_size, module docstring) and the value column block (≤ 64) shrink so that a chunk's
    feature tiles and the state hold at most _TILE elements each (shared memory: with
    num_stages=1, M = 256 and Dk = 64 need at most 120 KB on sm_90)."""

    def __init__(self, q: Tensor, v: Tensor, m: int, causal: bool, chunk_size: int, feature_map: tl.constexpr,
                 key_mask: Optional[Tensor] = None):
        check_positive("chunk_size", chunk_size)
        # the (BH, T) mask the kernels read, or (unread) q when there is none
        self.has_mask = key_mask is not None
        self.mask = key_mask if self.has_mask else q
        B, H, self.T, self.DQ = q.shape
        self.BH, self.M, self.DV = B * H, m, v.shape[3]
        self.feature_map, self.causal = feature_map.value, causal   # GIVEN or FAVOR, passed as an int
        self.m_pad = pow2(m, 16, 1 << 30)
        self.dq_pad = pow2(self.DQ, 16, 1 << 30) if self.feature_map == FAVOR.value else self.m_pad
        self.block_t = pow2(chunk_size, 16, min(128, max(16, _TILE // max(self.m_pad, self.dq_pad))))
        self.block_dv = pow2(self.DV, 16, min(64, max(16, _TILE // self.m_pad)))
        self.blocks = triton.cdiv(self.DV, self.block_dv)
        self.n_chunks = triton.cdiv(self.T, self.block_t)
        self.precision = "ieee" if q.dtype == torch.float32 else "tf32"
        self.grid = (self.BH, self.blocks)

    @property
    def empty(self) -> bool:
        return self.BH * self.T * self.DV == 0

    def meta(self) -> dict:
        return dict(FEATURE_MAP=self.feature_map, CAUSAL=self.causal, HAS_MASK=self.has_mask, BLOCK_T=self.block_t,
                    M_PAD=self.m_pad,
                    DQ_PAD=self.dq_pad, BLOCK_DV=self.block_dv, PRECISION=self.precision)


def forward(q: Tensor, k: Tensor, v: Tensor, w: Tensor, launch: Launch, sqrt_scale: float) -> Tuple[Tensor, Tensor]:
    out = v.new_zeros(v.shape, dtype=torch.float32)
    lognorm = q.new_zeros(q.shape[:3], dtype=torch.float32)
    if not launch.empty:
        wrap_triton(_fwd_kernel)[launch.grid](
            q, k, v, w, launch.mask, out, lognorm, launch.T, launch.M, launch.DQ, launch.DV, sqrt_scale, _TINY,
            num_stages=1, **launch.meta())
    return out, lognorm          # float32: the backward's g·out must not see a half-rounded out


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor, out: Tensor, lognorm: Tensor,
              launch: Launch, sqrt_scale: float, weight_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dw) in the dtypes of q, k, v, w; dw is zeros unless weight_grad."""
    f32 = torch.float32
    parts = (launch.blocks,) + tuple(q.shape)
    dq = q.new_zeros(parts, dtype=f32)
    dk = q.new_zeros(parts, dtype=f32)
    dv = v.new_zeros(v.shape, dtype=f32)
    dw = w.new_zeros((launch.BH * launch.blocks, launch.M, launch.DQ) if weight_grad else (1, 1, 1), dtype=f32)
    if not launch.empty:
        delta = (grad_out.to(f32) * out.to(f32)).sum(-1)
        scratch = q.new_empty((launch.BH * launch.blocks, launch.n_chunks if launch.causal else 1), dtype=f32)
        wrap_triton(_bwd_kernel)[launch.grid](
            q, k, v, w, launch.mask, grad_out, lognorm, delta, dq, dk, dv, dw, scratch, launch.BH, launch.T, launch.M,
            launch.DQ, launch.DV, sqrt_scale, launch.n_chunks, DW=weight_grad, num_stages=1,
            **launch.meta())
    dw_total = dw.sum(0).to(w.dtype) if weight_grad else w.new_zeros(w.shape)
    return dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv.to(v.dtype), dw_total


