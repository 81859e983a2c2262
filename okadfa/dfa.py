"""The Direct Feedback Alignment engine (docs/design.md §4).

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

Under `torch.autocast` (see `DFA.loss`): with bfloat16 the head and the projections
compute in bfloat16, as autocast runs backprop's unembedding; with float16 they stay
in float32. Either way the signals are multiplied by the gradient of the loss in the
backward, so a `torch.amp.GradScaler`'s loss scale reaches them like any backprop
gradient, and its unscale_/inf check covers every parameter.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops.dfa_head import dfa_head
from .ops.dfa_feedback import dfa_feedback, seeded_feedback_matrix
from .feedback import FeedbackSpec, materialize_feedback
from .validation import autocast_inputs

__all__ = ["DFA"]


class _DFAHeadLoss(torch.autograd.Function):
    """loss = CE(h w_decᵀ, targets); backward: true gradients for h and w_dec and the
    projected error for each feedback point (the inputs after the fixed ones).

    `groups` is a tuple of (feedback, point indices): the first group's signals come
    from the fused head, every other group's from `dfa_feedback` on the head's error
    (error="hidden": e = grad_h), since one projection has one output width. With
    error="stream" every group projects e = ∂loss/∂x_L, computed from grad_h through
    the final norm (stream = (x_L, norm))."""

    @staticmethod
    def forward(ctx, h, w_dec, targets, groups, error, ignore_index, stream, *points):
        n, d = h.shape[0] * h.shape[1], h.shape[-1]
        fused = error != "stream"             # the first group's signals come from the fused head
        head_feedback = groups[0][0] if fused else FeedbackSpec(1, d, d)   # "stream": the head gives e only
        loss, grad_h, grad_w, signals = dfa_head(h.reshape(n, d), w_dec, targets.reshape(n), head_feedback,
                                                 ignore_index=ignore_index, error="hidden" if not fused else error)
        e = grad_h if fused else _stream_error(stream, grad_h)
        point_signals = [None] * len(points)
        if fused:
            for i, index in enumerate(groups[0][1]):
                point_signals[index] = signals[i]
        for feedback, indices in groups[1 if fused else 0:]:
            for i, s in zip(indices, dfa_feedback(e, feedback)):
                point_signals[i] = s
        ctx.save_for_backward(grad_h, grad_w, *point_signals)
        ctx.shapes = [p.shape for p in points]
        ctx.h_shape = h.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, *signals = ctx.saved_tensors
        point_grads = [(s * grad_loss).reshape(shape).to(s.dtype) for s, shape in zip(signals, ctx.shapes)]
        return (grad_h.reshape(ctx.h_shape) * grad_loss, grad_w * grad_loss, None, None, None, None, None,
                *point_grads)


def _stream_error(stream, grad_h: Tensor) -> Tensor:
    """e = ∂loss/∂x_L (N, d): grad_h taken back through the final norm, stream = (x_L, norm)."""
    x, norm = stream
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        (e,) = torch.autograd.grad(norm(x), x, grad_h.view_as(x))
    # autograd returns x's dtype (float32 under autocast); the projections compute in the head's dtype
    return e.reshape(grad_h.shape).to(grad_h.dtype)


def _head_operands(h: Tensor, w_dec: Tensor) -> tuple[Tensor, Tensor]:
    """h and w_dec in the dtype the fused head computes in under torch.autocast.

    bfloat16 autocast: both cast to bfloat16, as autocast casts the operands of backprop's
    unembedding Linear (the head is the model's largest matrix product). float16 autocast:
    left as they are (float32, the master weights and the trunk's normalised output),
    because the head's outputs are gradients formed in the forward, before a GradScaler's
    loss scale multiplies them in the backward: they are about 1/tokens in size (~1e-5 at
    2048 tokens), in float16's subnormal range, so unscaled float16 would round or flush
    them (bfloat16 has float32's exponent range). No autocast, or float64: unchanged."""
    cast = autocast_inputs(h, w_dec)
    return cast if cast[0].dtype == torch.bfloat16 else (h, w_dec)


class DFA(nn.Module):
    """Feedback matrices and the DFA loss for named feedback points.

    Args:
        points: names of the feedback points, in order (e.g. ["block0", ...]).
        dim: width of the points' activations: one int for all (d_model), or one per point
            (points="micro" adds the MLP hidden activations, of width d_ff).
        error_dim: E, the width of the error (d for error="hidden", V for "logits").
        error: "hidden" (e = ∂loss/∂h, before the unembedding), "logits" (e = ∂loss/∂y)
            or "stream" (e = ∂loss/∂x_L, before the final norm; `loss(..., stream=)`).
        seed, dist, shared, storage: as in `okadfa.FeedbackSpec`. storage="stored"
            keeps the matrices as buffers (in the state_dict); "seeded" regenerates
            them from the seed and stores nothing but the seed. dist="spd" (okadfa's
            own variant, stored only, E = dim): B_p = G_p G_pᵀ with G_p the spec's
            "normal" matrix, symmetric positive semi-definite with E[B_p] = I, so each
            signal has a positive inner product with e: a random feedback that keeps
            the direction of the residual path, along which a pre-LN block's true
            gradient contains e itself.

    Points of one width form a group with one `FeedbackSpec` (`specs[g]`, the points
    in order); group g (widths in order of first appearance) uses seed ⊕ g·2⁴⁸, so the
    groups' matrices are independent; `shared=True` shares one matrix within a group.
    The first group's signals come from the fused head; widths other than the first
    need a d-wide error ("hidden" or "stream").
    """

    def __init__(self, points: list[str], dim, error_dim: int, *, error: str = "hidden", seed: int = 0,
                 dist: str = "normal", shared: bool = False, storage: str = "seeded"):
        super().__init__()
        if error not in ("hidden", "logits", "stream"):
            raise ValueError(f"error must be 'hidden', 'logits' or 'stream', got {error!r}")
        if dist == "spd" and (storage != "stored" or error == "logits"):
            raise ValueError("dist='spd' needs storage='stored' and a d-wide error ('hidden' or 'stream')")
        if not points:
            raise ValueError("DFA needs at least one feedback point")
        self.points = list(points)
        dims = [dim] * len(self.points) if isinstance(dim, int) else list(dim)
        if len(dims) != len(self.points):
            raise ValueError(f"dim lists {len(dims)} widths for {len(self.points)} points")
        widths = list(dict.fromkeys(dims))
        if len(widths) > 1 and error == "logits":
            raise ValueError("feedback points of different widths (points='micro') need a d-wide error, not 'logits'")
        self.error = error
        self.groups = [[i for i, w in enumerate(dims) if w == width] for width in widths]
        if dist == "spd" and any(width != error_dim for width in widths):
            raise ValueError(f"dist='spd' needs every point as wide as the error ({error_dim}), got widths {widths}")
        self.dist = dist
        self.specs = [FeedbackSpec(len(members), width, error_dim, seed=seed ^ (g << 48),
                                   dist="normal" if dist == "spd" else dist, shared=shared, storage=storage)
                      for g, (width, members) in enumerate(zip(widths, self.groups))]
        self.spec = self.specs[0]
        self._feedback_names = []
        for g, spec in enumerate(self.specs):
            name = "feedback" if g == 0 else f"feedback_{g}"
            matrices = materialize_feedback(spec) if storage == "stored" else None
            if dist == "spd":                 # G Gᵀ: (P, dim, E) @ (P, E, dim) -> (P, dim, dim); E = dim
                matrices = matrices @ matrices.transpose(1, 2)
            self.register_buffer(name, matrices)
            self._feedback_names.append(name)

    def _feedback(self, g: int):
        stored = getattr(self, self._feedback_names[g])
        return self.specs[g] if stored is None else stored

    def feedback_matrix(self, p: int | str) -> Tensor:
        """B_p (dim_p × error_dim): point p receives e B_pᵀ. Seeded matrices are generated
        on demand (float32, on the CPU, as the cpu kernels generate them), for diagnostics."""
        index = self.points.index(p) if isinstance(p, str) else p
        g = next(g for g, members in enumerate(self.groups) if index in members)
        k, feedback = self.groups[g].index(index), self._feedback(g)
        return seeded_feedback_matrix(feedback, k) if isinstance(feedback, FeedbackSpec) else feedback[k]

    def loss(self, h: Tensor, w_dec: Tensor, targets: Tensor, point_outputs: list[Tensor], *,
             ignore_index: int = -100, stream: tuple | None = None) -> Tensor:
        """The mean cross-entropy of h w_decᵀ against targets, whose backward gives h
        and w_dec their true gradients and point_outputs[p] the signal e B_pᵀ.

        h: (B, T, d) final hidden states; w_dec: (V, d); targets: (B, T);
        point_outputs: the activations at the feedback points, each (B, T, dim_p).
        stream: (x_L, norm) with h = norm(x_L), needed for error="stream".

        Under bfloat16 autocast the head and the projections compute in bfloat16 (h and
        w_dec are cast, accumulation stays float32), under float16 autocast in float32
        (`_head_operands` says why); the loss is float32, and the gradients reach the
        float32 parameters and points in their own dtypes.
        """
        if self.error == "stream" and stream is None:
            raise ValueError("error='stream' needs stream=(x_L, final norm)")
        if len(point_outputs) != len(self.points):
            raise ValueError(f"expected {len(self.points)} feedback point outputs, got {len(point_outputs)}")
        groups = tuple((self._feedback(g), tuple(members)) for g, members in enumerate(self.groups))
        h, w_dec = _head_operands(h, w_dec)        # outside the Function: autograd casts the gradients back
        return _DFAHeadLoss.apply(h, w_dec, targets, groups, self.error, ignore_index, stream, *point_outputs)

    def extra_repr(self) -> str:
        s = self.spec
        widths = "/".join(str(spec.dim) for spec in self.specs)
        return (f"points={len(self.points)}, dim={widths}, error={self.error} (E={s.error_dim}), "
                f"dist={self.dist}, shared={s.shared}, storage={s.storage}, seed={s.seed}")
