"""Incremental decoding: attention state carried from one generated token to the next.

`FavorState` is causal FAVOR+ attention as a recurrence (docs/design.md §3): after
positions 1..t it holds, per batch row and head,

    S_t = Σ_{s≤t} exp(l_s − c_t) v_sᵀ   (M×Dv),   z_t = Σ_{s≤t} exp(l_s − c_t)   (M),

with l_s = w·k̂_s − ‖k̂_s‖²/2 the key's log-features and c_t = max_{s≤t} max_m l_s,m the
running stabiliser, and the output at t is φ(q̂_t)ᵀS_t / φ(q̂_t)ᵀz_t: the causal op's
output at t, at O(M·Dv) cost per token whatever t is (Katharopoulos et al. 2020,
"Transformers are RNNs"). `KVCache` is the softmax counterpart (keys and values kept,
O(t) per token), so `OKADFAModel.generate` has one code path for both attentions.
"""
from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import Tensor

from . import validation
from .reference.attention import KEY_FLOOR, _normalise, causal_chunk, key_log_features, query_features

__all__ = ["FavorState", "KVCache"]

CHUNK = 64      # positions per step of `extend` (the reference path's chunked form)


def _check_step_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    validation.check_tensor(q, "q", 4, "(B, H, n, Dk)")
    validation.check_tensor(k, "k", 4, "(B, H, n, Dk)")
    validation.check_tensor(v, "v", 4, "(B, H, n, Dv)")
    validation.check_same({"q": q, "k": k, "v": v})
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have the head dim of q ({q.shape[3]}), got shape {tuple(k.shape)}")


class _Cache(abc.ABC):
    """What both caches share: `step` is `extend` with one position."""

    @abc.abstractmethod
    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None) -> Tensor:
        """Append n positions: q, k (B, H, n, Dk), v (B, H, n, Dv) → outputs (B, H, n, Dv);
        key_mask None or bool (B, n), True = a real position."""

    def step(self, q_t: Tensor, k_t: Tensor, v_t: Tensor) -> Tensor:
        """Append one position: q_t, k_t (B, H, Dk), v_t (B, H, Dv) → output (B, H, Dv)."""
        for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
            validation.check_tensor(x, name, 3, "(B, H, D)")
        return self.extend(q_t[:, :, None], k_t[:, :, None], v_t[:, :, None])[:, :, 0]


