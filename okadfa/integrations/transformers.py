"""FAVOR+ as a Hugging Face transformers attention implementation (extra `hf`).

Importing okadfa registers "okadfa_favor" with the default settings as soon as transformers'
model code is imported (okadfa/integrations/_autoregister.py); `register()` adds it, or other
settings, to transformers' attention registry
(`AttentionInterface`, plus a mask function in `AttentionMaskInterface`), so a causal LM
built with `attn_implementation="okadfa_favor"` computes every self-attention with
`okadfa.favor_sdpa` instead of softmax attention:

    from okadfa.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="okadfa_favor")

Semantics. A layer gets query (B, Hq, L, E) and key/value (B, H, S, E) (H < Hq for
grouped-query attention, passed on with enable_gqa=True, never repeated here). Query i
sits at position S − L + i and attends to keys 0 … S − L + i (causal, aligned to the
last key, as with HF's KV cache):

    L = S          favor_sdpa(q, k, v, is_causal=True)          (training, prefill)
    L = 1          favor_sdpa(q, k, v) over all S keys           (a decoding step)
    1 < L < S      causal favor_sdpa over S positions with the queries left-padded by
                   zeros, last L outputs kept (FAVOR+'s causal output t depends on q_t
                   and keys ≤ t only, so the padding changes nothing)

Each layer's `scaling` is favor_sdpa's `scale`. The random projection is favor_sdpa's
cached one (num_features × head_dim, drawn from `seed`), shared by all layers.

Padding. Key padding is exact (`okadfa.favor_attention`'s key_mask): a 2-D attention_mask
with zeros (right padding for training, left padding for batched generation) becomes HF's 4-D
mask, which is decomposed into a key mask and the causal (or full) pattern; padded keys leave
every sum, and outputs at padded positions are 0. Each sequence of a padded batch gets the
outputs it gets alone (tested: padded-batch logits, batched left-padded greedy generation).

What FAVOR+ cannot do, and what this backend then does:
    * masks other than key padding with the causal or full pattern: FAVOR+ never forms the
      L×S weights a mask acts on. Packed sequences, sliding windows that bite and custom
      masks raise ValueError.
    * attention dropout: ValueError when the module is training with dropout > 0 (set
      e.g. GPT-2's attn_pdrop / Llama's attention_dropout to 0). In eval mode it is 0.
    * attention weights: never formed, returned as None. output_attentions=True raises
      ValueError where the model passes the flag down to the attention (Llama); models
      that collect weights by hooks (GPT-2 in transformers 5) return none, as with "sdpa".

Cost of generation: `FavorCache` keeps one `okadfa.FavorState` per layer, so each generated
token costs O(1) in the context length; generate() uses it by default for okadfa_favor models
(greedy and sampled decoding). With HF's own cache (every past key and value) each token costs
O(S), the features of all S cached keys being recomputed.

Tested with transformers 5.24, 4.53.3 and 4.48.3 (torch 2.13). The mask registry exists
since 4.53; before it, models hand over a 4-D mask, which is checked here (causal and
padding-free is accepted, anything else raises).
"""
from __future__ import annotations

import functools
import threading
import weakref

import torch
from torch import Tensor

try:
    import transformers as _transformers
except ImportError as exc:    # pragma: no cover - exercised only without the extra
    raise ImportError("okadfa.integrations.transformers needs Hugging Face transformers>=4.48: "
                      "pip install 'okadfa[hf]'") from exc

from ..decoding import FavorState
from ..validation import check_feature_settings
from ..ops.favor_sdpa import cached_projection, favor_sdpa, key_padding

__all__ = ["DEFAULT_NAME", "FavorCache", "check", "favor_attention_forward", "favor_attention_mask", "register"]

DEFAULT_NAME = "okadfa_favor"
_MIN_VERSION = (4, 48)


def _version(text: str) -> tuple[int, int]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (2 - len(parts)))


if _version(_transformers.__version__) < _MIN_VERSION:    # pragma: no cover
    raise ImportError(f"okadfa.integrations.transformers needs transformers>=4.48, found "
                      f"{_transformers.__version__}: pip install -U 'okadfa[hf]'")

try:    # transformers >= 4.53: masks are made through a registry of mask functions
    from transformers import masking_utils as _masking
except ImportError:    # pragma: no cover
    _masking = None

_SETTINGS: dict[str, dict] = {}    # registered name -> favor_sdpa keywords



