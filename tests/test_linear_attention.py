"""linear_attention (features given) on every CPU backend against the float64 brute force."""
import pytest
import torch

import okadfa
from conftest import CPU_BACKENDS, NATIVE_BACKENDS, assert_rms_close, shape_id
from okadfa.reference import linear_attention_naive

SHAPES = [
    (1, 1, 1, 0, 8, 16, 64),
    (1, 2, 63, 0, 20, 37, 64),
    (2, 3, 100, 0, 9, 24, 16),
    (1, 1, 129, 0, 33, 50, 32),
]


def _features(B, H, T, M, Dv, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    fq = torch.nn.functional.elu(torch.randn(B, H, T, M, generator=g, dtype=torch.float64)) + 1
    fk = torch.nn.functional.elu(torch.randn(B, H, T, M, generator=g, dtype=torch.float64)) + 1
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (fq, fk, v)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_brute_force_float64(backend, causal, shape):
    B, H, T, _, Dv, M, C = shape
    fq, fk, v = (x.requires_grad_() for x in _features(B, H, T, M, Dv))
    expected = linear_attention_naive(fq, fk, v, causal=causal)
    out = okadfa.linear_attention(fq, fk, v, causal=causal, backend=backend, chunk_size=C)
    assert_rms_close(out, expected, torch.float64, what="out")
    g = torch.randn_like(expected)
    for name, a, e in zip(("dq_feat", "dk_feat", "dv"), torch.autograd.grad(out, (fq, fk, v), g),
                          torch.autograd.grad(expected, (fq, fk, v), g)):
        assert_rms_close(a, e, torch.float64, grad=True, what=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_float32_and_bfloat16(backend, causal):
    fq, fk, v = _features(2, 2, 90, 20, 12, seed=1)
    expected = linear_attention_naive(fq, fk, v, causal=causal)
    for dtype in (torch.float32, torch.bfloat16):
        out = okadfa.linear_attention(fq.to(dtype), fk.to(dtype), v.to(dtype), causal=causal, backend=backend)
        assert out.dtype == dtype
        assert_rms_close(out, expected, dtype, what=str(dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gradcheck(backend, causal):
    fq, fk, v = (x.requires_grad_() for x in _features(1, 2, 9, 5, 3, seed=2))
    assert torch.autograd.gradcheck(
        lambda a, b, c: okadfa.linear_attention(a, b, c, causal=causal, backend=backend, chunk_size=4), (fq, fk, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_causality(backend):
    fq, fk, v = _features(1, 2, 80, 16, 8, seed=3)
    t = 30
    fk2, v2 = fk.clone(), v.clone()
    fk2[..., t + 1:, :] *= 1e6
    v2[..., t + 1:, :] = -5.0
    a = okadfa.linear_attention(fq, fk, v, causal=True, backend=backend, chunk_size=32)
    b = okadfa.linear_attention(fq, fk2, v2, causal=True, backend=backend, chunk_size=32)
    torch.testing.assert_close(b[..., : t + 1, :], a[..., : t + 1, :], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_weight_rows_are_zero(backend):
    """All-zero features give a 0/0 row: the documented guard returns 0 and no NaN gradient."""
    fq, fk, v = _features(1, 1, 10, 4, 3, seed=4)
    fq[..., 2, :] = 0.0
    fq, fk, v = (x.requires_grad_() for x in (fq, fk, v))
    out = okadfa.linear_attention(fq, fk, v, causal=True, backend=backend)
    assert (out[..., 2, :] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (fq, fk, v))


def test_negative_features_rejected():
    fq, fk, v = _features(1, 1, 5, 4, 3)
    with pytest.raises(ValueError, match="k_feat must be non-negative"):
        okadfa.linear_attention(fq, -fk, v)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_opcheck(causal):
    if not NATIVE_BACKENDS:
        pytest.skip("native extension not built")
    fq, fk, v = _features(1, 2, 21, 6, 5, dtype=torch.float32)
    for requires_grad in (False, True):
        args = [x.clone().requires_grad_(requires_grad) for x in (fq, fk, v)]
        torch.library.opcheck(torch.ops.okadfa.linear_attention_fwd, (*args, causal, 8))
    out, lognorm = torch.ops.okadfa.linear_attention_fwd(fq, fk, v, causal, 8)
    torch.library.opcheck(torch.ops.okadfa.linear_attention_bwd,
                          (torch.randn_like(out), fq, fk, v, out, lognorm, causal, 8))


def test_torch_compile_fullgraph():
    fq, fk, v = _features(1, 2, 40, 8, 8, dtype=torch.float32, seed=5)
    fn = lambda a, b, c: okadfa.linear_attention(a, b, c, causal=True).square().sum()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    grads = []
    for f in (fn, compiled):
        args = [x.clone().requires_grad_() for x in (fq, fk, v)]
        f(*args).backward()
        grads.append([x.grad for x in args])
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_reference_ladder_naive_recurrent_chunked():
    g = torch.Generator().manual_seed(4)
    fq, fk = (torch.rand(2, 3, 29, 7, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    v = torch.randn(2, 3, 29, 5, generator=g, dtype=torch.float64)
    naive = linear_attention_naive(fq, fk, v, causal=True)
    assert_rms_close(okadfa.reference.linear_attention_recurrent(fq, fk, v), naive, torch.float64, what="recurrent")
    for chunk in (1, 8, 64):
        assert_rms_close(okadfa.reference.linear_attention(fq, fk, v, causal=True, chunk_size=chunk), naive,
                         torch.float64, what=f"chunked {chunk}")
