"""DFA references: Philox known answers, seeded feedback, dfa_feedback and dfa_head vs autograd."""
import math

import pytest
import torch
import torch.nn.functional as F

from okadfa.reference import FeedbackSpec, dfa_feedback, dfa_head, materialize_feedback
from okadfa.reference.feedback import philox4x32


@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    """Random123's published test vectors for Philox4x32-10."""
    assert tuple(int(x) for x in philox4x32(counter, key)) == expected


def test_seeded_feedback_is_deterministic_and_seed_dependent():
    spec = FeedbackSpec(3, 16, 24, seed=7)
    a, b = materialize_feedback(spec), materialize_feedback(spec)
    assert a.shape == (3, 16, 24) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, materialize_feedback(FeedbackSpec(3, 16, 24, seed=8)))
    assert not torch.allclose(a[0], a[1])                       # points differ
    big = FeedbackSpec(1, 16, 24, seed=2 ** 40 + 5)              # high seed bits are used
    assert not torch.allclose(materialize_feedback(big), materialize_feedback(FeedbackSpec(1, 16, 24, seed=5)))


def test_normal_feedback_statistics():
    E = 64
    b = materialize_feedback(FeedbackSpec(4, 256, E, seed=1)).double().flatten()
    n = b.numel()
    assert abs(b.mean().item()) < 5 / math.sqrt(n * E)
    assert abs(b.var().item() * E - 1) < 5 * math.sqrt(2 / n)


def test_uniform_feedback_range_and_shared():
    E = 32
    b = materialize_feedback(FeedbackSpec(3, 64, E, dist="uniform", shared=True, seed=3))
    assert (b >= -1 / math.sqrt(E)).all() and (b < 1 / math.sqrt(E)).all()
    assert torch.equal(b[0], b[2])
    assert abs(b[0].double().var().item() * E - 1 / 3) < 0.05


@pytest.mark.parametrize("field,value", [("points", 0), ("dim", -1), ("error_dim", 1.5), ("seed", -1),
                                         ("dist", "cauchy"), ("storage", "disk")])
def test_spec_validation(field, value):
    kwargs = dict(points=2, dim=3, error_dim=4)
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"FeedbackSpec.{field}"):
        FeedbackSpec(**kwargs)


@pytest.mark.parametrize("stored", [True, False])
def test_dfa_feedback_matches_einsum(stored):
    spec = FeedbackSpec(5, 12, 20, seed=4)
    e = torch.randn(33, 20, dtype=torch.float64)
    fb = materialize_feedback(spec, dtype=torch.float64) if stored else spec
    out = dfa_feedback(e, fb)
    expected = torch.stack([e @ materialize_feedback(spec, dtype=torch.float64)[p].T for p in range(5)])
    tol = dict(rtol=1e-12, atol=1e-12) if stored else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, expected, **tol)
    half = dfa_feedback(e.bfloat16(), fb)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, rtol=2e-2, atol=2e-2)


def test_dfa_feedback_errors():
    e = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"feedback must have shape \(P, d, 6\)"):
        dfa_feedback(e, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="error_dim"):
        dfa_feedback(e, FeedbackSpec(2, 3, 5))
    with pytest.raises(TypeError, match="error must be a floating-point"):
        dfa_feedback(e.long(), FeedbackSpec(2, 3, 6))
    with pytest.raises(ValueError, match=r"error must have shape \(N, E\)"):
        dfa_feedback(e[0], FeedbackSpec(2, 3, 6))


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("error", ["hidden", "logits"])
def test_dfa_head_matches_autograd(chunk, error):
    g = torch.Generator().manual_seed(0)
    N, d, V = 29, 10, 17
    h = torch.randn(N, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[[3, 10, 11]] = -100
    E = d if error == "hidden" else V
    fb = materialize_feedback(FeedbackSpec(3, 8, E, seed=1), dtype=torch.float64)
    loss, gh, gw, signals = dfa_head(h.detach(), w.detach(), t, fb, chunk_size=chunk, error=error)
    logits = h @ w.T
    ref = F.cross_entropy(logits, t, ignore_index=-100)
    ref_gh, ref_gw, ref_dy = torch.autograd.grad(ref, (h, w, logits))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-6, atol=1e-8)
    e = ref_gh if error == "hidden" else ref_dy
    torch.testing.assert_close(signals, torch.einsum("ne,pde->pnd", e, fb), rtol=1e-6, atol=1e-8)


def test_dfa_head_all_ignored_and_bad_targets():
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    loss, gh, gw, s = dfa_head(h, w, torch.full((4,), -100), FeedbackSpec(2, 3, 3))
    assert loss.item() == 0 and not gh.any() and not gw.any() and not s.any()
    with pytest.raises(ValueError, match="targets must be in"):
        dfa_head(h, w, torch.tensor([0, 1, 5, 2]), FeedbackSpec(2, 3, 3))
    with pytest.raises(TypeError, match="targets must be an int64"):
        dfa_head(h, w, torch.zeros(4, dtype=torch.int32), FeedbackSpec(2, 3, 3))