# ----------------------------------------------------------------------------- masks

def favor_attention_mask(batch_size: int, q_length: int | None = None, kv_length: int | None = None, q_offset=0,
                         kv_offset=0, mask_function=None, attention_mask: Tensor | None = None, cache_position=None,
                         **kwargs) -> Tensor | None:
    """Mask function registered in `AttentionMaskInterface` next to the attention.

    Returns None (no mask: the attention applies causality itself) for the plain causal
    pattern without padding whose queries end at the last key, `q_offset + q_length ==
    kv_offset + kv_length` — every training step, prefill and decoding step with a dynamic
    cache. Anything else (padding, static cache, sliding window, packed sequences, custom
    overlays) is materialised as SDPA would and decomposed by the attention, which accepts key
    padding with the causal or full pattern (`okadfa.ops.favor_sdpa.key_padding`). (transformers
    < 5 passes `cache_position` instead of q_length/q_offset; both are understood.)
    """
    if mask_function is None:
        mask_function = _masking.causal_mask_function
    padded = attention_mask is not None and attention_mask.dim() == 2 and not _fast_all(attention_mask)
    if mask_function is _masking.causal_mask_function and kwargs.get("local_size") is None and not padded:
        try:
            if cache_position is not None:
                q_length, q_offset = cache_position.shape[0], int(cache_position[0])
            if int(q_offset) + q_length == int(kv_offset) + kv_length:
                return None
        except Exception:    # symbolic sizes while tracing: fall through to a real mask
            pass
    call = dict(kwargs, batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
                attention_mask=attention_mask, allow_is_causal_skip=False)
    call.pop("allow_is_bidirectional_skip", None)
    if cache_position is not None:
        call["cache_position"] = cache_position
    else:
        call.update(q_length=q_length, q_offset=q_offset)
    return _masking.sdpa_mask(**call)


def _fast_all(mask: Tensor) -> bool:
    mask = mask if mask.dtype == torch.bool else mask != 0
    return bool(mask.sum() == mask.numel())


_LAST_MASK: list = [None, None]    # [weakref to the last 4-D mask decomposed, its (keys, causal, key_mask, version)]


def _mask_pattern(mask: Tensor, q_length: int, causal: bool) -> tuple[int, bool | None, Tensor | None]:
    """(keys, causal, key_mask) of a 4-D mask (B|1, H|1, L|1, S): attend to the first `keys` keys,
    causally (query i at key position keys − L + i) or not, leaving out those key_mask (B, keys)
    marks False (None: none). The pattern is key padding with the causal or full pattern
    (`favor_sdpa.key_padding`, queries aligned to the last key); keys after the last one any
    query sees (a static cache's unfilled tail) are cut off. A mask broadcast over the queries
    (a padding mask) gives causal None (the module decides). ValueError for anything else. The
    result is memoised for the last mask seen: all layers of a forward share one mask.
    """
    version = _tensor_version(mask)
    ref, result = _LAST_MASK
    if version is not None and ref is not None and ref() is mask and result[3] == version:
        return result[:3]
    if mask.dim() != 4 or mask.shape[-2] not in (1, q_length):
        raise ValueError(f"okadfa_favor expects a 4-D attention mask (batch, heads, {q_length}, keys), got shape "
                         f"{tuple(mask.shape)}")
    if mask.dtype.is_floating_point:    # additive: 0 attends, the dtype's minimum (or -inf) masks
        if not bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            raise ValueError("okadfa_favor cannot add an attention bias: a float attention mask must hold only 0 "
                             "(attend) and large negative values (masked)")
        allowed = mask == 0
    else:
        allowed = mask if mask.dtype == torch.bool else mask != 0
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        raise ValueError("okadfa_favor needs one attention mask for every head (key padding)")
    seen = allowed.flatten(0, -2).any(0).nonzero()
    keys = int(seen.max()) + 1 if seen.numel() else allowed.shape[-1]
    allowed = allowed[:, :1, :, :keys]
    mask_causal = None
    if allowed.shape[-2] != q_length:    # a padding mask broadcast over the queries
        key_mask = allowed[:, 0, 0]
    else:
        try:
            key_mask, mask_causal = key_padding(allowed, allowed.shape[0], q_length, keys, causal, aligned=True)
        except ValueError:
            raise ValueError("okadfa_favor supports only key padding with causal (or full) attention: the attention "
                             "mask is another pattern (packed sequences, a sliding window that bites or a custom "
                             "mask). FAVOR+ never forms the attention weights a mask would act on") from None
    result = (keys, mask_causal, None if _fast_all(key_mask) else key_mask)
    if version is not None:
        _LAST_MASK[:] = [weakref.ref(mask), (*result, version)]
    return result