class FavorState(_Cache):
    """The running (S, z, c) of causal FAVOR+ attention, for generation token by token.

    `step(q_t, k_t, v_t)` appends position t and returns its attention output, equal
    (to rounding) to `okadfa.favor_attention(q, k, v, projection, causal=True)[..., t, :]`
    on the whole sequence; `extend(q, k, v)` does the same for n positions at once (a
    prompt). Batch and head dims broadcast and k, v may have fewer heads than q
    (grouped-query attention) as in `favor_attention`; the shape they broadcast to is
    fixed by the first call. Half-precision inputs are computed and kept in float32.

    Args:
        projection: (M, Dk), the same one the causal op uses.
        scale: logit scale, default Dk^-1/2.

    Example:
        >>> state = okadfa.FavorState(w)
        >>> out = state.extend(q_prompt, k_prompt, v_prompt)     # (B, H, T0, Dv)
        >>> out_t = state.step(q_t, k_t, v_t)                    # (B, H, Dv), O(1) in t
    """

    def __init__(self, projection: Tensor, *, scale: float | None = None):
        validation.check_tensor(projection, "projection", 2, "(M, Dk)")
        self.projection = projection.detach()
        self.scale = validation.check_scale(scale, projection.shape[1], projection.dtype)
        self.reset()

    def reset(self) -> None:
        """Forget every position (the state of an empty prefix)."""
        self.carried: tuple[Tensor, Tensor, Tensor] | None = None    # (S, z, c) as in causal_chunk
        self.length = 0
        self._batch: torch.Size | None = None

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None) -> Tensor:
        """Append n positions: q, k (B, H, n, Dk), v (B, H, n, Dv) → outputs (B, H, n, Dv).

        key_mask: None or bool (B, n), True = a real position, as in `okadfa.favor_attention`:
        a masked position leaves the state unchanged (its key and value never enter it) and
        its output is 0, e.g. the left padding of a batch of prompts."""
        _check_step_inputs(q, k, v)
        if q.shape[3] != self.projection.shape[1]:
            raise ValueError(f"q has head dim {q.shape[3]} but the projection is {tuple(self.projection.shape)}")
        if self.projection.device != q.device:
            raise ValueError(f"the projection is on {self.projection.device} but q is on {q.device}")
        batch = validation.attention_batch_shape(q, k, v, "q", "k")
        if self._batch is not None and batch != self._batch:
            raise ValueError(f"this state holds batch and heads {tuple(self._batch)}, got inputs for {tuple(batch)}")
        out_dtype, dtype = v.dtype, validation.native_dtype(v.dtype)
        mask = validation.key_mask(key_mask, batch, q.shape[2], q.device)      # (B, H, n) or None
        q, k, v = (validation.prepare(x, batch, dtype) for x in (q, k, v))
        w = self.projection.to(dtype)
        fq, lk = query_features(q, w, self.scale), key_log_features(k, w, self.scale)
        if mask is not None:
            lk = lk.masked_fill(~mask[..., None], -torch.inf)
            v = v.masked_fill(~mask[..., None], 0)
        c = lk.amax(-1)
        if self.carried is not None:
            c = torch.maximum(c, self.carried[2][..., None])
        c = torch.cummax(c, dim=-1).values.clamp_min(KEY_FLOOR)
        fk = torch.exp(lk - c[..., None])
        self.length += q.shape[2]
        self._batch = batch
        if q.shape[2] == 1 and self.carried is not None:
            out = self._recur(fq, fk, v, c)
        else:
            outs = []
            for t0 in range(0, q.shape[2], CHUNK):
                sl = slice(t0, t0 + CHUNK)
                out, self.carried = causal_chunk(fq[..., sl, :], fk[..., sl, :], v[..., sl, :], c[..., sl],
                                                 self.carried)
                outs.append(out)
            out = torch.cat(outs, dim=-2)
        if mask is not None:
            out = out.masked_fill(~mask[..., None], 0)
        return out.to(out_dtype)

    def _recur(self, fq: Tensor, fk: Tensor, v: Tensor, c: Tensor) -> Tensor:
        """One position as the plain recurrence (fewer operations than a chunk of one):
        S ← S·exp(c_old − c) + φ(k̂)ᵀv, z ← z·exp(c_old − c) + φ(k̂), out = φ(q̂)ᵀS / φ(q̂)ᵀz."""
        state, zsum, ref = self.carried
        decay = torch.exp(ref - c[..., 0])[..., None]
        zsum = torch.addcmul(fk[..., 0, :], zsum, decay)
        state = torch.baddbmm((state * decay[..., None]).flatten(0, 1), fk.flatten(0, 1).transpose(1, 2),
                              v.flatten(0, 1)).view_as(state)
        self.carried = (state, zsum, c[..., 0])
        return _normalise(fq @ state, (fq @ zsum[..., None])[..., 0], True)


class KVCache(_Cache):
    """Keys and values of the positions so far, for softmax attention token by token:
    `extend(q, k, v)` returns SDPA of the new queries over all cached keys, query i of
    the n new ones seeing the keys up to its own position."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.key_mask: Tensor | None = None     # (B, 1, total) bool once a key_mask was given
        self.length = 0

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None) -> Tensor:
        """As `FavorState.extend`: key_mask None or bool (B, n), True = a real position; masked
        keys are never attended to and the outputs at masked positions are 0."""
        _check_step_inputs(q, k, v)
        n = q.shape[2]
        mask = validation.key_mask(key_mask, q.shape[:2], n, q.device)
        real = self.key_mask      # (B, 1, total) once any position was masked
        if mask is not None or real is not None:
            new = torch.ones(q.shape[0], 1, n, dtype=torch.bool, device=q.device) if mask is None else mask[:, :1]
            if real is None and self.keys is not None:
                real = torch.ones(q.shape[0], 1, self.keys.shape[2], dtype=torch.bool, device=q.device)
            real = new if real is None else torch.cat([real, new], dim=2)
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        self.keys, self.values, self.key_mask = k, v, real
        total = k.shape[2]
        self.length = total
        if n == 1 and real is None:
            return F.scaled_dot_product_attention(q, k, v)
        allowed = torch.arange(total - n, total, device=q.device)[:, None] >= torch.arange(total, device=q.device)
        if real is not None:
            allowed = allowed & real[:, :, None, :]             # (B, 1, n, total)
            # a query that sees no real key would get NaN: it sees every key, and is zeroed below
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return out if mask is None else out.masked_fill(~mask[..., None], 0)
