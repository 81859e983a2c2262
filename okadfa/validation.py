"""Input validation shared by every backend: runs before any kernel and raises
TypeError (wrong kind of object or dtype) or ValueError (shape, device, value)
naming the argument and what was expected."""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .feedback import FeedbackSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NATIVE_DTYPES = (torch.float32, torch.float64)
MAX_CHUNK = 1024


# ------------------------------------------------------------------ errors under torch.compile
# Inside torch.compile(fullgraph=True) an exception raised while tracing surfaces as Dynamo's
# `Unsupported: Observed exception`, not as the ValueError/TypeError eager mode raises. The public
# ops therefore catch their validation errors while compiling and put this op in the graph
# instead: it raises the same exception, with the same message, when the compiled code runs.
_ERRORS = {"ValueError": ValueError, "TypeError": TypeError}


@torch.library.custom_op("okadfa::raise_error", mutates_args=())
def _raise_error(like: Tensor, kind: str, message: str) -> Tensor:
    raise _ERRORS[kind](message)


@_raise_error.register_fake
def _(like, kind, message):
    return torch.empty_like(like)


def errors_as_in_eager(outputs: int = 1):
    """Decorator of a public op (returning one tensor, or a tuple of `outputs` tensors): under
    torch.compile a ValueError/TypeError it raises while being traced is raised by the compiled
    code instead, as in eager mode (above)."""
    def wrap(op):
        @functools.wraps(op)
        def checked(*args, **kwargs):
            try:
                return op(*args, **kwargs)
            except (ValueError, TypeError) as exc:
                if not torch.compiler.is_compiling():
                    raise
                kind, message = "TypeError" if isinstance(exc, TypeError) else "ValueError", str(exc)
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            like = tensors[0] if tensors else torch.empty(0)
            failed = [_raise_error(like, kind, message) for _ in range(outputs)]
            return failed[0] if outputs == 1 else tuple(failed)
        return checked
    return wrap


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


# Positions per chunk when chunk_size is None for bfloat16 on the CPU: the cpu kernels' bfloat16
# GEMMs (oneDNN) pay off on larger blocks. Causal fwd+bwd, B=1, H=8, T=4096, D=64, M=256, 2 threads
# on an AVX512-BF16 CPU: 146 ms at 64, 113 ms at 128, 129 ms at 256 (float32 inputs: 156 ms at 64
# and at 128, 200 ms at 256).
CPU_BF16_CHUNK = 128


def default_chunk(x: Tensor, default: int) -> int:
    """The chunk size when chunk_size is None: CPU_BF16_CHUNK for bfloat16 CPU tensors, else default."""
    return CPU_BF16_CHUNK if x.dtype == torch.bfloat16 and x.device.type == "cpu" else default


def check_chunk(chunk_size, default: int) -> int:
    if chunk_size is None:
        return default
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}], got {chunk_size}")
    return chunk_size


def key_mask(mask, batch: torch.Size, S: int, device: torch.device) -> Tensor | None:
    """The attention ops' key_mask: None, or a bool (B, S) tensor (B = batch[0] or 1) on `device`,
    True = a real key. Returns it as the kernels take it: bool (B, H, S), contiguous."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_mask must be a bool tensor (B, S) or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be bool (True = a real key, False = padding), got {mask.dtype}")
    if mask.dim() != 2 or mask.shape[1] != S or mask.shape[0] not in (1, batch[0]):
        raise ValueError(f"key_mask must have shape (B, S) = ({batch[0]}, {S}) (B may be 1), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_mask is on {mask.device} but q is on {device}")
    return mask[:, None, :].expand(batch[0], batch[1], S).contiguous()


def check_causal(causal) -> bool:
    # Python's bool or NumPy's bool_ (without importing NumPy).
    if not (isinstance(causal, bool) or type(causal).__name__ in ("bool_", "bool")):
        raise TypeError(f"causal must be a bool, got {type(causal).__module__}.{type(causal).__name__}")
    return bool(causal)


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under torch.autocast for the tensors' device, cast them to the autocast dtype as
    autocast does for SDPA (float64 is left alone); otherwise return them unchanged."""
    device_type = tensors[0].device.type
    if (len({x.device for x in tensors}) > 1 or not torch.amp.is_autocast_available(device_type)
            or not torch.is_autocast_enabled(device_type)):
        return tensors          # mixed devices (the caller's check names them), or a device without autocast
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x for x in tensors)


