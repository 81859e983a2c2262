"""The triton backend of favor_attention and linear_attention (kernels/favor_attention.py)
against the float64 brute force of conftest, forward and backward. Runs on a CUDA GPU, or on
the CPU under TRITON_INTERPRET=1 (small shapes: the interpreter is slow).

Tolerances: relative RMS error against float64 on the same (rounded) inputs, conftest's
RMS_TOL / GRAD_RMS_TOL: float32 3e-6 (outputs) and 3e-5 (gradients), bfloat16 2e-2 and 6e-2,
float16 4e-3 and 2e-2.
"""
import math
import os

import pytest
import torch

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (the CPU interpreter)",
                allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

import okadfa  # noqa: E402
from conftest import assert_rms_close, make_inputs, shape_id  # noqa: E402
from okadfa.reference import favor_attention_naive, linear_attention_naive  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])

# (B, H, T, Dk, Dv, M, chunk): T = 1; T not a multiple of the chunk (3 chunks); M, Dk, Dv not
# powers of two; Dv = 70 > 64 splits the value columns over two programs per head.
SHAPES = [
    (1, 1, 1, 8, 8, 16, 64),
    (2, 2, 37, 12, 20, 21, 16),
    (1, 2, 40, 5, 70, 3, 16),
]


def _on_device(dtype, *xs):
    return [x.detach().to(device=DEVICE, dtype=dtype).requires_grad_() for x in xs]


def _check(actual, expected, dtype, grads_of, grads_ref, names):
    """Output and gradients against float64 (grads_ref in float64) at dtype's tolerance.
    At T = 1 (out = v) every gradient but dv is exactly 0: those must be 0 up to the rounding
    of g·(v − out), O(eps) absolute (a relative error to 0 means nothing)."""
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert_rms_close(actual, expected, dtype, what="out")
    for name, a, e in zip(names, grads_of, grads_ref):
        assert a.dtype == dtype and a.shape == e.shape, name
        if expected.shape[2] == 1 and name != "dv":
            assert e.abs().max() <= 1e-12 and a.abs().max() <= 1e-5, name
        else:
            assert_rms_close(a, e, dtype, grad=True, what=name)


def _favor_case(shape, causal, dtype, seed=0, **kw):
    B, H, T, Dk, Dv, M, C = shape
    inputs = _on_device(dtype, *make_inputs(B, H, T, Dk, Dv, M, seed=seed, **kw))
    exact = [x.detach().double().requires_grad_() for x in inputs]        # the same rounded values
    expected = favor_attention_naive(*exact, causal=causal)
    out = okadfa.favor_attention(*inputs, causal=causal, backend="triton", chunk_size=C)
    g = torch.randn_like(expected)
    _check(out, expected, dtype, torch.autograd.grad(out, inputs, g.to(dtype)),
           torch.autograd.grad(expected, exact, g), ("dq", "dk", "dv", "dprojection"))


def _features(B, H, T, M, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    fq = torch.nn.functional.elu(torch.randn(B, H, T, M, generator=g, dtype=torch.float64)) + 1
    fk = torch.nn.functional.elu(torch.randn(B, H, T, M, generator=g, dtype=torch.float64)) + 1
    return fq, fk, torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)


def _linear_case(shape, causal, dtype, seed=0):
    B, H, T, _, Dv, M, C = shape
    inputs = _on_device(dtype, *_features(B, H, T, M, Dv, seed))
    exact = [x.detach().double().requires_grad_() for x in inputs]
    expected = linear_attention_naive(*exact, causal=causal)
    out = okadfa.linear_attention(*inputs, causal=causal, backend="triton", chunk_size=C)
    g = torch.randn_like(expected)
    _check(out, expected, dtype, torch.autograd.grad(out, inputs, g.to(dtype)),
           torch.autograd.grad(expected, exact, g), ("dq_feat", "dk_feat", "dv"))


@CAUSAL
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_favor_float32(shape, causal):
    _favor_case(shape, causal, torch.float32)


@CAUSAL
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_linear_float32(shape, causal):
    _linear_case(shape, causal, torch.float32)


@CAUSAL
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision(dtype, causal):
    """16-bit inputs stay 16-bit (output and gradients), float32 inside."""
    _favor_case((1, 2, 50, 16, 12, 24, 16), causal, dtype, seed=1)
    _linear_case((1, 2, 50, 0, 12, 24, 16), causal, dtype, seed=1)


