"""Attention modules and the KOA transformer block.

`FavorAttention` is a drop-in for `torch.nn.MultiheadAttention` that computes
FAVOR+ attention (`okadfa.favor_attention`); `SoftmaxAttention` is the same
module with exact softmax attention (SDPA), for like-for-like comparisons.
`KOABlock` is a pre-LN or post-LN transformer block (Kernelized Orthogonal Attention)
with either attention and a GELU MLP.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decoding import FavorState, KVCache
from .ops import favor_attention
from .reference import random_features

__all__ = ["FavorAttention", "SoftmaxAttention", "KOABlock", "replace_attention"]


def _check_causal_mask(mask: Tensor, is_causal: bool, who: str) -> bool:
    """True if `mask` is the causal mask (or is_causal says so: a hint, not read); else raise."""
    if is_causal:
        return True
    if mask.dim() == 2 and mask.shape[0] == mask.shape[1]:
        upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
        if mask.dtype == torch.bool and torch.equal(mask, upper):
            return True
        if mask.is_floating_point() and bool((mask[upper] == -math.inf).all() and (mask[~upper] == 0).all()):
            return True
    raise ValueError(f"{who} supports no attn_mask other than the causal one (FAVOR+ never forms the weights "
                     "a mask would act on); pass is_causal=True")


def _key_mask(key_padding_mask: Tensor, batch: int, S: int, who: str) -> Tensor:
    """MultiheadAttention's key_padding_mask (N, S) (bool: True = ignore; float: added, 0 keeps
    and −inf ignores) as okadfa's key_mask (True = a real key)."""
    m = key_padding_mask
    if not isinstance(m, Tensor) or m.dim() != 2 or tuple(m.shape) != (batch, S):
        raise ValueError(f"{who}: key_padding_mask must be a (N, S) = ({batch}, {S}) tensor, got "
                         f"{tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__}")
    if m.dtype == torch.bool:
        return ~m
    if m.is_floating_point() and bool(((m == 0) | (m == -math.inf)).all()):
        return m == 0
    raise ValueError(f"{who}: key_padding_mask must be bool (True = padding) or float with 0 and -inf only "
                     f"(FAVOR+ has no weights to add a bias to), got {m.dtype}")


class _ProjectedAttention(nn.Module):
    """Q/K/V/O projections around an attention kernel, with MultiheadAttention's
    constructor and call conventions. Subclasses implement `_attend`."""

    # Read by nn.TransformerEncoderLayer to decide on its fused fast path, which needs
    # MultiheadAttention's packed in-projection: there is none here, so it is never taken.
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 orthogonal_init: bool = True):
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if dropout != 0.0:
            raise ValueError(f"{type(self).__name__} has no attention dropout (got dropout={dropout}); "
                             "apply dropout to its output instead")
        if add_bias_kv or add_zero_attn:
            raise ValueError(f"{type(self).__name__} does not support add_bias_kv or add_zero_attn")
        kw = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        if orthogonal_init:
            for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
                nn.init.orthogonal_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def projection_weights(self) -> dict[str, Tensor]:
        """The Q/K/V/O weight matrices, e.g. for `okadfa.orthogonality_loss`."""
        return {name: getattr(self, f"{name}_proj").weight for name in ("q", "k", "v", "out")}

    def _heads(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        return x.view(n, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, cache=None):
        """Same call as MultiheadAttention; returns (output, None): no weights are formed.

        query: (L, N, E), or (N, L, E) with batch_first (unbatched (L, E) too); key/value
        likewise (key and value of one length S; S ≠ L only without causality, e.g. a
        decoder's cross-attention). `is_causal=True` alone selects causal attention;
        an attn_mask is accepted only if it is the (L, L) causal mask (bool, True above
        the diagonal, or float, −inf above it), as `nn.Transformer` layers pass it; with
        is_causal=True it is taken as a hint, as MultiheadAttention does, and not read.
        key_padding_mask: (N, S) as in MultiheadAttention, True (or −inf) at padding: padded
            keys are left out exactly, and when S = L the outputs at padded positions are 0
            (MultiheadAttention's are whatever the padded queries attend to).
        cache: a state from `new_cache()` for incremental decoding (causal): the L
        positions are appended to it and attend to every earlier one it holds (with
        key_padding_mask, to every earlier real one: the mask covers the L new positions).
        """
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (x.unsqueeze(1 if not self.batch_first else 0) for x in (query, key, value))
        if query.dim() != 3:
            raise ValueError(f"query must have 2 or 3 dimensions, got shape {tuple(query.shape)}")
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if value.shape[1] != key.shape[1]:
            raise ValueError(f"{type(self).__name__} needs key and value of the same length, got {key.shape[1]} "
                             f"and {value.shape[1]}")
        if attn_mask is not None and tuple(attn_mask.shape) != (query.shape[1], key.shape[1]):
            raise ValueError(f"attn_mask must have shape ({query.shape[1]}, {key.shape[1]}), got "
                             f"{tuple(attn_mask.shape)}")
        if attn_mask is not None:
            is_causal = _check_causal_mask(attn_mask, is_causal, type(self).__name__)
        key_mask = None
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0) if unbatched else key_padding_mask
            key_mask = _key_mask(key_padding_mask, key.shape[0], key.shape[1], type(self).__name__)
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        if cache is not None and not is_causal:
            raise ValueError("a decoding cache needs is_causal=True")
        if cache is None:
            out = self._attend(q, k, v, bool(is_causal), key_mask)
        else:
            out = cache.extend(q, k, v, key_mask=key_mask)
        out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
        return out, None


