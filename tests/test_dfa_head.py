"""dfa_head on every backend (the `backend` fixture) against the float64 reference
(okadfa.reference.dfa_head) and against autograd through F.cross_entropy: seeded and stored
feedback, hidden and logits error, ignore_index, chunking, edge sizes, dtypes, validation and the
registered ops. Tolerances: tests/tolerances.py."""
import sys

import pytest
import torch
import torch.nn.functional as F

import okadfa
from conftest import FEEDBACK_KINDS, HALF, assert_refused_or_same, backend_info, make_feedback, make_head_inputs
from okadfa.feedback import FeedbackSpec, materialize_feedback
from okadfa.reference import dfa_head as ref_head
from tolerances import (F32_ACCUMULATED, REORDERED, assert_close, assert_half_close, assert_max_rel_close,
                        assert_rms_close)

OUTPUTS = ("loss", "grad_h", "grad_w_dec", "signals")


def _assert_head_close(got, expected, dtype, what=""):
    """Each of the four outputs against float64 at dtype's accuracy, in RMS and in max error."""
    for name, a, e in zip(OUTPUTS, got, expected):
        if dtype == torch.float64:
            assert_close(a, e, REORDERED, msg=lambda m: f"{what} {name}: {m}")
        else:
            assert_rms_close(a, e, dtype, what=f"{what} {name}")
            assert_max_rel_close(a, e, dtype, what=f"{what} {name}")


def autograd_head(h, w, t, b, error="hidden", ignore_index=-100):
    """loss, dloss/dh, dloss/dw and the signals e·B_pᵀ by autograd through F.cross_entropy, in
    h's dtype: float64 for the ground truth, a half type for plain PyTorch at that precision."""
    h, w = h.detach().requires_grad_(), w.detach().to(h.dtype).requires_grad_()
    logits = h @ w.T
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index)
    gh, gw, dy = torch.autograd.grad(loss, (h, w, logits))
    e = gh if error == "hidden" else dy
    return loss.detach(), gh, gw, torch.einsum("ne,pde->pnd", e, b.to(h.dtype))


