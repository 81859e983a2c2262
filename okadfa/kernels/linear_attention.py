"""Triton kernels of linear_attention (docs/design.md §3): the custom ops
okadfa::triton_linear_attention_fwd/_bwd on the chunked kernels of okadfa.kernels.chunked_attention
with caller-given features (fake tensors, autograd, dispatch: okadfa/ops/linear_attention.py)."""
from typing import Optional, Tuple

from torch import Tensor

from ._utils import check_attention, check_dtypes, check_key_mask, check_saved, triton_op
from .chunked_attention import GIVEN, Launch, backward, forward


@triton_op("okadfa::triton_linear_attention_fwd", mutates_args=())
def triton_linear_attention_fwd(q_feat: Tensor, k_feat: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool,
                                chunk_size: int) -> Tuple[Tensor, Tensor]:
    """Normalised linear attention on given features q_feat, k_feat (B, H, T, M); v (B, H, T, Dv);
    key_mask None or bool (B, H, T), True = a real key."""
    check_dtypes(q_feat=q_feat, k_feat=k_feat, v=v)
    check_attention(q_feat, k_feat, v, chunk_size)
    check_key_mask(key_mask, q_feat)
    launch = Launch(q_feat, v, q_feat.shape[3], causal, chunk_size, GIVEN, key_mask)
    return forward(q_feat, k_feat, v, q_feat, launch, 1.0)


@triton_op("okadfa::triton_linear_attention_bwd", mutates_args=())
def triton_linear_attention_bwd(grad_out: Tensor, q_feat: Tensor, k_feat: Tensor, v: Tensor, out: Tensor,
                                lognorm: Tensor, key_mask: Optional[Tensor], causal: bool,
                                chunk_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq_feat, dk_feat, dv) of triton_linear_attention_fwd."""
    check_dtypes(grad_out=grad_out, q_feat=q_feat, k_feat=k_feat, v=v)
    check_attention(q_feat, k_feat, v, chunk_size)
    check_saved(grad_out, q_feat, v, out, lognorm)
    check_key_mask(key_mask, q_feat)
    launch = Launch(q_feat, v, q_feat.shape[3], causal, chunk_size, GIVEN, key_mask)
    dq, dk, dv, _ = backward(grad_out, q_feat, k_feat, v, q_feat, out, lognorm, launch, 1.0, False)
    return dq, dk, dv
