"""Direct Feedback Alignment signals and the DFA output head (DESIGN.md §4), reference path.

DFA (Nøkland, "Direct Feedback Alignment Provides Learning in Deep Neural Networks",
NeurIPS 2016; at transformer scale: Launay, Poli, Boniface and Krzakala, "Direct
Feedback Alignment Scales to Modern Deep Learning Tasks and Architectures", NeurIPS
2020) gives feedback point p the fixed random projection g_p = e B_pᵀ of the output
error e instead of its backpropagated gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_matrix
from .feedback import FeedbackSpec, materialize_feedback

__all__ = ["dfa_feedback", "dfa_head"]


def check_feedback(feedback, error_dim: int, device: torch.device, needs: str) -> None:
    """Validate `feedback` (a FeedbackSpec or a stored (P, d, E) tensor) against an error
    with `error_dim` columns on `device`; `needs` completes the mismatch message, e.g.
    "the error has 6 columns". Shared by every backend (okadfa.ops)."""
    if isinstance(feedback, FeedbackSpec):
        if feedback.error_dim != error_dim:
            raise ValueError(f"feedback.error_dim is {feedback.error_dim} but {needs}")
        return
    if not isinstance(feedback, Tensor):
        raise TypeError(f"feedback must be a FeedbackSpec or a tensor (P, d, E), got {type(feedback).__name__}")
    if not feedback.is_floating_point():
        raise TypeError(f"feedback must be a floating-point tensor, got {feedback.dtype}")
    if feedback.dim() != 3 or feedback.shape[2] != error_dim:
        raise ValueError(f"feedback must have shape (P, d, {error_dim}) since {needs}, got {tuple(feedback.shape)}")
    if feedback.device != device:
        raise ValueError(f"feedback is on {feedback.device} but the error is on {device}")


def _feedback_tensor(feedback, device: torch.device) -> Tensor:
    """B (P, d, E) of a checked `feedback`: the stored tensor, or the spec materialised."""
    return materialize_feedback(feedback, device=device) if isinstance(feedback, FeedbackSpec) else feedback


def _project(e: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """(N, E), (P, d, E) -> (P, N, d) in `acc`: out[p] = e B_pᵀ."""
    return torch.einsum("ne,pde->pnd", e.to(acc), b.to(acc))


def dfa_feedback(error: Tensor, feedback) -> Tensor:
    """Every DFA signal at once: out[p] = error · B_pᵀ, i.e. out[p, n, i] = Σ_j e[n, j]·B[p, i, j].

    Args:
        error: e (N, E), floating point.
        feedback: a `FeedbackSpec` with error_dim = E (its matrices are regenerated),
            or a stored tensor B (P, d, E) on error's device, any floating dtype.
    Returns:
        (P, N, d) in error's dtype, accumulated in float32 (float64 for float64 errors).

    Example:
        >>> spec = FeedbackSpec(12, 768, 768)
        >>> dfa_feedback(torch.randn(10, 768), spec).shape
        torch.Size([12, 10, 768])
    """
    check_matrix(error, "error", "(N, E)")
    check_feedback(feedback, error.shape[1], error.device, f"the error has {error.shape[1]} columns")
    b = _feedback_tensor(feedback, error.device)
    acc = torch.promote_types(error.dtype, torch.float32)    # half types accumulate in float32
    return _project(error, b, acc).to(error.dtype)


def check_target_range(targets: Tensor, V: int, ignore_index: int) -> None:
    """Every target in [0, V) or equal to ignore_index (reads the data)."""
    kept = targets[targets != ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= V):
        bad = kept[(kept < 0) | (kept >= V)][0].item()
        raise ValueError(f"targets must be in [0, {V}) or equal ignore_index={ignore_index}, found {bad}")


def check_head_inputs(h, w_dec, targets, feedback, ignore_index, chunk_size, error) -> int:
    """Validate dfa_head's arguments (shared by every backend); return E, the error width."""
    check_matrix(h, "h", "(N, d)")
    check_matrix(w_dec, "w_dec", "(V, d)")
    if w_dec.shape[1] != h.shape[1]:
        raise ValueError(f"w_dec must have shape (V, {h.shape[1]}) to match h (N, {h.shape[1]}), "
                         f"got {tuple(w_dec.shape)}")
    if w_dec.device != h.device:
        raise ValueError(f"w_dec is on {w_dec.device} but h is on {h.device}")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be an int64 tensor, got {targets.dtype}")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"targets must have shape ({h.shape[0]},) to match h, got {tuple(targets.shape)}")
    if targets.device != h.device:
        raise ValueError(f"targets is on {targets.device} but h is on {h.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if error not in ("hidden", "logits"):
        raise ValueError(f"error must be 'hidden' or 'logits', got {error!r}")
    V = w_dec.shape[0]
    if not torch.compiler.is_compiling():    # traced code has no data: okadfa.ops.dfa_head checks in the graph
        check_target_range(targets, V, ignore_index)
    E = h.shape[1] if error == "hidden" else V
    check_feedback(feedback, E, h.device, f"error={error!r} needs E = {'d' if error == 'hidden' else 'V'} = {E}")
    return E


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
        chunk_size: rows processed at a time (None: all at once); the results do not
            depend on it beyond rounding.
        error: "hidden" or "logits", which error the feedback projects.
    Returns:
        (loss, grad_h, grad_w_dec, signals): loss a 0-d tensor in the accumulation
        dtype (float32, or float64 if h or w_dec is float64); grad_h and signals in
        h's dtype, grad_w_dec in w_dec's dtype. Everything accumulates in that dtype.

    Example:
        >>> h, w = torch.randn(8, 16), torch.randn(50, 16)
        >>> loss, gh, gw, s = dfa_head(h, w, torch.randint(0, 50, (8,)), FeedbackSpec(4, 16, 16))
        >>> s.shape
        torch.Size([4, 8, 16])
    """
    check_head_inputs(h, w_dec, targets, feedback, ignore_index, chunk_size, error)
    (N, d), V = h.shape, w_dec.shape[0]
    b = _feedback_tensor(feedback, h.device)
    acc = torch.promote_types(torch.promote_types(h.dtype, w_dec.dtype), torch.float32)
    w = w_dec.to(acc)
    valid = targets != ignore_index
    n_valid = max(int(valid.sum()), 1)                    # Nv = 0: every dy row is 0 anyway
    loss = torch.zeros((), dtype=acc, device=h.device)
    grad_h = torch.zeros(N, d, dtype=acc, device=h.device)
    grad_w = torch.zeros(V, d, dtype=acc, device=h.device)
    signals = torch.zeros(b.shape[0], N, b.shape[1], dtype=acc, device=h.device)
    step = chunk_size or max(N, 1)
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
        signals[:, rows] = _project(grad_h[rows] if error == "hidden" else dy, b, acc)
    return loss / n_valid, grad_h.to(h.dtype), grad_w.to(w_dec.dtype), signals.to(h.dtype)
