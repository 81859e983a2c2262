"""favor_attention: FAVOR+ attention with the feature map fused (docs/design.md §3).

The native kernels are the registered ops okadfa::favor_attention_fwd/_bwd
(csrc/favor_attention.cpp), the Triton kernels okadfa::triton_favor_attention_fwd/_bwd
(okadfa.kernels.favor_attention); this module gives them fake implementations and
autograd, validates input and dispatches between backends.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import dispatch
from .. import validation
from ._registration import attention_implementations, register



# fake tensor implementation of okadfa::favor_attention_fwd and okadfa::triton_favor_attention_fwd
def _fwd_fake(q, k, v, projection, key_mask, causal, scale, chunk_size):
    # float32 for half inputs (the cpu and Triton ops take them; the cuda ones get float32 already)
    return (v.new_empty(v.shape, dtype=validation.native_dtype(v.dtype)),
            q.new_empty(q.shape[:3], dtype=validation.native_dtype(q.dtype)))   # out, lognorm


# fake tensor implementation of okadfa::favor_attention_bwd and okadfa::triton_favor_attention_bwd
def _bwd_fake(grad_out, q, k, v, projection, out, lognorm, key_mask, causal, scale, chunk_size, projection_grad):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(projection)


def _reference(q, k, v, projection, key_mask, causal, scale, chunk_size):
    return reference.favor_attention(q, k, v, projection, causal=causal, scale=scale, chunk_size=chunk_size,
                                     key_mask=key_mask)


# backend -> (the dtype it computes an input dtype in, the forward)
IMPLEMENTATIONS = attention_implementations("favor_attention_fwd", _reference)

register("favor_attention_fwd", _fwd_fake, backward="favor_attention_bwd", backward_fake=_bwd_fake, num_tensors=4,
         weight_grad=True)


@validation.errors_as_in_eager()
def favor_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, causal: bool = False,
                    scale: float | None = None, key_mask: Tensor | None = None, backend: str = "auto",
                    chunk_size: int | None = None) -> Tensor:
    """FAVOR+ attention: softmax attention approximated by positive random features.

    With q̂ = q·√scale, k̂ = k·√scale and φ(x̂)_m = exp(w_m·x̂ − ‖x̂‖²/2)/√M,

        out_t = Σ_s a_ts v_s / Σ_s a_ts,   a_ts = φ(q̂_t)·φ(k̂_s),

    over s ≤ t when causal, all s otherwise. E[a_ts] = exp(scale·q_t·k_s) for
    Gaussian rows w_m, so the output approximates softmax attention and improves
    with M. Time and memory are linear in T (chunked prefix sums, Choromanski et
    al. 2021); a running maximum of the key features keeps it finite without any
    dependence on later positions.

    Args:
        q: (B, H, L, Dk); k: (B, H, S, Dk); v: (B, H, S, Dv), L = S when causal (non-causal
            cross-attention with L ≠ S runs the reference path, plain PyTorch and also linear
            in L and S, on every backend). B and H broadcast (size 1 is expanded);
            k and v may have fewer heads than q when they divide q's (grouped-query
            attention as in SDPA's enable_gqa: kv head j serves q heads j·G … j·G+G−1).
        projection: (M, Dk), e.g. from `okadfa.random_features(M, Dk)`; gets a
            gradient if it requires one.
        causal: attend to s ≤ t only.
        scale: logit scale, default Dk^-1/2 as in scaled_dot_product_attention.
        key_mask: None, or a bool (B, S) tensor (B may be 1), True = a real key, False = padding
            (SDPA's convention for boolean masks; nn.MultiheadAttention's key_padding_mask is the
            opposite). Masked keys leave every sum exactly: their features count as 0 and their
            values are not read. When L = S, output rows at masked positions are 0 and pass no
            gradient; a row whose keys are all masked is 0 too.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see `okadfa.backends()`).
        chunk_size: positions per chunk of the native kernels (default 64, 128 for bfloat16 on
            the CPU; the triton backend rounds it to a power of two in [16, 128], smaller for large M).
    Returns:
        (B, H, L, Dv) in v's dtype. The cpu backend computes float16/bfloat16 in float32, with
        bfloat16 GEMM operands (float32 accumulation) where the CPU has bfloat16 matrix
        instructions (`okadfa.backends()["cpu"]["bfloat16"]`); the cuda and reference backends
        compute them in float32; the triton backend reads them as they are (float32 arithmetic)
        and rejects float64. Under
        `torch.autocast` float32 inputs are first cast to the autocast dtype, as SDPA does.

    Example:
        >>> q, k, v = torch.randn(3, 2, 4, 1024, 64).unbind(0)
        >>> w = okadfa.random_features(256, 64)
        >>> out = okadfa.favor_attention(q, k, v, w, causal=True)   # (2, 4, 1024, 64)
    """
    validation.check_tensor(q, "q", 4, "(B, H, L, Dk)")
    validation.check_tensor(k, "k", 4, "(B, H, S, Dk)")
    validation.check_tensor(v, "v", 4, "(B, H, S, Dv)")
    validation.check_tensor(projection, "projection", 2, "(M, Dk)")
    q, k, v = validation.autocast_inputs(q, k, v)      # as torch.autocast does for SDPA
    validation.check_same({"q": q, "k": k, "v": v})
    if projection.device != q.device:
        raise ValueError(f"projection is on {projection.device} but q is on {q.device}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have the head dim of q ({q.shape[3]}), got shape {tuple(k.shape)}")
    if projection.shape[1] != q.shape[3] or projection.shape[0] < 1:
        raise ValueError(f"projection must have shape (M, {q.shape[3]}) with M >= 1, got {tuple(projection.shape)}")
    causal = validation.check_causal(causal)
    batch = validation.attention_batch_shape(q, k, v, "q", "k", cross=not causal)
    key_mask = validation.key_mask(key_mask, batch, k.shape[2], q.device)
    scale = validation.check_scale(scale, q.shape[3], q.dtype)
    chunk = validation.check_chunk(chunk_size, validation.default_chunk(q, reference.attention.DEFAULT_CHUNK))
    compute, forward = dispatch(IMPLEMENTATIONS, backend, q.device)
    if q.shape[2] != k.shape[2]:
        # The kernels take L = S: non-causal cross-attention runs the reference's form (also
        # linear in L and S) on every backend, computing half types in float32 as the reference does.
        compute, forward = validation.native_dtype, _reference
    dtype = validation.compute_dtype(compute, batch, q, k, v)
    q, k, v_c = (validation.prepare(x, batch, dtype) for x in (q, k, v))
    with torch.autocast(q.device.type, enabled=False):     # the plain-PyTorch paths compute in `dtype`
        out = forward(q, k, v_c, projection.to(dtype).contiguous(), key_mask, causal, scale, chunk)
    return out.to(v.dtype)
