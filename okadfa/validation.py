"""Input validation shared by every backend: runs before any kernel and raises
TypeError (wrong kind of object or dtype) or ValueError (shape, device, value)
naming the argument and what was expected."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .feedback import FeedbackSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NATIVE_DTYPES = (torch.float32, torch.float64)
MAX_CHUNK = 1024


def check_tensor(x, name: str, ndim: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}")


def check_matrix(x, name: str, layout: str) -> None:
    """A 2-D floating-point tensor, else TypeError/ValueError naming `name`."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")


def check_same(tensors: dict[str, Tensor]) -> None:
    (first, ref), *rest = tensors.items()
    for name, x in rest:
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {first} is on {ref.device}")
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {first} has dtype {ref.dtype}")


def attention_batch_shape(q: Tensor, k: Tensor, v: Tensor, qname: str, kname: str,
                          cross: bool = False) -> torch.Size:
    """Check (B, H, T, ·) agreement of q, k, v; return the broadcast (B, H) of q.

    cross: q may have its own length L (non-causal cross-attention), k and v share S.

    Batch dims broadcast. Heads broadcast too, and, as in SDPA's grouped-query
    attention, k and v may have Hkv heads with Hq divisible by Hkv: kv head j
    then serves q heads j·Hq/Hkv … (j+1)·Hq/Hkv − 1 (see `prepare`).
    """
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{kname} and v must have the same sequence length (dim 2), got {k.shape[2]} and "
                         f"{v.shape[2]}")
    if q.shape[2] != k.shape[2] and not cross:
        needs = " for causal attention (FavorState decodes token by token)" if qname == "q" else ""
        raise ValueError(f"{qname}, {kname} and v must have the same length (dim 2){needs}, got "
                         f"L={q.shape[2]} and S={k.shape[2]}")
    for name, x in ((qname, q), (kname, k)):
        if x.shape[2] < 1:
            raise ValueError(f"the sequence length (dim 2 of {name}) must be at least 1, got {x.shape[2]}")
    for name, x in ((qname, q), (kname, k), ("v", v)):
        if x.shape[3] < 1:
            raise ValueError(f"{name} must have at least one feature (dim 3), got shape {tuple(x.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{kname} and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    hq, hkv = q.shape[1], k.shape[1]
    heads_ok = hq == hkv or hkv == 1 or hq == 1 or (hkv > 0 and hq % hkv == 0)
    try:
        batch = torch.broadcast_shapes(q.shape[:1], k.shape[:1], v.shape[:1])
    except RuntimeError:
        batch = None
    if batch is None or not heads_ok:
        raise ValueError(f"the batch and head dims (0, 1) of {qname} {tuple(q.shape[:2])}, {kname} "
                         f"{tuple(k.shape[:2])} and v {tuple(v.shape[:2])} do not broadcast (grouped-query "
                         f"attention needs {qname}'s heads to be a multiple of {kname}'s)")
    return torch.Size((batch[0], max(hq, hkv)))
def check_scale(scale, head_dim: int, dtype: torch.dtype) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    if scale >= torch.finfo(native_dtype(dtype)).max ** 0.5:
        raise ValueError(f"scale {scale} is too large: the logits would overflow {native_dtype(dtype)}")
    return float(scale)


def check_feature_settings(num_features, seed) -> None:
    """favor_sdpa's (and the Hugging Face backend's) num_features and seed."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


def check_chunk(chunk_size, default: int) -> int:
    if chunk_size is None:
        return default
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}], got {chunk_size}")
    return chunk_size


def check_causal(causal) -> bool:
    # Python's bool or NumPy's bool_ (without importing NumPy).
    if not (isinstance(causal, bool) or type(causal).__name__ in ("bool_", "bool")):
        raise TypeError(f"causal must be a bool, got {type(causal).__module__}.{type(causal).__name__}")
    return bool(causal)


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under torch.autocast for the tensors' device, cast them to the autocast dtype as
    autocast does for SDPA (float64 is left alone); otherwise return them unchanged."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x for x in tensors)


def prepare(x: Tensor, batch: torch.Size, dtype: torch.dtype) -> Tensor:
    """Broadcast the (B, H) dims (repeating grouped kv heads), cast to the kernel's
    dtype and make contiguous, all differentiably."""
    if 1 < x.shape[1] < batch[1]:
        x = x.repeat_interleave(batch[1] // x.shape[1], dim=1)
    return x.expand(*batch, *x.shape[2:]).to(dtype).contiguous()


def native_dtype(dtype: torch.dtype) -> torch.dtype:
    """The native attention kernels (cpu, cuda) compute half types in float32."""
    return dtype if dtype in NATIVE_DTYPES else torch.float32


def same_dtype(dtype: torch.dtype) -> torch.dtype:
    """The triton and reference attention paths compute in the input dtype (float32 inside)."""
    return dtype


def check_feedback(feedback, error_dim: int, device: torch.device, needs: str) -> None:
    """Validate `feedback` (a FeedbackSpec or a stored (P, d, E) tensor) against an error
    with `error_dim` columns on `device`; `needs` completes the mismatch message, e.g.
    "the error has 6 columns". """
    if isinstance(feedback, FeedbackSpec):
        if feedback.error_dim != error_dim:
            raise ValueError(f"feedback.error_dim is {feedback.error_dim} but {needs}")
        return
    if not isinstance(feedback, Tensor):
        raise TypeError(f"feedback must be a FeedbackSpec or a tensor (P, d, E), got {type(feedback).__name__}")
    if not feedback.is_floating_point():
        raise TypeError(f"feedback must be a floating-point tensor, got {feedback.dtype}")
    if feedback.dim() != 3 or feedback.shape[2] != error_dim:
        raise ValueError(f"feedback must have shape (P, d, {error_dim}) since {needs}, got {tuple(feedback.shape)}")
    if feedback.device != device:
        raise ValueError(f"feedback is on {feedback.device} but the error is on {device}")


def check_target_range(targets: Tensor, V: int, ignore_index: int) -> None:
    """Every target in [0, V) or equal to ignore_index (reads the data)."""
    kept = targets[targets != ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= V):
        bad = kept[(kept < 0) | (kept >= V)][0].item()
        raise ValueError(f"targets must be in [0, {V}) or equal ignore_index={ignore_index}, found {bad}")


def check_head_inputs(h, w_dec, targets, feedback, ignore_index, chunk_size, error) -> int:
    """Validate dfa_head's arguments (shared by every backend); return E, the error width."""
    check_matrix(h, "h", "(N, d)")
    check_matrix(w_dec, "w_dec", "(V, d)")
    if w_dec.shape[1] != h.shape[1]:
        raise ValueError(f"w_dec must have shape (V, {h.shape[1]}) to match h (N, {h.shape[1]}), "
                         f"got {tuple(w_dec.shape)}")
    if w_dec.device != h.device:
        raise ValueError(f"w_dec is on {w_dec.device} but h is on {h.device}")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be an int64 tensor, got {targets.dtype}")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"targets must have shape ({h.shape[0]},) to match h, got {tuple(targets.shape)}")
    if targets.device != h.device:
        raise ValueError(f"targets is on {targets.device} but h is on {h.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if error not in ("hidden", "logits"):
        raise ValueError(f"error must be 'hidden' or 'logits', got {error!r}")
    V = w_dec.shape[0]
    if not torch.compiler.is_compiling():    # traced code has no data: okadfa.ops.dfa_head checks in the graph
        check_target_range(targets, V, ignore_index)
    E = h.shape[1] if error == "hidden" else V
    check_feedback(feedback, E, h.device, f"error={error!r} needs E = {'d' if error == 'hidden' else 'V'} = {E}")
    return E
