"""Attention modules and the KOA transformer block.

`FavorAttention` is a drop-in for `torch.nn.MultiheadAttention` that computes
FAVOR+ attention (`okadfa.favor_attention`); `SoftmaxAttention` is the same
module with exact softmax attention (SDPA), for like-for-like comparisons.
`KOABlock` is a pre-LN transformer block (Kernelized Orthogonal Attention) with
either attention and a GELU MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import favor_attention
from .reference import random_features

__all__ = ["FavorAttention", "SoftmaxAttention", "KOABlock"]


class _ProjectedAttention(nn.Module):
    """Q/K/V/O projections around an attention kernel, with MultiheadAttention's
    constructor and call conventions. Subclasses implement `_attend`."""

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
                is_causal: bool = False):
        """Same call as MultiheadAttention; returns (output, None): no weights are formed.

        query: (L, N, E), or (N, L, E) with batch_first (unbatched (L, E) too); key/value
        likewise with the same length L. `is_causal=True` alone selects causal attention.
        """
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError(f"{type(self).__name__} supports no key_padding_mask or attn_mask; "
                             "use is_causal=True for causal attention")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (x.unsqueeze(1 if not self.batch_first else 0) for x in (query, key, value))
        if query.dim() != 3:
            raise ValueError(f"query must have 2 or 3 dimensions, got shape {tuple(query.shape)}")
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if key.shape[1] != query.shape[1] or value.shape[1] != key.shape[1]:
            raise ValueError(f"{type(self).__name__} needs query, key and value of the same length, got "
                             f"{query.shape[1]}, {key.shape[1]} and {value.shape[1]}")
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        out = self._attend(q, k, v, bool(is_causal)).transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
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

    def _attend(self, q, k, v, causal):
        if self.training and self.redraw_interval is not None:
            if int(self.steps) > 0 and int(self.steps) % self.redraw_interval == 0:
                self.redraw()
            self.steps += 1
        return favor_attention(q, k, v, self.projection, causal=causal, backend=self.backend)


class SoftmaxAttention(_ProjectedAttention):
    """Exact softmax attention (`scaled_dot_product_attention`) with the same
    projections and conventions as `FavorAttention`."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 orthogonal_init: bool = True):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype, orthogonal_init=orthogonal_init)

    def _attend(self, q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class KOABlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(x)), causal.

    attention: "favor" (FavorAttention) or "softmax" (SoftmaxAttention); the MLP
    is Linear(d, d_ff) → GELU → Linear(d_ff, d). The two residual steps are
    exposed separately (`attention_step`, `mlp_step`) so DFA can place a feedback
    point after each sub-layer.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None, *, attention: str = "favor",
                 nb_features: int = 256, redraw_interval: int | None = None, feature_seed: int = 0,
                 backend: str = "auto"):
        super().__init__()
        if attention not in ("favor", "softmax"):
            raise ValueError(f"attention must be 'favor' or 'softmax', got {attention!r}")
        self.ln1 = nn.LayerNorm(d_model)
        if attention == "favor":
            self.attn = FavorAttention(d_model, n_heads, batch_first=True, nb_features=nb_features,
                                       redraw_interval=redraw_interval, feature_seed=feature_seed, backend=backend)
        else:
            self.attn = SoftmaxAttention(d_model, n_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        d_ff = d_ff or 4 * d_model
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def attention_step(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        return x + self.attn(h, h, h, need_weights=False, is_causal=True)[0]

    def mlp_step(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.ln2(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp_step(self.attention_step(x))

    def ortho_weights(self) -> dict[str, Tensor]:
        """Attention and MLP weight matrices for the orthogonality penalty."""
        weights = dict(self.attn.projection_weights())
        weights["mlp_in"], weights["mlp_out"] = self.mlp[0].weight, self.mlp[2].weight
        return weights
