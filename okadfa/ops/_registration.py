"""One registration helper for every op: fake tensors (torch.compile, meta) and autograd of
each built implementation, okadfa::<name> of okadfa._C and okadfa::triton_<name> of
okadfa.kernels, through public torch.library calls only.

The attention ops are (forward op, backward op) pairs: every backend's forward op returns (out, lognorm) and takes its tensors first, then its
non-tensor arguments; the backward op takes (grad_out, *tensors, out, lognorm, *arguments
[, weight_grad]) and returns one gradient per tensor. lognorm is an internal statistic
(the log-normaliser the backward reuses), not differentiable.
"""
from __future__ import annotations

import functools

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
        torch.library.register_fake(f"okadfa::{prefix}{name}")(_on_one_device(fake))
        if backward is not None:
            torch.library.register_fake(f"okadfa::{prefix}{backward}")(_on_one_device(backward_fake))
            _register_autograd(prefix + name, prefix + backward, num_tensors, weight_grad)


def _on_one_device(fake):
    """fake, first checking that every tensor argument is on one device. A meta tensor among CPU
    tensors dispatches to the fake (the Meta key wins): without the check such a call would
    return uninitialised CPU tensors instead of an error."""
    @functools.wraps(fake)
    def checked(*args):
        devices = sorted({str(a.device) for a in args if isinstance(a, torch.Tensor)})
        if len(devices) > 1:
            raise ValueError(f"okadfa: every tensor argument must be on one device, got {', '.join(devices)}")
        return fake(*args)
    return checked


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
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # create_graph=True: the backward kernels are not differentiable, so second
            # derivatives through them would silently be 0.
            raise RuntimeError(f"okadfa: okadfa::{fwd} has no double backward (create_graph=True / "
                               f"gradgradcheck); use backend='reference', whose plain-PyTorch ops support it")
        flag = (ctx.needs_input_grad[num_tensors - 1],) if weight_grad else ()
        grads = getattr(torch.ops.okadfa, bwd)(grad_out.contiguous(), *ctx.saved_tensors, *ctx.args, *flag)
        if weight_grad and not flag[0]:
            grads = (*grads[:-1], None)
        return (*grads, *(None,) * len(ctx.args))

    torch.library.register_autograd(f"okadfa::{fwd}", backward, setup_context=setup_context)


def attention_implementations(forward: str, reference_forward) -> dict:
    """The IMPLEMENTATIONS table of an attention op whose registered forward is okadfa::<forward>
    (cpu, cuda) and okadfa::triton_<forward>. The cpu kernels take half types as they are and
    compute in float32, with bfloat16 GEMMs where the CPU has bfloat16 matrix instructions
    (`okadfa.backends()["cpu"]["bfloat16"]` says which); the Triton kernels read half types as
    they are and compute in float32; the cuda kernels and the reference compute half types in
    float32 (cast in, the output cast back). Every call returns the output."""
    return {
        "cpu": (validation.same_dtype, registered(forward, output=0)),
        "cuda": (validation.native_dtype, registered(forward, output=0)),
        "triton": (validation.same_dtype, registered(f"triton_{forward}", output=0)),
        "reference": (validation.native_dtype, reference_forward),
    }
