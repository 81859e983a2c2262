"""favor_sdpa: FAVOR+ behind the signature of scaled_dot_product_attention (DESIGN.md §3).

A one-line swap for `torch.nn.functional.scaled_dot_product_attention` in code that
already has q, k and v: same positional arguments, same shape rules (any number of
leading batch dims, grouped-query attention with `enable_gqa=True`), output in the
same layout and dtype. It is an approximation of softmax attention, not a
reimplementation: the error shrinks like 1/√num_features (measured in
tests/test_favor_sdpa.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference, validation
from .favor_attention import favor_attention

_PROJECTIONS: dict[tuple, Tensor] = {}


# torch.compile runs it at trace time and keeps the tensor as a constant of the graph
@torch.compiler.assume_constant_result
def cached_projection(head_dim: int, num_features: int, seed: int, device, dtype: torch.dtype) -> Tensor:
    """The projection favor_sdpa uses when none is given: `random_features(num_features,
    head_dim)` drawn from `seed`, made once per (head_dim, num_features, seed, device,
    dtype) and reused (it does not require grad). Its size is checked before it is drawn
    (ValueError naming num_features and E if it could never be allocated); drawing it costs
    O(num_features·E·min(num_features, E)), not a full E×E QR."""
    key = (head_dim, num_features, seed, torch.device(device), dtype)
    w = _PROJECTIONS.get(key)
    if w is None:
        validation.check_projection_size(num_features, head_dim, dtype, device, who="favor_sdpa: the default projection",
                                         names=("num_features", "E"))
        g = torch.Generator().manual_seed(seed)
        w = _PROJECTIONS[key] = reference.random_features(num_features, head_dim, generator=g, device=device,
                                                          dtype=dtype)
    return w


def _check_arguments(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, num_features, seed):
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 3:
            raise ValueError(f"{name} must have at least 3 dimensions (N, ..., L, E), got shape {tuple(x.shape)}")
    if not query.dim() == key.dim() == value.dim():
        raise ValueError(f"query, key and value must have the same number of dimensions, got {query.dim()}, "
                         f"{key.dim()} and {value.dim()}")
    if attn_mask is not None:
        raise ValueError("favor_sdpa supports no attn_mask: FAVOR+ never forms the L×S weights a mask would "
                         "act on. Use is_causal=True for causal attention (a padding mask has no equivalent)")
    if dropout_p != 0.0:
        raise ValueError(f"favor_sdpa has no attention dropout (got dropout_p={dropout_p}): the weights are "
                         "never formed; apply dropout to the output instead")
    validation.check_causal(is_causal)
    if is_causal and query.shape[-2] != key.shape[-2]:
        raise ValueError(f"is_causal=True needs query and key of the same length, got L={query.shape[-2]} and "
                         f"S={key.shape[-2]}; for token-by-token decoding use okadfa.FavorState")
    if query.shape[-2] < 1 or key.shape[-2] < 1:
        raise ValueError(f"favor_sdpa needs at least one query and one key, got L={query.shape[-2]} and "
                         f"S={key.shape[-2]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same length (dim -2), got {key.shape[-2]} and "
                         f"{value.shape[-2]}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same embedding size (dim -1), got {query.shape[-1]} and "
                         f"{key.shape[-1]}")
    if query.dim() > 3:
        hq, hkv = query.shape[-3], key.shape[-3]
        if hq != hkv and 1 not in (hq, hkv) and not enable_gqa:
            raise ValueError(f"query has {hq} heads and key {hkv}: set enable_gqa=True for grouped-query "
                             "attention, as with scaled_dot_product_attention")
        if hq != hkv and 1 not in (hq, hkv) and hq % hkv:
            raise ValueError(f"grouped-query attention needs query's heads ({hq}) to be a multiple of key's "
                             f"({hkv})")
    validation.check_feature_settings(num_features, seed)


def _to_4d(x: Tensor, batch: torch.Size) -> Tensor:
    """(N, ..., H, L, E) → (B, H, L, E): 3-d inputs get one head, extra leading dims
    are broadcast to `batch` and flattened."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4:
        return x
    return x.expand(*batch, *x.shape[-3:]).flatten(0, -4)


@validation.errors_as_in_eager()
def favor_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
               num_features: int = 256, projection: Tensor | None = None, seed: int = 0,
               backend: str = "auto") -> Tensor:
    """FAVOR+ attention as a drop-in for `F.scaled_dot_product_attention`.

    softmax(scale·Q Kᵀ) V is approximated by φ(Q̂) (φ(K̂)ᵀ V), normalised, with the
    positive random features of `okadfa.favor_attention` (M = num_features): time and
    memory linear in L instead of quadratic. The estimate of each weight is unbiased,
    the normalised output is not exactly; its relative error falls as M grows.

    Shapes, as in SDPA: query (N, ..., Hq, L, E), key (N, ..., H, S, E), value
    (N, ..., H, S, Ev) → (N, ..., Hq, L, Ev); 3-d inputs (N, L, E) too. Leading dims
    broadcast; H = 1 broadcasts over Hq; H < Hq needs enable_gqa=True and Hq % H = 0
    (key head j serves query heads j·Hq/H … (j+1)·Hq/H − 1).

    Args:
        attn_mask: must be None (ValueError otherwise: the L×S weights a mask acts on are
            never formed). Causal masking is `is_causal=True`.
        dropout_p: must be 0.0 (ValueError otherwise).
        is_causal: query t sees keys s ≤ t; needs L = S (decode token by token with
            `okadfa.FavorState`).
        scale: default E^-1/2.
        num_features: M, used when projection is None.
        projection: (M, E) from `okadfa.random_features`; None uses a cached projection
            drawn from `seed`, one per (E, M, seed, device, dtype). torch.compile takes it as
            a constant; with dynamic=True (symbolic E) pass a projection instead.
        backend: as in `okadfa.favor_attention` (which also runs non-causal L ≠ S).
    Returns:
        Tensor (N, ..., Hq, L, Ev) in query's dtype; under `torch.autocast` float32
        inputs are first cast to the autocast dtype, as SDPA does, and the result has it.

    Example:
        >>> # out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> out = okadfa.favor_sdpa(q, k, v, is_causal=True)
    """
    _check_arguments(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, num_features, seed)
    query, key, value = validation.autocast_inputs(query, key, value)   # the cached projection's dtype
    validation.check_same({"query": query, "key": key, "value": value})
    if projection is None:
        projection = cached_projection(query.shape[-1], num_features, seed, query.device, query.dtype)
    lead = query.shape[:-3] if query.dim() > 3 else query.shape[:-2]
    try:
        batch = torch.broadcast_shapes(lead, key.shape[:len(lead)], value.shape[:len(lead)])
    except RuntimeError:
        raise ValueError(f"the batch dims of query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)} do not broadcast") from None
    q, k, v = (_to_4d(x, batch) for x in (query, key, value))
    out = favor_attention(q, k, v, projection, causal=is_causal, scale=scale, backend=backend)
    if query.dim() == 3:
        return out.squeeze(1)
    return out.reshape(*batch, *out.shape[-3:])
