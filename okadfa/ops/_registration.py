"""One registration helper for every op: fake tensors (torch.compile, meta) and autograd of
each built implementation, okadfa::<name> of okadfa._C and okadfa::triton_<name> of
okadfa.kernels, through public torch.library calls only.

The attention ops are (forward op, backward op) pairs: every backend's forward op returns (out, lognorm) and takes its tensors first, then its
non-tensor arguments; the backward op takes (grad_out, *tensors, out, lognorm, *arguments
[, weight_grad]) and returns one gradient per tensor. lognorm is an internal statistic
(the log-normaliser the backward reuses), not differentiable.
"""
from __future__ import annotations

import torch

from .. import validation
from ..backends import NATIVE_AVAILABLE, TRITON_OPS, registered


def register(name: str, fake, *, backward: str | None = None, backward_fake=None, num_tensors: int = 0,
             weight_grad: bool = False) -> None:
    """Give okadfa::<name> and okadfa::triton_<name>, those that exist here, the fake
    implementation `fake`; with `backward` (the backward op's name, same prefixes) also its
    fake and autograd (`_register_autograd`). Ops without a backward (the DFA ops) compute
    gradients themselves and are not differentiable."""
    prefixes = ([""] if NATIVE_AVAILABLE else []) + (["triton_"] if TRITON_OPS else [])
    for prefix in prefixes:
        # For the Triton ops this replaces the fake that triton_op derives from the launcher:
        # under TRITON_INTERPRET=1 wrap_triton returns the plain interpreted kernel, which
        # cannot run on fake tensors.
        torch.library.register_fake(f"okadfa::{prefix}{name}")(fake)
        if backward is not None:
            torch.library.register_fake(f"okadfa::{prefix}{backward}")(backward_fake)
            _register_autograd(prefix + name, prefix + backward, num_tensors, weight_grad)


def _register_autograd(fwd: str, bwd: str, num_tensors: int, weight_grad: bool) -> None:
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


def attention_implementations(forward: str, reference_forward) -> dict:
    """The IMPLEMENTATIONS table of an attention op whose registered forward is okadfa::<forward>
    (cpu, cuda) and okadfa::triton_<forward>: the native kernels compute half types in float32,
    the Triton kernels and the reference in the input dtype; every call returns the output."""
    return {
        "cpu": (validation.native_dtype, registered(forward, output=0)),
        "cuda": (validation.native_dtype, registered(forward, output=0)),
        "triton": (validation.same_dtype, registered(f"triton_{forward}", output=0)),
        "reference": (validation.same_dtype, reference_forward),
    }
