"""dfa_feedback: every DFA signal g_p = e B_pᵀ in one call (docs/design.md §4).

Native kernels: okadfa::dfa_feedback (csrc/dfa_feedback.cpp on the CPU, the CUDA
kernel under the CUDA key) and okadfa::triton_dfa_feedback (okadfa.kernels). They
share one calling convention, `native_feedback_args`: a stored feedback tensor is
passed (cast to the accumulation dtype), a `FeedbackSpec` is passed as
(points, dim, seed, dist, shared) and its entries are generated inside the kernel.
This module validates, dispatches and gives the ops fake implementations.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import NATIVE_AVAILABLE, dispatch, registered
from ..feedback import FeedbackSpec, seeded_matrix
from .. import validation
from ..validation import check_feedback, check_matrix
from ._registration import register

_DISTS = {"normal": 0, "uniform": 1}


def native_feedback_args(feedback, dtype: torch.dtype) -> tuple:
    """(feedback tensor or None, points, dim, seed, dist, shared) for the native ops.

    The seed in [0, 2⁶⁴) travels as the int64 with the same bits."""
    if isinstance(feedback, FeedbackSpec):
        seed = feedback.seed - 2 ** 64 if feedback.seed >= 2 ** 63 else feedback.seed
        return None, feedback.points, feedback.dim, seed, _DISTS[feedback.dist], feedback.shared
    return feedback.to(dtype).contiguous(), feedback.shape[0], feedback.shape[1], 0, 0, False


def seeded_feedback_matrix(spec: FeedbackSpec, p: int) -> Tensor:
    """B_p (dim, error_dim) of a seeded spec, float32 on the CPU, exactly as the cpu backend
    generates it (without the native extension: the reference definition). It equals
    `materialize_feedback(spec)[p]` bit for bit."""
    if not isinstance(spec, FeedbackSpec):
        raise TypeError(f"spec must be a FeedbackSpec, got {type(spec).__name__}")
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < spec.points:
        raise ValueError(f"p must be an int in [0, {spec.points}), got {p!r}")
    if not NATIVE_AVAILABLE:
        return seeded_matrix(spec, p)
    _, _, _, seed, dist, _ = native_feedback_args(spec, torch.float32)
    return torch.ops.okadfa.seeded_feedback(0 if spec.shared else p, spec.dim, spec.error_dim, seed, dist)


# fake tensor implementation of okadfa::dfa_feedback and okadfa::triton_dfa_feedback
def _fake(error, feedback, points, dim, seed, dist, shared):
    P, d = (points, dim) if feedback is None else feedback.shape[:2]
    return error.new_empty((P, error.shape[0], d))


register("dfa_feedback", _fake)


def _native(name: str):
    """The registered op okadfa::<name> with dfa_feedback's signature (native_feedback_args)."""
    op = registered(name)
    return lambda error, feedback: op(error.contiguous(),
                                      *native_feedback_args(feedback, torch.promote_types(error.dtype, torch.float32)))


# backend -> (the dtype it computes an input dtype in, the projection): every backend takes the
# error as it is and accumulates in float32 (float64 for float64 errors) itself.
IMPLEMENTATIONS = {
    "cpu": (validation.same_dtype, _native("dfa_feedback")),
    "cuda": (validation.same_dtype, _native("dfa_feedback")),
    "triton": (validation.same_dtype, _native("triton_dfa_feedback")),
    "reference": (validation.same_dtype, reference.dfa_feedback),
}


@validation.errors_as_in_eager()
def dfa_feedback(error: Tensor, feedback, *, backend: str = "auto") -> Tensor:
    """Every DFA signal at once: out[p] = error · B_pᵀ, out[p, n, i] = Σ_j e[n, j]·B[p, i, j].

    The error is read once per call for all P points (no per-point launches); a seeded
    `FeedbackSpec` is regenerated tile by tile inside the kernel and never stored.
    Not differentiable: it computes gradient signals (use it inside a backward).

    Args:
        error: e (N, E), floating point.
        feedback: a `FeedbackSpec` with error_dim = E, or a stored tensor B (P, d, E) on
            error's device, any floating dtype.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see `okadfa.backends()`).
    Returns:
        (P, N, d) in error's dtype, accumulated in float32 (float64 for float64 errors).
        Seeded entries equal `materialize_feedback`'s bit for bit on every backend.

    Example:
        >>> g = okadfa.dfa_feedback(torch.randn(10, 768), okadfa.FeedbackSpec(12, 768, 768))
        >>> g.shape
        torch.Size([12, 10, 768])
    """
    check_matrix(error, "error", "(N, E)")
    check_feedback(feedback, error.shape[1], error.device, f"the error has {error.shape[1]} columns")
    validation.check_feedback_size(feedback, error.shape[0], error.dtype, error.device)
    compute, project = dispatch(IMPLEMENTATIONS, backend, error.device)
    return project(error.to(compute(error.dtype)), feedback)
