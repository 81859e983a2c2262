"""Direct Feedback Alignment signals and the DFA output head (docs/design.md §4), reference path.

DFA (Nøkland, "Direct Feedback Alignment Provides Learning in Deep Neural Networks",
NeurIPS 2016; at transformer scale: Launay, Poli, Boniface and Krzakala, "Direct
Feedback Alignment Scales to Modern Deep Learning Tasks and Architectures", NeurIPS
2020) gives feedback point p the fixed random projection g_p = e B_pᵀ of the output
error e instead of its backpropagated gradient.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .. import validation
from ..feedback import FeedbackSpec, materialize_feedback

__all__ = ["dfa_feedback", "dfa_head"]

# Rows per chunk when dfa_head's chunk_size is None: the chunk's logits hold about this many
# entries (32 MiB in float32), as in the native kernels (okadfa.ops.dfa_head.CHUNK_ENTRIES).
CHUNK_ENTRIES = 1 << 23


def _feedback_tensor(feedback, device: torch.device, who: str) -> Tensor:
    """B of `feedback`: the stored tensor (P, d, E), or the spec's generated matrices, checked for
    size first: one (1, d, E) if it is shared (every point's), else all P (P, d, E)."""
    if not isinstance(feedback, FeedbackSpec):
        return feedback
    validation.check_seeded_generation(feedback, device, who=who)
    spec = dataclasses.replace(feedback, points=1) if feedback.shared else feedback
    return materialize_feedback(spec, device=device)


def _project(e: Tensor, b: Tensor, acc: torch.dtype, points: int) -> Tensor:
    """(N, E), (P, d, E) or (1, d, E) -> (points, N, d) in `acc`: out[p] = e B_pᵀ. One matrix
    (shared feedback) is one product, expanded, so that every point gets the same signal bit for
    bit, as the kernels give."""
    if b.shape[0] == 1:
        return (e.to(acc) @ b[0].to(acc).T).expand(points, -1, -1)
    return torch.einsum("ne,pde->pnd", e.to(acc), b.to(acc))


def _points(feedback) -> int:
    return feedback.points if isinstance(feedback, FeedbackSpec) else feedback.shape[0]


def dfa_feedback(error: Tensor, feedback) -> Tensor:
    """Every DFA signal at once: out[p] = error · B_pᵀ, i.e. out[p, n, i] = Σ_j e[n, j]·B[p, i, j].

    Args:
        error: e (N, E), floating point.
        feedback: a `FeedbackSpec` with error_dim = E (its matrices are regenerated),
            or a stored tensor B (P, d, E) on error's device, any floating dtype.
    Returns:
        (P, N, d) in error's dtype, accumulated in float32 (float64 for float64 errors).

    Sizes are checked before any work (ValueError if the signals, or the matrices a seeded
    spec needs, could never be allocated); a shared spec generates its one matrix only.

    Example:
        >>> spec = FeedbackSpec(12, 768, 768)
        >>> dfa_feedback(torch.randn(10, 768), spec).shape
        torch.Size([12, 10, 768])
    """
    acc = torch.promote_types(error.dtype, torch.float32)    # half types accumulate in float32
    validation.check_feedback_size(feedback, error.shape[0], acc, error.device)
    b = _feedback_tensor(feedback, error.device, "dfa_feedback")
    return _project(error, b, acc, _points(feedback)).to(error.dtype).contiguous()


def dfa_head(h: Tensor, w_dec: Tensor, targets: Tensor, feedback, *, ignore_index: int = -100,
             chunk_size: int | None = None, error: str = "hidden"):
    """The output head with DFA signals: loss, the head's true gradients and every g_p.

    With Nv the number of rows whose target is not ignore_index:

        y = h w_decᵀ (N, V);   loss = −(1/Nv) Σ_{n kept} log softmax(y_n)[t_n]
        dy = (softmax(y) − onehot(t)) / Nv, rows with t_n = ignore_index set to 0
        grad_h = dy w_dec (N, d);   grad_w_dec = dyᵀ h (V, d)
        e = grad_h (error="hidden", E = d) or dy (error="logits", E = V)
        signals[p] = e B_pᵀ (P, N, d_p)

    loss, grad_h and grad_w_dec equal autograd through F.cross_entropy(y, t,
    ignore_index=...). If Nv = 0 (every row ignored, or N = 0) the loss, the gradients
    and the signals are 0, where F.cross_entropy would return nan.

    Args:
        h: (N, d) final hidden states. w_dec: (V, d) unembedding, on h's device.
        targets: (N,) int64, each in [0, V) or equal to ignore_index.
        feedback: `FeedbackSpec` or stored tensor (P, d_p, E), as for `dfa_feedback`.
        chunk_size: rows processed at a time (None: about 2²³/V rows, as the native
            kernels, so the logits of a chunk take about 32 MiB in float32; all rows when N·V
            is below that); the results do not depend on it beyond rounding.
        error: "hidden" or "logits", which error the feedback projects.
    Returns:
        (loss, grad_h, grad_w_dec, signals): loss a 0-d tensor in the accumulation
        dtype (float32, or float64 if h or w_dec is float64); grad_h and signals in
        h's dtype, grad_w_dec in w_dec's dtype. Everything accumulates in that dtype.

    Sizes (the signals, a chunk's logits, the matrices a seeded spec needs: one if shared)
    are checked before any work, as in `dfa_feedback`.

    Example:
        >>> h, w = torch.randn(8, 16), torch.randn(50, 16)
        >>> loss, gh, gw, s = dfa_head(h, w, torch.randint(0, 50, (8,)), FeedbackSpec(4, 16, 16))
        >>> s.shape
        torch.Size([4, 8, 16])
    """
    (N, d), V = h.shape, w_dec.shape[0]
    acc = torch.promote_types(torch.promote_types(h.dtype, w_dec.dtype), torch.float32)
    step = max(1, min(N, CHUNK_ENTRIES // max(V, 1))) if chunk_size is None else max(1, min(N, chunk_size))
    validation.check_allocation(f"dfa_head: the logits of one chunk (chunk_size={step} rows, V={V})", (step, V), acc,
                                h.device, hint="; pass a smaller chunk_size")
    validation.check_feedback_size(feedback, N, acc, h.device, who="dfa_head")
    b = _feedback_tensor(feedback, h.device, "dfa_head")
    w = w_dec.to(acc)
    valid = targets != ignore_index
    n_valid = max(int(valid.sum()), 1)                    # Nv = 0: every dy row is 0 anyway
    loss = torch.zeros((), dtype=acc, device=h.device)
    grad_h = torch.zeros(N, d, dtype=acc, device=h.device)
    grad_w = torch.zeros(V, d, dtype=acc, device=h.device)
    signals = torch.zeros(_points(feedback), N, b.shape[1], dtype=acc, device=h.device)
    for r0 in range(0, N, step):
        rows = slice(r0, min(r0 + step, N))
        h_c, mask = h[rows].to(acc), valid[rows]
        t_c = torch.where(mask, targets[rows], 0)         # ignored rows: any class, masked below
        logp = torch.log_softmax(h_c @ w.T, dim=-1)       # [n, V]
        loss = loss - (logp.gather(1, t_c[:, None])[:, 0] * mask).sum()
        dy = logp.exp()
        dy[torch.arange(dy.shape[0], device=h.device), t_c] -= 1.0
        dy = dy * mask[:, None] / n_valid                 # [n, V]
        grad_h[rows] = dy @ w
        grad_w += dy.T @ h_c
        signals[:, rows] = _project(grad_h[rows] if error == "hidden" else dy, b, acc, _points(feedback))
    return loss / n_valid, grad_h.to(h.dtype), grad_w.to(w_dec.dtype), signals.to(h.dtype)
