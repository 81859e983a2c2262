"""favor_attention on every CPU backend against the float64 brute force and the reference."""
import math

import pytest
import torch

import okadfa
from conftest import (CPU_BACKENDS, NATIVE_BACKENDS, assert_rms_close, make_inputs,
                      rms_error, shape_id)
from okadfa.reference import favor_attention_naive

# (B, H, T, Dk, Dv, M, chunk): odd sizes, T = 1, T not a multiple of the chunk,
# M and D not powers of two, B·H below and above the thread count.
SHAPES = [
    (1, 1, 1, 8, 8, 16, 64),
    (1, 1, 63, 24, 20, 37, 64),
    (2, 3, 100, 16, 9, 24, 16),
    (1, 2, 64, 16, 16, 40, 64),
    (1, 1, 129, 12, 33, 50, 32),
    (2, 2, 70, 5, 7, 3, 7),
]


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_brute_force_float64(backend, causal, shape):
    B, H, T, Dk, Dv, M, C = shape
    q, k, v, w = (x.requires_grad_() for x in make_inputs(B, H, T, Dk, Dv, M))
    expected = favor_attention_naive(q, k, v, w, causal=causal)
    out = okadfa.favor_attention(q, k, v, w, causal=causal, backend=backend, chunk_size=C)
    assert out.dtype == torch.float64 and out.shape == (B, H, T, Dv)
    assert_rms_close(out, expected, torch.float64, what="out")
    g = torch.randn_like(expected)
    for name, a, e in zip("qkvw", _grads(out, (q, k, v, w), g), _grads(expected, (q, k, v, w), g)):
        assert_rms_close(a, e, torch.float64, grad=True, what=f"d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_low_precision_against_float64(backend, dtype, causal):
    q, k, v, w = make_inputs(2, 2, 150, 32, 24, 48, seed=1)
    expected = okadfa.reference.favor_attention(*(x.requires_grad_() for x in (q, k, v, w)), causal=causal)
    low = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, w)]
    out = okadfa.favor_attention(*low, causal=causal, backend=backend)
    assert out.dtype == dtype
    assert_rms_close(out, expected, dtype, what="out")
    g = torch.randn_like(expected)
    for name, a, e in zip("qkvw", _grads(out, low, g.to(dtype)), _grads(expected, (q, k, v, w), g)):
        assert a.dtype == dtype
        assert_rms_close(a, e, dtype, grad=True, what=f"d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gradcheck(backend, causal):
    q, k, v, w = (x.requires_grad_() for x in make_inputs(1, 2, 11, 4, 3, 5, seed=2))
    fn = lambda q, k, v, w: okadfa.favor_attention(q, k, v, w, causal=causal, backend=backend, chunk_size=4)
    assert torch.autograd.gradcheck(fn, (q, k, v, w))


def _dominating_future(q, k, v, w, t, scale):
    """Keys of norm 32 (log-features far below 0), then future keys aligned with
    the longest feature row w_m, scaled to maximise w_m·k̂ − ‖k̂‖²/2 = ‖w_m‖²/2 > 0:
    the future keys' log-features exceed the past ones by more than float32's exp
    range, so a stabiliser shared across positions would wipe out the past."""
    k = k * (32.0 / k.norm(dim=-1, keepdim=True))
    wm = w[w.norm(dim=1).argmax()]
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    k2[..., t + 1:, :] = wm / scale ** 0.5
    v2[..., t + 1:, :] = 1e4
    q2[..., t + 1:, :] = -q2[..., t + 1:, :]
    return k, (q2, k2, v2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_causality_with_dominating_future_keys(backend, dtype):
    """Outputs (and input gradients) at positions <= t ignore everything after t,
    even when later keys dominate every earlier one by more than the dtype's
    exponent range (a non-causal stabiliser would underflow the earlier weights)."""
    q, k, v, w = make_inputs(1, 2, 96, 16, 8, 32, dtype=dtype, seed=3)
    t = 40
    k, changed = _dominating_future(q, k, v, w, t, 16 ** -0.5)
    outs, grads = [], []
    for qq, kk, vv in ((q, k, v), changed):
        qq, kk, vv = (x.clone().requires_grad_() for x in (qq, kk, vv))
        out = okadfa.favor_attention(qq, kk, vv, w, causal=True, backend=backend, chunk_size=32)
        mask = torch.zeros_like(out)
        mask[..., : t + 1, :] = 1.0
        grads.append(torch.autograd.grad((out * mask).sum(), (qq, kk, vv)))
        outs.append(out.detach())
    assert torch.isfinite(outs[0]).all() and (outs[0][..., : t + 1, :].abs().sum(-1) > 0).all()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[1][..., : t + 1, :], outs[0][..., : t + 1, :], **tol)
    for g0, g1 in zip(grads[0], grads[1]):
        torch.testing.assert_close(g1[..., : t + 1, :], g0[..., : t + 1, :], **tol)


def test_causality_check_detects_a_sequence_wide_stabiliser():
    """The setting above really separates the two: with one maximum over the whole
    sequence (what causality forbids) the past outputs change."""
    q, k, v, w = make_inputs(1, 2, 96, 16, 8, 32, dtype=torch.float32, seed=3)
    t = 40
    k, (q2, k2, v2) = _dominating_future(q, k, v, w, t, 16 ** -0.5)

    def global_max_attention(q, k, v):
        s = 16 ** -0.25
        lq, lk = (q * s) @ w.T, (k * s) @ w.T - (k * k).sum(-1, keepdim=True) * (16 ** -0.5 / 2)
        fq, fk = torch.exp(lq - lq.amax(-1, keepdim=True)), torch.exp(lk - lk.amax((-1, -2), keepdim=True))
        a = (fq @ fk.transpose(-1, -2)).tril()
        return (a @ v) / a.sum(-1, keepdim=True).clamp_min(1e-30)

    before, after = global_max_attention(q, k, v), global_max_attention(q2, k2, v2)
    assert (after[..., : t + 1, :] - before[..., : t + 1, :]).abs().max() > 0.1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_large_magnitude_float32(backend, causal):
    """|q|, |k| ~ 10 puts the unstabilised feature logits (±40) outside fp32's exp
    range: the stabilised kernels stay accurate and each output stays inside the
    convex hull of the values it attends to."""
    q, k, v, w = make_inputs(1, 2, 130, 16, 8, 32, seed=4, magnitude=10.0)
    expected = okadfa.reference.favor_attention(q, k, v, w, causal=causal)
    q, k, v = (x.float().requires_grad_() for x in (q, k, v))
    out = okadfa.favor_attention(q, k, v, w.float(), causal=causal, backend=backend)
    assert_rms_close(out, expected, torch.float32)
    hi = (torch.cummax(v, dim=2).values if causal else v.amax(2, keepdim=True)).detach()
    lo = (-torch.cummax(-v, dim=2).values if causal else v.amin(2, keepdim=True)).detach()
    assert (out <= hi + 1e-5).all() and (out >= lo - 1e-5).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_extreme_magnitude_float32_stays_finite(backend, causal):
    """|q|, |k| ~ 30 (logits beyond ±1000): fp32 cannot represent the weight
    ratios any more, but outputs and gradients must stay finite (no NaN/Inf)."""
    q, k, v, w = make_inputs(1, 2, 130, 16, 8, 32, dtype=torch.float32, seed=4, magnitude=30.0)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = okadfa.favor_attention(q, k, v, w, causal=causal, backend=backend)
    assert torch.isfinite(out).all()
    out.backward(torch.randn_like(out))
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()


def test_approximation_of_softmax_improves_with_features():
    """E[φ(q̂)·φ(k̂)] = exp(scale·q·k): the error to exact softmax attention falls as M grows."""
    q, k, v, _ = make_inputs(1, 4, 64, 16, 16, 16, seed=5, magnitude=0.7)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    errors = []
    for M in (8, 64, 512):
        errs = [rms_error(okadfa.favor_attention(q, k, v, okadfa.random_features(
            M, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), causal=True), exact)
            for seed in range(4)]
        errors.append(sum(errs) / len(errs))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.5 * errors[0], errors


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_broadcast_inputs(backend):
    q, k, v, w = make_inputs(2, 3, 40, 8, 6, 12, seed=6)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)          # a strided view
    k1, v1 = k[:, :1], v[:, :1]                                   # one k/v head broadcast to all
    wt = w.T.contiguous().T
    assert not qt.is_contiguous() and not wt.is_contiguous()
    out = okadfa.favor_attention(qt, k1, v1, wt, causal=True, backend=backend, chunk_size=16)
    expected = okadfa.reference.favor_attention(q, k1.expand_as(k), v1.expand_as(v), w, causal=True)
    assert_rms_close(out, expected, torch.float64)
    # Gradients of broadcast inputs are summed over the broadcast heads.
    k1g, v1g = k1.clone().requires_grad_(), v1.clone().requires_grad_()
    g = torch.randn_like(expected)
    got = torch.autograd.grad(okadfa.favor_attention(q, k1g, v1g, w, causal=True, backend=backend), (k1g, v1g), g)
    k1r, v1r = k1.clone().requires_grad_(), v1.clone().requires_grad_()
    ref = torch.autograd.grad(favor_attention_naive(q, k1r.expand_as(k), v1r.expand_as(v), w, causal=True), (k1r, v1r), g)
    for a, e in zip(got, ref):
        assert a.shape == k1.shape[:3] + a.shape[3:]
        assert_rms_close(a, e, torch.float64, grad=True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bh", [(1, 1), (1, 3)], ids=["BH1", "BH3"])
def test_native_thread_counts_agree(threads, bh):
    """Heads in parallel, and value columns split across threads when B·H is small."""
    if not NATIVE_BACKENDS:
        pytest.skip("native extension not built")
    q, k, v, w = (x.requires_grad_() for x in make_inputs(*bh, 90, 16, 40, 24, seed=7))
    expected = favor_attention_naive(q, k, v, w, causal=True)
    g = torch.randn_like(expected)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = okadfa.favor_attention(q, k, v, w, causal=True, backend="cpu", chunk_size=32)
        grads = _grads(out, (q, k, v, w), g)
    finally:
        torch.set_num_threads(old)
    assert_rms_close(out, expected, torch.float64)
    for a, e in zip(grads, _grads(expected, (q, k, v, w), g)):
        assert_rms_close(a, e, torch.float64, grad=True)


def test_default_scale_and_explicit_scale():
    q, k, v, w = make_inputs(1, 1, 20, 9, 4, 10, seed=8)
    a = okadfa.favor_attention(q, k, v, w, causal=True)
    b = okadfa.favor_attention(q, k, v, w, causal=True, scale=9 ** -0.5)
    c = okadfa.favor_attention(q, k, v, w, causal=True, scale=0.05)
    torch.testing.assert_close(a, b)
    assert_rms_close(c, favor_attention_naive(q, k, v, w, causal=True, scale=0.05), torch.float64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_opcheck(causal):
    if not NATIVE_BACKENDS:
        pytest.skip("native extension not built")
    q, k, v, w = make_inputs(1, 2, 33, 8, 5, 12, dtype=torch.float32, seed=9)
    for requires_grad in (False, True):
        args = [x.clone().requires_grad_(requires_grad) for x in (q, k, v, w)]
        torch.library.opcheck(torch.ops.okadfa.favor_attention_fwd, (*args, causal, 0.3, 16))
    out, lognorm = torch.ops.okadfa.favor_attention_fwd(q, k, v, w, causal, 0.3, 16)
    torch.library.opcheck(torch.ops.okadfa.favor_attention_bwd,
                          (torch.randn_like(out), q, k, v, w, out, lognorm, causal, 0.3, 16, True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    q, k, v, w = make_inputs(2, 2, 48, 8, 8, 16, dtype=torch.float32, seed=10)

    def loss(q, k, v, w):
        out = okadfa.favor_attention(q, k, v, w, causal=True, backend=backend)
        return out, out.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    results = []
    for fn in (loss, compiled):
        args = [x.clone().requires_grad_() for x in (q, k, v)] + [w]
        out, value = fn(*args)
        value.backward()
        results.append((out.detach(), [x.grad for x in args[:3]]))
    (eager_out, eager_grads), (out, grads) = results
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_raw_op_rejects_bad_input_clearly():
    if not NATIVE_BACKENDS:
        pytest.skip("native extension not built")
    q, k, v, w = make_inputs(1, 1, 8, 4, 4, 6, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        torch.ops.okadfa.favor_attention_fwd(q.transpose(2, 3), k, v, w, True, 0.5, 64)
    with pytest.raises(RuntimeError, match="projection has size"):
        torch.ops.okadfa.favor_attention_fwd(q, k, v, w[:, :3].contiguous(), True, 0.5, 64)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.okadfa.favor_attention_fwd(*(x.half() for x in (q, k, v, w)), True, 0.5, 64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grouped_query_attention(backend):
    """k/v with Hkv heads serve groups of Hq/Hkv consecutive q heads, as SDPA's enable_gqa."""
    q, _, _, w = make_inputs(2, 6, 30, 8, 5, 12, seed=11)
    _, k, v, _ = make_inputs(2, 2, 30, 8, 5, 12, seed=12)
    k, v = (x.requires_grad_() for x in (k, v))
    out = okadfa.favor_attention(q, k, v, w, causal=True, backend=backend)
    expected = favor_attention_naive(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), w, causal=True)
    assert_rms_close(out, expected, torch.float64)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (k, v), g), torch.autograd.grad(expected, (k, v), g)):
        assert a.shape == (2, 2, 30, a.shape[-1])
        assert_rms_close(a, e, torch.float64, grad=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_or_heads(backend):
    q, k, v, w = make_inputs(2, 3, 10, 4, 5, 6, dtype=torch.float32)
    assert okadfa.favor_attention(q[:0], k[:0], v[:0], w, causal=True, backend=backend).shape == (0, 3, 10, 5)
    assert okadfa.favor_attention(q[:, :0], k[:, :0], v[:, :0], w, backend=backend).shape == (2, 0, 10, 5)


def test_reference_ladder_naive_recurrent_chunked():
    # Each rung of okadfa.reference against the one below it, in float64 (module docstring there).
    q, k, v, w = make_inputs(2, 3, 37, 8, 5, 16, seed=3)
    naive = favor_attention_naive(q, k, v, w, causal=True)
    assert_rms_close(okadfa.reference.favor_attention_recurrent(q, k, v, w), naive, torch.float64, what="recurrent")
    for chunk in (1, 8, 64):
        assert_rms_close(okadfa.reference.favor_attention(q, k, v, w, causal=True, chunk_size=chunk), naive,
                         torch.float64, what=f"chunked {chunk}")
    # the naive rung is itself the definition: row t of the causal output only sees keys s <= t
    later = favor_attention_naive(q, k.clone().index_fill_(2, torch.tensor([36]), 5.0), v, w, causal=True)
    assert torch.equal(later[:, :, :36], naive[:, :, :36]) and not torch.equal(later[:, :, 36], naive[:, :, 36])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_causal_cross_attention_of_different_lengths(backend):
    q, _, _, w = make_inputs(2, 3, 7, 8, 6, 16, seed=5)
    _, k, v, _ = make_inputs(2, 3, 19, 8, 6, 16, seed=6)
    out = okadfa.favor_attention(q, k, v, w, backend=backend)
    assert out.shape == (2, 3, 7, 6)
    assert_rms_close(out, favor_attention_naive(q, k, v, w, causal=False), torch.float64, what="L=7, S=19")
    with pytest.raises(ValueError, match="same length .* for causal attention"):
        okadfa.favor_attention(q, k, v, w, causal=True, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_casts_the_inputs_as_sdpa_does(backend):
    q, k, v, w = make_inputs(1, 2, 33, 8, 8, 16, dtype=torch.float32, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = okadfa.favor_attention(q, k, v, w, causal=True, backend=backend)
    expected = okadfa.favor_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), w, causal=True, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