def prepare(x: Tensor, batch: torch.Size, dtype: torch.dtype) -> Tensor:
    """Cast to the kernel's dtype, then broadcast the (B, H) dims (repeating grouped kv heads) and
    make contiguous, all differentiably: in that order the gradient of a broadcast input is summed
    over its copies in the kernel's dtype (see compute_dtype) and cast back once."""
    x = x.to(dtype)
    if 1 < x.shape[1] < batch[1]:
        x = x.repeat_interleave(batch[1] // x.shape[1], dim=1)
    return x.expand(*batch, *x.shape[2:]).contiguous()


def compute_dtype(compute, batch: torch.Size, *tensors: Tensor) -> torch.dtype:
    """The dtype an attention op runs its backend in: compute(the inputs' dtype), except that
    half inputs of which one is broadcast over (B, H) run in float32, so that the gradients of
    the copies are summed in float32 and rounded once, not rounded each and summed in the half
    type (every backend takes float32)."""
    dtype = compute(tensors[-1].dtype)
    if dtype in (torch.float16, torch.bfloat16) and any(tuple(x.shape[:2]) != tuple(batch[:2]) for x in tensors):
        return torch.float32
    return dtype


def native_dtype(dtype: torch.dtype) -> torch.dtype:
    """The native attention kernels (cpu, cuda) and the reference compute half types in float32."""
    return dtype if dtype in NATIVE_DTYPES else torch.float32


def same_dtype(dtype: torch.dtype) -> torch.dtype:
    """The Triton kernels and the DFA ops take the input dtype as it is (and accumulate in float32)."""
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


# ------------------------------------------------------------------------------ allocation sizes
# Sizes that come from arguments (a FeedbackSpec, num_features × head_dim, ...) are checked
# before any work, against two limits:
#   * the entries must be countable by an int64 (torch's sizes and every kernel's indices);
#   * the bytes of the allocation must not exceed the *total* memory of the device it lands on
#     (physical RAM, or the cgroup limit if lower, for the CPU; the GPU's total memory for
#     CUDA). Such a request can never succeed, whatever else is freed, so refusing it loses
#     nothing; the total (not the currently free) memory keeps the verdict the same from call to
#     call. Linux lets a too-large CPU allocation "succeed" lazily (overcommit) and kills the
#     process when it is touched: the check turns that into a ValueError up front.
MAX_ENTRIES = 2 ** 63 - 1


@functools.lru_cache(maxsize=None)
def _cpu_memory() -> int | None:
    import os
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        total = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = int(f.read().strip())
        except (OSError, ValueError):       # absent, or "max"
            continue
        total = limit if total is None else min(total, limit)
    return total


def device_memory(device) -> int | None:
    """Total bytes of memory of `device` (None: the CPU): the ceiling no allocation there can
    pass. None where there is none to exhaust or it is unknown (meta, other device types)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type in ("cpu", "mps"):                  # mps: unified memory
        return _cpu_memory()
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    return None


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"


def check_allocation(what: str, shape, dtype: torch.dtype, device=None, *, copies: int = 1,
                     hint: str = "") -> int:
    """Refuse, before any work, `copies` tensors of `shape` and `dtype` on `device` that could
    never be allocated: more entries than an int64 counts, or more bytes than the device's total
    memory (`device_memory`). `what` names the tensor and the arguments its size comes from;
    `hint` says what to change. Sizes are Python ints: nothing overflows. Returns the bytes.
    Under torch.compile nothing is checked (the traced sizes may be symbolic; eager calls check)."""
    if torch.compiler.is_compiling():
        return 0
    entries = math.prod(int(s) for s in shape)
    itemsize = dtype.itemsize
    nbytes = entries * itemsize * copies
    dims = " × ".join(str(int(s)) for s in shape)
    if entries > MAX_ENTRIES:
        raise ValueError(f"{what} would have {dims} = {entries} entries, more than an int64 can count "
                         f"(2**63 - 1){hint}")
    limit = device_memory(device)
    if limit is not None and nbytes > limit:
        dev = torch.device("cpu") if device is None else torch.device(device)
        times = f"{copies} × " if copies > 1 else ""
        raise ValueError(f"{what} would need {format_bytes(nbytes)} ({times}{dims} {str(dtype).replace('torch.', '')}"
                         f"), more than the {format_bytes(limit)} of memory the {dev} device has in all{hint}")
    return nbytes


def check_projection_size(num_features: int, head_dim: int, dtype: torch.dtype, device=None, *,
                          who: str = "random_features: the projection", names: tuple[str, str] = ("num_features", "head_dim")) -> None:
    """The (num_features, head_dim) FAVOR+ projection: sampled on the CPU in float64 (the rows
    and, with scaling="chi", the Gaussian draw of their norms: 2 copies), then cast to `dtype`
    on `device`."""
    what = f"{who} ({names[0]}={num_features}, {names[1]}={head_dim})"
    hint = f"; use fewer features ({names[0]}) or a smaller {names[1]}"
    check_allocation(what + " sampled in float64 on the CPU", (num_features, head_dim), torch.float64, "cpu",
                     copies=2, hint=hint)
    check_allocation(what, (num_features, head_dim), dtype, device, hint=hint)


def check_feedback_size(feedback, rows: int, dtype: torch.dtype, device, *, who: str = "dfa_feedback") -> None:
    """The (P, rows, d) signals of `feedback` (a FeedbackSpec or a stored tensor) for an error of
    `rows` rows, in `dtype` on `device`: refused before any work if they could never be
    allocated (`check_allocation`). For every backend, before dispatch."""
    P, d = (feedback.points, feedback.dim) if isinstance(feedback, FeedbackSpec) else feedback.shape[:2]
    check_allocation(f"{who}: the signals (P={P}, N={rows}, d={d})", (P, rows, d), dtype, device,
                     hint="; use fewer feedback points, a narrower dim or fewer rows")


def check_seeded_generation(spec: FeedbackSpec, device=None, *, who: str = "materialize_feedback") -> None:
    """The matrices a reference (Python) generation of `spec` computes and holds on `device`
    (None: the CPU): one (dim, error_dim) float32 matrix if spec.shared, else points of them.
    Refused before any is generated if they could never be stored (which also bounds the
    work: the reference's CPU Philox runs at millions, not billions, of entries a second)."""
    n = 1 if spec.shared else spec.points
    what = (f"{who}: the seeded feedback ({'1 shared matrix' if spec.shared else f'points={spec.points} matrices'}"
            f" of dim={spec.dim} × error_dim={spec.error_dim})")
    check_allocation(what, (n, spec.dim, spec.error_dim), torch.float32, device,
                     hint="; use fewer points, a narrower dim or error_dim, or shared=True")
