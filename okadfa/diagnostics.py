"""Diagnostics for DFA and FAVOR+ training, returned as plain dicts ready to log.

* `gradient_alignment`: per block, the cosine and relative error between the DFA
  update and the true backprop gradient on the same batch (Launay et al. 2020
  track the same alignment; positive cosine means DFA descends), for all the
  block's parameters and separately for three groups: the weights that write the
  residual stream (attention output projection, MLP output), every weight matrix,
  and the LayerNorm and bias parameters. The groups matter: LayerNorm gains and
  biases can align (cosine ±1) while the matrices learn nothing, and the
  all-parameter cosine then looks healthy (it did, at +0.45, while DFA trained
  nothing; `tests/test_models.py` checks the split catches it).
* `activation_norms`: per feedback point and per block output, the mean per-token
  L2 norm of the activation: DFA on an un-normalised point shows as a norm that
  grows without limit.
* `attention_similarity`: per layer, how close FAVOR+ attention is to exact
  softmax attention on the same projected q, k, v.
* `orthogonality_violation`: per weight matrix, ‖WᵀW − I‖_F (smaller Gram side).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import feedback_points
from .nn import FavorAttention
from .ortho import ortho_weights, orthogonality_loss

__all__ = ["gradient_alignment", "mean_alignment", "activation_norms", "attention_similarity",
           "orthogonality_violation", "ALIGNMENT_GROUPS"]

# Parameter groups of a block that gradient_alignment reports separately.
ALIGNMENT_GROUPS = ("all", "writers", "weights", "norm_bias")


def _groups(block) -> dict[str, list]:
    """A KOA block's parameters by ALIGNMENT_GROUPS (a parameter may be in several)."""
    writers = {id(block.attn.out_proj.weight), id(block.mlp[2].weight)}
    params = list(block.parameters())
    return {"all": params, "writers": [p for p in params if id(p) in writers],
            "weights": [p for p in params if p.dim() >= 2], "norm_bias": [p for p in params if p.dim() < 2]}


def _block_grads(model, input_ids, targets, training: str) -> dict[str, dict[str, Tensor]]:
    """{block name: {group: flattened gradient}} of one backward, with DFA or backprop."""
    engine = model.dfa
    grads = {}
    try:
        if training == "bp":
            model.dfa = None          # the model backpropagates when it has no DFA engine
        model.zero_grad(set_to_none=True)
        model(input_ids, targets).ce_loss.backward()
        for i, block in enumerate(model.blocks):
            grads[f"block{i}"] = {
                group: torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
                                  for p in params])
                for group, params in _groups(block).items()}
    finally:
        model.dfa = engine
        model.zero_grad(set_to_none=True)
    grads["blocks"] = {g: torch.cat([grads[f"block{i}"][g] for i in range(len(model.blocks))])
                       for g in ALIGNMENT_GROUPS}
    return grads


def _cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a, b, dim=0).item()


def gradient_alignment(model, input_ids: Tensor, targets: Tensor) -> dict[str, dict[str, float]]:
    """Per block ("block<i>") and for all blocks together ("blocks"):
    {"cosine": cos(g_dfa, g_bp) over all the block's parameters, "rel_error": ‖g_dfa − g_bp‖/‖g_bp‖,
     "writers": the cosine over the weights that write the residual stream (attn.out_proj, mlp output),
     "weights": over every weight matrix, "norm_bias": over LayerNorm and bias parameters}.
    A positive cosine means the DFA update descends the loss to first order; only the
    "writers" and "weights" cosines say the trunk's matrices learn.

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
    report = {}
    for name in dfa:
        a, b = dfa[name]["all"], bp[name]["all"]
        report[name] = {"cosine": _cosine(a, b), "rel_error": ((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
                        **{g: _cosine(dfa[name][g], bp[name][g]) for g in ALIGNMENT_GROUPS[1:]}}
    return report


def mean_alignment(model, batches) -> dict[str, dict[str, float]]:
    """{group: {block name: mean cosine}} for each of ALIGNMENT_GROUPS ("all" is the
    `gradient_alignment` "cosine"), per block and for "blocks", averaged over `batches`
    of (input_ids, targets): one batch is noisy, a few fixed ones are not."""
    reports = [gradient_alignment(model, x, y) for x, y in batches]
    key = {"all": "cosine"}
    return {g: {name: sum(r[name][key.get(g, g)] for r in reports) / len(reports) for name in reports[0]}
            for g in ALIGNMENT_GROUPS}


@torch.no_grad()
def activation_norms(model, input_ids: Tensor) -> dict[str, dict[str, float]]:
    """Mean per-token L2 norms on a batch (B, T): {"points": {feedback point: ‖activation‖},
    "stream": {"block<i>": ‖output of block i‖}}. The points are those of the model's
    config (`okadfa.models.feedback_points`), as DFA delivers signals to them (after the
    parameter-free LayerNorm with point_norm); a backprop model reports the points it
    would have. Post-LN points sit near √d_model; a pre-LN stream under DFA grows
    without limit. Runs in eval mode (no redraw, no step counted)."""
    was_training = model.training
    model.eval()
    try:
        x = model.embed(input_ids)
        stream = {}
        _, points = model.trunk_points(x)
        for i, block in enumerate(model.blocks):
            x = block(x)
            stream[f"block{i}"] = x.float().norm(dim=-1).mean().item()
    finally:
        model.train(was_training)
    names, _ = feedback_points(model.config)
    return {"points": {n: p.float().norm(dim=-1).mean().item() for n, p in zip(names, points)}, "stream": stream}


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