def _tensor_version(x: Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:    # inference tensors keep no version counter: no memo then
        return None


# ----------------------------------------------------------------------------- O(1) decoding cache

try:    # transformers >= 4.56: caches made of per-layer objects
    from transformers.cache_utils import Cache as _HFCache, CacheLayerMixin as _HFLayer
except ImportError:    # pragma: no cover
    _HFCache = _HFLayer = None

_UPDATED = threading.local()    # .entry: (the key tensor a FavorLayer's update returned, that layer)


if _HFLayer is not None:
    class FavorLayer(_HFLayer):
        """One layer of a `FavorCache`: the layer's `okadfa.FavorState` (M×Dv per head, whatever
        the context length) and the number of positions folded into it. `update` keeps nothing:
        it hands the new keys and values back, and the attention that receives them folds them
        into the state."""

        is_compileable = False
        is_croppable = False
        is_sliding = False

        def __init__(self, **kwargs):
            super().__init__()
            self.state: FavorState | None = None
            self.length = 0

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            self.device = key_states.device
            self.is_initialized = True

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            _UPDATED.entry = (key_states, self)
            return key_states, value_states

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            self.state, self.length = None, 0

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if self.state is not None and self.state.carried is not None:
                self.state.carried = tuple(x.index_select(0, beam_idx.to(x.device)) for x in self.state.carried)

    class FavorCache(_HFCache):
        """A transformers `Cache` for models with attn_implementation="okadfa_favor": one
        `FavorState` per layer instead of every past key and value, so each generated token
        costs O(1) in the context length and the cache's memory does not grow with it.

            out = model.generate(ids, past_key_values=FavorCache(), max_new_tokens=100)

        `register()` makes generate() use it by default for greedy and sampled decoding of
        okadfa_favor models (pass `past_key_values=DynamicCache()` for HF's own cache). Not
        croppable (assisted decoding, which rolls the cache back, keeps HF's cache), not for
        static-cache compilation."""

        def __init__(self, **kwargs):
            super().__init__(layer_class_to_replicate=FavorLayer)
else:    # pragma: no cover
    class FavorCache:
        def __init__(self, *args, **kwargs):
            raise ImportError("FavorCache needs transformers >= 4.56 (per-layer cache objects)")


# generate() modes that decode forward only (assisted decoding rolls the cache back: FavorCache cannot)
_FORWARD_MODES = ("greedy_search", "sample")


def _generate_with_favor_cache() -> None:
    """Make generate() of a model whose attention is a registered okadfa name (and that would get a
    plain DynamicCache: no user cache, no cache_implementation) decode with a FavorCache. transformers
    has no hook for choosing the default cache, so this wraps GenerationMixin's cache preparation
    (once; a no-op where transformers has no per-layer caches)."""
    if _HFLayer is None:
        return
    from transformers.cache_utils import DynamicCache
    from transformers.generation import utils as generation
    original = getattr(generation.GenerationMixin, "_prepare_cache_for_generation", None)
    if original is None or getattr(original, "_okadfa", False):
        return

    @functools.wraps(original)
    def prepare(self, generation_config, model_kwargs, *args, **kwargs):
        result = original(self, generation_config, model_kwargs, *args, **kwargs)
        mode = next((a for a in args if type(a).__name__ == "GenerationMode"), kwargs.get("generation_mode"))
        for key in ("cache", "past_key_values"):
            cache = model_kwargs.get(key)
            if (type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False)
                    and getattr(self.config, "_attn_implementation", None) in _SETTINGS
                    and getattr(mode, "value", None) in _FORWARD_MODES):
                model_kwargs[key] = FavorCache()
        return result

    prepare._okadfa = True
    generation.GenerationMixin._prepare_cache_for_generation = prepare


