"""favor_attention on every backend (the `backend` fixture: reference, cpu, triton, cuda) against
the float64 brute force okadfa.reference.favor_attention_naive, forward and backward; the
registered ops behind it; and the reference ladder naive → recurrent → chunked.

Triton runs on a GPU or under TRITON_INTERPRET=1 on the CPU (so the shapes stay small) and takes
no float64: its tests run in float32. Tolerances: tests/tolerances.py."""
import math

import pytest
import torch

import okadfa
from conftest import backend_info, check_against_float64, cpu_flags, check_double_backward, make_inputs, shape_id
from okadfa.reference import favor_attention_naive
from tolerances import (EXACT, REORDERED, REORDERED_GRAD, UNCHANGED, F32_ACCUMULATED, assert_close,
                        assert_rms_close, rms_error)

CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
GRADS = ("dq", "dk", "dv", "dprojection")


def _check(backend, inputs, dtype, causal, **kw):
    check_against_float64(okadfa.favor_attention, favor_attention_naive, backend, inputs, dtype, causal, GRADS,
                          **kw)


# (B, H, T, Dk, Dv, M, chunk): T = 1; T not a multiple of the chunk; M, Dk, Dv not powers of two;
# B·H below and above the thread count; Dv = 70 > 64 splits the value columns over two Triton
# programs per head; a longer sequence of typical head sizes.
SHAPES = [
    (1, 1, 1, 8, 8, 16, 64),
    (1, 1, 63, 24, 20, 37, 64),
    (2, 3, 100, 16, 9, 24, 16),
    (1, 2, 64, 16, 16, 40, 64),
    (1, 1, 129, 12, 33, 50, 32),
    (2, 2, 70, 5, 7, 3, 7),
    (2, 2, 37, 12, 20, 21, 16),
    (1, 2, 40, 5, 70, 3, 16),
    (1, 2, 300, 64, 64, 128, 64),
]


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@CAUSAL
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_brute_force(backend, causal, shape):
    """In the backend's most precise dtype (float64; float32 on triton)."""
    B, H, T, Dk, Dv, M, C = shape
    _check(backend, make_inputs(B, H, T, Dk, Dv, M), backend.exact, causal, chunk_size=C)


@CAUSAL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision(backend, dtype, causal):
    """Inputs stay in their dtype (output and gradients); the cpu and cuda backends compute half
    types in float32, triton reads them as they are with float32 arithmetic."""
    backend.skip_unless(dtype)
    _check(backend, make_inputs(2, 2, 150, 32, 24, 48, seed=1), dtype, causal)


# SHAPES and a size at which every GEMM of a chunk takes the cpu kernels' bfloat16 path.
BF16_SHAPES = SHAPES + [(1, 2, 260, 64, 64, 256, 128)]


@CAUSAL
@pytest.mark.parametrize("shape", BF16_SHAPES, ids=shape_id)
def test_cpu_bfloat16_matches_brute_force(cpu_bf16, causal, shape):
    """bfloat16 on the cpu backend, with and without bfloat16 GEMMs, every size class: the output
    and all gradients within 2× the error of plain PyTorch in bfloat16 (check_against_float64)."""
    B, H, T, Dk, Dv, M, C = shape
    _check(cpu_bf16, make_inputs(B, H, T, Dk, Dv, M), torch.bfloat16, causal, chunk_size=C)


def test_cpu_bfloat16_gemm_path_is_switched(monkeypatch):
    """OKADFA_CPU_HALF_GEMM selects the engine (so the test above covers each), backends() names
    it, the engines give different roundings of the same answer, and a bad value is refused."""
    backend_info("cpu")
    q, k, v, w = make_inputs(1, 2, 260, 64, 64, 256, dtype=torch.bfloat16)
    names = {"float32": "float32 GEMMs", "onednn": "bfloat16 GEMMs (oneDNN", "amx": "bfloat16 GEMMs on AMX tiles"}
    if not {"amx_bf16", "avx512_bf16"} <= cpu_flags():
        del names["amx"]
    outs = {}
    for engine, name in names.items():
        monkeypatch.setenv("OKADFA_CPU_HALF_GEMM", engine)
        assert okadfa.backends()["cpu"]["bfloat16"].startswith(name)
        outs[engine] = okadfa.favor_attention(q, k, v, w, causal=True, backend="cpu")
    for engine in names:
        if engine != "float32":
            assert not torch.equal(outs[engine], outs["float32"]), engine
    monkeypatch.setenv("OKADFA_CPU_HALF_GEMM", "fast")
    with pytest.raises(RuntimeError, match="OKADFA_CPU_HALF_GEMM must be 'amx', 'onednn', 'float32' or 'half'"):
        okadfa.favor_attention(q, k, v, w, causal=True, backend="cpu")


