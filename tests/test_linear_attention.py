"""linear_attention (features given) on every backend (the `backend` fixture) against the float64
brute force okadfa.reference.linear_attention_naive, forward and backward; the registered ops
behind it; and the reference ladder naive → recurrent → chunked. Tolerances: tests/tolerances.py."""
import math

import pytest
import torch

import okadfa
from conftest import backend_info, check_against_float64, check_double_backward, make_features, shape_id
from okadfa.reference import linear_attention_naive
from tolerances import EXACT, REORDERED_GRAD, UNCHANGED, assert_close, assert_rms_close

CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
GRADS = ("dq_feat", "dk_feat", "dv")


def _check(backend, inputs, dtype, causal, **kw):
    check_against_float64(okadfa.linear_attention, linear_attention_naive, backend, inputs, dtype, causal, GRADS,
                          **kw)


# (B, H, T, -, Dv, M, chunk): T = 1; T not a multiple of the chunk; M, Dv not powers of two;
# Dv = 70 > 64 splits the value columns over two Triton programs per head.
SHAPES = [
    (1, 1, 1, 0, 8, 16, 64),
    (1, 2, 63, 0, 20, 37, 64),
    (2, 3, 100, 0, 9, 24, 16),
    (1, 1, 129, 0, 33, 50, 32),
    (2, 2, 37, 0, 20, 21, 16),
    (1, 2, 40, 0, 70, 3, 16),
    (1, 2, 300, 0, 64, 128, 64),
]


@CAUSAL
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_brute_force(backend, causal, shape):
    """In the backend's most precise dtype (float64; float32 on triton)."""
    B, H, T, _, Dv, M, C = shape
    _check(backend, make_features(B, H, T, M, Dv), backend.exact, causal, chunk_size=C)


@CAUSAL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision(backend, dtype, causal):
    backend.skip_unless(dtype)
    _check(backend, make_features(2, 2, 90, 20, 12, seed=1), dtype, causal)


# SHAPES and a size at which every GEMM of a chunk takes the cpu kernels' bfloat16 path.
BF16_SHAPES = SHAPES + [(1, 2, 260, 0, 64, 256, 128)]


@CAUSAL
@pytest.mark.parametrize("shape", BF16_SHAPES, ids=shape_id)
def test_cpu_bfloat16_matches_brute_force(cpu_bf16, causal, shape):
    """As test_favor_attention's: both GEMM paths, every size class, within 2× plain PyTorch's
    bfloat16 error."""
    B, H, T, _, Dv, M, C = shape
    _check(cpu_bf16, make_features(B, H, T, M, Dv), torch.bfloat16, causal, chunk_size=C)


@CAUSAL
def test_gradcheck(backend, causal):
    backend.skip_unless(torch.float64)
    fq, fk, v = backend.put(*make_features(1, 2, 9, 5, 3, seed=2), grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: okadfa.linear_attention(a, b, c, causal=causal, backend=backend.name, chunk_size=4),
        (fq, fk, v))


def test_double_backward_is_exact_or_refused(backend):
    """create_graph=True: the reference (plain PyTorch) gives exact second derivatives
    (gradgradcheck); the kernels' backward is not differentiable, so they refuse, never a
    silent 0."""
    inputs = backend.put(*make_features(1, 2, 7, 4, 2, seed=3), grad=True)
    fn = lambda *x: okadfa.linear_attention(*x, causal=True, backend=backend.name)    # noqa: E731
    check_double_backward(backend, fn, inputs)


def test_causality(backend):
    """Huge later features and values change nothing before them."""
    fq, fk, v = make_features(1, 2, 80, 16, 8, seed=3)
    t = 30
    fk2, v2 = fk.clone(), v.clone()
    fk2[..., t + 1:, :] *= 1e6
    v2[..., t + 1:, :] = -5.0
    a, b = (okadfa.linear_attention(*backend.put(fq, kk, vv), causal=True, backend=backend.name, chunk_size=32)
            for kk, vv in ((fk, v), (fk2, v2)))
    assert_close(b[..., : t + 1, :], a[..., : t + 1, :], UNCHANGED)


@pytest.mark.parametrize("where", ["q_feat", "k_feat", "v"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_causality_with_non_finite_future_inputs(backend, where, bad):
    """A NaN or Inf at position 21 (inside a chunk of 32) leaves every output before it as it was."""
    fq, fk, v = make_features(1, 2, 40, 8, 4, seed=13)
    clean = okadfa.linear_attention(*backend.put(fq, fk, v), causal=True, backend=backend.name, chunk_size=32)
    {"q_feat": fq, "k_feat": fk, "v": v}[where][:, :, 21] = bad
    out = okadfa.linear_attention(*backend.put(fq, fk, v), causal=True, backend=backend.name, chunk_size=32)
    assert_close(out[:, :, :21], clean[:, :, :21], UNCHANGED)
    assert not torch.isfinite(out[:, :, 21]).all()


def test_zero_feature_rows_are_zero(backend):
    """All-zero query features give a 0/0 row: the documented guard returns 0 and no NaN gradient."""
    fq, fk, v = make_features(1, 1, 20, 4, 3, seed=4)
    fq[..., 2, :] = 0.0
    inputs = backend.put(fq, fk, v, grad=True)
    out = okadfa.linear_attention(*inputs, causal=True, backend=backend.name)
    assert (out[..., 2, :] == 0).all() and torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), inputs))


def test_negative_features_rejected():
    fq, fk, v = make_features(1, 1, 5, 4, 3)
    with pytest.raises(ValueError, match="k_feat must be non-negative"):
        okadfa.linear_attention(fq, -fk, v)