def _state_attention(layer, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling, options: dict):
    """The L new positions of `layer` through its FavorState: queries causal over everything folded
    in before and the new keys, padded keys (the attention mask's new columns) left out."""
    q_length = query.shape[2]
    if layer.state is None:
        projection = cached_projection(query.shape[-1], options["num_features"], options["seed"], query.device,
                                       torch.float32)
        layer.state = FavorState(projection, scale=scaling)
    new_mask = None
    if attention_mask is not None:
        keys, _, key_mask = _mask_pattern(attention_mask, q_length, True)
        if keys != layer.length + q_length:
            raise ValueError(f"okadfa_favor: the attention mask covers {keys} keys, the FavorCache holds "
                             f"{layer.length} + {q_length}")
        if key_mask is not None:
            new_mask = key_mask.expand(query.shape[0], keys)[:, layer.length:]
    out = layer.state.extend(query, key, value, key_mask=new_mask)
    layer.length += q_length
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------- attention

def _causal_favor(query: Tensor, key: Tensor, value: Tensor, scale, gqa: bool, options: dict) -> Tensor:
    """Causal FAVOR+ with query i at position S − L + i (lower-right alignment); options may hold
    a key_mask (B, S)."""
    q_length, kv_length = query.shape[2], key.shape[2]
    if q_length == kv_length:
        return favor_sdpa(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa, **options)
    if q_length == 1:    # a decoding step sees every cached key
        return favor_sdpa(query, key, value, scale=scale, enable_gqa=gqa, **options)
    if q_length > kv_length:
        raise ValueError(f"okadfa_favor: {q_length} queries but only {kv_length} keys; causal attention aligned to "
                         "the last key needs at least as many keys as queries")
    padded = torch.cat([query.new_zeros(*query.shape[:2], kv_length - q_length, query.shape[3]), query], dim=2)
    return favor_sdpa(padded, key, value, is_causal=True, scale=scale, enable_gqa=gqa, **options)[:, :, -q_length:]


def favor_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, *, favor_options: dict | None = None,
                            **kwargs) -> tuple[Tensor, None]:
    """HF attention function: `sdpa_attention_forward`'s convention, FAVOR+ inside.

    query (B, Hq, L, E), key/value (B, H, S, E/Ev) → ((B, L, Hq, Ev) contiguous, None).
    Causal unless `is_causal` (or else `module.is_causal`) is False; see the module
    docstring for the L < S alignment, masks and dropout.
    """
    options = dict(favor_options or {})
    updated = getattr(_UPDATED, "entry", None)
    from_cache = updated is not None and updated[0] is key     # the keys a FavorLayer's update returned
    _UPDATED.entry = None
    if dropout and dropout > 0 and getattr(module, "training", False):
        raise ValueError(f"okadfa_favor has no attention dropout (the module is training with dropout={dropout}): "
                         "FAVOR+ never forms the attention weights. Set the model's attention dropout to 0 (GPT-2: "
                         "attn_pdrop=0.0; Llama and most others: attention_dropout=0.0) or use dropout elsewhere")
    if kwargs.get("output_attentions"):
        raise ValueError("okadfa_favor cannot return attention weights (output_attentions=True): FAVOR+ never forms "
                         "them. Use attn_implementation='eager' to inspect attention weights")
    for unsupported in ("softcap", "position_bias", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"okadfa_favor does not support `{unsupported}` (FAVOR+ cannot modify the attention "
                             "logits)")
    if kwargs.get("cache") is not None:
        raise ValueError("okadfa_favor does not support continuous batching (paged attention cache)")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"okadfa_favor expects 4-D query/key/value (batch, heads, length, dim), got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")

    if from_cache:
        return _state_attention(updated[1], query, key, value, attention_mask, scaling, options)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_length = query.shape[2]
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise ValueError(f"okadfa_favor got an attention mask of type {type(attention_mask).__name__}; it "
                             "takes a tensor mask (key padding with causal or full attention)")
        keys, mask_causal, key_mask = _mask_pattern(attention_mask, q_length, causal)
        if key_mask is not None:
            options["key_mask"] = key_mask.expand(query.shape[0], keys)
        if mask_causal is None:    # a padding mask masking nothing: the module's own nature decides (callers
            # such as GPT-2 in transformers 4.4x pass is_causal=False whenever a mask is given)
            mask_causal = getattr(module, "is_causal", causal) and not getattr(module, "is_cross_attention", False)
        causal = mask_causal
        if keys < key.shape[2]:    # e.g. the unfilled tail of a static cache
            key, value = key[:, :, :keys], value[:, :, :keys]
    gqa = key.shape[1] != query.shape[1]
    if causal:
        out = _causal_favor(query, key, value, scaling, gqa, options)
    else:
        out = favor_sdpa(query, key, value, scale=scaling, enable_gqa=gqa, **options)
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------- config check

