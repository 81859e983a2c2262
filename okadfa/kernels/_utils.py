"""Helpers shared by the Triton kernels of every op (okadfa.kernels.<op>)."""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# torch < 2.6 has no triton_op/wrap_triton: a plain custom op launching the kernels directly
triton_op = getattr(torch.library, "triton_op", None) or torch.library.custom_op
wrap_triton = getattr(torch.library, "wrap_triton", lambda kernel: kernel)

SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def dot_f32(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a·b in float32: IEEE float32 products (no TF32), or the native dot of two 16-bit operands."""
    if FP32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


INTERPRETED = not isinstance(dot_f32, triton.runtime.JITFunction)   # TRITON_INTERPRET=1


def pow2(n: int, lo: int, hi: int) -> int:
    """The power of two ≥ n, clamped to [lo, hi] (block sizes: tl.dot needs ≥ 16)."""
    return min(max(triton.next_power_of_2(max(n, 1)), lo), hi)


def fp32_dot(*dtypes: torch.dtype) -> bool:
    """False when every operand has one 16-bit dtype (native dot, exact products), except under
    the interpreter, whose dot multiplies bfloat16 operands as their raw uint16 bits."""
    return INTERPRETED or not (len(set(dtypes)) == 1 and dtypes[0] in (torch.float16, torch.bfloat16))


def check_dtypes(**tensors: Tensor) -> None:
    """The raw triton ops' own dtype check (okadfa.ops validates before calling them)."""
    for name, x in tensors.items():
        if x.dtype not in SUPPORTED:
            raise TypeError(f"okadfa: the triton backend supports float32, float16 and bfloat16, but {name} is "
                            f"{x.dtype} (use backend='cpu', 'cuda' or 'reference' for float64)")


def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"okadfa: {name} must be positive, got {value}")


# The raw ops' own argument checks, run before any launch: okadfa.ops validates (and broadcasts,
# casts, makes contiguous) before calling them, but torch.ops.okadfa.triton_* can be called
# directly, and a kernel given a wrong shape or stride reads and writes out of bounds. The same
# rules as the native ops' csrc/checks.h, raised as ValueError/TypeError.

def check_tensor(x: Tensor, name: str, shape: Tuple[Optional[int], ...], like: Tensor) -> None:
    """x is a contiguous tensor on like's device with len(shape) dimensions, each equal to the
    given size (None: any)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"okadfa: {name} must be a tensor, got {type(x).__name__}")
    if x.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"okadfa: {name} must have shape {want}, got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"okadfa: {name} is on {x.device} but expected {like.device}")
    if not x.is_contiguous():
        raise ValueError(f"okadfa: {name} must be contiguous (the okadfa.* ops make it so), got strides {x.stride()}")


def check_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, projection: Optional[Tensor] = None,
                    scale: float = 1.0) -> None:
    """q, k (B, H, T, DQ), v (B, H, T, Dv), projection (M, DQ) when given; chunk_size in
    [1, 1024], scale positive and finite."""
    check_tensor(q, "q", (None,) * 4, q)
    B, H, T, DQ = q.shape
    check_tensor(k, "k", (B, H, T, DQ), q)
    check_tensor(v, "v", (B, H, T, None), q)
    if projection is not None:
        check_tensor(projection, "projection", (None, DQ), q)
        if projection.shape[0] < 1:
            raise ValueError("okadfa: projection must have at least one row")
    if not 1 <= chunk_size <= 1024:
        raise ValueError(f"okadfa: chunk_size must be in [1, 1024], got {chunk_size}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"okadfa: scale must be positive and finite, got {scale}")


def check_key_mask(key_mask: Optional[Tensor], q: Tensor) -> None:
    """key_mask: None, or a contiguous bool (B, H, T) tensor over q's first three dimensions."""
    if key_mask is None:
        return
    check_tensor(key_mask, "key_mask", tuple(q.shape[:3]), q)
    if key_mask.dtype != torch.bool:
        raise TypeError(f"okadfa: key_mask must be bool (True = a real key), got {key_mask.dtype}")


def check_saved(grad_out: Tensor, q: Tensor, v: Tensor, out: Tensor, lognorm: Tensor) -> None:
    """A backward op's saved tensors: grad_out and out like v, lognorm float32 (B, H, T)."""
    check_tensor(grad_out, "grad_out", tuple(v.shape), q)
    check_tensor(out, "out", tuple(v.shape), q)
    check_tensor(lognorm, "lognorm", tuple(q.shape[:3]), q)
    if lognorm.dtype != torch.float32:
        raise TypeError(f"okadfa: lognorm must be float32 (as the forward returns it), got {lognorm.dtype}")


def holds_data(x: Tensor) -> bool:
    """x is an eager tensor whose values can be read (not a fake or functional tensor that
    torch.compile traces with): data-dependent checks run only then."""
    return type(x) in (Tensor, torch.nn.Parameter) and x.device.type != "meta" and not torch.compiler.is_compiling()


__all__ = ["triton_op", "wrap_triton", "SUPPORTED", "INTERPRETED", "dot_f32", "pow2", "fp32_dot", "check_dtypes",
           "check_positive", "check_tensor", "check_attention", "check_key_mask", "check_saved", "holds_data"]