def test_cpu_bfloat16_gemm_path_follows_the_cpu(monkeypatch):
    """Unforced, the bfloat16 engine follows the CPU: AMX tiles where it has AMX-BF16 (with
    AVX512-BF16), oneDNN where it has only AVX512-BF16, float32 GEMMs otherwise (the kernel reads
    CPUID; /proc/cpuinfo is the kernel's view of the same bits)."""
    backend_info("cpu")
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    monkeypatch.delenv("OKADFA_CPU_HALF_GEMM", raising=False)
    reason = okadfa.backends()["cpu"]["bfloat16"]
    if {"amx_bf16", "avx512_bf16"} <= flags:
        assert reason.startswith("bfloat16 GEMMs on AMX tiles"), reason
    elif "avx512_bf16" in flags and torch.backends.mkldnn.is_available():
        assert reason.startswith("bfloat16 GEMMs (oneDNN"), reason
    else:
        assert reason.startswith("float32 GEMMs"), reason
    assert okadfa.backends()["cpu"]["float16"].startswith("float32 GEMMs")


@CAUSAL
def test_gradcheck(backend, causal):
    backend.skip_unless(torch.float64)
    q, k, v, w = backend.put(*make_inputs(1, 2, 11, 4, 3, 5, seed=2), grad=True)
    fn = lambda q, k, v, w: okadfa.favor_attention(q, k, v, w, causal=causal, backend=backend.name, chunk_size=4)
    assert torch.autograd.gradcheck(fn, (q, k, v, w))


def test_double_backward_is_exact_or_refused(backend):
    """create_graph=True: the reference (plain PyTorch) gives exact second derivatives
    (gradgradcheck); the kernels' backward is not differentiable, so they refuse, never a
    silent 0."""
    inputs = backend.put(*make_inputs(1, 2, 7, 3, 2, 5, seed=3), grad=True)
    fn = lambda *x: okadfa.favor_attention(*x, causal=True, backend=backend.name)    # noqa: E731
    check_double_backward(backend, fn, inputs)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_causality_with_dominating_future_keys(backend, dtype):
    """Outputs (and input gradients) at positions <= t ignore everything after t,
    even when later keys dominate every earlier one by more than the dtype's
    exponent range (a non-causal stabiliser would underflow the earlier weights)."""
    backend.skip_unless(dtype)
    q, k, v, w = make_inputs(1, 2, 96, 16, 8, 32, dtype=dtype, seed=3)
    t = 40
    k, changed = _dominating_future(q, k, v, w, t, 16 ** -0.5)
    outs, grads = [], []
    for inputs in ((q, k, v), changed):
        qq, kk, vv = backend.put(*inputs, dtype=dtype, grad=True)
        out = okadfa.favor_attention(qq, kk, vv, backend.put(w, dtype=dtype), causal=True, backend=backend.name,
                                     chunk_size=32)
        mask = torch.zeros_like(out)
        mask[..., : t + 1, :] = 1.0
        grads.append(torch.autograd.grad((out * mask).sum(), (qq, kk, vv)))
        outs.append(out.detach())
    assert torch.isfinite(outs[0]).all() and (outs[0][..., : t + 1, :].abs().sum(-1) > 0).all()
    assert_close(outs[1][..., : t + 1, :], outs[0][..., : t + 1, :], UNCHANGED)
    for g0, g1 in zip(grads[0], grads[1]):
        assert_close(g1[..., : t + 1, :], g0[..., : t + 1, :], UNCHANGED)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_causality_with_non_finite_future_inputs(backend, where, bad):
    """A NaN or ±Inf at position 21 (inside a chunk of 32) leaves every output before it as it
    was: in a plain within-chunk product it would meet its exact-0 weight, and 0·NaN is NaN."""
    q, k, v, w = make_inputs(1, 2, 40, 8, 4, 16, seed=13)
    clean = okadfa.favor_attention(*backend.put(q, k, v, w), causal=True, backend=backend.name, chunk_size=32)
    {"q": q, "k": k, "v": v}[where][:, :, 21] = bad
    out = okadfa.favor_attention(*backend.put(q, k, v, w), causal=True, backend=backend.name, chunk_size=32)
    assert_close(out[:, :, :21], clean[:, :, :21], UNCHANGED)
    assert not torch.isfinite(out[:, :, 21]).all()


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