@CAUSAL
def test_lognorm_is_the_log_normaliser(causal):
    """lognorm_t = log Σ_{s, m} exp(√s·q_t·w_m + √s·k_s·w_m − s‖k_s‖²/2) over s ≤ t (causal):
    the normaliser up to log M + ‖q̂‖²/2, whatever the chunking and stabilisers."""
    q, k, v, w = make_inputs(1, 2, 37, 12, 9, 21, seed=2)
    scale = 0.3
    s = math.sqrt(scale)
    lq = (q * s) @ w.T
    lk = (k * s) @ w.T - (k * k).sum(-1, keepdim=True) * (scale / 2)
    pair = torch.logsumexp(lq[..., :, None, :] + lk[..., None, :, :], dim=-1)          # (t, s)
    if causal:
        pair = pair.masked_fill(~torch.ones(37, 37, dtype=torch.bool).tril(), -math.inf)
    expected = torch.logsumexp(pair, dim=-1)
    for chunk in (16, 64):
        _, lognorm = torch.ops.okadfa.triton_favor_attention_fwd(
            *(x.to(device=DEVICE, dtype=torch.float32) for x in (q, k, v, w)), causal, scale, chunk)
        torch.testing.assert_close(lognorm.double().cpu(), expected, rtol=1e-6, atol=1e-5)


def test_chunk_size_does_not_change_the_result():
    """chunk_size 1 … 1024 maps to BLOCK_T 16 … 128: the same attention up to rounding."""
    q, k, v, w = _on_device(torch.float32, *make_inputs(1, 1, 70, 8, 8, 12, seed=3))
    outs = [okadfa.favor_attention(q, k, v, w, causal=True, backend="triton", chunk_size=c) for c in (1, 33, 1024)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)


def test_causality_with_dominating_future_keys():
    """Outputs and input gradients at positions ≤ t ignore everything after t, even when the
    later keys' log-features exceed the earlier ones by more than float32's exponent range."""
    q, k, v, w = make_inputs(1, 2, 48, 16, 8, 32, dtype=torch.float32, seed=4)
    t = 20
    k = k * (32.0 / k.norm(dim=-1, keepdim=True))                        # log-features ≪ 0
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    k2[..., t + 1:, :] = w[w.norm(dim=1).argmax()] * 16 ** 0.25           # w_m·k̂ − ‖k̂‖²/2 = ‖w_m‖²/2
    v2[..., t + 1:, :] = 1e4
    q2[..., t + 1:, :] = -q2[..., t + 1:, :]
    outs, grads = [], []
    for inputs in ((q, k, v), (q2, k2, v2)):
        qq, kk, vv = _on_device(torch.float32, *inputs)
        out = okadfa.favor_attention(qq, kk, vv, w.to(DEVICE), causal=True, backend="triton", chunk_size=16)
        mask = torch.zeros_like(out)
        mask[..., : t + 1, :] = 1.0
        grads.append(torch.autograd.grad((out * mask).sum(), (qq, kk, vv)))
        outs.append(out.detach())
    assert torch.isfinite(outs[0]).all() and (outs[0][..., : t + 1, :].abs().sum(-1) > 0).all()
    torch.testing.assert_close(outs[1][..., : t + 1, :], outs[0][..., : t + 1, :], rtol=1e-6, atol=1e-6)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1[..., : t + 1, :], g0[..., : t + 1, :], rtol=1e-6, atol=1e-6)
    # linear_attention: huge later features and values change nothing before them either
    fq, fk, fv = _features(1, 2, 48, 16, 8, seed=4)
    fk2, fv2 = fk.clone(), fv.clone()
    fk2[..., t + 1:, :] *= 1e6
    fv2[..., t + 1:, :] = -5.0
    a, b = (okadfa.linear_attention(*_on_device(torch.float32, fq, kk, vv), causal=True, backend="triton",
                                    chunk_size=16).detach() for kk, vv in ((fk, fv), (fk2, fv2)))
    torch.testing.assert_close(b[..., : t + 1, :], a[..., : t + 1, :], rtol=1e-6, atol=1e-6)


@CAUSAL
def test_large_magnitudes(causal):
    """|q|, |k| ~ 10: unstabilised logits of ±40 leave float32's exp range, the running key
    stabiliser keeps float32 accurate; |q|, |k| ~ 30: rows may hit the underflow guard, but
    outputs and gradients stay finite."""
    q, k, v, w = make_inputs(1, 2, 40, 16, 8, 32, seed=5, magnitude=10.0)
    expected = okadfa.reference.favor_attention(q, k, v, w, causal=causal)
    out = okadfa.favor_attention(*_on_device(torch.float32, q, k, v, w), causal=causal, backend="triton",
                                 chunk_size=16)
    assert_rms_close(out, expected, torch.float32)
    inputs = _on_device(torch.float32, *make_inputs(1, 2, 40, 16, 8, 32, seed=5, magnitude=30.0))
    out = okadfa.favor_attention(*inputs, causal=causal, backend="triton", chunk_size=16)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out, inputs, torch.randn_like(out)))


