"""okadfa's names in transformers, in every process that imports okadfa, without a call.

`import okadfa` must not import transformers (it is an optional extra and slow to import), and
transformers has no entry point through which it would discover attention implementations or
model types. So `install()` registers each name at the moment the transformers module that
reads it has been imported:

    transformers.models.auto.configuration_auto   model_type "okadfa" for AutoConfig
    transformers.models.auto.modeling_auto        OKADFAForCausalLM for AutoModelForCausalLM
    transformers.modeling_utils                   attn_implementation "okadfa_favor"

at once for a module already loaded, otherwise through a one-shot import hook (a
`sys.meta_path` finder that wraps the module's loader and registers right after the module has
run). A program that imports okadfa before or after transformers can then pass the names as
plain strings: `AutoModelForCausalLM.from_pretrained(saved_okadfa_dir)`,
`from_pretrained(..., attn_implementation="okadfa_favor")`, a CLI flag, a Trainer config.

The attention is registered with its default settings (`register()`: 256 features, seed 0,
backend "auto"); call `register(...)` yourself for others. OKADFA_HF_REGISTER=0 in the
environment turns the hooks off. A failure to register (e.g. a transformers older than the
integration supports) is a warning, never an error in the user's import of transformers.
"""
from __future__ import annotations

import importlib.abc
import os
import sys
import warnings


def _register_config() -> None:
    from .transformers_config import register_config
    register_config()


def _register_model() -> None:
    importing = sys.modules.get(f"{__package__}.transformers_model")
    if importing is not None and not hasattr(importing, "register_model"):
        return                          # its own import reached modeling_auto: it registers at its end
    from .transformers_model import register_model
    register_model()


def _register_attention() -> None:
    from .transformers import register
    register()


HOOKS = {"transformers.models.auto.configuration_auto": ("the 'okadfa' model type", _register_config),
         "transformers.models.auto.modeling_auto": ("the 'okadfa' model", _register_model),
         "transformers.modeling_utils": ("the 'okadfa_favor' attention", _register_attention)}


def _run(target: str) -> None:
    what, register = HOOKS[target]
    try:
        register()
    except Exception as exc:    # never break the user's `import transformers`
        warnings.warn(f"okadfa could not register {what} with transformers: {exc}", RuntimeWarning, stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds a module of `pending` with the other finders, then registers once it has executed."""

    def __init__(self, pending: set[str]):
        self.pending = pending

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _run(name)

        spec.loader.exec_module = exec_module   # this spec's own loader instance
        return spec


def install() -> None:
    """Register now for the modules already loaded, the others when they are (idempotent)."""
    if os.environ.get("OKADFA_HF_REGISTER", "1") == "0":
        return
    if any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        return
    pending = set()
    for target in HOOKS:                # in order: the model needs the config type
        if target in sys.modules:
            _run(target)
        else:
            pending.add(target)
    if pending:
        sys.meta_path.insert(0, _RegisterAfterImport(pending))
