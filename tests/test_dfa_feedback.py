"""dfa_feedback on every backend (the `backend` fixture) against the float64 reference
(okadfa.reference.dfa_feedback, itself checked against an einsum): seeded (normal, uniform,
shared) and stored feedback, dtypes, edge sizes, validation and the registered ops. The seeded
entries themselves are tests/test_feedback.py. Tolerances: tests/tolerances.py."""
import pytest
import torch

import okadfa
from conftest import FEEDBACK_KINDS, assert_refused_or_same, backend_info, make_feedback, within
from okadfa.feedback import FeedbackSpec, materialize_feedback
from okadfa.reference import dfa_feedback as ref_feedback
from tolerances import (REORDERED, assert_close, assert_half_close, assert_max_rel_close,
                        assert_rms_close)


def _error(N, E, seed=1):
    return torch.randn(N, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", FEEDBACK_KINDS)
def test_matches_reference(backend, kind, dtype):
    backend.skip_unless(dtype)
    N, P, d, E = 37, 3, 11, 1100           # E > 1024: more than one tile of the error dimension
    e = _error(N, E).to(dtype)
    feedback, b64 = make_feedback(kind, P, d, E, 2 ** 63 + 11, dtype, backend.device)
    out = okadfa.dfa_feedback(backend.put(e, dtype=dtype), feedback, backend=backend.name)
    assert out.dtype == dtype and out.device.type == backend.device and out.shape == (P, N, d)
    expected = ref_feedback(e.double(), b64)
    assert_rms_close(out, expected, dtype, what="signals")
    assert_max_rel_close(out, expected, dtype, what="signals")
    if kind == "shared":
        assert torch.equal(out[1], out[0]) and torch.equal(out[2], out[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("storage", ["seeded", "stored float32", "stored in dtype"])
def test_half_types(backend, dtype, storage):
    """Half errors give half signals, accumulated in float32 and rounded once: within a rounding
    of the float64 result, and at most 2× as far from it as the same einsum in plain PyTorch."""
    spec = FeedbackSpec(3, 24, 40, seed=5)
    b = materialize_feedback(spec)
    feedback = {"seeded": spec, "stored float32": b, "stored in dtype": b.to(dtype)}[storage]
    e = _error(17, 40).to(dtype)
    out = okadfa.dfa_feedback(backend.put(e, dtype=dtype), backend.put(feedback) if storage != "seeded" else spec,
                              backend=backend.name)
    assert out.dtype == dtype and out.shape == (3, 17, 24)
    b64 = (b if storage != "stored in dtype" else b.to(dtype)).double()
    expected = ref_feedback(e.double(), b64)
    plain = torch.einsum("ne,pde->pnd", e, b64.to(dtype))
    assert_half_close(out, expected, plain, dtype, what="signals")
    assert_max_rel_close(out, expected, dtype, what="signals")


@pytest.mark.parametrize("storage", ["seeded", "stored"])
def test_cpu_bfloat16_gemms(cpu_bf16, storage):
    """bfloat16 errors on the cpu backend at a size where every tile's product takes the bfloat16
    path (OKADFA_CPU_HALF_GEMM picks the engine; E > 1024: products of several tiles are summed):
    at most 2× as far from float64 as plain PyTorch in bfloat16, and a bfloat16 engine actually
    changes the result."""
    spec = FeedbackSpec(3, 70, 1100, seed=7)
    b = materialize_feedback(spec)
    feedback = spec if storage == "seeded" else b
    e = _error(300, 1100).to(torch.bfloat16)
    out = okadfa.dfa_feedback(e, feedback, backend=cpu_bf16.name)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 300, 70)
    expected = ref_feedback(e.double(), b.double())
    plain = torch.einsum("ne,pde->pnd", e, b.to(torch.bfloat16))
    assert_half_close(out, expected, plain, torch.bfloat16, what="signals")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OKADFA_CPU_HALF_GEMM", "float32")
        in_float32 = okadfa.dfa_feedback(e, feedback, backend=cpu_bf16.name)
    if okadfa.backends()["cpu"]["bfloat16"].startswith("bfloat16"):
        assert not torch.equal(out, in_float32)


@pytest.mark.parametrize("N,P,d,E", [(1, 1, 1, 1), (33, 5, 12, 20), (64, 2, 9, 50)], ids=lambda v: str(v))
@pytest.mark.parametrize("stored", [True, False], ids=["stored", "seeded"])
def test_reference_matches_einsum(N, P, d, E, stored):
    spec = FeedbackSpec(P, d, E, seed=4)
    e = _error(N, E, seed=N)
    b64 = materialize_feedback(spec, dtype=torch.float64)
    out = ref_feedback(e, b64 if stored else spec)
    assert out.shape == (P, N, d) and out.dtype == torch.float64
    assert_close(out, torch.stack([e @ b64[p].T for p in range(P)]), REORDERED)


@pytest.mark.parametrize("N", [0, 1])
def test_empty_and_single_row(backend, N):
    spec = FeedbackSpec(2, 3, 5, seed=9)
    e = _error(N, 5, seed=4)
    out = okadfa.dfa_feedback(backend.put(e), spec, backend=backend.name)
    assert out.shape == (2, N, 3)
    assert_max_rel_close(out, ref_feedback(e.to(backend.exact).double(), spec), backend.exact)


def test_deterministic(backend):
    e = backend.put(_error(120, 200), dtype=torch.float32)
    spec = FeedbackSpec(5, 70, 200, seed=9)
    assert torch.equal(okadfa.dfa_feedback(e, spec, backend=backend.name),
                       okadfa.dfa_feedback(e, spec, backend=backend.name))


@pytest.mark.triton
def test_triton_refuses_float64_before_any_kernel():
    triton = backend_info("triton")
    with pytest.raises(TypeError, match="float64"):
        okadfa.dfa_feedback(torch.randn(3, 4, dtype=torch.float64, device=triton.device), FeedbackSpec(2, 4, 4),
                            backend="triton")


@pytest.mark.parametrize("error,feedback,exc,match", [
    (torch.randn(4, 6).long(), FeedbackSpec(2, 3, 6), TypeError, "error must be a floating-point"),
    ([[1.0]], FeedbackSpec(2, 3, 6), TypeError, "error must be a torch.Tensor"),
    (torch.randn(3), FeedbackSpec(1, 2, 3), ValueError, r"error must have shape \(N, E\)"),
    (torch.randn(4, 6), FeedbackSpec(2, 3, 5), ValueError, "feedback.error_dim is 5 but the error has 6 columns"),
    (torch.randn(4, 6), torch.randn(2, 3, 5), ValueError, r"feedback must have shape \(P, d, 6\)"),
    (torch.randn(4, 6), torch.randn(3, 6), ValueError, r"feedback must have shape \(P, d, 6\)"),
    (torch.randn(4, 6), torch.ones(2, 3, 6, dtype=torch.int64), TypeError, "feedback must be a floating-point"),
    (torch.randn(4, 6), [[[1.0]]], TypeError, "feedback must be a FeedbackSpec or a tensor"),
    (torch.randn(4, 6), torch.empty(2, 3, 6, device="meta"), ValueError, "feedback is on meta"),
])
@pytest.mark.parametrize("name", ["reference", "auto"])
def test_bad_input(error, feedback, exc, match, name):
    """The op validates before dispatching (the reference does not validate)."""
    with pytest.raises(exc, match=match):
        okadfa.dfa_feedback(error, feedback, backend=name)


def _strided(x):
    return x.T.contiguous().T


def test_raw_op_rejects_bad_input_before_any_kernel(backend):
    """torch.ops.okadfa.(triton_)dfa_feedback called directly skips the Python checks: the op
    itself refuses shapes, strides, devices and arguments that would make a kernel read or
    write out of bounds."""
    op = backend.op("dfa_feedback")
    e = backend.put(torch.randn(5, 6), dtype=torch.float32)
    b = backend.put(torch.randn(2, 3, 6), dtype=torch.float32)
    calls = [
        ("error", lambda: op(e[0], None, 1, 3, 0, 0, False)),
        ("feedback", lambda: op(e, b[..., :5].contiguous(), 0, 0, 0, 0, False)),
        ("dist", lambda: op(e, None, 1, 3, 0, 2, False)),
        ("points", lambda: op(e, None, -1, 3, 0, 0, False)),
        ("dim", lambda: op(e, None, 1, -2, 0, 0, False)),
        ("one device", lambda: op(e, b.to("meta"), 0, 0, 0, 0, False)),
    ]
    for name, call in calls:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=rf"okadfa: .*({name})"):
            call()
    strided = b.transpose(0, 1).contiguous().transpose(0, 1)
    assert_refused_or_same(lambda: op(e, strided, 0, 0, 0, 0, False), lambda: op(e, b, 0, 0, 0, 0, False), "feedback")
    assert_refused_or_same(lambda: op(_strided(e), b, 0, 0, 0, 0, False), lambda: op(e, b, 0, 0, 0, 0, False),
                           "error")


@pytest.mark.parametrize("storage", ["seeded", "stored"])
def test_opcheck(backend, storage):
    """Schema, fake tensors (their shapes and dtypes are the real ones, half and mixed dtypes
    included), autograd registration and AOT dispatch (not for the Triton op under
    TRITON_INTERPRET=1: see test_favor_attention.test_opcheck)."""
    op = backend.op("dfa_feedback")
    utils = ("test_schema", "test_faketensor")
    if backend.name != "triton" or backend.device == "cuda":
        utils += ("test_autograd_registration", "test_aot_dispatch_dynamic")
    e = backend.put(torch.randn(6, 12), dtype=torch.float16)
    args = ((e, None, 2, 7, 1, 0, False) if storage == "seeded" else
            (e, backend.put(torch.randn(3, 5, 12), dtype=torch.float32), 0, 0, 0, 0, False))
    torch.library.opcheck(op, args, test_utils=utils)


# ------------------------------------------- reference path: sizes checked first, only what is needed
@pytest.mark.parametrize("spec,match", [
    # signals (P, N, d) of 8 TB: the old reference generated the P matrices first (hours)
    (FeedbackSpec(10 ** 6, 10 ** 6, 8), r"dfa_feedback: the signals \(P=1000000, N=2, d=1000000\).*would need"),
    (FeedbackSpec(10 ** 6, 10 ** 6, 8, shared=True), r"the signals.*would need"),
    # small signals, but 4 TB of matrices to generate (1e12 entries: days on the CPU)
    (FeedbackSpec(10 ** 4, 10 ** 4, 10 ** 4), r"dfa_feedback: the seeded feedback \(points=10000 matrices of "
                                              r"dim=10000 × error_dim=10000\).*would need"),
])
def test_reference_refuses_absurd_feedback_before_generating(spec, match):
    e = torch.randn(2 if spec.error_dim == 8 else 1, spec.error_dim)
    for call in (lambda: ref_feedback(e, spec), lambda: okadfa.dfa_feedback(e, spec, backend="reference")):
        with pytest.raises(ValueError, match=match):
            within(20, call)


def _recording_materialize(monkeypatch):
    import okadfa.reference.dfa as ref
    shapes, materialize = [], ref.materialize_feedback

    def recording(spec, **kwargs):
        out = materialize(spec, **kwargs)
        shapes.append(tuple(out.shape))
        return out
    monkeypatch.setattr(ref, "materialize_feedback", recording)
    return shapes


def test_reference_generates_one_matrix_for_shared_feedback(monkeypatch):
    """Shared feedback: the reference generates and holds one (d, E) matrix, not P copies of it,
    and every point's signal is that one product, bit for bit."""
    shapes = _recording_materialize(monkeypatch)
    spec = FeedbackSpec(64, 12, 20, seed=3, shared=True)
    e = _error(9, 20)
    out = ref_feedback(e, spec)
    assert shapes == [(1, 12, 20)] and out.shape == (64, 9, 12)
    b = materialize_feedback(spec, dtype=torch.float64)
    assert_close(out[63], e @ b[0].T, REORDERED)
    assert all(torch.equal(out[p], out[0]) for p in (1, 63))
    h, w = torch.randn(9, 20, dtype=torch.float64), torch.randn(30, 20, dtype=torch.float64)
    t = torch.randint(0, 30, (9,))
    _, gh, _, s = okadfa.reference.dfa_head(h, w, t, spec)
    assert shapes[1:] == [(1, 12, 20)] and s.shape == (64, 9, 12)
    assert_close(s[40], gh @ b[0].T, REORDERED)


@pytest.mark.parametrize("spec,match", [
    (FeedbackSpec(10 ** 6, 10 ** 6, 8), r"dfa_head: the signals \(P=1000000, N=3, d=1000000\).*would need"),
    (FeedbackSpec(10 ** 4, 10 ** 4, 10 ** 4), r"dfa_head: the seeded feedback.*would need"),
])
def test_reference_head_refuses_absurd_feedback_before_generating(spec, match):
    E = spec.error_dim
    h, w, t = torch.randn(3 if E == 8 else 1, E), torch.randn(5, E), torch.tensor([1, 2, 3][:3 if E == 8 else 1])
    for call in (lambda: okadfa.reference.dfa_head(h, w, t, spec),
                 lambda: okadfa.dfa_head(h, w, t, spec, backend="reference")):
        with pytest.raises(ValueError, match=match):
            within(20, call)


def test_reference_head_bounds_the_logits_of_a_chunk(monkeypatch):
    """chunk_size=None: about 2²³/V rows at a time (as the native kernels), so no N×V logits of
    arbitrary size; an explicit chunk whose logits could never fit is refused, naming chunk_size."""
    import okadfa.reference.dfa as ref
    rows, log_softmax = [], torch.log_softmax

    def recording(x, *args, **kwargs):
        rows.append(x.shape[0])
        return log_softmax(x, *args, **kwargs)
    monkeypatch.setattr(ref.torch, "log_softmax", recording)
    monkeypatch.setattr(ref, "CHUNK_ENTRIES", 40 * 50, raising=False)   # 40 rows of V = 50 per chunk
    h, w = torch.randn(100, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64)
    t = torch.randint(0, 50, (100,))
    spec = FeedbackSpec(2, 4, 50, seed=1)
    chunked = ref.dfa_head(h, w, t, spec, error="logits")
    assert rows == [40, 40, 20]
    whole = ref.dfa_head(h, w, t, spec, error="logits", chunk_size=100)
    for a, b in zip(chunked, whole):
        assert_close(a, b, REORDERED)
    n = 10 ** 6                                                   # 10¹² logits in one chunk: 4 TB
    h, w, t = torch.randn(n, 1), torch.randn(n, 1), torch.zeros(n, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"dfa_head: the logits of one chunk \(chunk_size=1000000 rows, "
                                         r"V=1000000\).*would need.*pass a smaller chunk_size"):
        within(20, lambda: ref.dfa_head(h, w, t, FeedbackSpec(1, 1, 1), chunk_size=n))


def test_every_backend_refuses_signals_that_could_never_be_allocated(backend):
    """An absurd FeedbackSpec is a ValueError naming the sizes before dispatch, on every backend."""
    e = backend.put(torch.randn(4, 6), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"dfa_feedback: the signals \(P=4000000000, N=4, d=2000000000\)"):
        okadfa.dfa_feedback(e, FeedbackSpec(4_000_000_000, 2_000_000_000, 6), backend=backend.name)
