"""Helpers shared by the Triton kernels of every op (okadfa.kernels.<op>)."""
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


__all__ = ["triton_op", "wrap_triton", "SUPPORTED", "INTERPRETED", "dot_f32", "pow2", "fp32_dot", "check_dtypes",
           "check_positive"]