class FavorAttention(_ProjectedAttention):
    """FAVOR+ multi-head attention, a drop-in for `torch.nn.MultiheadAttention`.

    Extra keyword arguments: `nb_features` (M random features per head),
    `redraw_interval` (draw a new projection every that many training forward
    passes; None keeps it fixed), `feature_seed` (projection i is drawn from seed
    feature_seed·1000003 + i, so every replica and every resumed run draws the same
    one), `orthogonal_init` (orthogonal Q/K/V/O weights), `backend` (see
    `okadfa.backends()`). The projection and the step counter are buffers, so a
    checkpoint reproduces them exactly.

    Example:
        >>> attn = FavorAttention(256, 8, batch_first=True, nb_features=128)
        >>> x = torch.randn(2, 1024, 256)
        >>> out, _ = attn(x, x, x, is_causal=True)
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 nb_features: int = 256, redraw_interval: int | None = None, feature_seed: int = 0,
                 orthogonal_init: bool = True, backend: str = "auto"):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype, orthogonal_init=orthogonal_init)
        if redraw_interval is not None and (not isinstance(redraw_interval, int) or redraw_interval < 1):
            raise ValueError(f"redraw_interval must be a positive int or None, got {redraw_interval!r}")
        self.nb_features, self.redraw_interval, self.feature_seed = nb_features, redraw_interval, feature_seed
        self.backend = backend
        self.register_buffer("projection", self._draw(0, device, dtype))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=device))

    def _draw(self, index: int, device=None, dtype=None) -> Tensor:
        g = torch.Generator().manual_seed(self.feature_seed * 1000003 + index)
        return random_features(self.nb_features, self.head_dim, generator=g, device=device, dtype=dtype)

    def redraw(self) -> None:
        """Draw the next projection (index steps // redraw_interval)."""
        index = int(self.steps) // self.redraw_interval if self.redraw_interval else 0
        self.projection.copy_(self._draw(index, dtype=self.projection.dtype))

    def new_cache(self) -> FavorState:
        """An empty `FavorState` on the current projection, for `forward(..., cache=...)`."""
        return FavorState(self.projection)

    def _attend(self, q, k, v, causal, key_mask=None):
        if self.training and self.redraw_interval is not None:
            if int(self.steps) > 0 and int(self.steps) % self.redraw_interval == 0:
                self.redraw()
            self.steps += 1
        return favor_attention(q, k, v, self.projection, causal=causal, key_mask=key_mask, backend=self.backend)


class SoftmaxAttention(_ProjectedAttention):
    """Exact softmax attention (`scaled_dot_product_attention`) with the same
    projections and conventions as `FavorAttention`."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 orthogonal_init: bool = True):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype, orthogonal_init=orthogonal_init)

    def new_cache(self) -> KVCache:
        """An empty `KVCache`, for `forward(..., cache=...)`."""
        return KVCache()

    def _attend(self, q, k, v, causal, key_mask=None):
        if key_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        L, S = q.shape[2], k.shape[2]
        allowed = key_mask[:, None, None, :]
        if causal:
            allowed = allowed & torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        # rows that attend nothing would be NaN: they attend everything and are zeroed below (as FavorAttention)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~allowed.any(-1, keepdim=True))
        return out.masked_fill(~key_mask[:, None, :, None], 0) if L == S else out


class KOABlock(nn.Module):
    """Transformer block, causal: FAVOR+ or softmax attention, then a GELU MLP.

    norm="pre" (GPT-2):  h = x + attn(ln1(x));  out = h + mlp(ln2(h))   (the model adds a final LayerNorm)
    norm="post" (the original Transformer, BERT):  h = ln1(x + attn(x));  out = ln2(h + mlp(h))

    attention: "favor" (FavorAttention) or "softmax" (SoftmaxAttention); the MLP is
    Linear(d, d_ff) → GELU → Linear(d_ff, d). `forward(x, tap=...)` lets DFA (okadfa.models)
    place feedback points inside the block: after the attention sub-layer ("attn") and at
    the MLP's hidden activation ("hidden"); what `tap` returns is used in their place.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None, *, attention: str = "favor",
                 nb_features: int = 256, redraw_interval: int | None = None, feature_seed: int = 0,
                 backend: str = "auto", norm: str = "pre"):
        super().__init__()
        if attention not in ("favor", "softmax"):
            raise ValueError(f"attention must be 'favor' or 'softmax', got {attention!r}")
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
        self.norm = norm
        self.ln1 = nn.LayerNorm(d_model)
        if attention == "favor":
            self.attn = FavorAttention(d_model, n_heads, batch_first=True, nb_features=nb_features,
                                       redraw_interval=redraw_interval, feature_seed=feature_seed, backend=backend)
        else:
            self.attn = SoftmaxAttention(d_model, n_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        d_ff = d_ff or 4 * d_model
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def attention_step(self, x: Tensor, cache=None, key_mask: Tensor | None = None) -> Tensor:
        """The attention sub-layer with its residual and norm: (B, T, d) -> (B, T, d).
        key_mask: None or bool (B, T), True = a real token (padded ones are attended by none)."""
        padding = None if key_mask is None else ~key_mask
        h = self.ln1(x) if self.norm == "pre" else x
        out = self.attn(h, h, h, key_padding_mask=padding, need_weights=False, is_causal=True, cache=cache)[0]
        return x + out if self.norm == "pre" else self.ln1(x + out)

    def mlp_hidden(self, x: Tensor) -> Tensor:
        """The MLP's hidden activation GELU(W_in ·): (B, T, d) -> (B, T, d_ff)."""
        return self.mlp[1](self.mlp[0](self.ln2(x) if self.norm == "pre" else x))

    def mlp_output(self, x: Tensor, hidden: Tensor) -> Tensor:
        """The MLP sub-layer's output from its input x and hidden activation."""
        if self.norm == "pre":
            return x + self.mlp[2](hidden)
        return self.ln2(x + self.mlp[2](hidden))

    def forward(self, x: Tensor, cache=None, tap=None, key_mask: Tensor | None = None) -> Tensor:
        """x (B, T, d); cache: the attention's decoding state (`attn.new_cache()`) or None;
        tap(kind, t) -> t: called with kind "attn" and "hidden" (None: identity);
        key_mask: None or bool (B, T), True = a real token."""
        x = self.attention_step(x, cache, key_mask)
        if tap is not None:
            x = tap("attn", x)
        hidden = self.mlp_hidden(x)
        if tap is not None:
            hidden = tap("hidden", hidden)
        return self.mlp_output(x, hidden)

    def ortho_weights(self) -> dict[str, Tensor]:
        """Attention and MLP weight matrices for the orthogonality penalty."""
        weights = dict(self.attn.projection_weights())
        weights["mlp_in"], weights["mlp_out"] = self.mlp[0].weight, self.mlp[2].weight
        return weights


def replace_attention(model: nn.Module, *, ignore_dropout: bool = False, **favor_kwargs) -> nn.Module:
    """Swap every `nn.MultiheadAttention` inside `model` for a `FavorAttention` with the
    same weights (the packed in-projection split into q/k/v), batch_first, device and
    dtype; returns `model`, changed in place. `favor_kwargs` go to FavorAttention
    (nb_features, redraw_interval, feature_seed, backend). FAVOR+ has no attention
    dropout: a module with dropout > 0 raises unless ignore_dropout=True (then it is
    dropped). add_bias_kv / add_zero_attn raise. The i-th module replaced draws its
    projection from feature_seed + i (feature_seed from favor_kwargs, default 0). The new
    modules have new parameters: build the optimizer after the swap.

    Example:
        >>> layer = nn.TransformerEncoderLayer(256, 8, batch_first=True, dropout=0.0)
        >>> okadfa.nn.replace_attention(layer, nb_features=128)
        >>> y = layer(x, src_mask=nn.Transformer.generate_square_subsequent_mask(T), is_causal=True)
    """
    if type(model) is nn.MultiheadAttention:
        raise ValueError("model is itself a MultiheadAttention: construct a FavorAttention instead")
    swaps = [(name, m) for name, m in model.named_modules() if type(m) is nn.MultiheadAttention]
    seed = favor_kwargs.pop("feature_seed", 0)
    for index, (name, mha) in enumerate(swaps):
        if mha.dropout and not ignore_dropout:
            raise ValueError(f"{name or 'model'} has attention dropout {mha.dropout}, which FAVOR+ cannot apply; "
                             "pass ignore_dropout=True to drop it")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f"{name or 'model'} uses add_bias_kv or add_zero_attn, which FavorAttention lacks")
        ref = mha.out_proj.weight
        new = FavorAttention(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, kdim=mha.kdim,
                             vdim=mha.vdim, batch_first=mha.batch_first, device=ref.device, dtype=ref.dtype,
                             orthogonal_init=False, feature_seed=seed + index, **favor_kwargs)
        E = mha.embed_dim
        with torch.no_grad():
            weights = (mha.in_proj_weight[:E], mha.in_proj_weight[E:2 * E], mha.in_proj_weight[2 * E:]) \
                if mha._qkv_same_embed_dim else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            for i, (lin, w) in enumerate(zip((new.q_proj, new.k_proj, new.v_proj), weights)):
                lin.weight.copy_(w)
                if lin.bias is not None:
                    lin.bias.copy_(mha.in_proj_bias[i * E:(i + 1) * E])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return model
