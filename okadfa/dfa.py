"""The Direct Feedback Alignment engine (DESIGN.md §4).

With DFA, feedback point p (a block's output, or each sub-layer's) receives
g_p = e B_pᵀ, a fixed random projection of the output error e, in place of the
gradient backpropagation would deliver; inside a segment between feedback points
gradients flow by ordinary autograd, and nothing flows from a segment's input to
the previous one (Nøkland 2016; Launay et al. 2020 for transformers). The head
(final norm, unembedding) gets its true gradient.

Everything runs through an ordinary `loss.backward()`: `dfa_loss` returns a loss
whose backward delivers the head gradients and every g_p at once, computed by the
fused `okadfa.dfa_head` (the N×V logits never exist whole; seeded feedback is
generated inside the kernel, so no feedback matrix is materialised).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops.dfa_head import dfa_head
from .ops.dfa_feedback import seeded_feedback_matrix
from .reference.feedback import FeedbackSpec, materialize_feedback

__all__ = ["DFA"]


class _DFAHeadLoss(torch.autograd.Function):
    """loss = CE(h w_decᵀ, targets); backward: true gradients for h and w_dec and
    the projected error for each feedback point (inputs after the fixed ones)."""

    @staticmethod
    def forward(ctx, h, w_dec, targets, feedback, error, ignore_index, *points):
        n, d = h.shape[0] * h.shape[1], h.shape[-1]
        loss, grad_h, grad_w, signals = dfa_head(h.reshape(n, d), w_dec, targets.reshape(n), feedback,
                                                 ignore_index=ignore_index, error=error)
        ctx.save_for_backward(grad_h, grad_w, signals)
        ctx.shapes = [p.shape for p in points]
        ctx.h_shape = h.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, signals = ctx.saved_tensors
        point_grads = [(signals[i] * grad_loss).reshape(shape).to(signals.dtype) for i, shape in enumerate(ctx.shapes)]
        return (grad_h.reshape(ctx.h_shape) * grad_loss, grad_w * grad_loss, None, None, None, None, *point_grads)


class DFA(nn.Module):
    """Feedback matrices and the DFA loss for `points` feedback points.

    Args:
        points: names of the feedback points, in order (e.g. ["block0", ...]).
        dim: width of each point's activations (d_model).
        error_dim: E, the width of the error (d for error="hidden", V for "logits").
        error: "hidden" (e = ∂loss/∂h, before the unembedding) or "logits" (e = ∂loss/∂y).
        seed, dist, shared, storage: as in `okadfa.FeedbackSpec`. storage="stored"
            keeps the matrices as a buffer (in the state_dict); "seeded" regenerates
            them from the seed and stores nothing but the seed.
    """

    def __init__(self, points: list[str], dim: int, error_dim: int, *, error: str = "hidden", seed: int = 0,
                 dist: str = "normal", shared: bool = False, storage: str = "seeded"):
        super().__init__()
        if error not in ("hidden", "logits"):
            raise ValueError(f"error must be 'hidden' or 'logits', got {error!r}")
        if not points:
            raise ValueError("DFA needs at least one feedback point")
        self.points = list(points)
        self.error = error
        self.spec = FeedbackSpec(len(self.points), dim, error_dim, seed=seed, dist=dist, shared=shared,
                                 storage=storage)
        if storage == "stored":
            self.register_buffer("feedback", materialize_feedback(self.spec))
        else:
            self.feedback = None

    def feedback_matrix(self, p: int | str) -> Tensor:
        """B_p (dim × error_dim): point p receives e B_pᵀ. Seeded matrices are generated
        on demand (float32, on the CPU, as the cpu kernels generate them), for diagnostics."""
        index = self.points.index(p) if isinstance(p, str) else p
        return seeded_feedback_matrix(self.spec, index) if self.feedback is None else self.feedback[index]

    def loss(self, h: Tensor, w_dec: Tensor, targets: Tensor, point_outputs: list[Tensor], *,
             ignore_index: int = -100) -> Tensor:
        """The mean cross-entropy of h w_decᵀ against targets, whose backward gives h
        and w_dec their true gradients and point_outputs[p] the signal e B_pᵀ.

        h: (B, T, d) final hidden states; w_dec: (V, d); targets: (B, T);
        point_outputs: the activations at the feedback points, each (B, T, dim).
        """
        if len(point_outputs) != len(self.points):
            raise ValueError(f"expected {len(self.points)} feedback point outputs, got {len(point_outputs)}")
        feedback = self.spec if self.feedback is None else self.feedback
        return _DFAHeadLoss.apply(h, w_dec, targets, feedback, self.error, ignore_index, *point_outputs)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"points={len(self.points)}, dim={s.dim}, error={self.error} (E={s.error_dim}), dist={s.dist}, "
                f"shared={s.shared}, storage={s.storage}, seed={s.seed}")
