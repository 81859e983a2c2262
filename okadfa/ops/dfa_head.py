"""dfa_head: the fused output head with DFA signals (docs/design.md §4).

Native kernels: okadfa::dfa_head (csrc/dfa_head.cpp on the CPU, the CUDA kernel
under the CUDA key) and okadfa::triton_dfa_head (okadfa.kernels), with the feedback
passed as in okadfa.ops.dfa_feedback. This module validates, dispatches and gives
the ops fake implementations.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import dispatch, registered
from .. import validation
from ..validation import check_head_inputs, check_target_range
from ._registration import register
from .dfa_feedback import native_feedback_args

# Rows per chunk when chunk_size is None: the chunk's logits hold about this many
# entries (32 MiB in float32; 166 rows at V = 50257), whatever the vocabulary size.
CHUNK_ENTRIES = 1 << 23


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk of the native kernels for a vocabulary of `vocab_size`."""
    return max(1, CHUNK_ENTRIES // max(vocab_size, 1))


# fake tensor implementation of okadfa::dfa_head and okadfa::triton_dfa_head
def _fake(h, w_dec, targets, feedback, points, dim, seed, dist, shared, ignore_index, logits_error, chunk_size):
    acc = torch.promote_types(torch.promote_types(h.dtype, w_dec.dtype), torch.float32)
    P, d = (points, dim) if feedback is None else feedback.shape[:2]
    return (h.new_empty((), dtype=acc), torch.empty_like(h), torch.empty_like(w_dec),
            h.new_empty((P, h.shape[0], d)))


register("dfa_head", _fake)


def _native(name: str):
    """The registered op okadfa::<name> with the reference's arguments (native_feedback_args;
    chunk_size None: about 2²³/V rows)."""
    op = registered(name)

    def head(h, w_dec, targets, feedback, ignore_index, chunk_size, error):
        acc = torch.promote_types(torch.promote_types(h.dtype, w_dec.dtype), torch.float32)
        chunk = default_chunk_size(w_dec.shape[0]) if chunk_size is None else chunk_size
        return op(h.contiguous(), w_dec.contiguous(), targets.contiguous(), *native_feedback_args(feedback, acc),
                  ignore_index, error == "logits", chunk)
    return head


def _reference(h, w_dec, targets, feedback, ignore_index, chunk_size, error):
    return reference.dfa_head(h, w_dec, targets, feedback, ignore_index=ignore_index, chunk_size=chunk_size,
                              error=error)


# backend -> (the dtype it computes an input dtype in, the head); every backend accumulates in
# float32 (float64 for float64 inputs) itself.
IMPLEMENTATIONS = {
    "cpu": (validation.same_dtype, _native("dfa_head")),
    "cuda": (validation.same_dtype, _native("dfa_head")),
    "triton": (validation.same_dtype, _native("triton_dfa_head")),
    "reference": (validation.same_dtype, _reference),
}


@torch.library.custom_op("okadfa::checked_targets", mutates_args=())
def checked_targets(targets: Tensor, vocab_size: int, ignore_index: int) -> Tensor:
    """A copy of targets once their range is checked on the real data: the range check
    of dfa_head inside a compiled graph, where the traced Python sees no data."""
    check_target_range(targets, vocab_size, ignore_index)
    return targets.clone()


@checked_targets.register_fake
def _(targets, vocab_size, ignore_index):
    return torch.empty_like(targets)


@validation.errors_as_in_eager(outputs=4)
def dfa_head(h: Tensor, w_dec: Tensor, targets: Tensor, feedback, *, ignore_index: int = -100,
             chunk_size: int | None = None, error: str = "hidden", backend: str = "auto"):
    """The output head with DFA signals: loss, the head's true gradients and every g_p.

    With Nv the number of rows whose target is not ignore_index:

        y = h w_decᵀ (N, V);   loss = −(1/Nv) Σ_{n kept} log softmax(y_n)[t_n]
        dy = (softmax(y) − onehot(t)) / Nv, rows with t_n = ignore_index set to 0
        grad_h = dy w_dec (N, d);   grad_w_dec = dyᵀ h (V, d)
        e = grad_h (error="hidden", E = d) or dy (error="logits", E = V)
        signals[p] = e B_pᵀ (P, N, d_p)

    The native kernels go row chunk by row chunk (logits, cross-entropy, dy, the head's
    gradients, the signals), so no N×V tensor exists; seeded feedback is generated inside
    the kernel. loss, grad_h and grad_w_dec equal autograd through F.cross_entropy(y, t,
    ignore_index=...); if Nv = 0 everything is 0 (where F.cross_entropy gives nan).
    Not differentiable: it returns gradients (okadfa.dfa.DFA uses it in a backward).

    Args:
        h: (N, d) final hidden states. w_dec: (V, d) unembedding, on h's device.
        targets: (N,) int64, each in [0, V) or equal to ignore_index.
        feedback: `FeedbackSpec` (seeded: nothing stored) or stored tensor (P, d_p, E).
        chunk_size: rows per chunk (None: about 2²³/V rows, on every backend); results do
            not depend on it beyond rounding. With
            error="logits" and seeded feedback each chunk regenerates the P·d_p·V entries.
        error: "hidden" or "logits", which error the feedback projects.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see `okadfa.backends()`).
    Returns:
        (loss, grad_h, grad_w_dec, signals): loss a 0-d tensor in the accumulation dtype
        (float32, or float64 if h or w_dec is float64); grad_h and signals in h's dtype,
        grad_w_dec in w_dec's dtype; half types accumulate in float32.

    Example:
        >>> h, w = torch.randn(2048, 768), torch.randn(50257, 768)
        >>> t = torch.randint(0, 50257, (2048,))
        >>> loss, gh, gw, s = okadfa.dfa_head(h, w, t, okadfa.FeedbackSpec(12, 768, 768))
        >>> s.shape
        torch.Size([12, 2048, 768])
    """
    check_head_inputs(h, w_dec, targets, feedback, ignore_index, chunk_size, error)
    validation.check_feedback_size(feedback, h.shape[0], h.dtype, h.device, who="dfa_head")
    if torch.compiler.is_compiling():
        targets = checked_targets(targets, w_dec.shape[0], ignore_index)
    compute, head = dispatch(IMPLEMENTATIONS, backend, h.device)
    return head(h.to(compute(h.dtype)), w_dec, targets, feedback, ignore_index, chunk_size, error)
