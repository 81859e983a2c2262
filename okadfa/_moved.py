"""Old import paths of modules that moved (issue 14: the training application now lives in
okadfa.training). Each old module is a two-line file calling `moved`, so existing imports,
`python -m okadfa.train` and `torchrun -m okadfa.train` keep working, with a FutureWarning."""
from __future__ import annotations

import importlib
import runpy
import sys
import warnings


def moved(old: str, new: str, name: str) -> None:
    """Make module `old` (whose __name__ is `name`) stand for module `new`: run `new` as the
    program when `old` was run with -m, else put `new` in sys.modules under the old name."""
    warnings.warn(f"{old} moved to {new}; import or run that instead (the old path will go away)",
                  FutureWarning, stacklevel=3)
    if name == "__main__":
        runpy.run_module(new, run_name="__main__", alter_sys=True)
    else:
        sys.modules[old] = importlib.import_module(new)
