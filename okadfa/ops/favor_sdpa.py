"""favor_sdpa: FAVOR+ behind the signature of scaled_dot_product_attention (docs/design.md §3).

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
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
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


def key_padding(attn_mask: Tensor, batch: int, L: int, S: int, is_causal: bool,
                aligned: bool = False) -> tuple[Tensor, bool]:
    """(key_mask (batch, S) bool, causal) such that attn_mask is key padding combined with full
    attention, or with the causal pattern, on every row of a real query; ValueError for any other
    mask (FAVOR+ never forms the L×S weights an arbitrary mask acts on).

    A boolean attn_mask attends where True; a float one is additive: 0 attends, −inf or anything
    at or below half the dtype's lowest value (what Hugging Face writes) masks, other values are
    refused. It broadcasts to (batch, heads, L, S) as in SDPA and must be the same for every head.
    Queries and keys are one sequence when L = S, or with `aligned` (query i at key position
    S − L + i, as in a KV cache; the causal pattern is then aligned to the last key); otherwise
    the queries are their own sequence (cross-attention, full only). Rows of padded queries are
    not checked (they output 0): Hugging Face fills them either way, some versions with
    everything. is_causal=True with a mask (SDPA refuses the pair) asks for the causal pattern."""
    m = attn_mask
    if m.dtype != torch.bool:
        if not m.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating point, got {m.dtype}")
        low = m <= torch.finfo(m.dtype).min / 2
        if bool(((m != 0) & ~low).any()):
            raise ValueError("favor_sdpa takes additive masks of 0 and -inf (or the dtype's lowest value) only: "
                             "FAVOR+ has no L×S weights to add a bias to")
        m = ~low
    if m.dim() < 2 or m.shape[-2] not in (1, L) or m.shape[-1] != S:
        raise ValueError(f"attn_mask must broadcast to (..., L, S) = (..., {L}, {S}), got shape {tuple(m.shape)}")
    m = m.reshape(-1, *m.shape[-3:]) if m.dim() > 3 else m.reshape(-1, 1, *m.shape[-2:])
    if m.shape[0] not in (1, batch):
        raise ValueError(f"attn_mask's batch dims ({m.shape[0]} entries) do not broadcast to the inputs' {batch}")
    if m.shape[1] > 1 and not bool((m == m[:, :1]).all()):
        raise ValueError("favor_sdpa needs one attn_mask for every head (a key padding mask)")
    m = m[:, 0].expand(batch, L, S)                       # (batch, L, S)
    everything = m.all(-1)                                # (batch, L): rows that attend every key
    one_sequence = aligned or L == S
    if one_sequence and L <= S:
        # Key s is real where its own query attends to it (keys before the first query: where any
        # query does); rows HF unmasked (a padded query that would attend nothing attends
        # everything) fool that, so the keys attended by the other rows are the second candidate.
        # Each batch row takes the first candidate that fits.
        own = m[..., S - L:].diagonal(dim1=-2, dim2=-1)
        candidates = (torch.cat([m[..., :S - L].any(-2), own], -1), (m & ~everything[..., None]).any(-2))
    else:
        candidates = (m.any(-2),)
    tril = torch.ones(L, S, dtype=torch.bool, device=m.device).tril(S - L)
    # A wrong candidate can fit too (the keys attended only by a row that attends everything
    # look like padding): of the decompositions that fit, each row takes the one with the most
    # real keys, and the pattern with the most real keys in all wins (ties: the first).
    best = None
    for causal in ((True,) if is_causal else (False, True) if one_sequence else (False,)):
        chosen, count = None, torch.full((batch,), -1, device=m.device)
        for key_mask in candidates:
            real_rows = key_mask[:, S - L:] if one_sequence else torch.ones(batch, L, dtype=torch.bool,
                                                                            device=m.device)
            pattern = key_mask[:, None, :] & tril if causal else key_mask[:, None, :].expand(batch, L, S)
            same = (m == pattern).all(-1)                 # (batch, L): the row is the pattern's
            # a padded query's row may be the pattern's, nothing, or everything
            ok = torch.where(real_rows, same, same | ~m.any(-1) | everything).all(-1)    # (batch,)
            better = ok & (key_mask.sum(-1) > count)
            chosen = key_mask if chosen is None else torch.where(better[:, None], key_mask, chosen)
            count = torch.where(better, key_mask.sum(-1), count)
        if bool((count >= 0).all()) and (best is None or int(count.sum()) > best[2]):
            best = (chosen, causal, int(count.sum()))
    if best is not None:
        return best[0], best[1]
    raise ValueError("favor_sdpa takes an attn_mask that is key padding, alone or with the causal pattern: FAVOR+ "
                     "never forms the L×S weights an arbitrary mask would act on")


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
               key_mask: Tensor | None = None, backend: str = "auto") -> Tensor:
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
        attn_mask: None, or a key padding mask as SDPA takes it (bool, True = attend, or
            additive float, 0 / −inf), alone or combined with the causal pattern (L = S), e.g.
            the 4-d masks Hugging Face builds for padded batches; the same for every head.
            ValueError for any other mask: the L×S weights an arbitrary mask acts on are never
            formed (`key_padding` says exactly what is accepted). Output rows of padded
            queries are 0. Causal masking alone is `is_causal=True`.
        dropout_p: must be 0.0 (ValueError otherwise).
        is_causal: query t sees keys s ≤ t; needs L = S (decode token by token with
            `okadfa.FavorState`). With an attn_mask (which SDPA refuses) it asks for the causal
            pattern combined with that padding.
        scale: default E^-1/2.
        num_features: M, used when projection is None.
        projection: (M, E) from `okadfa.random_features`; None uses a cached projection
            drawn from `seed`, one per (E, M, seed, device, dtype). torch.compile takes it as
            a constant; with dynamic=True (symbolic E) pass a projection instead.
        key_mask: (N, S) bool, True = a real key: key padding without an attn_mask (as
            `okadfa.favor_attention` takes it; N the flattened batch dims). Not with attn_mask.
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
    if attn_mask is not None and key_mask is not None:
        raise ValueError("favor_sdpa takes attn_mask or key_mask, not both")
    if attn_mask is not None:
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {q.device}")
        key_mask, is_causal = key_padding(attn_mask, q.shape[0], q.shape[2], k.shape[2], is_causal)
    out = favor_attention(q, k, v, projection, causal=is_causal, scale=scale, key_mask=key_mask, backend=backend)
    if query.dim() == 3:
        return out.squeeze(1)
    return out.reshape(*batch, *out.shape[-3:])