def test_zero_feature_rows_are_zero():
    """Given features with an all-zero query row: 0/0 → 0 and no NaN gradient (the guard)."""
    fq, fk, v = _features(1, 1, 20, 4, 3, seed=6)
    fq[..., 2, :] = 0.0
    inputs = _on_device(torch.float32, fq, fk, v)
    out = okadfa.linear_attention(*inputs, causal=True, backend="triton")
    assert (out[..., 2, :] == 0).all() and torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), inputs))


def test_non_contiguous_broadcast_and_grouped_query_inputs():
    q, _, _, w = make_inputs(2, 4, 30, 8, 6, 12, seed=7)
    _, k, v, _ = make_inputs(2, 2, 30, 8, 6, 12, seed=8)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)                    # strided views
    wt = w.T.contiguous().T
    assert not qt.is_contiguous() and not wt.is_contiguous()
    for kk, vv, expand in ((k, v, lambda x: x.repeat_interleave(2, dim=1)),          # GQA: 2 kv heads
                           (k[:1, :1], v[:1, :1], lambda x: x.expand(2, 4, -1, -1))):   # broadcast B and H
        inputs = _on_device(torch.float32, qt, kk, vv, wt)
        exact = [x.detach().double().requires_grad_() for x in inputs]
        expected = favor_attention_naive(exact[0], expand(exact[1]), expand(exact[2]), exact[3], causal=True)
        out = okadfa.favor_attention(*inputs, causal=True, backend="triton", chunk_size=16)
        g = torch.randn_like(expected)
        grads = torch.autograd.grad(out, inputs, g.float())
        _check(out, expected, torch.float32, grads, torch.autograd.grad(expected, exact, g),
               ("dq", "dk", "dv", "dprojection"))
        assert grads[1].shape == kk.shape and grads[2].shape == vv.shape


def test_float64_is_refused_before_any_kernel():
    q, k, v, w = (x.to(DEVICE) for x in make_inputs(1, 1, 8, 4, 4, 6))
    with pytest.raises(TypeError, match="triton backend supports float32, float16 and bfloat16.*float64"):
        okadfa.favor_attention(q, k, v, w, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        okadfa.linear_attention(q.abs(), k.abs(), v, backend="triton")
    with pytest.raises(TypeError, match="projection is torch.float64"):
        torch.ops.okadfa.triton_favor_attention_fwd(q.float(), k.float(), v.float(), w, True, 0.5, 16)


@CAUSAL
def test_opcheck(causal):
    """Schema, fake tensors and registered autograd; on a GPU also AOT dispatch (triton_op's
    decomposition into the kernels, what torch.compile traces), which the interpreter lacks:
    there wrap_triton hands back the plain interpreted kernel, which cannot run on fake tensors."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    q, k, v, w = (x.to(DEVICE) for x in make_inputs(1, 2, 20, 8, 5, 12, dtype=torch.float32, seed=9))
    args = [x.clone().requires_grad_() for x in (q, k, v, w)]
    torch.library.opcheck(torch.ops.okadfa.triton_favor_attention_fwd, (*args, causal, 0.3, 16), test_utils=utils)
    out, lognorm = torch.ops.okadfa.triton_favor_attention_fwd(q, k, v, w, causal, 0.3, 16)
    torch.library.opcheck(torch.ops.okadfa.triton_favor_attention_bwd,
                          (torch.randn_like(out), q, k, v, w, out, lognorm, causal, 0.3, 16, True), test_utils=utils)
    fq, fk = q.abs(), k.abs()
    args = [x.clone().requires_grad_() for x in (fq, fk, v)]
    torch.library.opcheck(torch.ops.okadfa.triton_linear_attention_fwd, (*args, causal, 16), test_utils=utils)
    out, lognorm = torch.ops.okadfa.triton_linear_attention_fwd(fq, fk, v, causal, 16)
    torch.library.opcheck(torch.ops.okadfa.triton_linear_attention_bwd,
                          (torch.randn_like(out), fq, fk, v, out, lognorm, causal, 16), test_utils=utils)
