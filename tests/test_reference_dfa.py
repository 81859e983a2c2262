"""DFA reference path: Philox known answers, the seeded feedback definition, dfa_feedback, dfa_head vs autograd."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import okadfa
from conftest import assert_rms_close
from okadfa.reference.dfa import dfa_feedback, dfa_head
from okadfa.feedback import FeedbackSpec, _seeded_values, materialize_feedback, philox4x32

M32 = 0xFFFFFFFF


def philox_python(counter, key, rounds=10):
    """Philox4x32 on Python ints (exact products): an independent check of the tensor version."""
    c, (k0, k1) = list(counter), key
    for r in range(rounds):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M32, (p0 >> 32) ^ c[3] ^ k1, p0 & M32]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c


def entry_python(seed, p, idx, E, dist):
    """B[p, i, j] with idx = i·E + j, straight from the normative definition (float32 scalars)."""
    x0, x1, _, _ = philox_python((idx & M32, p, idx >> 32, 0), (seed & M32, (seed >> 32) & M32))
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    u_a, u_b = f32(((x0 >> 8) + 1) * 2.0 ** -24), f32((x1 >> 8) * 2.0 ** -24)
    if dist == "uniform":
        return (2 * u_b - 1) / f32(math.sqrt(E))
    return torch.sqrt(-2 * torch.log(u_a)) * torch.cos(f32(2 * math.pi) * u_b) / f32(math.sqrt(E))


# ---------------------------------------------------------------------------------------------- Philox
@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
], ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    """Random123's published known-answer vectors for Philox4x32-10."""
    assert tuple(int(x) for x in philox4x32(counter, key)) == expected
    as_tensors = tuple(torch.tensor([c], dtype=torch.int64) for c in counter)
    assert tuple(int(x[0]) for x in philox4x32(as_tensors, key)) == expected


def test_philox_matches_python_ints():
    g = torch.Generator().manual_seed(0)
    counter = [torch.randint(0, 2 ** 32, (37,), generator=g, dtype=torch.int64) for _ in range(4)]
    counter[0][:3] = torch.tensor([0, M32, 0x80000000])                # edge words
    key = (0xDEADBEEF, torch.tensor(0x12345678))
    out = philox4x32(counter, key)
    for n in range(37):
        expected = philox_python([int(c[n]) for c in counter], (0xDEADBEEF, 0x12345678))
        assert [int(x[n]) for x in out] == expected
    assert all(x.dtype == torch.int64 and x.shape == (37,) for x in out)


@pytest.mark.parametrize("counter,key,exc,match", [
    ((0, 0, 0, 2 ** 32), (0, 0), ValueError, r"counter\[3\]"),
    ((0, torch.tensor([-1]), 0, 0), (0, 0), ValueError, r"counter\[1\]"),
    ((0, torch.tensor([1.0]), 0, 0), (0, 0), TypeError, r"counter\[1\]"),
    ((0, 0, 0, 0), (0, -5), ValueError, r"key\[1\]"),
    ((0, 0, 0), (0, 0), ValueError, "counter must have 4 words"),
])
def test_philox_bad_input(counter, key, exc, match):
    with pytest.raises(exc, match=match):
        philox4x32(counter, key)


# ------------------------------------------------------------------------------------- seeded feedback
@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_seeded_entries_follow_the_definition(dist):
    seed, P, d, E = 2 ** 40 + 12345, 3, 5, 7
    b = materialize_feedback(FeedbackSpec(P, d, E, seed=seed, dist=dist))
    for p, i, j in [(0, 0, 0), (1, 2, 3), (2, 4, 6), (2, 0, 5)]:
        expected = entry_python(seed, p, i * E + j, E, dist)
        if dist == "uniform":
            assert b[p, i, j] == expected                              # bit-exact
        else:
            torch.testing.assert_close(b[p, i, j], expected, rtol=4e-7, atol=1e-7)
    # Flat indices past 2³² use the counter's third word (large vocab-size errors).
    big = torch.tensor([2 ** 32 + 5, 3 * 2 ** 32 - 1], dtype=torch.int64)
    got = _seeded_values(seed, 4, big, 50257, dist)
    for n, idx in enumerate(big.tolist()):
        torch.testing.assert_close(got[n], entry_python(seed, 4, idx, 50257, dist), rtol=4e-7, atol=1e-7)


