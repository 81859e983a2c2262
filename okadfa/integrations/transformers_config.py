"""`OKADFAPretrainedConfig`: the OKADFA model's config as a transformers `PretrainedConfig`
(model_type "okadfa"; the model is okadfa/integrations/transformers_model.py). A module of
its own, importing only transformers' config code, so that `AutoConfig` can know the model
type without loading transformers' model code (okadfa/integrations/_autoregister.py).
"""
from __future__ import annotations

import dataclasses

try:
    from transformers.configuration_utils import PretrainedConfig
except ImportError as exc:    # pragma: no cover - exercised only without the extra
    raise ImportError("okadfa.integrations.transformers_config needs Hugging Face transformers>=4.48: "
                      "pip install 'okadfa[hf]'") from exc

from ..models import OKADFAConfig

__all__ = ["MODEL_TYPE", "OKADFAPretrainedConfig", "register_config"]

MODEL_TYPE = "okadfa"
_FIELDS = tuple(f.name for f in dataclasses.fields(OKADFAConfig))


class OKADFAPretrainedConfig(PretrainedConfig):
    """A transformers config with every field of `okadfa.models.OKADFAConfig` (checked, and the
    rule-dependent defaults resolved, by building one), plus HF's standard names as aliases
    (hidden_size = d_model, num_hidden_layers = n_layers, num_attention_heads = n_heads,
    max_position_embeddings = max_seq_len). `tie_word_embeddings` follows `tie_weights`."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "max_seq_len"}

    def __init__(self, **kwargs):
        for alias, field in self.attribute_map.items():      # HF's names for OKADFA fields, checked as those
            if alias in kwargs:
                if field in kwargs and kwargs[field] != kwargs[alias]:
                    raise ValueError(f"{alias}={kwargs[alias]} contradicts {field}={kwargs[field]}")
                kwargs[field] = kwargs.pop(alias)
        own = OKADFAConfig(**{name: kwargs.pop(name) for name in _FIELDS if name in kwargs}).to_dict()
        for name, value in own.items():
            setattr(self, name, value)
        if kwargs.setdefault("tie_word_embeddings", own["tie_weights"]) != own["tie_weights"]:
            raise ValueError(f"tie_word_embeddings={kwargs['tie_word_embeddings']} contradicts "
                             f"tie_weights={own['tie_weights']}: set tie_weights")
        super().__init__(**kwargs)

    @classmethod
    def preset(cls, name: str, **overrides) -> "OKADFAPretrainedConfig":
        """As `OKADFAConfig.preset`: "tiny", "gpt2-small" or "gpt2-medium", with overrides (of
        OKADFAConfig's fields and of PretrainedConfig's)."""
        own = {field: overrides.pop(field) for field in _FIELDS if field in overrides}
        return cls(**OKADFAConfig.preset(name, **own).to_dict(), **overrides)

    def okadfa_config(self) -> OKADFAConfig:
        """The `OKADFAConfig` these fields describe (checked again: fields set after construction,
        e.g. from_pretrained's keyword overrides, skip __init__)."""
        if self.tie_word_embeddings != self.tie_weights:
            raise ValueError(f"tie_word_embeddings={self.tie_word_embeddings} contradicts tie_weights="
                             f"{self.tie_weights}: set tie_weights")
        return OKADFAConfig(**{name: getattr(self, name) for name in _FIELDS})


def register_config() -> None:
    """Register model_type "okadfa" with AutoConfig (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig
    AutoConfig.register(MODEL_TYPE, OKADFAPretrainedConfig, exist_ok=True)
