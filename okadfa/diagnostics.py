"""Diagnostics for DFA and FAVOR+ training, returned as plain dicts ready to log.

* `gradient_alignment`: per block, the cosine and relative error between the DFA
  update and the true backprop gradient on the same batch (Launay et al. 2020
  track the same alignment; positive cosine means DFA descends).
* `attention_similarity`: per layer, how close FAVOR+ attention is to exact
  softmax attention on the same projected q, k, v.
* `orthogonality_violation`: per weight matrix, ‖WᵀW − I‖_F (smaller Gram side).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .nn import FavorAttention
from .ortho import ortho_weights, orthogonality_loss

__all__ = ["gradient_alignment", "mean_alignment", "attention_similarity", "orthogonality_violation"]


def _block_grads(model, input_ids, targets, training: str) -> dict[str, Tensor]:
    """Per-block flattened parameter gradients of one backward, with DFA or backprop."""
    engine = model.dfa
    grads = {}
    try:
        if training == "bp":
            model.dfa = None          # the model backpropagates when it has no DFA engine
        model.zero_grad(set_to_none=True)
        model(input_ids, targets).ce_loss.backward()
        for i, block in enumerate(model.blocks):
            parts = [p.grad.flatten() for p in block.parameters() if p.grad is not None]
            grads[f"block{i}"] = torch.cat(parts) if parts else None
    finally:
        model.dfa = engine
        model.zero_grad(set_to_none=True)
    return grads


def gradient_alignment(model, input_ids: Tensor, targets: Tensor) -> dict[str, dict[str, float]]:
    """{"block<i>": {"cosine": cos(g_dfa, g_bp), "rel_error": ‖g_dfa − g_bp‖/‖g_bp‖}} per block,
    and "blocks" for all block parameters together (a positive cosine there means
    the DFA update descends the loss to first order).

    Runs one DFA and one backprop backward on the same batch (model in training
    mode, the step counter and FAVOR+ redraws restored afterwards); leaves .grad
    cleared. Needs a model built with training="dfa".
    """
    if model.dfa is None:
        raise ValueError("gradient_alignment needs a model with training='dfa'")
    state = {k: v.clone() for k, v in model.named_buffers() if k.endswith("steps") or k == "step"}
    projections = {k: v.clone() for k, v in model.named_buffers() if k.endswith("projection")}
    rng = torch.get_rng_state()
    was_training = model.training
    model.train()
    try:
        dfa = _block_grads(model, input_ids, targets, "dfa")
        for k, v in {**state, **projections}.items():
            model.get_buffer(k).copy_(v)
        torch.set_rng_state(rng)
        bp = _block_grads(model, input_ids, targets, "bp")
    finally:
        for k, v in {**state, **projections}.items():
            model.get_buffer(k).copy_(v)
        torch.set_rng_state(rng)
        model.train(was_training)
    dfa["blocks"], bp["blocks"] = torch.cat(list(dfa.values())), torch.cat(list(bp.values()))
    report = {}
    for name in dfa:
        a, b = dfa[name], bp[name]
        report[name] = {"cosine": F.cosine_similarity(a, b, dim=0).item(),
                        "rel_error": ((a - b).norm() / b.norm().clamp_min(1e-30)).item()}
    return report


def mean_alignment(model, batches) -> dict[str, float]:
    """The `gradient_alignment` cosine per block and for "blocks", averaged over
    `batches` of (input_ids, targets): one batch is noisy, a few fixed ones are not."""
    reports = [gradient_alignment(model, x, y) for x, y in batches]
    return {k: sum(r[k]["cosine"] for r in reports) / len(reports) for k in reports[0]}


@torch.no_grad()
def attention_similarity(model, input_ids: Tensor) -> dict[str, dict[str, float]]:
    """Per FAVOR+ layer: cosine and relative error of its attention output against
    exact causal softmax attention on the same projected q, k, v."""
    report = {}
    captured = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            query = args[0] if args else kwargs["query"]
            q = module._heads(module.q_proj(query))
            k = module._heads(module.k_proj(query))
            v = module._heads(module.v_proj(query))
            captured[name] = (module._attend(q, k, v, True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True)
               for n, m in model.named_modules() if isinstance(m, FavorAttention)]
    was_training = model.training
    model.eval()
    try:
        model(input_ids)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for name, (favor, exact) in captured.items():
        report[name] = {"cosine": F.cosine_similarity(favor.flatten(), exact.flatten(), dim=0).item(),
                        "rel_error": ((favor - exact).norm() / exact.norm().clamp_min(1e-30)).item()}
    return report


@torch.no_grad()
def orthogonality_violation(model) -> dict[str, float]:
    """{"<block>.<matrix>": ‖WᵀW − I‖_F} for every regularised weight."""
    return {name: orthogonality_loss(w.float()).sqrt().item() for name, w in ortho_weights(model).items()}