@pytest.mark.triton
def test_triton_refuses_float64_before_any_kernel():
    triton = backend_info("triton")
    fq, fk, v = (x.to(triton.device) for x in make_features(1, 1, 8, 4, 4))
    with pytest.raises(TypeError, match="triton backend supports float32, float16 and bfloat16.*float64"):
        okadfa.linear_attention(fq, fk, v, backend="triton")


def test_raw_ops_reject_bad_input_before_any_kernel(backend):
    """As test_favor_attention's: the registered ops check their own arguments."""
    fwd, bwd = backend.op("linear_attention_fwd"), backend.op("linear_attention_bwd")
    fq, fk, v = backend.put(*make_features(1, 2, 8, 5, 3), dtype=torch.float32)
    mask = torch.ones(1, 2, 8, dtype=torch.bool, device=fq.device)
    calls = [
        ("q_feat|q", lambda: fwd(fq.transpose(-1, -2).contiguous().transpose(-1, -2), fk, v, None, True, 16)),
        ("k_feat|k", lambda: fwd(fq, fk[..., :4].contiguous(), v, None, True, 16)),
        ("v", lambda: fwd(fq, fk, v[:, :, :7].contiguous(), None, True, 16)),
        ("key_mask", lambda: fwd(fq, fk, v, mask[:, :, :7].contiguous(), True, 16)),
        ("key_mask", lambda: fwd(fq, fk, v, mask.float(), True, 16)),
        ("chunk_size", lambda: fwd(fq, fk, v, None, True, 0)),
        ("one device", lambda: fwd(fq, fk.to("meta"), v, None, True, 16)),
    ]
    out, lognorm = fwd(fq, fk, v, None, True, 16)
    calls += [("lognorm", lambda: bwd(torch.randn_like(out), fq, fk, v, out, lognorm[:, :1].contiguous(), None, True,
                                      16)),
              ("grad_out", lambda: bwd(torch.randn_like(out)[..., :2].contiguous(), fq, fk, v, out, lognorm, None, True,
                                       16)),
              ("key_mask", lambda: bwd(torch.randn_like(out), fq, fk, v, out, lognorm, mask[:1, :1].contiguous(), True,
                                       16))]
    for name, call in calls:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=rf"okadfa: .*({name})"):
            call()


@CAUSAL
def test_opcheck(backend, causal):
    """Schema, fake tensors, registered autograd and AOT dispatch (not for the Triton ops under
    TRITON_INTERPRET=1: see test_favor_attention.test_opcheck)."""
    fwd, bwd = backend.op("linear_attention_fwd"), backend.op("linear_attention_bwd")
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if backend.name != "triton" or backend.device == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    fq, fk, v = backend.put(*make_features(1, 2, 21, 6, 5), dtype=torch.float32)
    mask = torch.rand(1, 2, 21, generator=torch.Generator().manual_seed(3)).to(fq.device) > 0.3
    for key_mask in (None, mask):
        for requires_grad in (False, True):
            args = [x.clone().requires_grad_(requires_grad) for x in (fq, fk, v)]
            torch.library.opcheck(fwd, (*args, key_mask, causal, 8), test_utils=utils)
        out, lognorm = fwd(fq, fk, v, key_mask, causal, 8)
        torch.library.opcheck(bwd, (torch.randn_like(out), fq, fk, v, out, lognorm, key_mask, causal, 8),
                              test_utils=utils)


def test_torch_compile_fullgraph(backend):
    if backend.name == "triton" and backend.device == "cpu":
        pytest.skip("torch.compile through a triton_op cannot run under TRITON_INTERPRET=1")
    fq, fk, v = backend.put(*make_features(1, 2, 40, 8, 8, seed=5), dtype=torch.float32)
    fn = lambda a, b, c: okadfa.linear_attention(a, b, c, causal=True, backend=backend.name).square().sum()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    grads = []
    for f in (fn, compiled):
        args = [x.clone().requires_grad_() for x in (fq, fk, v)]
        f(*args).backward()
        grads.append([x.grad for x in args])
    for a, e in zip(*grads):
        assert_close(a, e, REORDERED_GRAD)


def test_reference_ladder_naive_recurrent_chunked():
    g = torch.Generator().manual_seed(4)
    fq, fk = (torch.rand(2, 3, 29, 7, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    v = torch.randn(2, 3, 29, 5, generator=g, dtype=torch.float64)
    naive = linear_attention_naive(fq, fk, v, causal=True)
    assert_rms_close(okadfa.reference.linear_attention_recurrent(fq, fk, v), naive, torch.float64, what="recurrent")
    for chunk in (1, 8, 64):
        assert_rms_close(okadfa.reference.linear_attention(fq, fk, v, causal=True, chunk_size=chunk), naive,
                         torch.float64, what=f"chunked {chunk}")


def test_autocast_does_not_change_the_computation(backend):
    """linear_attention takes its inputs' dtype under torch.autocast too: every backend,
    the plain-PyTorch reference included, computes as without autocast."""
    fq, fk, v = backend.put(*make_features(1, 2, 30, 8, 6, seed=9), dtype=torch.float32)
    expected = okadfa.linear_attention(fq, fk, v, causal=True, backend=backend.name)
    with torch.autocast(backend.device, dtype=torch.bfloat16):
        out = okadfa.linear_attention(fq, fk, v, causal=True, backend=backend.name)
    assert out.dtype == torch.float32
    assert_close(out, expected, EXACT)
