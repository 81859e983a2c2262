"""linear_attention: normalised linear attention on caller-computed features.

Native kernels: okadfa::linear_attention_fwd/_bwd (csrc/linear_attention.cpp),
Triton kernels: okadfa::triton_linear_attention_fwd/_bwd (okadfa.kernels.linear_attention);
the same chunked algorithm as favor_attention without the fused feature map.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import dispatch
from .. import validation
from ._registration import attention_implementations, register



# fake tensor implementation of okadfa::linear_attention_fwd and okadfa::triton_linear_attention_fwd
def _fwd_fake(q_feat, k_feat, v, key_mask, causal, chunk_size):
    return (v.new_empty(v.shape, dtype=validation.native_dtype(v.dtype)),                 # float32 for half inputs
            q_feat.new_empty(q_feat.shape[:3], dtype=validation.native_dtype(q_feat.dtype)))


# fake tensor implementation of okadfa::linear_attention_bwd and okadfa::triton_linear_attention_bwd
def _bwd_fake(grad_out, q_feat, k_feat, v, out, lognorm, key_mask, causal, chunk_size):
    return torch.empty_like(q_feat), torch.empty_like(k_feat), torch.empty_like(v)


def _reference(q_feat, k_feat, v, key_mask, causal, chunk_size):
    return reference.linear_attention(q_feat, k_feat, v, causal=causal, chunk_size=chunk_size, key_mask=key_mask)


# backend -> (the dtype it computes an input dtype in, the forward)
IMPLEMENTATIONS = attention_implementations("linear_attention_fwd", _reference)

register("linear_attention_fwd", _fwd_fake, backward="linear_attention_bwd", backward_fake=_bwd_fake, num_tensors=3,
         weight_grad=False)


def _check_nonnegative(x: Tensor, name: str) -> None:
    if bool((x < 0).any()):
        raise ValueError(f"{name} must be non-negative (features of a positive kernel)")


@torch.library.custom_op("okadfa::checked_nonnegative", mutates_args=())
def checked_nonnegative(x: Tensor, name: str) -> Tensor:
    """A copy of x once it is checked non-negative on the real data: linear_attention's check
    inside a compiled graph, where the traced Python sees no data."""
    _check_nonnegative(x, name)
    return x.clone()


checked_nonnegative.register_fake(lambda x, name: torch.empty_like(x))
checked_nonnegative.register_autograd(lambda ctx, grad: (grad, None))


@validation.errors_as_in_eager()
def linear_attention(q_feat: Tensor, k_feat: Tensor, v: Tensor, *, causal: bool = False,
                     key_mask: Tensor | None = None, backend: str = "auto", chunk_size: int | None = None) -> Tensor:
    """Normalised linear attention with features computed by the caller.

        out_t = Σ_s a_ts v_s / Σ_s a_ts,   a_ts = q_feat_t · k_feat_s,

    over s ≤ t when causal (chunked prefix sums, linear in T), all s otherwise.
    Use it for feature maps other than FAVOR+ (e.g. elu(x)+1 of Katharopoulos et
    al. 2020). Features must be non-negative; the kernels do not rescale them, so
    keep them in a range where their products neither overflow nor underflow to
    0 (the result does not depend on their scale, but the arithmetic does). A row
    whose weights are all exactly 0 gives 0 and passes no gradient. Under
    torch.compile the non-negativity check runs when the compiled code runs (on a copy).

    Args:
        q_feat, k_feat: (B, H, T, M), non-negative. v: (B, H, T, Dv). B, H broadcast.
        causal, key_mask, backend, chunk_size: as in `favor_attention` (a masked key's features
            count as 0, whatever k_feat holds there).
    Returns:
        (B, H, T, Dv) in v's dtype.

    Example:
        >>> fq, fk = (torch.nn.functional.elu(x) + 1 for x in torch.randn(2, 1, 4, 512, 32))
        >>> out = okadfa.linear_attention(fq, fk, torch.randn(1, 4, 512, 64), causal=True)
    """
    validation.check_tensor(q_feat, "q_feat", 4, "(B, H, T, M)")
    validation.check_tensor(k_feat, "k_feat", 4, "(B, H, T, M)")
    validation.check_tensor(v, "v", 4, "(B, H, T, Dv)")
    validation.check_same({"q_feat": q_feat, "k_feat": k_feat, "v": v})
    if k_feat.shape[3] != q_feat.shape[3] or q_feat.shape[3] < 1:
        raise ValueError(f"q_feat and k_feat must have the same number of features M >= 1 (dim 3), got shapes "
                         f"{tuple(q_feat.shape)} and {tuple(k_feat.shape)}")
    batch = validation.attention_batch_shape(q_feat, k_feat, v, "q_feat", "k_feat")
    causal = validation.check_causal(causal)
    key_mask = validation.key_mask(key_mask, batch, k_feat.shape[2], q_feat.device)
    chunk = validation.check_chunk(chunk_size, validation.default_chunk(q_feat, reference.attention.DEFAULT_CHUNK))
    if torch.compiler.is_compiling():        # checked when the compiled code runs
        q_feat, k_feat = checked_nonnegative(q_feat, "q_feat"), checked_nonnegative(k_feat, "k_feat")
    else:
        _check_nonnegative(q_feat, "q_feat")
        _check_nonnegative(k_feat, "k_feat")
    compute, forward = dispatch(IMPLEMENTATIONS, backend, q_feat.device)
    dtype = validation.compute_dtype(compute, batch, q_feat, k_feat, v)
    q_feat, k_feat, v_c = (validation.prepare(x, batch, dtype) for x in (q_feat, k_feat, v))
    with torch.autocast(v.device.type, enabled=False):     # the reference computes in `dtype`
        out = forward(q_feat, k_feat, v_c, key_mask, causal, chunk)
    return out.to(v.dtype)