def check(config, *, training: bool = True) -> None:
    """Raise ValueError naming every feature of a transformers `config` that this backend cannot
    run, before any model is built or forward runs (otherwise they surface at the first forward):
    attention dropout when `training` (`attention_dropout`, GPT-2's `attn_pdrop`), attention-logit
    soft-capping (`attn_logit_softcapping`, e.g. Gemma 2), a sliding window shorter than the
    context that the model uses (`sliding_window` with `use_sliding_window` where the model has
    that switch, or `layer_types` with sliding layers), and output_attentions. Returns None when
    the config is fine.

    Example:
        >>> check(AutoConfig.from_pretrained(path))    # ValueError: ... sliding_window=4096 ...
    """
    problems = []
    for name in ("attention_dropout", "attn_pdrop"):
        rate = getattr(config, name, None)
        if training and isinstance(rate, (int, float)) and rate > 0:
            problems.append(f"{name}={rate}: FAVOR+ has no attention dropout (set it to 0.0, or check with "
                            "training=False for inference)")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        problems.append(f"attn_logit_softcapping={config.attn_logit_softcapping}: FAVOR+ cannot modify the "
                        "attention logits")
    window = getattr(config, "sliding_window", None)
    context = getattr(config, "max_position_embeddings", None)
    layer_types = getattr(config, "layer_types", None) or ()
    uses_window = getattr(config, "use_sliding_window", True) and window is not None
    if any(t == "sliding_attention" for t in layer_types):
        uses_window = window is not None
    if uses_window and (context is None or window < context):
        problems.append(f"sliding_window={window} (max_position_embeddings={context}): FAVOR+ attends to every "
                        "earlier position; sequences longer than the window would be refused at the first forward")
    if getattr(config, "output_attentions", False):
        problems.append("output_attentions=True: FAVOR+ never forms attention weights")
    if problems:
        raise ValueError("okadfa_favor cannot run this model config: " + "; ".join(problems))


# ----------------------------------------------------------------------------- registration

def register(name: str = DEFAULT_NAME, *, num_features: int = 256, seed: int = 0, backend: str = "auto") -> str:
    """Register FAVOR+ with transformers under `name` and return the name.

    Adds the attention function to `transformers.AttentionInterface` and, where
    transformers has one (>= 4.53), a mask function to `AttentionMaskInterface` that
    rejects padding and hands over no mask in the plain causal case. Idempotent; a second
    call with other settings replaces them (models built earlier use the new ones too).

    Args:
        num_features: M, the random features per head (error ~ 1/√M).
        seed: seed of the projection (the same for every layer).
        backend: as in `okadfa.favor_attention` ("auto", "cpu", "cuda", "triton", "reference").

    Example:
        >>> from okadfa.integrations.transformers import register
        >>> register()
        'okadfa_favor'
        >>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation="okadfa_favor")
    """
    if not isinstance(name, str) or not name or name == "eager" or (name in _attention_registry()
                                                                    and name not in _SETTINGS):
        raise ValueError(f"name must be a new attention implementation name (not one transformers or another "
                         f"library registered), got {name!r}")
    check_feature_settings(num_features, seed)
    if backend not in ("auto", "cpu", "cuda", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'cpu', 'cuda', 'triton' or 'reference', got {backend!r}")
    settings = _SETTINGS.setdefault(name, {})
    settings.clear()
    settings.update(num_features=num_features, seed=seed, backend=backend)

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        return favor_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                       favor_options=settings, **kwargs)

    attention.__name__ = attention.__qualname__ = f"{name}_attention_forward"
    attention.__doc__ = favor_attention_forward.__doc__
    interface = getattr(_transformers, "AttentionInterface", None)
    if interface is not None:
        interface.register(name, attention)
    else:    # transformers 4.48 kept a plain dict
        _attention_registry()[name] = attention
    if _masking is not None and hasattr(_masking, "AttentionMaskInterface"):
        _masking.AttentionMaskInterface.register(name, favor_attention_mask)
    _generate_with_favor_cache()
    return name


def _attention_registry() -> dict:
    interface = getattr(_transformers, "AttentionInterface", None)
    if interface is not None:
        return interface._global_mapping
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS    # transformers 4.48
    return ALL_ATTENTION_FUNCTIONS
