"""Without a loadable okadfa._C: one clear RuntimeWarning at import, the ops still run
through the reference path, and backends() says why cpu is unavailable.

Each case runs in a subprocess, where the extension is hidden before `import okadfa`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import okadfa

# the okadfa the test process uses (source tree or site-packages): the subprocess imports the same
_OKADFA_ROOT = str(Path(okadfa.__file__).resolve().parents[1])

_RUN = r"""
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import okadfa, torch
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    w = okadfa.random_features(16, 8, generator=g)
    out = okadfa.favor_attention(q, k, v, w, causal=True)                       # auto: reference
    ref = okadfa.reference.favor_attention(q, k, v, w, causal=True)
    spec = okadfa.FeedbackSpec(3, 5, 4, seed=1)
    e = torch.randn(6, 4, generator=g)
    fb = okadfa.dfa_feedback(e, spec)
    fb_ref = okadfa.reference.dfa_feedback(e, spec)
try:
    okadfa.favor_attention(q, k, v, w, causal=True, backend="cpu")
    explicit_cpu = "ran"
except RuntimeError as exc:
    explicit_cpu = str(exc)
print(json.dumps({
    "warnings": [[w.category.__name__, str(w.message), w.filename] for w in caught
                 if "okadfa" in str(w.message)],
    "favor_err": (out - ref).abs().max().item(),
    "dfa_err": (fb - fb_ref).abs().max().item(),
    "backends": okadfa.backends(),
    "explicit_cpu": explicit_cpu,
    "torch": torch.__version__,
}))
"""

# okadfa._C "not built": None in sys.modules makes `from . import _C` fail with ModuleNotFoundError
_NOT_BUILT = 'import sys\nsys.modules["okadfa._C"] = None\n'

# okadfa._C present but built against another torch: the loader fails with an undefined
# symbol, and the okadfa/_build_info.py written next to it names the other torch version
_ABI_MISMATCH = r'''
import importlib.abc, sys, types
class _Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "okadfa._C":
            raise ImportError("/x/okadfa/_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")
sys.meta_path.insert(0, _Broken())
info = types.ModuleType("okadfa._build_info")
info.TORCH_VERSION = "1.0.0+fake"
sys.modules["okadfa._build_info"] = info
'''


def _run(prelude, tmp_path, root=_OKADFA_ROOT):
    env = {k: v for k, v in os.environ.items() if k not in ("OKADFA_BACKEND", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", prelude + _RUN], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_common(report):
    # exactly one warning, at import; running ops afterwards does not warn again
    assert len(report["warnings"]) == 1, report["warnings"]
    category, message, filename = report["warnings"][0]
    assert category == "RuntimeWarning"
    assert "the native extension okadfa._C could not be loaded" in message
    assert "fall back to the slower reference path" in message
    assert "pip install --no-build-isolation -e ." in message and "make build" in message
    assert "make wheel" in message
    assert not filename.endswith("backends.py"), filename   # points at the importer, not at okadfa's own code
    # the ops ran through the reference path
    assert report["favor_err"] == 0.0
    assert report["dfa_err"] == 0.0
    status = report["backends"]
    assert status["reference"]["available"]
    for name in ("cpu", "cuda"):
        assert not status[name]["available"]
        assert status[name]["reason"].startswith("okadfa._C failed to import (")
    assert "is unavailable: okadfa._C failed to import" in report["explicit_cpu"]
    return message


def test_import_warns_once_and_ops_fall_back_when_extension_missing(tmp_path):
    report = _run(_NOT_BUILT, tmp_path)
    message = _check_common(report)
    assert "could not be loaded (it is not built)" in message
    assert "(it is not built)" in report["backends"]["cpu"]["reason"]
    assert "ABI" not in message      # nothing was built: no torch version to compare


def test_import_warning_names_torch_abi_mismatch(tmp_path):
    report = _run(_ABI_MISMATCH, tmp_path)
    message = _check_common(report)
    assert "undefined symbol" in message
    assert f"built against torch 1.0.0+fake but torch {report['torch']} is installed" in message
    assert "ABI mismatch" in message and "rebuild okadfa against the installed torch" in message
    assert "install torch==1.0.0+fake" in message
    reason = report["backends"]["cpu"]["reason"]
    assert "undefined symbol" in reason and "built against torch 1.0.0+fake" in reason


def test_a_package_without_the_extension_file_says_it_is_not_built(tmp_path):
    """The real case: okadfa/ with no _C*.so (the interpreter's own error then speaks of a
    "partially initialized module"), and a stale _build_info.py naming another torch, which
    must not be taken for an ABI mismatch."""
    root = tmp_path / "site"
    shutil.copytree(Path(okadfa.__file__).parent, root / "okadfa",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__", "_build_info.py"))
    (root / "okadfa" / "_build_info.py").write_text('TORCH_VERSION = "1.0.0+stale"\n')
    # an editable install's finder would still map okadfa._C to the source tree's build
    hide_editable = ('import sys\nsys.meta_path[:] = [f for f in sys.meta_path '
                     'if "__editable__" not in (getattr(f, "__module__", "") or "")]\n')
    report = _run(hide_editable, tmp_path, root=str(root))
    assert len(report["warnings"]) == 1, report["warnings"]
    message = report["warnings"][0][1]
    assert "could not be loaded (it is not built)" in message, message
    assert "ABI" not in message and "circular" not in message, message
    assert report["favor_err"] < 1e-6 and report["backends"]["cpu"]["available"] is False
