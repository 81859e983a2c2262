"""Direct Feedback Alignment signals (DESIGN.md §4), reference implementation.

DFA (Nøkland, NeurIPS 2016; at transformer scale: Launay et al., NeurIPS 2020)
replaces the gradient that reaches feedback point p by a fixed random projection
of the output error: g_p = e B_pᵀ.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .feedback import FeedbackSpec, materialize_feedback

__all__ = ["dfa_feedback", "dfa_head"]


def _feedback_tensor(feedback, error_dim: int, device, name: str = "feedback") -> Tensor:
    if isinstance(feedback, FeedbackSpec):
        if feedback.error_dim != error_dim:
            raise ValueError(f"{name}.error_dim is {feedback.error_dim} but the error has {error_dim} columns")
        return materialize_feedback(feedback, device=device)
    if not isinstance(feedback, Tensor):
        raise TypeError(f"{name} must be a FeedbackSpec or a tensor (P, d, E), got {type(feedback).__name__}")
    if not feedback.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {feedback.dtype}")
    if feedback.dim() != 3 or feedback.shape[2] != error_dim:
        raise ValueError(f"{name} must have shape (P, d, {error_dim}), got {tuple(feedback.shape)}")
    if feedback.device != device:
        raise ValueError(f"{name} is on {feedback.device} but the error is on {device}")
    return feedback


def dfa_feedback(error: Tensor, feedback) -> Tensor:
    """Every feedback signal at once: out[p] = error · B_pᵀ.

    error: (N, E); feedback: a FeedbackSpec or a tensor (P, d, E). Returns
    (P, N, d) in error's dtype, accumulated in (at least) float32.
    """
    if not isinstance(error, Tensor):
        raise TypeError(f"error must be a torch.Tensor, got {type(error).__name__}")
    if not error.is_floating_point():
        raise TypeError(f"error must be a floating-point tensor, got {error.dtype}")
    if error.dim() != 2:
        raise ValueError(f"error must have shape (N, E), got {tuple(error.shape)}")
    b = _feedback_tensor(feedback, error.shape[1], error.device)
    acc = torch.promote_types(error.dtype, torch.float32)
    return torch.einsum("ne,pde->pnd", error.to(acc), b.to(acc)).to(error.dtype)


def dfa_head(h: Tensor, w_dec: Tensor, targets: Tensor, feedback, *, ignore_index: int = -100,
             chunk_size: int | None = None, error: str = "hidden"):
    """The output head with DFA signals: loss, head gradients and projected errors.

    h: (N, d) final hidden states; w_dec: (V, d); targets: (N,) int64 (ignore_index
    rows are skipped); feedback: FeedbackSpec or tensor (P, d_p, E).
    y = h w_decᵀ; loss = mean cross-entropy over the Nv non-ignored rows;
    dy = (softmax(y) − onehot)/Nv (0 on ignored rows); grad_h = dy w_dec;
    grad_w_dec = dyᵀ h; e = grad_h (error="hidden", E = d) or dy ("logits", E = V);
    signals = dfa_feedback(e, feedback) (P, N, d_p). With Nv = 0 the loss and all
    gradients are 0. chunk_size processes rows in chunks (same result).
    Returns (loss, grad_h, grad_w_dec, signals).
    """
    for name, x in (("h", h), ("w_dec", w_dec)):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
            raise TypeError(f"{name} must be a 2-D floating-point tensor")
    if w_dec.shape[1] != h.shape[1]:
        raise ValueError(f"w_dec must have shape (V, {h.shape[1]}), got {tuple(w_dec.shape)}")
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64:
        raise TypeError("targets must be an int64 tensor")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"targets must have shape ({h.shape[0]},), got {tuple(targets.shape)}")
    if error not in ("hidden", "logits"):
        raise ValueError(f"error must be 'hidden' or 'logits', got {error!r}")
    valid = targets != ignore_index
    if ((targets[valid] < 0) | (targets[valid] >= w_dec.shape[0])).any():
        raise ValueError(f"targets must be in [0, {w_dec.shape[0]}) or ignore_index={ignore_index}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n_valid = int(valid.sum())
    acc = torch.promote_types(h.dtype, torch.float32)        # half inputs accumulate in float32
    step = chunk_size or max(h.shape[0], 1)
    loss = h.new_zeros((), dtype=acc)
    grad_h = torch.zeros_like(h)
    grad_w = torch.zeros_like(w_dec)
    errors = []
    for r0 in range(0, h.shape[0], step):
        rows = slice(r0, r0 + step)
        logits = h[rows].to(acc) @ w_dec.to(acc).T
        mask = valid[rows]
        safe_t = torch.where(mask, targets[rows], 0)
        logp = torch.log_softmax(logits, dim=-1)
        loss = loss - (logp.gather(1, safe_t[:, None])[:, 0] * mask).sum()
        dy = logp.exp()
        dy[torch.arange(dy.shape[0]), safe_t] -= 1.0
        dy = dy * mask[:, None] / max(n_valid, 1)
        grad_h[rows] = (dy @ w_dec.to(acc)).to(h.dtype)
        grad_w += (dy.T @ h[rows].to(acc)).to(w_dec.dtype)
        errors.append(grad_h[rows] if error == "hidden" else dy.to(h.dtype))
    loss = loss / max(n_valid, 1)
    signals = dfa_feedback(torch.cat(errors) if errors else h.new_zeros(0, h.shape[1]), feedback)
    return loss, grad_h, grad_w, signals