@CAUSAL
def test_large_magnitude_float32(backend, causal):
    """|q|, |k| ~ 10 puts the unstabilised feature logits (±40) outside fp32's exp
    range: the stabilised kernels stay accurate and each output stays inside the
    convex hull of the values it attends to."""
    q, k, v, w = make_inputs(1, 2, 130, 16, 8, 32, seed=4, magnitude=10.0)
    expected = okadfa.reference.favor_attention(q, k, v, w, causal=causal)
    q, k, v, w = backend.put(q, k, v, w, dtype=torch.float32)
    out = okadfa.favor_attention(q, k, v, w, causal=causal, backend=backend.name).cpu()
    assert_rms_close(out, expected, torch.float32)
    v = v.cpu()
    hi = torch.cummax(v, dim=2).values if causal else v.amax(2, keepdim=True)
    lo = -torch.cummax(-v, dim=2).values if causal else v.amin(2, keepdim=True)
    assert (out <= hi + 1e-5).all() and (out >= lo - 1e-5).all()


@CAUSAL
def test_extreme_magnitude_float32_stays_finite(backend, causal):
    """|q|, |k| ~ 30 (logits beyond ±1000): fp32 cannot represent the weight
    ratios any more, but outputs and gradients must stay finite (no NaN/Inf)."""
    q, k, v, w = make_inputs(1, 2, 130, 16, 8, 32, seed=4, magnitude=30.0)
    q, k, v = backend.put(q, k, v, dtype=torch.float32, grad=True)
    out = okadfa.favor_attention(q, k, v, backend.put(w, dtype=torch.float32), causal=causal, backend=backend.name)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in _grads(out, (q, k, v), torch.randn_like(out)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_with_large_logits_are_computed_in_float32(backend, dtype):
    """q, k entries of std 4: feature logits far outside float16's exponent range. Every backend
    computes half types in float32 (the reference too: it is the fallback without okadfa._C),
    so no row underflows to 0 and the result is as accurate as the dtype's rounding allows."""
    backend.skip_unless(dtype)
    q, k, v, w = (x.to(dtype).double() for x in make_inputs(1, 2, 40, 16, 8, 32, seed=6, magnitude=4.0))
    expected = favor_attention_naive(q, k, v, w, causal=True)
    out = okadfa.favor_attention(*backend.put(q, k, v, w, dtype=dtype), causal=True, backend=backend.name)
    assert out.dtype == dtype and (out.abs().sum(-1) > 0).all()
    assert_rms_close(out, expected, dtype)


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


def test_non_contiguous_broadcast_and_grouped_query_inputs(backend):
    """Strided q and projection; k/v broadcast over B and H, or grouped-query (2 kv heads for 4
    q heads, as SDPA's enable_gqa); gradients of broadcast inputs are summed to their shapes."""
    q, _, _, w = make_inputs(2, 4, 30, 8, 6, 12, seed=7)
    _, k, v, _ = make_inputs(2, 2, 30, 8, 6, 12, seed=8)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    wt = w.T.contiguous().T
    for kk, vv, expand in ((k, v, lambda x: x.repeat_interleave(2, dim=1)),
                           (k[:1, :1], v[:1, :1], lambda x: x.expand(2, 4, -1, -1))):
        exact = [x.to(backend.exact).double().requires_grad_() for x in (q, kk, vv, w)]
        inputs = backend.put(qt, kk, vv, wt, grad=True)
        assert not inputs[0].is_contiguous() and not inputs[3].is_contiguous()
        expected = favor_attention_naive(exact[0], expand(exact[1]), expand(exact[2]), exact[3], causal=True)
        out = okadfa.favor_attention(*inputs, causal=True, backend=backend.name, chunk_size=16)
        assert_rms_close(out, expected, backend.exact, what="out")
        g = torch.randn_like(expected)
        for name, a, e, x in zip(GRADS, _grads(out, inputs, g.to(out)), _grads(expected, exact, g), inputs):
            assert a.shape == x.shape, name
            assert_rms_close(a, e, backend.exact, grad=True, what=name)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bh", [(1, 1), (1, 3)], ids=["BH1", "BH3"])
def test_cpu_thread_counts_agree(threads, bh):
    """Heads in parallel, and value columns split across threads when B·H is small."""
    backend_info("cpu")
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


def test_default_scale_and_explicit_scale(backend):
    q, k, v, w = make_inputs(1, 1, 20, 9, 4, 10, seed=8, dtype=backend.exact)
    x = backend.put(q, k, v, w)
    a = okadfa.favor_attention(*x, causal=True, backend=backend.name)
    b = okadfa.favor_attention(*x, causal=True, backend=backend.name, scale=9 ** -0.5)
    c = okadfa.favor_attention(*x, causal=True, backend=backend.name, scale=0.05)
    assert_close(a, b, EXACT)
    assert_rms_close(c, favor_attention_naive(*(t.double() for t in (q, k, v, w)), causal=True, scale=0.05),
                     backend.exact)


@CAUSAL
def test_chunk_size_does_not_change_the_result(backend, causal):
    """chunk_size 1 … 1024 (triton: BLOCK_T 16 … 128): the same attention up to rounding."""
    x = backend.put(*make_inputs(1, 1, 70, 8, 8, 12, seed=3))
    outs = [okadfa.favor_attention(*x, causal=causal, backend=backend.name, chunk_size=c) for c in (1, 33, 1024)]
    for out in outs[1:]:
        assert_close(out, outs[0], REORDERED)


@CAUSAL
def test_lognorm_is_the_log_normaliser(backend, causal):
    """The forward op's saved lognorm_t = log Σ_{s, m} exp(√s·q_t·w_m + √s·k_s·w_m − s‖k_s‖²/2)
    over s ≤ t (causal): the normaliser up to log M + ‖q̂‖²/2, whatever the chunking and stabilisers."""
    fwd = backend.op("favor_attention_fwd")
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
        _, lognorm = fwd(*backend.put(q, k, v, w), None, causal, scale, chunk)
        kind = F32_ACCUMULATED if backend.exact == torch.float32 else REORDERED
        assert_close(lognorm.double().cpu(), expected, kind)


@CAUSAL
def test_opcheck(backend, causal):
    """Schema, fake tensors, registered autograd and AOT dispatch of the forward and backward
    ops. Under TRITON_INTERPRET=1 wrap_triton hands back the plain interpreted kernel, which
    cannot run on fake tensors: there the Triton ops skip the AOT dispatch check."""
    fwd, bwd = backend.op("favor_attention_fwd"), backend.op("favor_attention_bwd")
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if backend.name != "triton" or backend.device == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    q, k, v, w = backend.put(*make_inputs(1, 2, 33, 8, 5, 12, seed=9), dtype=torch.float32)
    mask = torch.rand(1, 2, 33, generator=torch.Generator().manual_seed(3)).to(q.device) > 0.3
    for key_mask in (None, mask):
        for requires_grad in (False, True):
            args = [x.clone().requires_grad_(requires_grad) for x in (q, k, v, w)]
            torch.library.opcheck(fwd, (*args, key_mask, causal, 0.3, 16), test_utils=utils)
        out, lognorm = fwd(q, k, v, w, key_mask, causal, 0.3, 16)
        torch.library.opcheck(bwd, (torch.randn_like(out), q, k, v, w, out, lognorm, key_mask, causal, 0.3, 16, True),
                              test_utils=utils)


def test_torch_compile_fullgraph(backend):
    if backend.name == "triton" and backend.device == "cpu":
        pytest.skip("torch.compile through a triton_op cannot run under TRITON_INTERPRET=1")
    q, k, v, w = backend.put(*make_inputs(2, 2, 48, 8, 8, 16, seed=10), dtype=torch.float32)

    def loss(q, k, v, w):
        out = okadfa.favor_attention(q, k, v, w, causal=True, backend=backend.name)
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
    assert_close(out, eager_out, REORDERED)
    for a, e in zip(grads, eager_grads):
        assert_close(a, e, REORDERED_GRAD)


def _strided(x):
    """x's values in a non-contiguous layout of the same shape."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def test_raw_ops_reject_bad_input_before_any_kernel(backend):
    """torch.ops.okadfa.* called directly skip the Python layer: each native and Triton op still
    checks shapes, contiguity, devices, dtypes and arguments itself (csrc/checks.h,
    okadfa/kernels/_utils.py) and raises naming the argument, before a kernel reads out of bounds."""
    fwd, bwd = backend.op("favor_attention_fwd"), backend.op("favor_attention_bwd")
    q, k, v, w = backend.put(*make_inputs(1, 2, 8, 4, 3, 6), dtype=torch.float32)
    # each backend's first refused dtype (the cpu kernels take all four floating types)
    bad_dtype = {"triton": torch.float64, "cpu": torch.int32}.get(backend.name, torch.float16)
    mask = torch.ones(1, 2, 8, dtype=torch.bool, device=q.device)
    calls = [
        ("q", lambda: fwd(_strided(q), k, v, w, None, True, 0.5, 16)),
        ("k", lambda: fwd(q, k[:, :, :7].contiguous(), v, w, None, True, 0.5, 16)),
        ("v", lambda: fwd(q, k, v.expand(2, -1, -1, -1).contiguous(), w, None, True, 0.5, 16)),
        ("projection", lambda: fwd(q, k, v, w[:, :3].contiguous(), None, True, 0.5, 16)),
        ("key_mask", lambda: fwd(q, k, v, w, mask[:, :, :7].contiguous(), True, 0.5, 16)),
        ("key_mask", lambda: fwd(q, k, v, w, mask.to(torch.uint8), True, 0.5, 16)),
        ("key_mask", lambda: fwd(q, k, v, w, mask[:, :1].expand(1, 2, 8), True, 0.5, 16)),   # not contiguous
        ("chunk_size", lambda: fwd(q, k, v, w, None, True, 0.5, 0)),
        ("chunk_size", lambda: fwd(q, k, v, w, None, True, 0.5, 2000)),
        ("scale", lambda: fwd(q, k, v, w, None, True, -1.0, 16)),
        ("one device", lambda: fwd(q.to("meta"), k, v, w, None, True, 0.5, 16)),
        ("float", lambda: fwd(*(x.to(bad_dtype) for x in (q, k, v, w)), None, True, 0.5, 16)),
    ]
    out, lognorm = fwd(q, k, v, w, None, True, 0.5, 16)
    g = torch.randn_like(out)
    calls += [
        ("grad_out", lambda: bwd(g[:, :1].contiguous(), q, k, v, w, out, lognorm, None, True, 0.5, 16, True)),
        ("lognorm", lambda: bwd(g, q, k, v, w, out, lognorm[:, :, :5].contiguous(), None, True, 0.5, 16, True)),
        ("k", lambda: bwd(g, q, _strided(k), v, w, out, lognorm, None, True, 0.5, 16, True)),
        ("key_mask", lambda: bwd(g, q, k, v, w, out, lognorm, mask[:, :1].contiguous(), True, 0.5, 16, True)),
    ]
    for name, call in calls:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=rf"okadfa: .*{name}"):
            call()


def test_chunk_size_limit_is_one_in_python_and_cpp(native):
    """okadfa.validation.MAX_CHUNK and the raw ops' check (csrc/checks.h) are the same number."""
    from okadfa.validation import MAX_CHUNK
    q, k, v, w = native.put(*make_inputs(1, 1, 8, 4, 4, 6), dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"chunk_size must be in \[1, {MAX_CHUNK}\]"):
        okadfa.favor_attention(q, k, v, w, backend=native.name, chunk_size=MAX_CHUNK + 1)
    with pytest.raises(RuntimeError, match=rf"chunk_size must be in \[1, {MAX_CHUNK}\]"):
        torch.ops.okadfa.favor_attention_fwd(q, k, v, w, None, True, 0.5, MAX_CHUNK + 1)
    torch.ops.okadfa.favor_attention_fwd(q, k, v, w, None, True, 0.5, MAX_CHUNK)


@pytest.mark.triton
def test_triton_refuses_float64_before_any_kernel():
    triton = backend_info("triton")
    q, k, v, w = (x.to(triton.device) for x in make_inputs(1, 1, 8, 4, 4, 6))
    with pytest.raises(TypeError, match="triton backend supports float32, float16 and bfloat16.*float64"):
        okadfa.favor_attention(q, k, v, w, backend="triton")
    with pytest.raises(TypeError, match="projection is torch.float64"):
        torch.ops.okadfa.triton_favor_attention_fwd(q.float(), k.float(), v.float(), w, None, True, 0.5, 16)


def test_empty_batch_or_heads(backend):
    q, k, v, w = backend.put(*make_inputs(2, 3, 10, 4, 5, 6), dtype=torch.float32)
    assert okadfa.favor_attention(q[:0], k[:0], v[:0], w, causal=True, backend=backend.name).shape == (0, 3, 10, 5)
    assert okadfa.favor_attention(q[:, :0], k[:, :0], v[:, :0], w, backend=backend.name).shape == (2, 0, 10, 5)


def test_reference_ladder_naive_recurrent_chunked():
    """Each rung of okadfa.reference against the one below it, in float64 (module docstring there)."""
    q, k, v, w = make_inputs(2, 3, 37, 8, 5, 16, seed=3)
    naive = favor_attention_naive(q, k, v, w, causal=True)
    assert_rms_close(okadfa.reference.favor_attention_recurrent(q, k, v, w), naive, torch.float64, what="recurrent")
    for chunk in (1, 8, 64):
        assert_rms_close(okadfa.reference.favor_attention(q, k, v, w, causal=True, chunk_size=chunk), naive,
                         torch.float64, what=f"chunked {chunk}")
    # the naive rung is itself the definition: row t of the causal output only sees keys s <= t
    later = favor_attention_naive(q, k.clone().index_fill_(2, torch.tensor([36]), 5.0), v, w, causal=True)
    assert torch.equal(later[:, :, :36], naive[:, :, :36]) and not torch.equal(later[:, :, 36], naive[:, :, 36])


def test_non_causal_cross_attention_of_different_lengths(backend):
    q, _, _, w = make_inputs(2, 3, 7, 8, 6, 16, seed=5, dtype=backend.exact)
    _, k, v, _ = make_inputs(2, 3, 19, 8, 6, 16, seed=6, dtype=backend.exact)
    out = okadfa.favor_attention(*backend.put(q, k, v, w), backend=backend.name)
    assert out.shape == (2, 3, 7, 6)
    assert_rms_close(out, favor_attention_naive(*(x.double() for x in (q, k, v, w)), causal=False), backend.exact,
                     what="L=7, S=19")
    with pytest.raises(ValueError, match="same length .* for causal attention"):
        okadfa.favor_attention(*backend.put(q, k, v, w), causal=True, backend=backend.name)


def test_autocast_casts_the_inputs_as_sdpa_does(backend):
    q, k, v, w = backend.put(*make_inputs(1, 2, 33, 8, 8, 16, seed=7), dtype=torch.float32)
    with torch.autocast(backend.device, dtype=torch.bfloat16):
        out = okadfa.favor_attention(q, k, v, w, causal=True, backend=backend.name)
    expected = okadfa.favor_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), w, causal=True, backend=backend.name)
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, EXACT)
