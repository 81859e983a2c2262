"""Autograd for a registered (forward op, backward op) pair of the attention ops.

Every backend's forward op returns (out, lognorm) and takes its tensors first, then its
non-tensor arguments; the backward op takes (grad_out, *tensors, out, lognorm, *arguments
[, weight_grad]) and returns one gradient per tensor. lognorm is an internal statistic
(the log-normaliser the backward reuses), not differentiable.
"""
from __future__ import annotations

import torch


def register_attention_autograd(fwd: str, bwd: str, num_tensors: int, weight_grad: bool) -> None:
    """Register autograd for okadfa::<fwd> using okadfa::<bwd>.

    weight_grad: the last tensor is a weight (the projection) whose gradient the backward
    computes only when requested (a trailing bool argument) and which is None otherwise.
    """
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*inputs[:num_tensors], *output)
        ctx.args = tuple(inputs[num_tensors:])

    def backward(ctx, grad_out, grad_lognorm):
        flag = (ctx.needs_input_grad[num_tensors - 1],) if weight_grad else ()
        grads = getattr(torch.ops.okadfa, bwd)(grad_out.contiguous(), *ctx.saved_tensors, *ctx.args, *flag)
        if weight_grad and not flag[0]:
            grads = (*grads[:-1], None)
        return (*grads, *(None,) * len(ctx.args))

    torch.library.register_autograd(f"okadfa::{fwd}", backward, setup_context=setup_context)
