"""Backend discovery and selection (docs/design.md §2).

Backends: "triton" (okadfa.kernels), "cuda" and "cpu" (the native extension
okadfa._C), "reference" (plain PyTorch, okadfa.reference). `backend="auto"`
picks, for CUDA tensors, triton > cuda > reference and, for CPU tensors,
cpu > reference. The environment variable OKADFA_BACKEND=<name> replaces "auto"
for a whole run. An explicit choice that cannot run raises instead of falling back.

When okadfa._C cannot be loaded, importing okadfa warns once (RuntimeWarning) with
the error, the fallback and how to build it; backends() reports the same reason.
"""
from __future__ import annotations

import glob
import os
import warnings
from typing import Callable

import torch

__all__ = ["backends", "select_backend", "dispatch", "registered", "BACKENDS"]

BACKENDS = ("triton", "cuda", "cpu", "reference")

try:
    from . import _C  # noqa: F401  (registers torch.ops.okadfa.*)
    _NATIVE_ERROR = None
    _NATIVE_NOT_BUILT = False
except (ImportError, OSError) as exc:  # not built, or built against another torch (ABI)
    # No _C file next to this one: not built (the interpreter's message then only talks of a
    # "partially initialized module"); otherwise the loader's own error says why.
    _NATIVE_NOT_BUILT = isinstance(exc, ModuleNotFoundError) or not glob.glob(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.*"))
    _NATIVE_ERROR = "it is not built" if _NATIVE_NOT_BUILT else f"{type(exc).__name__}: {exc}"

NATIVE_AVAILABLE = _NATIVE_ERROR is None

_BUILD_HINT = ("build it against the installed torch: `pip install --no-build-isolation -e .` in a source "
               "checkout (or `make build`), or a wheel from `make wheel` installed next to the same torch version")


def _abi_note() -> str:
    """Why _C may not load: the torch it was built against (okadfa/_build_info.py, written
    by setup.py next to it) differs from the installed one. Empty if equal, unknown or if
    there is no _C at all (a leftover _build_info.py then says nothing about it)."""
    if _NATIVE_NOT_BUILT:
        return ""
    try:
        from . import _build_info
    except ImportError:
        return ""
    built = getattr(_build_info, "TORCH_VERSION", None)
    if not built or built == torch.__version__:
        return ""
    return (f"okadfa._C was built against torch {built} but torch {torch.__version__} is installed: "
            f"the C++ ABI differs between torch versions (ABI mismatch); rebuild okadfa against the "
            f"installed torch, or install torch=={built}. ")


def _missing_native_message() -> str:
    return (f"okadfa: the native extension okadfa._C could not be loaded ({_NATIVE_ERROR}). "
            f"{_abi_note()}Ops fall back to the slower reference path (plain PyTorch) on CPU tensors; on "
            f"CUDA tensors they use the Triton kernels if available, else the reference path. "
            f"To get the native kernels, {_BUILD_HINT}.")


if _NATIVE_ERROR is not None:
    # Once, at import (stacklevel 3: the `import okadfa` line when imported through the package).
    warnings.warn(_missing_native_message(), RuntimeWarning, stacklevel=3)


def _has_kernel(op: str, key: str) -> bool:
    return _NATIVE_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"okadfa::{op}", key)


try:
    import triton

    from . import kernels  # noqa: F401  (registers the okadfa::triton_* ops)
    _TRITON_ERROR = None
except ImportError as exc:
    _TRITON_ERROR = str(exc)

TRITON_OPS = _TRITON_ERROR is None   # the okadfa::triton_* ops are registered (they may not run here)


