"""The cuda backend (csrc/cuda/) of favor_attention and linear_attention against the float64
brute force, forward and backward. Runs only where okadfa._C was built with CUDA and a GPU is
present; elsewhere it is skipped with the reason (tests/test_cuda_sources.py checks the kernels'
sources and their host-side logic on any machine with nvcc).

Tolerances: conftest's RMS_TOL / GRAD_RMS_TOL (float64 1e-11 and 1e-10, float32 3e-6 and 3e-5).
"""
import pytest
import torch

import okadfa
from conftest import assert_rms_close, make_inputs, shape_id
from okadfa.reference import favor_attention_naive, linear_attention_naive

_STATUS = okadfa.backends()["cuda"]
if not _STATUS["available"]:
    pytest.skip(f"cuda backend: {_STATUS['reason']}", allow_module_level=True)

CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
# T = 1; T not a multiple of the chunk; M, Dk, Dv not powers of two; a longer sequence.
SHAPES = [(1, 1, 1, 8, 8, 16, 64), (2, 3, 77, 12, 20, 21, 32), (1, 2, 300, 64, 64, 128, 64)]


def _grads_close(out, expected, inputs, exact, dtype):
    assert out.dtype == dtype and out.device.type == "cuda"
    assert_rms_close(out.cpu(), expected, dtype, what="out")
    g = torch.randn_like(expected)
    got = torch.autograd.grad(out, inputs, g.to(device="cuda", dtype=dtype))
    want = torch.autograd.grad(expected, exact, g)
    for i, (a, e) in enumerate(zip(got, want)):
        if expected.shape[2] == 1 and e.abs().max() <= 1e-12:      # T = 1: exactly-zero gradients
            assert a.abs().max() <= 1e-5, i
        else:
            assert_rms_close(a.cpu(), e, dtype, grad=True, what=f"grad {i}")


@CAUSAL
@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_favor_attention_cuda(shape, dtype, causal):
    B, H, T, Dk, Dv, M, C = shape
    exact = [x.requires_grad_() for x in make_inputs(B, H, T, Dk, Dv, M)]
    inputs = [x.detach().to("cuda", dtype).requires_grad_() for x in exact]
    out = okadfa.favor_attention(*inputs, causal=causal, backend="cuda", chunk_size=C)
    _grads_close(out, favor_attention_naive(*exact, causal=causal), inputs, exact, dtype)


@CAUSAL
@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_linear_attention_cuda(shape, dtype, causal):
    B, H, T, _, Dv, M, C = shape
    g = torch.Generator().manual_seed(0)
    exact = [torch.nn.functional.elu(torch.randn(B, H, T, M, generator=g, dtype=torch.float64)) + 1
             for _ in range(2)] + [torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)]
    exact = [x.requires_grad_() for x in exact]
    inputs = [x.detach().to("cuda", dtype).requires_grad_() for x in exact]
    out = okadfa.linear_attention(*inputs, causal=causal, backend="cuda", chunk_size=C)
    _grads_close(out, linear_attention_naive(*exact, causal=causal), inputs, exact, dtype)


def test_causality_cuda():
    q, k, v, w = (x.to("cuda", torch.float32) for x in make_inputs(1, 2, 128, 16, 16, 32, magnitude=2.0))
    out = okadfa.favor_attention(q, k, v, w, causal=True, backend="cuda", chunk_size=32)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 70:] *= 5.0          # later keys that would dominate a sequence-wide stabiliser
    v2[:, :, 70:] = 3.0
    out2 = okadfa.favor_attention(q, k2, v2, w, causal=True, backend="cuda", chunk_size=32)
    torch.testing.assert_close(out[:, :, :70], out2[:, :, :70], rtol=1e-6, atol=1e-6)