@pytest.mark.parametrize("chunk", [16, None], ids=["chunk16", "default"])
@pytest.mark.parametrize("error", ["hidden", "logits"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", FEEDBACK_KINDS)
def test_matches_reference(backend, kind, dtype, error, chunk):
    backend.skip_unless(dtype)
    N, d, V, P, dp = 53, 24, 101, 3, 10      # 16 does not divide 53; nothing a power of two
    h, w, t = make_head_inputs(N, d, V)
    h, w = h.to(dtype), w.to(dtype)
    feedback, b64 = make_feedback(kind, P, dp, d if error == "hidden" else V, 2 ** 63 + 1, dtype, backend.device)
    got = okadfa.dfa_head(*backend.put(h, w, dtype=dtype), t.to(backend.device), feedback, chunk_size=chunk,
                          error=error, backend=backend.name)
    assert [x.dtype for x in got] == [dtype] * 4 and all(x.device.type == backend.device for x in got)
    _assert_head_close(got, ref_head(h.double(), w.double(), t, b64, error=error), dtype)
    if kind == "shared":
        assert torch.equal(got[3][2], got[3][0])


@pytest.mark.parametrize("chunk", [None, 1, 7, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("error", ["hidden", "logits"])
@pytest.mark.parametrize("stored", [True, False], ids=["stored", "seeded"])
def test_equals_autograd_cross_entropy(backend, chunk, error, stored):
    """loss and the head's gradients are those of F.cross_entropy; the signals project its error;
    ignored rows carry no error."""
    h, w, t = make_head_inputs(29, 10, 17, ignored=(3, 10, 11))
    h, w = h.to(backend.exact), w.to(backend.exact)
    spec = FeedbackSpec(3, 8, 10 if error == "hidden" else 17, seed=1)           # d_p = 8 differs from d = 10
    b64 = materialize_feedback(spec, dtype=torch.float64)
    feedback = backend.put(b64) if stored else spec
    got = okadfa.dfa_head(*backend.put(h, w), t.to(backend.device), feedback, chunk_size=chunk, error=error,
                          backend=backend.name)
    assert got[0].shape == () and got[3].shape == (3, 29, 8)
    _assert_head_close(got, autograd_head(h.double(), w.double(), t, b64, error), backend.exact)
    assert not got[3][:, [3, 10, 11]].any()


@pytest.mark.parametrize("ignore_index", [0, 5, -1])
def test_ignore_index_may_be_a_class(backend, ignore_index):
    """Rows whose target equals ignore_index, a real class id or not, are dropped."""
    h, w, t = make_head_inputs(20, 10, 33, seed=7, ignored=(0, 4, 19), ignore_index=ignore_index)
    h, w = h.to(backend.exact), w.to(backend.exact)
    spec = FeedbackSpec(3, 6, 10, seed=2 ** 63, dist="uniform", shared=True)
    got = okadfa.dfa_head(*backend.put(h, w), t.to(backend.device), spec, chunk_size=6, ignore_index=ignore_index,
                          backend=backend.name)
    b64 = materialize_feedback(spec, dtype=torch.float64)
    _assert_head_close(got, autograd_head(h.double(), w.double(), t, b64, ignore_index=ignore_index), backend.exact)


@pytest.mark.parametrize("case", ["N=1", "all-ignored", "N=0", "ignore_index=7", "chunk>N"])
def test_edge_cases(backend, case):
    N = {"N=1": 1, "N=0": 0}.get(case, 20)
    h, w, t = make_head_inputs(N, 9, 17, ignored=())
    h, w = h.to(backend.exact), w.to(backend.exact)
    ignore_index = 7 if case == "ignore_index=7" else -100
    if case == "all-ignored":
        t = torch.full_like(t, -100)
    kw = dict(ignore_index=ignore_index, chunk_size=64 if case == "chunk>N" else 4)
    spec, b64 = make_feedback("normal", 2, 5, 9, 4, backend.exact, backend.device)
    got = okadfa.dfa_head(*backend.put(h, w), t.to(backend.device), spec, backend=backend.name, **kw)
    _assert_head_close(got, ref_head(h.double(), w.double(), t, b64, **kw), backend.exact, what=case)
    if case == "all-ignored":
        assert all(not x.any() for x in got)


def test_nothing_to_learn_from_in_logits_mode(backend):
    """N = 0 with error='logits' and d_p ≠ d: zero loss and gradients, signals of shape (P, 0, d_p)."""
    h, w, t = make_head_inputs(4, 3, 5, ignored=())
    h, w = backend.put(h, w, dtype=torch.float32)
    loss, gh, gw, s = okadfa.dfa_head(h[:0], w, t[:0].to(backend.device), FeedbackSpec(2, 6, 5), error="logits",
                                      backend=backend.name)
    assert loss.item() == 0 and gh.shape == (0, 3) and not gw.any() and s.shape == (2, 0, 6)


@pytest.mark.parametrize("hdtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                           (torch.bfloat16, torch.float32), (torch.float32, torch.float64)])
@pytest.mark.parametrize("error", ["hidden", "logits"])
def test_mixed_and_half_dtypes(backend, hdtype, wdtype, error):
    """The loss in float32 (or wider), each gradient in its input's dtype, the signals in h's; half
    types at most 2× as far from float64 as plain PyTorch in that dtype."""
    backend.skip_unless(hdtype)
    backend.skip_unless(wdtype)
    h, w, t = make_head_inputs(30, 16, 50)
    h, w = h.to(hdtype), w.to(wdtype)
    spec = FeedbackSpec(2, 16, 16 if error == "hidden" else 50, seed=2)
    got = okadfa.dfa_head(backend.put(h, dtype=hdtype), backend.put(w, dtype=wdtype), t.to(backend.device), spec,
                          chunk_size=8, error=error, backend=backend.name)
    acc = torch.promote_types(torch.promote_types(hdtype, wdtype), torch.float32)
    assert [x.dtype for x in got] == [acc, hdtype, wdtype, hdtype]
    b64 = materialize_feedback(spec, dtype=torch.float64)
    expected = autograd_head(h.double(), w.double(), t, b64, error)
    if hdtype not in HALF:
        return _assert_head_close(got, expected, hdtype)
    plain = autograd_head(h, w.to(hdtype), t, b64, error)
    assert_close(got[0].double(), expected[0], F32_ACCUMULATED)
    for name, a, e, b in zip(OUTPUTS[1:], got[1:], expected[1:], plain[1:]):
        assert_half_close(a, e, b, a.dtype, what=name)
        assert_max_rel_close(a, e, a.dtype, what=name)


def test_chunked_equals_unchunked(backend):
    h, w, t = make_head_inputs(20, 24, 120, ignored=(3, 10, 11))
    h, w = backend.put(h, w, dtype=torch.float32)
    t = t.to(backend.device)
    fb = FeedbackSpec(4, 24, 120, seed=2)
    full = okadfa.dfa_head(h, w, t, fb, error="logits", backend=backend.name)
    for chunk in (1, 7, 19, 20, 1000):
        assert_close(okadfa.dfa_head(h, w, t, fb, error="logits", chunk_size=chunk, backend=backend.name), full,
                     REORDERED)


def test_deterministic(backend):
    h, w, t = make_head_inputs(150, 40, 500)
    args = (*backend.put(h, w, dtype=torch.float32), t.to(backend.device), FeedbackSpec(3, 40, 40))
    a = okadfa.dfa_head(*args, chunk_size=37, backend=backend.name)
    b = okadfa.dfa_head(*args, chunk_size=37, backend=backend.name)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.triton
def test_triton_refuses_float64_before_any_kernel():
    triton = backend_info("triton")
    h, w, t = (x.to(triton.device) for x in make_head_inputs(3, 4, 5, ignored=()))
    with pytest.raises(TypeError, match="float64"):
        okadfa.dfa_head(h, w, t, FeedbackSpec(2, 4, 4), backend="triton")


def _bad_calls():
    h, w, t = torch.randn(6, 4), torch.randn(10, 4), torch.randint(0, 10, (6,))
    spec = FeedbackSpec(2, 4, 4)
    return [
        (dict(h=h[0]), ValueError, r"h must have shape \(N, d\)"),
        (dict(h=h.long()), TypeError, "h must be a floating-point"),
        (dict(w_dec=torch.randn(10, 5)), ValueError, r"w_dec must have shape \(V, 4\)"),
        (dict(w_dec=w.to("meta")), ValueError, "w_dec is on meta"),
        (dict(targets=t.int()), TypeError, "targets must be an int64"),
        (dict(targets=t[:5]), ValueError, r"targets must have shape \(6,\)"),
        (dict(targets=torch.full((6,), 10)), ValueError, r"targets must be in \[0, 10\).*found 10"),
        (dict(targets=torch.tensor([0, -3, 1, 2, 0, 0])), ValueError, r"targets must be in \[0, 10\).*found -3"),
        (dict(feedback=FeedbackSpec(2, 4, 7)), ValueError, "feedback.error_dim is 7"),
        (dict(feedback=FeedbackSpec(2, 4, 4), error="logits"), ValueError,
         "feedback.error_dim is 4 but error='logits'"),
        (dict(feedback=torch.randn(2, 4, 5)), ValueError, r"feedback must have shape \(P, d, 4\)"),
        (dict(feedback="seeded"), TypeError, "feedback must be a FeedbackSpec"),
        (dict(error="hid"), ValueError, "error must be 'hidden' or 'logits'"),
        (dict(chunk_size=0), ValueError, "chunk_size must be positive"),
        (dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ], dict(h=h, w_dec=w, targets=t, feedback=spec)


@pytest.mark.parametrize("index", range(len(_bad_calls()[0])))
def test_bad_input(index, monkeypatch):
    """Clear errors from the Python layer, before any kernel runs (the kernel path is poisoned)."""
    cases, good = _bad_calls()
    change, exc, match = cases[index]
    module = sys.modules["okadfa.ops.dfa_head"]
    for name in ("reference", "native_feedback_args"):     # reached only after validation
        monkeypatch.setattr(module, name, None)
    with pytest.raises(exc, match=match):
        okadfa.dfa_head(**{**good, **change})


def test_raw_op_rejects_bad_input_before_any_kernel(backend):
    """torch.ops.okadfa.(triton_)dfa_head called directly skips the Python checks: the op itself
    refuses out-of-range targets (which would give a loss or read out of bounds), shapes,
    strides, devices and arguments."""
    head = backend.op("dfa_head")
    h, w = backend.put(torch.randn(4, 3), torch.randn(5, 3), dtype=torch.float32)
    t = lambda *x: torch.tensor(x, device=backend.device)    # noqa: E731
    ok = t(0, 1, 2, 2)
    stored = backend.put(torch.randn(1, 3, 4), dtype=torch.float32)
    calls = [
        ("targets", lambda: head(h, w, t(0, 1, 9, 2), None, 1, 3, 0, 0, False, -100, False, 2)),
        ("targets", lambda: head(h, w, t(0, -2, 1, 2), None, 1, 3, 0, 0, False, -100, False, 2)),
        ("targets", lambda: head(h, w, ok[:3], None, 1, 3, 0, 0, False, -100, False, 2)),
        ("targets", lambda: head(h, w, ok.int(), None, 1, 3, 0, 0, False, -100, False, 2)),
        ("w_dec", lambda: head(h, w[:, :2].contiguous(), ok, None, 1, 3, 0, 0, False, -100, False, 2)),
        ("feedback", lambda: head(h, w, ok, stored, 1, 3, 0, 0, False, -100, False, 2)),
        ("chunk_size", lambda: head(h, w, ok, None, 1, 3, 0, 0, False, -100, False, 0)),
        ("one device", lambda: head(h, w.to("meta"), ok, None, 1, 3, 0, 0, False, -100, False, 2)),
    ]
    for name, call in calls:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=rf"okadfa: .*{name}"):
            call()
    args = (ok, None, 1, 3, 0, 0, False, -100, False, 2)
    for name, strided in (("h", (h.T.contiguous().T, w)), ("w_dec", (h, w.T.contiguous().T))):
        assert_refused_or_same(lambda: head(*strided, *args), lambda: head(h, w, *args), name)


@pytest.mark.parametrize("storage", ["seeded", "stored"])
def test_opcheck(backend, storage):
    """Schema, fake tensors (their shapes and dtypes are the real ones, mixed dtypes included),
    autograd registration and AOT dispatch (not for the Triton op under TRITON_INTERPRET=1: see
    test_favor_attention.test_opcheck)."""
    op = backend.op("dfa_head")
    utils = ("test_schema", "test_faketensor")
    if backend.name != "triton" or backend.device == "cuda":
        utils += ("test_autograd_registration", "test_aot_dispatch_dynamic")
    h, w, t = make_head_inputs(12, 8, 20)
    h, w, t = backend.put(h, dtype=torch.bfloat16), backend.put(w, dtype=torch.float32), t.to(backend.device)
    args = ((None, 2, 7, 1, 0, False) if storage == "seeded" else
            (backend.put(torch.randn(3, 5, 20), dtype=torch.float32), 0, 0, 0, 0, False))
    torch.library.opcheck(op, (h, w, t, *args, -100, storage == "stored", 4), test_utils=utils)


@pytest.mark.parametrize("error", ["hidden", "logits"])
def test_cpu_bfloat16_gemms(cpu_bf16, error):
    """bfloat16 h and w_dec on the cpu backend at a size where every chunk's GEMMs take the
    bfloat16 path (OKADFA_CPU_HALF_GEMM picks the engine): every output at most 2× as far from
    float64 as plain PyTorch in bfloat16, and a bfloat16 engine actually changes the result."""
    h, w, t = make_head_inputs(300, 64, 1000)
    h, w = h.to(torch.bfloat16), (w / 4).to(torch.bfloat16)
    spec = FeedbackSpec(2, 16, 64 if error == "hidden" else 1000, seed=2)
    got = okadfa.dfa_head(h, w, t, spec, chunk_size=128, error=error, backend=cpu_bf16.name)
    b64 = materialize_feedback(spec, dtype=torch.float64)
    expected, plain = autograd_head(h.double(), w.double(), t, b64, error), autograd_head(h, w, t, b64, error)
    for name, a, e, b in zip(OUTPUTS, got, expected, plain):
        assert_half_close(a, e, b, torch.bfloat16, what=name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OKADFA_CPU_HALF_GEMM", "float32")
        in_float32 = okadfa.dfa_head(h, w, t, spec, chunk_size=128, error=error, backend=cpu_bf16.name)
    if okadfa.backends()["cpu"]["bfloat16"].startswith("bfloat16"):
        assert not torch.equal(got[1], in_float32[1])
