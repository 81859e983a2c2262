"""`--precision fp32|bf16|fp16`: the dtype a run computes in (`okadfa train`, `okadfa compare`, `okadfa.bench.model`).

fp32 runs as before: no autocast. bf16 and fp16 run the forward pass and the loss under
`torch.autocast(device type, dtype)` (CPU and CUDA); the parameters, their `.grad` and the
AdamW state stay float32 (master weights), so only the activations and the matrix products
are in the half type. fp16 adds loss scaling (`torch.amp.GradScaler`, on the CPU too: its
range problem is the format's, not the device's; torch has `GradScaler("cpu")` since 2.3),
as its 5 exponent bits flush gradients below 6e-8 to zero; bf16 has float32's exponent
range and needs none.

torch itself only warns and computes in float32 when it cannot autocast to a dtype on a
device; `check` turns that into an error, so a run never claims a precision it does not use.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

__all__ = ["PRECISIONS", "autocast", "check", "grad_scaler"]

# --precision -> the autocast dtype (None: no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """A new context for one forward pass: torch.autocast(device's type, dtype) for bf16/fp16, nothing for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def check(precision: str, device) -> None:
    """ValueError (one sentence) unless `precision` really runs on `device`: bf16 on a GPU without
    bfloat16, or a dtype torch's autocast would disable there (it warns and stays in float32)."""
    dtype, kind = PRECISIONS[precision], torch.device(device).type
    if dtype is None:
        return
    if kind == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("bf16 needs a GPU with bfloat16 support (compute capability 8.0 or newer); use fp16 or fp32")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with autocast(precision, device):
                active = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == dtype
        why = " ".join(str(w.message) for w in caught)
    except RuntimeError as exc:             # e.g. a device type without autocast
        active, why = False, str(exc)
    if not active:
        raise ValueError(f"torch {torch.__version__} cannot autocast to {dtype} on {kind} "
                         f"({' '.join(why.split()) or 'autocast stays off'}); use fp32")


def grad_scaler(precision: str, device) -> torch.amp.GradScaler:
    """The loss scaler of a run: enabled for fp16 only (a disabled one passes loss and step through unchanged,
    so every precision runs the same loop)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
