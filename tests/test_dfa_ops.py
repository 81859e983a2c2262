"""dfa_feedback and dfa_head on the native backends (cpu; triton and cuda where available) against
the reference path: seeded (normal, uniform, shared) and stored feedback, hidden and logits error,
ignore_index, chunking, edge sizes, dtypes, validation, and the in-kernel seeded generation.

Tolerances (relative RMS error against the float64 reference):
  float64: 1e-12 (seeded entries are bit-identical on every backend).
  float32: 2e-5 (loss: 1e-5 relative).
"""
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import okadfa
from conftest import rms_error
from okadfa.ops.dfa_feedback import seeded_feedback_matrix
from okadfa.feedback import FeedbackSpec, materialize_feedback
from okadfa.reference import dfa_feedback as ref_feedback
from okadfa.reference import dfa_head as ref_head

NATIVE = ["cpu", "triton", "cuda"]
FEEDBACK = ["normal", "uniform", "shared", "stored"]
TOL32 = 2e-5


def _device(backend):
    """The device the backend runs on here, or skip with the reason it cannot."""
    status = okadfa.backends()[backend]
    if not status["available"]:
        pytest.skip(f"{backend}: {status['reason']}")
    if backend == "triton" and not torch._C._dispatch_has_kernel("okadfa::triton_dfa_head"):
        pytest.skip("triton: okadfa::triton_dfa_head is not registered by okadfa.kernels")
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton computes in float32 only; its float64 refusal is test_triton_refuses_float64")


def _work_dtype(backend):
    """float64 where the backend supports it, else float32."""
    return torch.float32 if backend == "triton" else torch.float64


