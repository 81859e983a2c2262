"""The OKADFA model as a Hugging Face transformers model (extra `hf`).

`OKADFAPretrainedConfig` is a `PretrainedConfig` holding the fields of `okadfa.models.OKADFAConfig`
(model_type "okadfa"); `OKADFAForCausalLM` is a `PreTrainedModel` + `GenerationMixin` around an
`okadfa.models.OKADFAModel` (its `.okadfa` attribute), with HF's conventions:

    config = OKADFAPretrainedConfig.preset("tiny", training="dfa")
    model = OKADFAForCausalLM(config)
    out = model(input_ids, attention_mask=mask, labels=input_ids)    # CausalLMOutputWithPast
    out.loss.backward()                                             # DFA signals under training="dfa"
    model.save_pretrained(path)                                     # config.json + model.safetensors
    AutoModelForCausalLM.from_pretrained(path).generate(ids, max_new_tokens=20)

* `labels` are shifted inside, as in HF's causal LMs: position t is scored on labels[t + 1];
  -100 gives no loss, and neither does a padded position. A real position whose next token is
  padding is scored on that label: set it to -100 there, as HF's collators do.
* `attention_mask` (B, S) of 0/1: key padding, exact, left or right (`OKADFAModel.forward`'s
  key_mask; padded tokens also take no position). S = T, or with a cache S = cached + new, as
  generate() passes it; only the last T columns are read (the cache remembers the padding before).
* `generate()` decodes through an `okadfa.models.OKADFACache`, one `FavorState` per block: each
  token costs the same whatever the context length (softmax models keep a `KVCache`). HF's own
  caches are refused (TypeError), and so is assisted decoding, which rolls the cache back
  (transformers' ValueError, RuntimeError from 5.25); `cache_implementation` is ignored, with HF's warning. Beam search reorders the
  cache.
* While training with training="dfa" the loss's backward delivers DFA's signals and `logits` is
  None (the N×V logits are never formed); eval mode gives logits and plain losses. Trainer
  trains it either way.

Importing okadfa registers both classes with `AutoConfig` / `AutoModelForCausalLM` as soon as
transformers' auto classes are imported (okadfa/integrations/_autoregister.py); so does importing
this module. Nothing is loaded through `trust_remote_code`: the saved directory holds only
a config and safetensors weights, and the classes come from the installed okadfa.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:    # pragma: no cover - exercised only without the extra
    raise ImportError("okadfa.integrations.transformers_model needs Hugging Face transformers>=4.48: "
                      "pip install 'okadfa[hf]'") from exc

from ..models import OKADFACache, OKADFAModel
from .transformers_config import MODEL_TYPE, OKADFAPretrainedConfig, register_config

__all__ = ["MODEL_TYPE", "OKADFAForCausalLM", "OKADFAPretrainedConfig", "register_model"]

# the cache's name in model outputs and generate()'s keywords: "cache" since transformers 5.x
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _tied_keys():
    # transformers 5 maps each tied parameter to its source; 4.x lists the tied parameters
    major = int(__import__("transformers").__version__.split(".")[0])
    return {"okadfa.lm_head.weight": "okadfa.tok_emb.weight"} if major >= 5 else ["okadfa.lm_head.weight"]


class OKADFAForCausalLM(PreTrainedModel, GenerationMixin):
    """An `OKADFAModel` with transformers' model API (see the module docstring).

    forward(input_ids (B, T), attention_mask (B, S) or None, labels (B, T) or None, cache /
    past_key_values (an OKADFACache) or None, use_cache) -> CausalLMOutputWithPast with loss,
    logits (B, T, V) (None while DFA-training) and the cache.
    """

    config_class = OKADFAPretrainedConfig
    base_model_prefix = "okadfa"
    main_input_name = "input_ids"
    _no_split_modules = ["KOABlock"]
    _tied_weights_keys = _tied_keys()
    accepts_loss_kwargs = False            # Trainer: the loss is a mean over this batch's labels
    _is_stateful = True                    # the cache cannot roll back: generate() refuses assisted decoding

    def __init__(self, config: OKADFAPretrainedConfig):
        super().__init__(config)
        self.okadfa = OKADFAModel(config.okadfa_config())
        self.post_init()

    def _init_weights(self, module) -> None:
        """Nothing: OKADFAModel initialises its own parameters and buffers. `from_pretrained` loads
        every one of them, or refuses a checkpoint that lacks any."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained, refusing a checkpoint that lacks a parameter or buffer of
        this config (e.g. saved with training="bp", loaded with training="dfa"): transformers would
        leave it uninitialised."""
        wanted = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if info.get("missing_keys"):
            raise ValueError(f"the checkpoint lacks {sorted(info['missing_keys'])} of this config: load it with the "
                             "config it was saved with")
        return (model, info) if wanted else model

    def resize_token_embeddings(self, *args, **kwargs):
        raise NotImplementedError("OKADFAForCausalLM cannot resize its vocabulary (the unembedding, the DFA head "
                                  "and the feedback are sized by vocab_size): build a model with the new vocab_size")

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False                       # prepare_inputs_for_generation makes an OKADFACache

    def get_input_embeddings(self):
        return self.okadfa.tok_emb

    def get_output_embeddings(self):
        return self.okadfa.lm_head

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, cache: OKADFACache | None = None,
                past_key_values: OKADFACache | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, inputs_embeds: Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None):
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("OKADFAForCausalLM takes input_ids (inputs_embeds are not supported)")
        if output_attentions or output_hidden_states:
            raise ValueError("OKADFAForCausalLM returns neither attention weights (FAVOR+ never forms them) nor "
                             "hidden states")
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache once (cache or past_key_values)")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, OKADFACache):
            raise TypeError(f"OKADFAForCausalLM decodes with an okadfa.models.OKADFACache, got "
                            f"{type(cache).__name__} (HF's caches keep every key; leave the cache to generate())")
        if cache is None and use_cache:
            cache = OKADFACache(self.okadfa)
        key_mask = None if attention_mask is None else self._key_mask(attention_mask, input_ids, cache)
        targets = None if labels is None else self._targets(labels, input_ids)
        out = self.okadfa(input_ids, targets, key_mask=key_mask, cache=cache)
        result = CausalLMOutputWithPast(loss=out.loss, logits=out.logits, **{_CACHE: cache})
        return result if return_dict is not False else result.to_tuple()

    @staticmethod
    def _key_mask(attention_mask: Tensor, input_ids: Tensor, cache: OKADFACache | None) -> Tensor:
        """The last T columns of a (B, S) 0/1 (or bool) mask, S = cached + T, as a bool key_mask."""
        m, (B, T) = attention_mask, input_ids.shape
        S = T + (cache.length if cache is not None else 0)
        if not isinstance(m, Tensor) or m.dim() != 2 or tuple(m.shape) != (B, S):
            raise ValueError(f"attention_mask must be (B, S) = ({B}, {S}): the cached and the new tokens, got "
                             f"{tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__}")
        m = m[:, S - T:]
        if m.is_floating_point() or m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (a real token) only: a 2-D padding mask")
        return m.to(device=input_ids.device, dtype=torch.bool)

    @staticmethod
    def _targets(labels: Tensor, input_ids: Tensor) -> Tensor:
        """HF's shift: position t is scored on labels[t + 1]; the last position on nothing."""
        if (not isinstance(labels, Tensor) or labels.shape != input_ids.shape or labels.is_floating_point()
                or labels.is_complex() or labels.dtype == torch.bool):
            raise ValueError(f"labels must be integer token ids of the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {(labels.dtype, tuple(labels.shape)) if isinstance(labels, Tensor) else labels!r}")
        return F.pad(labels[:, 1:], (0, 1), value=-100)

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
        """The tokens the cache has not seen yet, with the cache (made at the first step)."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("OKADFAForCausalLM generates from input_ids (inputs_embeds are not supported)")
        cache = kwargs.get(_CACHE, kwargs.get("past_key_values"))
        if cache is None and kwargs.get("use_cache", True) is False:
            return {"input_ids": input_ids, "attention_mask": attention_mask}      # re-encode every step
        if cache is None:
            cache = OKADFACache(self.okadfa)
        elif not isinstance(cache, OKADFACache):
            raise TypeError(f"OKADFAForCausalLM decodes with an okadfa.models.OKADFACache, got "
                            f"{type(cache).__name__}")
        return {"input_ids": input_ids[:, cache.length:], "attention_mask": attention_mask, _CACHE: cache,
                "use_cache": True}

    def _reorder_cache(self, cache: OKADFACache, beam_idx: Tensor) -> OKADFACache:
        cache.reorder_cache(beam_idx)
        return cache


def register_model() -> None:
    """Register model_type "okadfa" with AutoConfig and OKADFAForCausalLM with
    AutoModelForCausalLM (idempotent; importing okadfa does it when transformers is imported)."""
    register_config()
    AutoModelForCausalLM.register(OKADFAPretrainedConfig, OKADFAForCausalLM, exist_ok=True)


register_model()     # importing this module is enough, also where okadfa's import hooks are off