def test_materialize_is_deterministic_and_seed_dependent():
    spec = FeedbackSpec(3, 16, 24, seed=7)
    a = materialize_feedback(spec)
    assert a.shape == spec.shape == (3, 16, 24) and a.dtype == torch.float32
    assert torch.equal(a, materialize_feedback(spec))
    assert torch.equal(a.double(), materialize_feedback(spec, dtype=torch.float64))
    assert not torch.allclose(a, materialize_feedback(dataclasses.replace(spec, seed=8)))
    assert not torch.allclose(a[0], a[1])                               # points differ
    high = materialize_feedback(FeedbackSpec(1, 16, 24, seed=2 ** 40 + 7))  # high seed bits count
    assert not torch.allclose(high[0], a[0])
    # storage does not change the matrices; more points extend, never reshuffle, the first ones.
    assert torch.equal(a, materialize_feedback(dataclasses.replace(spec, storage="stored")))
    assert torch.equal(a, materialize_feedback(dataclasses.replace(spec, points=5))[:3])


def test_normal_statistics():
    """mean 0 and variance 1/E, to 5 standard errors of a sample of n entries."""
    P, d, E = 4, 300, 97
    b = materialize_feedback(FeedbackSpec(P, d, E, seed=1), dtype=torch.float64)
    x, n = b.flatten(), b.numel()
    assert abs(x.mean().item()) < 5 * math.sqrt(1 / E / n)
    assert abs(x.var().item() * E - 1) < 5 * math.sqrt(2 / n)            # Var[s²] = 2σ⁴/n for a normal
    assert abs((x.pow(4).mean() * E ** 2).item() - 3) < 5 * math.sqrt(96 / n)   # kurtosis 3
    r = torch.corrcoef(b.reshape(P, -1))[0, 1].item()                     # independent points
    assert abs(r) < 5 / math.sqrt(d * E)


def test_uniform_range_and_statistics():
    P, d, E = 3, 200, 64
    b = materialize_feedback(FeedbackSpec(P, d, E, dist="uniform", seed=3), dtype=torch.float64)
    assert (b >= -1 / math.sqrt(E)).all() and (b < 1 / math.sqrt(E)).all()
    x, n, var = b.flatten(), b.numel(), 1 / (3 * E)
    assert abs(x.mean().item()) < 5 * math.sqrt(var / n)
    assert abs(x.var().item() / var - 1) < 5 * math.sqrt(0.8 / n)        # μ₄ = 9σ⁴/5 for a uniform


def test_shared_uses_point_zero_for_every_point():
    spec = FeedbackSpec(4, 10, 6, seed=9, shared=True)
    b = materialize_feedback(spec)
    first = materialize_feedback(dataclasses.replace(spec, shared=False))[0]
    assert b.shape == (4, 10, 6) and all(torch.equal(b[p], first) for p in range(4))
    assert b.is_contiguous()
    b[1].zero_()                                                          # a real copy, safe as a buffer
    assert torch.equal(b[0], first)


@pytest.mark.parametrize("field,value", [
    ("points", 0), ("points", True), ("dim", -1), ("error_dim", 1.5), ("seed", -1), ("seed", 2 ** 64),
    ("dist", "cauchy"), ("shared", 1), ("storage", "disk"),
])
def test_spec_validation(field, value):
    kwargs = dict(points=2, dim=3, error_dim=4)
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"FeedbackSpec.{field}"):
        FeedbackSpec(**kwargs)