def test_triton_refuses_float64():
    device = _device("triton")
    spec = FeedbackSpec(2, 4, 4)
    h, w, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="float64"):
        okadfa.dfa_feedback(h.to(device), spec, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        okadfa.dfa_head(h.to(device), w.to(device), t.to(device), spec, backend="triton")


def _feedback(kind, P, d, E, seed, dtype, device):
    """(the feedback argument, the same matrices (P, d, E) in float64 on the CPU as the cpu kernels use them)."""
    if kind == "stored":
        b = torch.randn(P, d, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / math.sqrt(E)
        return b.to(device=device, dtype=dtype), b
    spec = FeedbackSpec(P, d, E, seed=seed, dist="uniform" if kind == "uniform" else "normal",
                        shared=kind == "shared")
    return spec, torch.stack([seeded_feedback_matrix(spec, p) for p in range(P)]).double()


def _tol(dtype):
    return TOL32 if dtype == torch.float32 else 1e-12


def _assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rms_error(actual.cpu(), expected)
    assert err <= tol, f"{what}: relative RMS error {err:.3g} > {tol:.1g}"


def _head_inputs(N, d, V, dtype, device, seed=0, ignored=(0, 5)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    t = torch.randint(0, V, (N,), generator=g)
    t[[i for i in ignored if i < N]] = -100
    return h, w, t, (h.to(device, dtype), w.to(device, dtype), t.to(device))


# ----------------------------------------------------------------------------------------- dfa_feedback
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", FEEDBACK)
@pytest.mark.parametrize("backend", NATIVE)
def test_dfa_feedback_matches_reference(backend, kind, dtype):
    device = _device(backend)
    _skip_unsupported(backend, dtype)
    N, P, d, E = 37, 3, 11, 1100           # E > 1024: more than one tile of the error dimension
    e64 = torch.randn(N, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    feedback, b64 = _feedback(kind, P, d, E, 2 ** 63 + 11, dtype, device)
    out = okadfa.dfa_feedback(e64.to(device, dtype), feedback, backend=backend)
    assert out.dtype == dtype and out.device.type == device
    _assert_close(out, ref_feedback(e64, b64), _tol(dtype), "dfa_feedback")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dfa_feedback_half_types(dtype):
    device = _device("cpu")
    e = torch.randn(9, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    spec = FeedbackSpec(2, 5, 16, seed=3)
    out = okadfa.dfa_feedback(e, spec, backend="cpu")
    assert out.dtype == dtype
    # both accumulate in float32 (in different orders): equal up to the final rounding to dtype
    torch.testing.assert_close(out, ref_feedback(e, spec))


@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_seeded_generation_equals_materialize_feedback(dist):
    """The cpu kernel's in-kernel entries (read back through an identity error) are the normative
    ones, bit for bit, for both distributions (correctly rounded ln and cos)."""
    _device("cpu")
    P, d, E, seed = 3, 7, 300, 2 ** 64 - 5
    spec = FeedbackSpec(P, d, E, seed=seed, dist=dist)
    generated = okadfa.dfa_feedback(torch.eye(E), spec, backend="cpu").transpose(1, 2)
    assert torch.equal(generated, materialize_feedback(spec))
    for p in range(P):   # the diagnostics' matrices are exactly the kernel's
        assert torch.equal(seeded_feedback_matrix(spec, p), generated[p])


def test_dfa_feedback_is_deterministic_and_empty_safe():
    _device("cpu")
    e = torch.randn(300, 200)
    spec = FeedbackSpec(5, 70, 200, seed=9)
    assert torch.equal(okadfa.dfa_feedback(e, spec), okadfa.dfa_feedback(e, spec))
    assert okadfa.dfa_feedback(torch.randn(0, 200), spec, backend="cpu").shape == (5, 0, 70)


# --------------------------------------------------------------------------------------------- dfa_head
@pytest.mark.parametrize("chunk", [16, None], ids=["chunk16", "default"])
@pytest.mark.parametrize("error", ["hidden", "logits"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", FEEDBACK)
@pytest.mark.parametrize("backend", NATIVE)
def test_dfa_head_matches_reference(backend, kind, dtype, error, chunk):
    device = _device(backend)
    _skip_unsupported(backend, dtype)
    N, d, V, P, dp = 53, 24, 101, 3, 10      # 16 does not divide 53; nothing a power of two
    h, w, t, (hx, wx, tx) = _head_inputs(N, d, V, dtype, device)
    feedback, b64 = _feedback(kind, P, dp, d if error == "hidden" else V, 2 ** 63 + 1, dtype, device)
    got = okadfa.dfa_head(hx, wx, tx, feedback, chunk_size=chunk, error=error, backend=backend)
    expected = ref_head(h, w, t, b64, error=error)
    assert [x.dtype for x in got] == [dtype] * 4
    tol = _tol(dtype)
    assert abs(got[0].item() - expected[0].item()) <= max(tol, 1e-5 if dtype == torch.float32 else 0) * expected[0]
    for name, a, b in zip(("grad_h", "grad_w_dec", "signals"), got[1:], expected[1:]):
        _assert_close(a, b, tol, name)


@pytest.mark.parametrize("backend", NATIVE)
def test_dfa_head_equals_autograd_cross_entropy(backend):
    device = _device(backend)
    dtype = _work_dtype(backend)
    h, w, t, (hx, wx, tx) = _head_inputs(40, 12, 33, dtype, device, ignored=(3,))
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy(hr @ wr.T, t)
    loss.backward()
    got = okadfa.dfa_head(hx, wx, tx, FeedbackSpec(2, 12, 12), chunk_size=7, backend=backend)
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (1e-5, 1e-7)
    torch.testing.assert_close(got[0].cpu().double(), loss.detach(), rtol=rtol, atol=0)
    torch.testing.assert_close(got[1].cpu().double(), hr.grad, rtol=100 * rtol, atol=atol)
    torch.testing.assert_close(got[2].cpu().double(), wr.grad, rtol=100 * rtol, atol=atol)


@pytest.mark.parametrize("case", ["N=1", "all-ignored", "N=0", "ignore_index=7", "chunk>N"])
@pytest.mark.parametrize("backend", NATIVE)
def test_dfa_head_edge_cases(backend, case):
    device = _device(backend)
    N = {"N=1": 1, "N=0": 0}.get(case, 20)
    dtype = _work_dtype(backend)
    h, w, t, (hx, wx, tx) = _head_inputs(N, 9, 17, dtype, device, ignored=())
    ignore_index = 7 if case == "ignore_index=7" else -100
    if case == "all-ignored":
        tx = torch.full_like(tx, -100)
    kw = dict(ignore_index=ignore_index, chunk_size=64 if case == "chunk>N" else 4)
    spec, b64 = _feedback("normal", 2, 5, 9, 4, dtype, device)
    got = okadfa.dfa_head(hx, wx, tx, spec, backend=backend, **kw)
    expected = ref_head(h, w, tx.cpu(), b64, **kw)
    atol = 1e-14 if dtype == torch.float64 else 1e-6
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.cpu().double(), b, rtol=_tol(dtype), atol=atol)
    if case == "all-ignored":
        assert all(not x.any() for x in got)


@pytest.mark.parametrize("hdtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                           (torch.float32, torch.float64)])
def test_dfa_head_mixed_and_half_dtypes(hdtype, wdtype):
    _device("cpu")
    h, w, t, _ = _head_inputs(30, 16, 50, torch.float64, "cpu")
    hx, wx = h.to(hdtype), w.to(wdtype)
    spec = FeedbackSpec(2, 16, 16, seed=2)
    got = okadfa.dfa_head(hx, wx, t, spec, chunk_size=8, backend="cpu")
    expected = ref_head(hx, wx, t, spec)
    acc = torch.promote_types(torch.promote_types(hdtype, wdtype), torch.float32)
    assert [x.dtype for x in got] == [acc, hdtype, wdtype, hdtype] == [x.dtype for x in expected]
    tol = 1e-2 if hdtype in (torch.float16, torch.bfloat16) else 1e-5
    for a, b in zip(got, expected):
        assert rms_error(a, b) <= tol


def test_dfa_head_is_deterministic():
    _device("cpu")
    h, w, t, _ = _head_inputs(300, 40, 500, torch.float32, "cpu")
    args = (h.float(), w.float(), t, FeedbackSpec(3, 40, 40))
    a, b = okadfa.dfa_head(*args, chunk_size=37), okadfa.dfa_head(*args, chunk_size=37)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_fake_implementations_and_opcheck():
    _device("cpu")
    h, w, t, _ = _head_inputs(12, 8, 20, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.okadfa.dfa_head, (h.float(), w.float(), t, None, 2, 8, -5, 0, False, -100,
                                                      False, 5))
    torch.library.opcheck(torch.ops.okadfa.dfa_feedback, (torch.randn(6, 8), torch.randn(3, 4, 8), 0, 0, 0, 0, False))


# ------------------------------------------------------------------------------------------- validation
def _bad_head_calls():
    h, w, t = torch.randn(6, 4), torch.randn(10, 4), torch.randint(0, 10, (6,))
    spec = FeedbackSpec(2, 4, 4)
    return [
        (dict(h=h[0]), ValueError, "h must have shape"),
        (dict(h=h.long()), TypeError, "h must be a floating-point"),
        (dict(w_dec=torch.randn(10, 5)), ValueError, "w_dec must have shape"),
        (dict(targets=t.int()), TypeError, "targets must be an int64"),
        (dict(targets=t[:5]), ValueError, "targets must have shape"),
        (dict(targets=torch.full((6,), 10)), ValueError, r"targets must be in \[0, 10\)"),
        (dict(feedback=FeedbackSpec(2, 4, 10)), ValueError, "feedback.error_dim is 10"),
        (dict(feedback=torch.randn(2, 4, 5)), ValueError, "feedback must have shape"),
        (dict(feedback="seeded"), TypeError, "feedback must be a FeedbackSpec"),
        (dict(feedback=spec, error="logits"), ValueError, "feedback.error_dim is 4 but error='logits'"),
        (dict(error="hid"), ValueError, "error must be 'hidden' or 'logits'"),
        (dict(chunk_size=0), ValueError, "chunk_size must be positive"),
        (dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ], dict(h=h, w_dec=w, targets=t, feedback=spec)


@pytest.mark.parametrize("index", range(len(_bad_head_calls()[0])))
def test_dfa_head_bad_input(index, monkeypatch):
    """Clear errors from the Python layer, before any kernel runs (the kernel path is poisoned)."""
    cases, good = _bad_head_calls()
    change, exc, match = cases[index]
    module = sys.modules["okadfa.ops.dfa_head"]
    for name in ("reference", "native_feedback_args"):     # reached only after validation
        monkeypatch.setattr(module, name, None)
    with pytest.raises(exc, match=match):
        okadfa.dfa_head(**{**good, **change})


@pytest.mark.parametrize("error,feedback,exc,match", [
    (torch.randn(3), FeedbackSpec(1, 2, 3), ValueError, "error must have shape"),
    (torch.randn(3, 4).long(), FeedbackSpec(1, 2, 4), TypeError, "error must be a floating-point"),
    (torch.randn(3, 4), FeedbackSpec(1, 2, 5), ValueError, "feedback.error_dim is 5 but the error has 4"),
    (torch.randn(3, 4), torch.randn(2, 4), ValueError, "feedback must have shape"),
    (torch.randn(3, 4), torch.ones(1, 2, 4, dtype=torch.int64), TypeError, "feedback must be a floating-point"),
])
def test_dfa_feedback_bad_input(error, feedback, exc, match):
    with pytest.raises(exc, match=match):
        okadfa.dfa_feedback(error, feedback)


def test_native_ops_reject_bad_arguments_without_crashing():
    """Direct torch.ops calls bypass the Python checks: the kernels still refuse bad input."""
    _device("cpu")
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    head = torch.ops.okadfa.dfa_head
    with pytest.raises(RuntimeError, match="targets must be in"):
        head(h, w, torch.tensor([0, 1, 9, 2]), None, 1, 3, 0, 0, False, -100, False, 2)
    with pytest.raises(RuntimeError, match="feedback must have shape"):
        head(h, w, torch.tensor([0, 1, 2, 2]), torch.randn(1, 3, 4), 1, 3, 0, 0, False, -100, False, 2)
    with pytest.raises(RuntimeError, match="dist must be"):
        torch.ops.okadfa.dfa_feedback(torch.randn(2, 3), None, 1, 3, 0, 2, False)
    with pytest.raises(RuntimeError, match="chunk_size must be positive"):
        head(h, w, torch.tensor([0, 1, 2, 2]), None, 1, 3, 0, 0, False, -100, False, 0)
