"""Triton kernels of favor_attention (docs/design.md §3): the custom ops
okadfa::triton_favor_attention_fwd/_bwd on the chunked kernels of okadfa.kernels.chunked_attention
with the fused FAVOR+ feature map (fake tensors, autograd, dispatch: okadfa/ops/favor_attention.py)."""
from typing import Optional, Tuple

from torch import Tensor

from ._utils import check_attention, check_dtypes, check_key_mask, check_saved, triton_op
from .chunked_attention import FAVOR, Launch, backward, forward


@triton_op("okadfa::triton_favor_attention_fwd", mutates_args=())
def triton_favor_attention_fwd(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, key_mask: Optional[Tensor],
                               causal: bool, scale: float, chunk_size: int) -> Tuple[Tensor, Tensor]:
    """FAVOR+ attention (out and lognorm (B, H, T) in float32, whatever the inputs' dtype); q, k (B, H, T, Dk),
    v (B, H, T, Dv), projection (M, Dk), all contiguous, float32/float16/bfloat16; key_mask None or bool
    (B, H, T), True = a real key."""
    check_dtypes(q=q, k=k, v=v, projection=projection)
    check_attention(q, k, v, chunk_size, projection, scale)
    check_key_mask(key_mask, q)
    launch = Launch(q, v, projection.shape[0], causal, chunk_size, FAVOR, key_mask)
    return forward(q, k, v, projection, launch, scale ** 0.5)


@triton_op("okadfa::triton_favor_attention_bwd", mutates_args=())
def triton_favor_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, projection: Tensor, out: Tensor,
                               lognorm: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float, chunk_size: int,
                               projection_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dprojection) of triton_favor_attention_fwd; dprojection is zeros unless
    projection_grad."""
    check_dtypes(grad_out=grad_out, q=q, k=k, v=v, projection=projection)
    check_attention(q, k, v, chunk_size, projection, scale)
    check_saved(grad_out, q, v, out, lognorm)
    check_key_mask(key_mask, q)
    launch = Launch(q, v, projection.shape[0], causal, chunk_size, FAVOR, key_mask)
    return backward(grad_out, q, k, v, projection, out, lognorm, launch, scale ** 0.5, projection_grad)
