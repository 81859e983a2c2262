"""The seeded feedback definition (okadfa/feedback.py, docs/design.md §4) and every implementation of it:
Philox4x32-10 on tensors, on Python ints and in the Triton kernels; the entries B[p, i, j] as the
reference, the diagnostics and every backend's dfa_feedback (the `backend` fixture) generate them,
bit for bit; FeedbackSpec and materialize_feedback."""
import dataclasses
import math

import pytest
import torch

import okadfa
from conftest import backend_info, within
from okadfa.feedback import FeedbackSpec, _seeded_values, materialize_feedback, philox4x32
from okadfa.ops.dfa_feedback import seeded_feedback_matrix
from tolerances import F32_ROUNDING, assert_close

try:
    import triton
    import triton.language as tl

    from okadfa.kernels import dfa_feedback as tk
    from okadfa.kernels._utils import INTERPRETED
except ImportError:        # the Triton tests below skip, backend_info("triton") says why
    triton = None

M32 = 0xFFFFFFFF
# Random123's published known-answer vectors for Philox4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


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
@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
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


def _triton_device():
    """Where the Triton kernels run here, or a skip with the reason they cannot."""
    return backend_info("triton").device


if triton is not None:      # kernels exposing the in-kernel Philox and the seeded tile generator
    @triton.jit
    def _philox_test_kernel(c_ptr, k_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """out[r] = Philox4x32-10(c[r], k[r]); int64 arrays holding uint32 words."""
        offs = tl.arange(0, BLOCK)
        m = offs < n
        x0, x1, x2, x3 = tk._philox4x32_10(
            tl.load(c_ptr + offs * 4, mask=m).to(tl.uint32), tl.load(c_ptr + offs * 4 + 1, mask=m).to(tl.uint32),
            tl.load(c_ptr + offs * 4 + 2, mask=m).to(tl.uint32), tl.load(c_ptr + offs * 4 + 3, mask=m).to(tl.uint32),
            tl.load(k_ptr + offs * 2, mask=m).to(tl.uint32), tl.load(k_ptr + offs * 2 + 1, mask=m).to(tl.uint32))
        tl.store(out_ptr + offs * 4, x0.to(tl.int64), mask=m)
        tl.store(out_ptr + offs * 4 + 1, x1.to(tl.int64), mask=m)
        tl.store(out_ptr + offs * 4 + 2, x2.to(tl.int64), mask=m)
        tl.store(out_ptr + offs * 4 + 3, x3.to(tl.int64), mask=m)


    def triton_philox(counters, keys):
        """(n, 4) and (n, 2) int64 tensors of uint32 words -> (n, 4) Philox4x32-10 outputs."""
        n = counters.shape[0]
        out = torch.empty(n, 4, dtype=torch.int64, device=_triton_device())
        _philox_test_kernel[(1,)](counters.to(out.device).contiguous(), keys.to(out.device).contiguous(), out, n,
                                  BLOCK=triton.next_power_of_2(n))
        return out.cpu()

    @triton.jit
    def _tile_test_kernel(out_ptr, row0, p, E, k0, k1, sqrt_e, NORMAL: tl.constexpr, LIBDEVICE: tl.constexpr,
                          BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        b = tk._feedback_tile(row0 + r, r, p.to(tl.uint32), E, k0.to(tl.uint32), k1.to(tl.uint32), sqrt_e, NORMAL,
                              LIBDEVICE)
        tl.store(out_ptr + r[:, None] * BLOCK + r[None, :], b)


@pytest.mark.triton
def test_triton_philox_known_answers():
    _triton_device()
    counters = torch.tensor([c for c, _, _ in PHILOX_KAT], dtype=torch.int64)
    keys = torch.tensor([k for _, k, _ in PHILOX_KAT], dtype=torch.int64)
    expected = torch.tensor([x for _, _, x in PHILOX_KAT], dtype=torch.int64)
    assert torch.equal(triton_philox(counters, keys), expected)


@pytest.mark.triton
def test_triton_philox_matches_the_tensor_version_on_random_words():
    _triton_device()
    g = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2 ** 32, (100, 4), generator=g, dtype=torch.int64)
    keys = torch.randint(0, 2 ** 32, (100, 2), generator=g, dtype=torch.int64)
    edge = torch.tensor([2 ** 32 - 1, 2 ** 31, 2 ** 31 - 1, 1])[:, None]   # carries and sign bits
    counters[:4], keys[:4] = edge, edge
    expected = torch.stack(philox4x32(tuple(counters.T), (keys[:, 0], keys[:, 1])), 1)
    assert torch.equal(triton_philox(counters, keys), expected)


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
            assert_close(b[p, i, j], expected, F32_ROUNDING)
    # Flat indices past 2³² use the counter's third word (large vocab-size errors).
    big = torch.tensor([2 ** 32 + 5, 3 * 2 ** 32 - 1], dtype=torch.int64)
    got = _seeded_values(seed, 4, big, 50257, dist)
    for n, idx in enumerate(big.tolist()):
        assert_close(got[n], entry_python(seed, 4, idx, 50257, dist), F32_ROUNDING)


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


@pytest.mark.parametrize("dist", ["normal", "uniform"])
@pytest.mark.parametrize("seed", [0, 2 ** 63 + 12345, 2 ** 64 - 5])
def test_every_backend_generates_the_normative_entries(backend, dist, seed):
    """dfa_feedback of an identity error reads the entries back (products by 1 and 0, sums of one
    term): bit for bit those of materialize_feedback on every backend, for both distributions
    (correctly rounded ln and cos); so are the diagnostics' matrices."""
    spec = FeedbackSpec(3, 19, 300, seed=seed, dist=dist)
    eye = torch.eye(300, device=backend.device)
    generated = okadfa.dfa_feedback(eye, spec, backend=backend.name).transpose(1, 2).cpu()
    expected = materialize_feedback(spec)
    assert torch.equal(generated, expected), f"{int((generated != expected).sum())} entries differ"
    for p in range(3):
        assert torch.equal(seeded_feedback_matrix(spec, p), expected[p])


@pytest.mark.triton
@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_triton_seeded_entries_with_64_bit_index(dist):
    # idx = i·E + j ≥ 2³²: the counter's third word (idx >> 32) is in play
    E, row0, p, seed = 2 ** 33 + 3, 5, 2, 2 ** 64 - 2 ** 40 + 7
    out = torch.empty(16, 16, device=_triton_device())
    _tile_test_kernel[(1,)](out, row0, p, E, seed & 0xFFFFFFFF, seed >> 32, tk._f32(E ** 0.5),
                            NORMAL=dist == "normal", LIBDEVICE=not INTERPRETED, BLOCK=16)
    idx = (torch.arange(row0, row0 + 16)[:, None] * E + torch.arange(16)[None, :]).reshape(-1)
    expected = _seeded_values(seed, p, idx, E, dist).reshape(16, 16)
    assert (idx >> 32).min() > 0
    assert torch.equal(out.cpu(), expected)




# ----------------------------------------------------------------- sizes: checked before any work
@pytest.mark.parametrize("spec,match", [
    # 4 TB of matrices: the old loop generated matrix after matrix (hours) before allocating B
    (FeedbackSpec(10 ** 5, 10 ** 4, 10 ** 3), r"points=100000, dim=10000, error_dim=1000.*would need .*TiB"),
    (FeedbackSpec(10 ** 6, 10 ** 6, 10 ** 6), r"points=1000000.*would need"),
    (FeedbackSpec(2 ** 32 - 1, 2 ** 31, 2 ** 31), r"more than an int64 can count"),
    (FeedbackSpec(10 ** 5, 10 ** 5, 10 ** 3, shared=True), r"would need"),    # B is P copies even if shared
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_materialize_refuses_absurd_specs_before_generating(spec, match, dtype):
    with pytest.raises(ValueError, match=match):
        within(20, lambda: materialize_feedback(spec, dtype=dtype))


def test_seeded_matrix_refuses_an_absurd_matrix_before_generating():
    from okadfa.feedback import seeded_matrix
    with pytest.raises(ValueError, match=r"seeded_matrix: B_p \(dim=10000000, error_dim=10000000\).*would need"):
        within(20, lambda: seeded_matrix(FeedbackSpec(2, 10 ** 7, 10 ** 7), 1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(points=2 ** 32, dim=1, error_dim=1), r"FeedbackSpec.points must be at most 2\*\*32 - 1"),
    (dict(points=1, dim=2 ** 32, error_dim=2 ** 31), r"FeedbackSpec.dim × FeedbackSpec.error_dim"),
])
def test_spec_refuses_sizes_outside_the_definition(kwargs, match):
    """p is one 32-bit Philox counter word and idx = i·E + j an int64: larger specs are undefined."""
    with pytest.raises(ValueError, match=match):
        FeedbackSpec(**kwargs)
    FeedbackSpec(2 ** 32 - 1, 2 ** 31, 2 ** 32 - 1)        # the largest allowed sizes


def test_many_small_matrices_are_one_vectorised_pass(monkeypatch):
    """P points of a tiny d×E generate ⌈P·d·E / 2²⁰⌉ blocks, not one Python step per point (the
    old loop: ~1400 points a second), with the entries of the definition, bit for bit."""
    import okadfa.feedback as fb
    calls, values = [], fb._seeded_values

    def counting(*args):
        calls.append(args[2].numel())
        return values(*args)
    monkeypatch.setattr(fb, "_seeded_values", counting)
    P, d, E = 3000, 2, 3
    spec = FeedbackSpec(P, d, E, seed=2 ** 63 + 5)
    b = materialize_feedback(spec, dtype=torch.float64)
    assert calls == [P * d * E] and b.shape == (P, d, E) and b.dtype == torch.float64
    monkeypatch.setattr(fb, "_seeded_values", values)
    for p in (0, 1, 1234, P - 1):
        expected = values(spec.seed, p, torch.arange(d * E), E, spec.dist).view(d, E)
        assert torch.equal(b[p], expected.double())
        assert torch.equal(fb.seeded_matrix(spec, p), expected)


def test_shared_spec_generates_one_matrix(monkeypatch):
    import okadfa.feedback as fb
    calls, values = [], fb._seeded_values

    def counting(*args):
        calls.append(args[2].numel())
        return values(*args)
    monkeypatch.setattr(fb, "_seeded_values", counting)
    b = materialize_feedback(FeedbackSpec(500, 7, 9, seed=3, shared=True))
    assert sum(calls) == 7 * 9 and b.shape == (500, 7, 9) and b.is_contiguous()
    assert all(torch.equal(b[p], b[0]) for p in (1, 499))