def test_spec_is_frozen_and_materialize_checks_arguments():
    spec = FeedbackSpec(2, 3, 4, seed=2 ** 64 - 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1
    with pytest.raises(TypeError, match="spec must be a FeedbackSpec"):
        materialize_feedback((2, 3, 4))
    with pytest.raises(TypeError, match="dtype"):
        materialize_feedback(spec, dtype=torch.int32)


# ---------------------------------------------------------------------------------------- dfa_feedback
@pytest.mark.parametrize("N,P,d,E", [(1, 1, 1, 1), (33, 5, 12, 20), (64, 2, 9, 50)], ids=lambda v: str(v))
@pytest.mark.parametrize("stored", [True, False], ids=["stored", "seeded"])
def test_dfa_feedback_matches_einsum(N, P, d, E, stored):
    spec = FeedbackSpec(P, d, E, seed=4)
    e = torch.randn(N, E, dtype=torch.float64, generator=torch.Generator().manual_seed(N))
    b64 = materialize_feedback(spec, dtype=torch.float64)
    out = dfa_feedback(e, b64 if stored else spec)
    expected = torch.stack([e @ b64[p].T for p in range(P)])
    assert out.shape == (P, N, d) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dfa_feedback_low_precision(dtype):
    spec = FeedbackSpec(3, 24, 40, seed=5)
    e = torch.randn(17, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = dfa_feedback(e.to(dtype).double(), materialize_feedback(spec, dtype=torch.float64))
    for feedback in (spec, materialize_feedback(spec, dtype=torch.float64), materialize_feedback(spec).to(dtype)):
        out = dfa_feedback(e.to(dtype), feedback)
        assert out.dtype == dtype and out.shape == (3, 17, 24)
        assert_rms_close(out, expected, dtype, what="dfa_feedback")


def test_dfa_feedback_errors():
    e, spec = torch.randn(4, 6), FeedbackSpec(2, 3, 6)
    cases = [
        ((e.long(), spec), TypeError, "error must be a floating-point"),
        (([[1.0]], spec), TypeError, "error must be a torch.Tensor"),
        ((e[0], spec), ValueError, r"error must have shape \(N, E\)"),
        ((e, FeedbackSpec(2, 3, 5)), ValueError, "feedback.error_dim is 5 but the error has 6 columns"),
        ((e, torch.randn(2, 3, 5)), ValueError, r"feedback must have shape \(P, d, 6\)"),
        ((e, torch.randn(3, 6)), ValueError, r"feedback must have shape \(P, d, 6\)"),
        ((e, torch.ones(2, 3, 6, dtype=torch.int64)), TypeError, "feedback must be a floating-point"),
        ((e, [[[1.0]]]), TypeError, "feedback must be a FeedbackSpec or a tensor"),
        ((e, torch.empty(2, 3, 6, device="meta")), ValueError, "feedback is on meta"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            okadfa.dfa_feedback(*args, backend="reference")    # the op validates, the reference does not


# -------------------------------------------------------------------------------------------- dfa_head
def head_inputs(N=29, d=10, V=17, dtype=torch.float64, ignored=(3, 10, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(V, d, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[list(ignored)] = -100
    return h, w, t


def autograd_head(h, w, t, ignore_index=-100):
    """loss, dloss/dh, dloss/dw and dloss/dlogits by autograd through F.cross_entropy (float64)."""
    h, w = h.double().requires_grad_(), w.double().requires_grad_()
    logits = h @ w.T
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w, logits)))


@pytest.mark.parametrize("chunk", [None, 1, 7, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("error", ["hidden", "logits"])
@pytest.mark.parametrize("stored", [True, False], ids=["stored", "seeded"])
def test_dfa_head_matches_autograd(chunk, error, stored):
    h, w, t = head_inputs()
    E = h.shape[1] if error == "hidden" else w.shape[0]
    spec = FeedbackSpec(3, 8, E, seed=1)                       # d_p = 8 differs from d = 10
    fb = materialize_feedback(spec, dtype=torch.float64)
    loss, gh, gw, signals = dfa_head(h, w, t, fb if stored else spec, chunk_size=chunk, error=error)
    ref_loss, ref_gh, ref_gw, ref_dy = autograd_head(h, w, t)
    assert loss.shape == () and gh.shape == h.shape and gw.shape == w.shape and signals.shape == (3, 29, 8)
    assert loss.dtype == gh.dtype == gw.dtype == signals.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-12, atol=1e-14)
    e = ref_gh if error == "hidden" else ref_dy
    torch.testing.assert_close(signals, torch.einsum("ne,pde->pnd", e, fb), rtol=1e-10, atol=1e-14)
    assert not signals[:, [3, 10, 11]].any()                   # ignored rows carry no error


@pytest.mark.parametrize("ignore_index", [0, 5, -1])
def test_dfa_head_other_ignore_index(ignore_index):
    h, w, t = head_inputs(ignored=())
    t[::4] = ignore_index
    loss, gh, gw, _ = dfa_head(h, w, t, FeedbackSpec(1, 10, 10), ignore_index=ignore_index)
    ref_loss, ref_gh, ref_gw, _ = autograd_head(h, w, t, ignore_index)
    torch.testing.assert_close((loss, gh, gw), (ref_loss, ref_gh, ref_gw), rtol=1e-12, atol=1e-14)


def test_dfa_head_chunked_equals_unchunked_float32():
    h, w, t = head_inputs(N=100, d=24, V=300, dtype=torch.float32)
    fb = FeedbackSpec(4, 24, 300, seed=2)
    full = dfa_head(h, w, t, fb, error="logits")
    for chunk in (1, 13, 99, 100, 1000):
        torch.testing.assert_close(dfa_head(h, w, t, fb, error="logits", chunk_size=chunk), full,
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dfa_head_half_precision(dtype):
    h, w, t = head_inputs(N=40, d=16, V=33, dtype=dtype)
    fb = FeedbackSpec(2, 16, 16, seed=3)
    loss, gh, gw, signals = dfa_head(h, w, t, fb, chunk_size=9)
    ref_loss, ref_gh, ref_gw, _ = autograd_head(h, w, t)
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == signals.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)   # float32 accumulation
    assert_rms_close(gh, ref_gh, dtype, what="grad_h")
    assert_rms_close(gw, ref_gw, dtype, what="grad_w_dec")
    assert_rms_close(signals, dfa_feedback(ref_gh, materialize_feedback(fb, dtype=torch.float64)), dtype,
                     what="signals")


def test_dfa_head_nothing_to_learn_from():
    h, w, t = head_inputs(N=4, d=3, V=5, dtype=torch.float32, ignored=range(4))
    loss, gh, gw, s = dfa_head(h, w, t, FeedbackSpec(2, 3, 3), chunk_size=3)
    assert loss.item() == 0 and not gh.any() and not gw.any() and not s.any()
    loss, gh, gw, s = dfa_head(h[:0], w, t[:0], FeedbackSpec(2, 6, 5), error="logits")
    assert loss.item() == 0 and gh.shape == (0, 3) and not gw.any() and s.shape == (2, 0, 6)


def test_dfa_head_bad_input():
    h, w, t = head_inputs(N=4, d=3, V=5, dtype=torch.float32, ignored=())
    fb = FeedbackSpec(2, 3, 3)
    cases = [
        (dict(h=h[0]), ValueError, r"h must have shape \(N, d\)"),
        (dict(h=h.long()), TypeError, "h must be a floating-point"),
        (dict(w_dec=w[:, :2]), ValueError, r"w_dec must have shape \(V, 3\)"),
        (dict(w_dec=w.to("meta")), ValueError, "w_dec is on meta"),
        (dict(targets=t.int()), TypeError, "targets must be an int64"),
        (dict(targets=t[:3]), ValueError, r"targets must have shape \(4,\)"),
        (dict(targets=torch.tensor([0, 1, 5, 2])), ValueError, r"targets must be in \[0, 5\).*found 5"),
        (dict(targets=torch.tensor([0, -3, 1, 2])), ValueError, r"targets must be in \[0, 5\).*found -3"),
        (dict(chunk_size=0), ValueError, "chunk_size must be positive"),
        (dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
        (dict(error="output"), ValueError, "error must be 'hidden' or 'logits'"),
        (dict(feedback=FeedbackSpec(2, 3, 5)), ValueError, "error='hidden' needs E = d = 3"),
        (dict(feedback=FeedbackSpec(2, 3, 3), error="logits"), ValueError, "error='logits' needs E = V = 5"),
        (dict(feedback=torch.randn(2, 3, 4)), ValueError, r"feedback must have shape \(P, d, 3\)"),
    ]
    for change, exc, match in cases:
        args = dict(h=h, w_dec=w, targets=t, feedback=fb) | change
        with pytest.raises(exc, match=match):
            okadfa.dfa_head(args.pop("h"), args.pop("w_dec"), args.pop("targets"), args.pop("feedback"),
                            backend="reference", **args)
