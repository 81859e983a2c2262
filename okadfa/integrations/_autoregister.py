"""`attn_implementation="okadfa_favor"` in every process that imports okadfa, without a call.

`import okadfa` must not import transformers (it is an optional extra and slow to import), and
transformers has no entry point through which it would discover attention implementations. So
`install()` registers the backend at the moment transformers' model code is imported:
immediately if `transformers.modeling_utils` is already loaded, otherwise through a one-shot
import hook (a `sys.meta_path` finder that wraps that module's loader and calls
`okadfa.integrations.transformers.register()` right after the module has run). A program that
imports okadfa before or after transformers can then pass the name as a plain string
(`from_pretrained(..., attn_implementation="okadfa_favor")`, a CLI flag, a Trainer config).

The default settings are registered (`register()`: 256 features, seed 0, backend "auto"); call
`register(...)` yourself for others. OKADFA_HF_REGISTER=0 in the environment turns the hook off.
A failure to register (e.g. a transformers older than the integration supports) is a warning,
never an error in the user's import of transformers.
"""
from __future__ import annotations

import importlib.abc
import os
import sys
import warnings

TARGET = "transformers.modeling_utils"


def _register() -> None:
    try:
        from .transformers import register
        register()
    except Exception as exc:    # never break the user's `import transformers`
        warnings.warn(f"okadfa could not register the 'okadfa_favor' attention with transformers: {exc}",
                      RuntimeWarning, stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds TARGET with the other finders, then runs `_register` once its module has executed."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)          # one shot; also keeps the search below from finding us
        for finder in sys.meta_path:
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
            _register()

        spec.loader.exec_module = exec_module   # this spec's own loader instance
        return spec


def install() -> None:
    """Register now if transformers' model code is loaded, else when it is (idempotent)."""
    if os.environ.get("OKADFA_HF_REGISTER", "1") == "0":
        return
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
