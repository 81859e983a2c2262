"""FAVOR+ attention in plain PyTorch: the ground truth of every backend.

Performer's FAVOR+ (Choromanski et al., "Rethinking Attention with Performers",
ICLR 2021) replaces softmax weights exp(scale·q·k) by the inner product of
positive random features

    φ(x̂)_m = exp(w_m·x̂ − ‖x̂‖²/2) / √M,   x̂ = x·√scale,

whose expectation over w_m ~ N(0, I) is exactly exp(q̂·k̂). The attention output
is the normalised average out_t = Σ_s a_ts v_s / Σ_s a_ts with
a_ts = φ(q̂_t)·φ(k̂_s), over s ≤ t (causal) or all s.

The reference is a ladder, each rung checked against the one below it (tests climb it):
  1. naive:     `linear_attention_naive` / `favor_attention_naive`, the O(T²) definition
                (the full weight matrix, unstabilised; for small float64 cases);
  2. recurrent: `linear_attention_recurrent` / `favor_attention_recurrent`, one position
                at a time through the running sums S_t = Σ_{s≤t} φ(k_s) v_sᵀ, z_t = Σ φ(k_s),
                the recurrence `okadfa.FavorState` decodes with (causal only);
  3. chunked:   `linear_attention` / `favor_attention`, the linear-memory chunked form the
                kernels use, stabilised, with autograd providing the gradients;
  4. the kernels (okadfa.ops), tested on every backend against rung 1 (float64) and 3.
Rung 3's stabilisers are constants that cancel in the normalisation, so they are
detached:
  * queries: each feature row is divided by its maximum (a per-row factor);
  * keys: with the running maximum c_t of the key log-features over positions
    ≤ t, key s contributes to query t with weight exp(l_s − c_t), where l_s are
    its log-features; exp(−c_t) is again per query row. Only positions ≤ t
    enter c_t, so causality holds even when a later key would dominate.
Key padding (`key_mask`, (..., S) bool, True = a real key): a masked key's log-features are
−inf, so its features are exactly 0 and it leaves every sum; its value is read as 0 (a NaN
there reaches nothing). It does not enter the running maximum either, which is floored at
KEY_FLOOR (finite, below any key logit of finite inputs) so that positions before the first
real key keep finite shifts. With L = S, query rows at masked positions output 0 and pass no
gradient (they would otherwise average the keys before them).
If the stabilised normaliser of a row underflows (below min_normal^0.8, ~1e-31
in float32: only for inputs whose weights leave the dtype's range, |q̂|, |k̂| of
order 10 and more) the row's output is 0 and it passes no gradient, rather than
0/0 = NaN or an overflowing backward. Every backend applies this same guard.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import validation

__all__ = ["random_features", "favor_features", "favor_attention", "linear_attention", "favor_attention_naive",
           "linear_attention_naive", "favor_attention_recurrent", "linear_attention_recurrent"]

DEFAULT_CHUNK = 64     # positions per chunk when chunk_size is None, on every backend (okadfa.ops)
# The floor of the key shifts c (every backend): finite, so that c_s − c_t never is −inf − (−inf)
# before the first real key; below any logit w·k̂ − ‖k̂‖²/2 of finite inputs, so it binds nowhere else.
KEY_FLOOR = -1e30


def random_features(num_features: int, head_dim: int, *, orthogonal: bool = True, scaling: str = "chi",
                    generator: torch.Generator | None = None, device=None, dtype=None) -> Tensor:
    """Draw a FAVOR+ projection W of shape (num_features, head_dim).

    orthogonal=True stacks ⌈M/Dk⌉ blocks of mutually orthogonal rows: Dk rows per block,
    the last one min(M − Dk·⌊M/Dk⌋, Dk) rows. A block of k rows is the transposed Q of the
    reduced QR of a Dk×k Gaussian matrix, with the signs of R's diagonal folded in, so its
    rows are a Haar-distributed (uniform) set of k orthonormal directions: the first k rows
    of a Haar orthogonal matrix, without the Dk×Dk matrix (time O(M·Dk·min(M, Dk)), memory
    O(M·Dk)). Row norms: scaling="chi" draws each from the norm of an independent N(0, I_Dk)
    vector (so each row is marginally N(0, I) and the estimator stays unbiased);
    scaling="sqrt" fixes them to √Dk. orthogonal=False gives i.i.d. N(0, I) rows (scaling is
    then ignored).

    Sampling happens on the CPU in float64 with `generator`, so a seed gives the same matrix
    on every device; the result is moved to `device`/`dtype`. Sizes are checked first: a
    projection that could never be allocated (more than the CPU's memory in float64, or the
    device's in `dtype`) raises ValueError before any sampling.

    Random stream: for M a multiple of Dk the draws are those of earlier versions (one Dk×Dk
    Gaussian per block, then the norms). A partial last block (M mod Dk ≠ 0, e.g. M < Dk)
    now draws a Dk×k Gaussian instead of a Dk×Dk one: same distribution, but that block and
    the chi norms differ from earlier versions for the same generator.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = random_features(256, 64, generator=g)   # (256, 64)
    """
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if scaling not in ("chi", "sqrt"):
        raise ValueError(f"scaling must be 'chi' or 'sqrt', got {scaling!r}")
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    validation.check_projection_size(num_features, head_dim, dtype, device)
    kw = dict(generator=generator, dtype=torch.float64)
    if not orthogonal:
        return torch.randn(num_features, head_dim, **kw).to(device=device, dtype=dtype)
    w = torch.empty(num_features, head_dim, dtype=torch.float64)
    for start in range(0, num_features, head_dim):
        k = min(head_dim, num_features - start)         # rows this block needs
        q, r = torch.linalg.qr(torch.randn(head_dim, k, **kw))    # reduced: q (Dk, k), r (k, k)
        diag = torch.diagonal(r)
        w[start:start + k] = (q * torch.sign(diag).where(diag != 0, torch.ones((), dtype=torch.float64))).T
    if scaling == "chi":
        w *= torch.randn(num_features, head_dim, **kw).norm(dim=1)[:, None]
    else:
        w *= math.sqrt(head_dim)
    return w.to(device=device, dtype=dtype)


def favor_features(x: Tensor, projection: Tensor, *, scale: float | None = None) -> Tensor:
    """φ(x̂)_m = exp(w_m·x̂ − ‖x̂‖²/2) / √M with x̂ = x·√scale (no stabilisation).

    x: (..., Dk); projection: (M, Dk); returns (..., M). scale defaults to Dk^-1/2.
    Exact but can overflow for large ‖x̂‖ in low precision; the attention ops
    never form it unstabilised.
    """
    scale = x.shape[-1] ** -0.5 if scale is None else scale
    xh = x * math.sqrt(scale)
    logits = xh @ projection.to(x.dtype).T - (xh * xh).sum(-1, keepdim=True) / 2
    return torch.exp(logits) / math.sqrt(projection.shape[0])


def underflow_threshold(dtype: torch.dtype) -> float:
    """Normalisers below min_normal^0.8 (~1e-31 in float32) count as underflowed."""
    return torch.finfo(dtype).tiny ** 0.8


def _normalise(num: Tensor, den: Tensor, stabilised: bool) -> Tensor:
    # The guard: a row whose stabilised normaliser underflowed (only for inputs
    # whose weights leave the dtype's range) is 0, and passes no gradient. Given
    # (unstabilised) features have an arbitrary scale: only an exact 0 counts.
    # Dividing both by den's value first keeps autograd from forming den² (which
    # underflows for tiny den); the quotient and its gradient are unchanged.
    small = den < underflow_threshold(den.dtype) if stabilised else den == 0
    den = torch.where(small, 1, den)
    unit = den.detach()
    out = (num / unit[..., None]) / (den / unit)[..., None]
    return torch.where(small[..., None], torch.zeros((), dtype=num.dtype), out)


def lower_product(weights: Tensor, v: Tensor) -> Tensor:
    """weights @ v for lower-triangular weights (..., n, n), row t reading only the values of rows
    s ≤ t: in a plain product a later row's NaN/Inf times its exact-0 weight is NaN and reaches
    row t. The finite values go through the product; the non-finite ones are summed in down the
    rows (as a product with positive weights sums them), so rows before them are untouched."""
    finite = torch.isfinite(v)
    return weights @ torch.where(finite, v, 0) + torch.where(finite, 0, v).cumsum(-2)


def causal_chunk(q_c: Tensor, k_c: Tensor, v_c: Tensor, c_c: Tensor, carried: tuple | None,
                 stabilised: bool = True) -> tuple[Tensor, tuple]:
    """One chunk of the causal prefix-sum form: its outputs and the state it passes on.

    q_c, k_c: (..., n, M) features of the chunk's queries and keys, key s scaled by
    exp(−c_s); c_c: (..., n) the keys' running shifts c_s (non-decreasing); v_c: (..., n, Dv).
    carried: None before the first chunk, else (S, z, P) with S = Σ exp(c_s − P) k_s v_sᵀ,
    z = Σ exp(c_s − P) k_s over the earlier keys and P the shift of the last of them.
    """
    n = v_c.shape[-2]
    # Within the chunk key s reaches query t ≥ s with factor exp(c_s − c_t) ≤ 1.
    # (−inf above the diagonal: those entries are exactly 0, their gradient too).
    mask = torch.ones(n, n, dtype=torch.bool, device=v_c.device).tril()
    decay = torch.exp((c_c[..., None, :] - c_c[..., :, None]).masked_fill(~mask, -math.inf))
    weights = ((q_c @ k_c.transpose(-1, -2)) * decay).masked_fill(~mask, 0.0)
    num, den = lower_product(weights, v_c), weights.sum(-1)
    new_ref = c_c[..., -1]
    key_w = k_c * torch.exp(c_c - new_ref[..., None])[..., None]    # relative to the new reference
    state, zsum = key_w.transpose(-1, -2) @ v_c, key_w.sum(-2)
    if carried is not None:
        old_state, old_zsum, ref = carried
        carry = torch.exp(ref[..., None] - c_c)                        # exp(P − c_t) ≤ 1
        num = num + carry[..., None] * (q_c @ old_state)
        den = den + carry * (q_c @ old_zsum[..., None])[..., 0]
        state = state + old_state * torch.exp(ref - new_ref)[..., None, None]
        zsum = zsum + old_zsum * torch.exp(ref - new_ref)[..., None]
    return _normalise(num, den, stabilised), (state, zsum, new_ref)


def _attend(fq: Tensor, fk: Tensor, lk_shift: Tensor | None, v: Tensor, causal: bool, chunk: int,
            stabilised: bool = True) -> Tensor:
    """Normalised attention from stabilised features.

    fq: (..., T, M) query features (any per-row scale); fk: (..., T, M) key
    features exp(l_s − c_s) relative to a per-key shift c_s given by lk_shift
    (..., T) (None: no shift, c = 0); v: (..., T, Dv).
    """
    if not causal:
        # fk shares one shift (a global constant): no per-key factors remain.
        state = fk.transpose(-1, -2) @ v                    # (..., M, Dv)
        return _normalise(fq @ state, (fq @ fk.sum(-2)[..., None])[..., 0], stabilised)
    T = v.shape[-2]
    c = torch.zeros(fq.shape[:-1], dtype=fq.dtype, device=fq.device) if lk_shift is None else lk_shift
    carried, outs = None, []
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(T, t0 + chunk))
        out, carried = causal_chunk(fq[..., sl, :], fk[..., sl, :], v[..., sl, :], c[..., sl], carried, stabilised)
        outs.append(out)
    return torch.cat(outs, dim=-2)


def query_features(q: Tensor, projection: Tensor, scale: float) -> Tensor:
    """φ(q̂) up to a per-row factor (which cancels): exp(w·q̂ − max_m w_m·q̂)."""
    lq = (q * math.sqrt(scale)) @ projection.to(q.dtype).T   # the −‖q̂‖²/2 term is per row: it cancels
    return torch.exp(lq - lq.amax(-1, keepdim=True).detach())


def key_log_features(k: Tensor, projection: Tensor, scale: float) -> Tensor:
    """log φ(k̂) + log √M: w·k̂ − ‖k̂‖²/2 (the constant log √M cancels)."""
    return (k * math.sqrt(scale)) @ projection.to(k.dtype).T - (k * k).sum(-1, keepdim=True) * (scale / 2)


def favor_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, causal: bool = False,
                    scale: float | None = None, chunk_size: int = DEFAULT_CHUNK, key_mask: Tensor | None = None) -> Tensor:
    """FAVOR+ attention (docs/design.md §3), reference implementation.

    q, k: (B, H, T, Dk); v: (B, H, T, Dv); projection: (M, Dk) from
    `random_features`; key_mask: None or (B, H, S) bool, True = a real key (module docstring).
    Returns (B, H, T, Dv) in v's dtype. scale defaults to Dk^-1/2. Linear memory in T;
    differentiable by autograd.

    Example:
        >>> q, k, v = torch.randn(3, 1, 2, 100, 16).unbind(0)
        >>> w = random_features(32, 16)
        >>> favor_attention(q, k, v, w, causal=True).shape
        torch.Size([1, 2, 100, 16])
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fq, lk = query_features(q, projection, scale), key_log_features(k, projection, scale)
    if key_mask is not None:
        lk = lk.masked_fill(~key_mask[..., None], -math.inf)
        v = v.masked_fill(~key_mask[..., None], 0)
    kmax = lk.amax(-1).detach()
    if causal:
        kmax = torch.cummax(kmax, dim=-1).values
    else:
        kmax = kmax.amax(-1, keepdim=True).expand_as(kmax)
    kmax = kmax.clamp_min(KEY_FLOOR)
    fk = torch.exp(lk - kmax[..., None])
    out = _attend(fq, fk, kmax if causal else None, v, causal, chunk_size)
    return _mask_queries(out, key_mask).to(v.dtype)


def _mask_queries(out: Tensor, key_mask: Tensor | None) -> Tensor:
    """Rows of masked positions set to 0 (and passing no gradient) when queries and keys are one sequence."""
    if key_mask is None or key_mask.shape[-1] != out.shape[-2]:
        return out
    return out.masked_fill(~key_mask[..., None], 0)


def linear_attention(q_feat: Tensor, k_feat: Tensor, v: Tensor, *, causal: bool = False,
                     chunk_size: int = DEFAULT_CHUNK, key_mask: Tensor | None = None) -> Tensor:
    """Normalised linear attention on caller-computed non-negative features.

    q_feat, k_feat: (B, H, T, M); v: (B, H, T, Dv); key_mask: None or (B, H, T) bool, True = a
    real key (masked keys' features and values count as 0, masked queries output 0). out_t =
    Σ_s a_ts v_s / Σ_s a_ts with a_ts = q_feat_t·k_feat_s over s ≤ t (causal) or all s.
    """
    if key_mask is not None:
        k_feat = k_feat.masked_fill(~key_mask[..., None], 0)
        v = v.masked_fill(~key_mask[..., None], 0)
    out = _attend(q_feat, k_feat, None, v, causal, chunk_size, stabilised=False)
    return _mask_queries(out, key_mask).to(v.dtype)


def linear_attention_naive(q_feat: Tensor, k_feat: Tensor, v: Tensor, *, causal: bool = False,
                           key_mask: Tensor | None = None) -> Tensor:
    """Rung 1, the definition: out = (A v) / (A 1) with A = q_feat k_featᵀ (T×T, lower-
    triangular if causal), masked keys' columns of A removed (key_mask, True = a real key) and,
    when L = S, masked queries' rows 0. O(T²) time and memory, no stabilisation: for small cases."""
    a = q_feat @ k_feat.transpose(-1, -2)
    if key_mask is not None:
        a = torch.where(key_mask[..., None, :], a, 0)     # selects: a masked key's NaN reaches no row
        v = v.masked_fill(~key_mask[..., None], 0)
    if causal:
        a = a.tril()           # selects: a later key's NaN does not reach earlier rows
    den = a.sum(-1, keepdim=True)
    if key_mask is not None:   # rows with no real key: 0 (not 0/0, whose gradient is NaN too)
        den = torch.where(den == 0, 1, den)
    return _mask_queries((lower_product(a, v) if causal else a @ v) / den, key_mask)


def favor_attention_naive(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, causal: bool = False,
                          scale: float | None = None, key_mask: Tensor | None = None) -> Tensor:
    """Rung 1 of FAVOR+: `linear_attention_naive` on the unstabilised `favor_features`."""
    return linear_attention_naive(favor_features(q, projection, scale=scale),
                                  favor_features(k, projection, scale=scale), v, causal=causal, key_mask=key_mask)


def linear_attention_recurrent(q_feat: Tensor, k_feat: Tensor, v: Tensor) -> Tensor:
    """Rung 2, causal: position by position, S_t = S_{t−1} + k_t v_tᵀ (M, Dv), z_t = z_{t−1} + k_t,
    out_t = q_t S_t / (q_t · z_t): the recurrence of decoding. Unstabilised; O(T·M·Dv)."""
    state = torch.zeros(*v.shape[:-2], q_feat.shape[-1], v.shape[-1], dtype=v.dtype, device=v.device)
    zsum = torch.zeros(*v.shape[:-2], q_feat.shape[-1], dtype=v.dtype, device=v.device)
    outs = []
    for t in range(v.shape[-2]):
        state = state + k_feat[..., t, :, None] * v[..., t, None, :]
        zsum = zsum + k_feat[..., t, :]
        q_t = q_feat[..., t, :]
        outs.append((q_t[..., None, :] @ state)[..., 0, :] / (q_t * zsum).sum(-1, keepdim=True))
    return torch.stack(outs, dim=-2)


def favor_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *,
                              scale: float | None = None) -> Tensor:
    """Rung 2 of causal FAVOR+: `linear_attention_recurrent` on the unstabilised `favor_features`."""
    return linear_attention_recurrent(favor_features(q, projection, scale=scale),
                                      favor_features(k, projection, scale=scale), v)