def _triton_status() -> tuple[bool, str]:
    if _TRITON_ERROR is not None:
        return False, f"okadfa.kernels failed to import ({_TRITON_ERROR}); install triton>=3.0"
    where = f"Triton {triton.__version__} kernels (okadfa.kernels)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, where + ", interpreted on the CPU (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return True, where
    return False, "no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on the CPU, slowly)"


def _discover() -> dict[str, dict[str, object]]:
    report = {}
    ok, why = _triton_status()
    report["triton"] = {"available": ok, "reason": why}
    if _NATIVE_ERROR is not None:
        why = f"okadfa._C failed to import ({_NATIVE_ERROR}); {_abi_note()}{_BUILD_HINT}"
        report["cuda"] = {"available": False, "reason": why}
        report["cpu"] = {"available": False, "reason": why}
    else:
        if not _has_kernel("favor_attention_fwd", "CUDA"):
            why = "okadfa._C was built without CUDA kernels"
        elif not torch.cuda.is_available():
            why = "no CUDA device is available"
        else:
            why = "native CUDA kernels (okadfa._C)"
        report["cuda"] = {"available": why.startswith("native"), "reason": why}
        report["cpu"] = {"available": True, "reason": "native CPU kernels (okadfa._C)"}
    report["reference"] = {"available": True, "reason": "plain PyTorch (okadfa.reference)"}
    return report


# Discovered once at import: dispatch then reads plain Python data, which
# torch.compile traces without graph breaks.
_STATUS = _discover()


def backends() -> dict[str, dict[str, object]]:
    """What each backend can do here: {name: {"available": bool, "reason": str}}; the available
    cpu backend also says how it multiplies matrices for bfloat16 and float16 inputs (bfloat16
    GEMMs on AMX tiles where the CPU has AMX-BF16, through oneDNN where it has AVX512-BF16,
    float32 otherwise; OKADFA_CPU_HALF_GEMM=amx|onednn|float32 forces one).

    Example:
        >>> okadfa.backends()["cpu"]
        {'available': True, 'reason': 'native CPU kernels (okadfa._C)',
         'bfloat16': 'bfloat16 GEMMs on AMX tiles (AMX-BF16), float32 accumulation',
         'float16': "float32 GEMMs: the kernels' running sums and states leave float16's range (65504)"}
    """
    report = {name: dict(status) for name, status in _STATUS.items()}
    if report["cpu"]["available"]:
        for dtype in (torch.bfloat16, torch.float16):
            report["cpu"][str(dtype).removeprefix("torch.")] = torch.ops.okadfa.cpu_gemm_path(dtype)
    return report


def select_backend(backend: str, device: torch.device) -> str:
    """Resolve `backend` ("auto" or a name) for tensors on `device`; raise if it cannot run."""
    if not isinstance(backend, str) or backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("OKADFA_BACKEND", "auto") or "auto"
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"OKADFA_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            for name in ("triton", "cuda"):
                if _STATUS[name]["available"]:
                    return name
            return "reference"
        if device.type == "cpu" and _NATIVE_ERROR is None:
            return "cpu"
        return "reference"   # without okadfa._C: warned once at import
    if backend == "reference":
        return backend
    if backend == "triton":
        ok, why = _STATUS["triton"]["available"], _STATUS["triton"]["reason"]
        if not ok and not why.startswith("no CUDA device"):
            raise RuntimeError(f"okadfa: backend 'triton' is unavailable: {why}")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("okadfa: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), "
                             f"got tensors on {device}")
        return backend
    status = _STATUS[backend]
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"okadfa: backend 'cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"okadfa: backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if not status["available"]:
        raise RuntimeError(f"okadfa: backend {backend!r} is unavailable: {status['reason']}")
    return backend


def dispatch(implementations: dict, backend: str, device: torch.device):
    """The entry of an op's implementation table for `backend` on `device` (after
    `select_backend`). Every op declares its table in okadfa/ops/<op>.py: backend name ->
    (compute dtype of an input dtype, the call), so that adding a backend is one row per op."""
    return implementations[select_backend(backend, device)]


def registered(name: str, output: int | None = None) -> Callable:
    """A call of the registered op okadfa::<name>, looked up when called (the op exists only
    where its backend is built); `output` selects one element of a tuple result."""
    def call(*args):
        result = getattr(torch.ops.okadfa, name)(*args)
        return result if output is None else result[output]
    call.__name__ = f"okadfa::{name}"
    return call
