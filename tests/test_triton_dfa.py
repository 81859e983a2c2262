"""okadfa::triton_dfa_feedback and okadfa::triton_dfa_head (kernels/dfa_feedback.py, kernels/dfa_head.py) against
the float64 reference (DESIGN.md §4), and the in-kernel Philox4x32-10 against
okadfa.feedback. Runs on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1."""
import os

import pytest
import torch

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (the CPU interpreter)",
                allow_module_level=True)
triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from okadfa.kernels import dfa_feedback as tk  # noqa: E402  (registers the ops)
from okadfa.kernels._utils import INTERPRETED  # noqa: E402
from okadfa.reference.dfa import dfa_feedback, dfa_head  # noqa: E402
from okadfa.feedback import FeedbackSpec, _seeded_values, materialize_feedback, philox4x32  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32_EPS = torch.finfo(torch.float32).eps
DISTS = {"normal": 0, "uniform": 1}
# Max |actual − float64 reference| / max |reference|: float32 accumulation over ≤ 70 terms,
# or (half inputs) the final rounding to the output dtype, ≤ 2⁻⁹ relative, plus float32 noise.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}


def op_args(spec: FeedbackSpec):
    """(feedback=None, points, dim, seed as int64 bits, dist, shared) of a seeded spec."""
    seed = spec.seed - 2 ** 64 if spec.seed >= 2 ** 63 else spec.seed
    return None, spec.points, spec.dim, seed, DISTS[spec.dist], spec.shared


def assert_rel_close(actual, expected, rel, what):
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:.3g} × {scale:.3g}"


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


# --- Philox4x32-10 ---------------------------------------------------------------------------

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
    out = torch.empty(n, 4, dtype=torch.int64, device=DEVICE)
    _philox_test_kernel[(1,)](counters.to(DEVICE).contiguous(), keys.to(DEVICE).contiguous(), out, n,
                              BLOCK=triton.next_power_of_2(n))
    return out.cpu()


# Random123 known-answer vectors (kat_vectors, philox4x32 10 rounds): (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_known_answers():
    counters = torch.tensor([c for c, _, _ in PHILOX_KAT], dtype=torch.int64)
    keys = torch.tensor([k for _, k, _ in PHILOX_KAT], dtype=torch.int64)
    expected = torch.tensor([x for _, _, x in PHILOX_KAT], dtype=torch.int64)
    assert torch.equal(torch.stack(philox4x32(tuple(counters.T), (keys[:, 0], keys[:, 1])), 1),
                       expected)
    assert torch.equal(triton_philox(counters, keys), expected)


def test_philox_matches_reference_on_random_words():
    g = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2 ** 32, (100, 4), generator=g, dtype=torch.int64)
    keys = torch.randint(0, 2 ** 32, (100, 2), generator=g, dtype=torch.int64)
    edge = torch.tensor([2 ** 32 - 1, 2 ** 31, 2 ** 31 - 1, 1])[:, None]   # carries and sign bits
    counters[:4], keys[:4] = edge, edge
    expected = torch.stack(philox4x32(tuple(counters.T), (keys[:, 0], keys[:, 1])), 1)
    assert torch.equal(triton_philox(counters, keys), expected)


# --- seeded feedback entries -------------------------------------------------------------------

def assert_entries_match(actual, expected, dist, E):
    """Bit-exact for both distributions: ln and cos are the correctly rounded float32 values
    on every backend (okadfa/feedback.py)."""
    assert torch.equal(actual, expected), f"{int((actual != expected).sum())} entries differ ({dist}, E={E})"


@pytest.mark.parametrize("dist", ["normal", "uniform"])
@pytest.mark.parametrize("seed", [0, 2 ** 63 + 12345, 2 ** 64 - 1])
def test_seeded_entries_match_materialize_feedback(dist, seed):
    # e = I (E×E) gives out[p, n, i] = B[p, i, n] exactly (products by 1 and 0, sums of one term)
    spec = FeedbackSpec(3, 19, 21, seed=seed, dist=dist)
    eye = torch.eye(21, device=DEVICE)
    entries = torch.ops.okadfa.triton_dfa_feedback(eye, *op_args(spec)).transpose(1, 2).cpu()
    assert_entries_match(entries, materialize_feedback(spec), dist, 21)


@triton.jit
def _tile_test_kernel(out_ptr, row0, p, E, k0, k1, sqrt_e, NORMAL: tl.constexpr, LIBDEVICE: tl.constexpr,
                      BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    b = tk._feedback_tile(row0 + r, r, p.to(tl.uint32), E, k0.to(tl.uint32), k1.to(tl.uint32), sqrt_e, NORMAL,
                          LIBDEVICE)
    tl.store(out_ptr + r[:, None] * BLOCK + r[None, :], b)


@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_seeded_entries_with_64_bit_index(dist):
    # idx = i·E + j ≥ 2³²: the counter's third word (idx >> 32) is in play
    E, row0, p, seed = 2 ** 33 + 3, 5, 2, 2 ** 64 - 2 ** 40 + 7
    out = torch.empty(16, 16, device=DEVICE)
    _tile_test_kernel[(1,)](out, row0, p, E, seed & 0xFFFFFFFF, seed >> 32, tk._f32(E ** 0.5),
                            NORMAL=dist == "normal", LIBDEVICE=not INTERPRETED, BLOCK=16)
    idx = (torch.arange(row0, row0 + 16)[:, None] * E + torch.arange(16)[None, :]).reshape(-1)
    expected = _seeded_values(seed, p, idx, E, dist).reshape(16, 16)
    assert (idx >> 32).min() > 0
    assert_entries_match(out.cpu(), expected, dist, E)


# --- dfa_feedback --------------------------------------------------------------------------------

@pytest.mark.parametrize("dist", ["normal", "uniform"])
@pytest.mark.parametrize("shared", [False, True])
def test_feedback_seeded(dist, shared):
    e = randn(37, 21, seed=1)
    spec = FeedbackSpec(3, 19, 21, seed=2 ** 63 + 1, dist=dist, shared=shared)
    out = torch.ops.okadfa.triton_dfa_feedback(e, *op_args(spec))
    assert out.shape == (3, 37, 19) and out.dtype == torch.float32
    assert_rel_close(out, dfa_feedback(e.double(), spec), REL_TOL[torch.float32], "signals")
    if shared:
        assert torch.equal(out[1], out[0]) and torch.equal(out[2], out[0])


@pytest.mark.parametrize("e_dtype, b_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
def test_feedback_stored(e_dtype, b_dtype):
    e, b = randn(40, 23, seed=2, dtype=e_dtype), randn(3, 17, 23, seed=3, dtype=b_dtype)
    out = torch.ops.okadfa.triton_dfa_feedback(e, b, 99, 99, 1, 0, True)   # points..shared are ignored
    assert out.shape == (3, 40, 17) and out.dtype == e_dtype
    assert_rel_close(out, dfa_feedback(e.double(), b.double()), REL_TOL[e_dtype], "signals")


@pytest.mark.parametrize("N", [0, 1])
def test_feedback_empty_and_single_row(N):
    e = randn(N, 5, seed=4)
    spec = FeedbackSpec(2, 3, 5, seed=9)
    out = torch.ops.okadfa.triton_dfa_feedback(e, *op_args(spec))
    assert out.shape == (2, N, 3)
    assert_rel_close(out, dfa_feedback(e.double(), spec), REL_TOL[torch.float32], "signals")


# --- dfa_head --------------------------------------------------------------------------------------

def head_inputs(N, d, V, seed=0, dtype=torch.float32, w_dtype=None, ignore_index=-100, ignored=(3, 10)):
    h, w = randn(N, d, seed=seed, dtype=dtype), randn(V, d, seed=seed + 1, dtype=w_dtype or dtype)
    g = torch.Generator().manual_seed(seed + 2)
    t = torch.randint(0, V, (N,), generator=g)
    t[[i for i in ignored if i < N]] = ignore_index
    return h, w, t.to(DEVICE)


def check_head(h, w, t, feedback, *, error, chunk_size, ignore_index=-100):
    """Run the Triton head and compare each output with the reference on the same inputs in float64."""
    stored = isinstance(feedback, torch.Tensor)
    args = (feedback, 0, 0, 0, 0, False) if stored else op_args(feedback)
    loss, gh, gw, sig = torch.ops.okadfa.triton_dfa_head(h, w, t, *args, ignore_index, error == "logits", chunk_size)
    ref = dfa_head(h.double(), w.double(), t, feedback.double() if stored else feedback,
                   ignore_index=ignore_index, chunk_size=chunk_size, error=error)
    P, dp = feedback.shape[:2] if stored else (feedback.points, feedback.dim)
    assert loss.shape == () and loss.dtype == torch.float32
    assert gh.shape == h.shape and gh.dtype == h.dtype and sig.dtype == h.dtype
    assert gw.shape == w.shape and gw.dtype == w.dtype and sig.shape == (P, h.shape[0], dp)
    for name, actual, expected in zip(("loss", "grad_h", "grad_w_dec", "signals"), (loss, gh, gw, sig), ref):
        assert_rel_close(actual, expected, REL_TOL[h.dtype], name)
    return loss, gh, gw, sig


@pytest.mark.parametrize("error", ["hidden", "logits"])
@pytest.mark.parametrize("storage", ["seeded", "stored"])
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_head_matches_reference(error, storage, chunk_size):
    N, d, V = 37, 24, 70                       # chunk 7 does not divide N; V, d not powers of two
    h, w, t = head_inputs(N, d, V)
    E = d if error == "hidden" else V
    spec = FeedbackSpec(3, 13, E, seed=2 ** 64 - 3)
    feedback = spec if storage == "seeded" else randn(3, 13, E, seed=5)
    check_head(h, w, t, feedback, error=error, chunk_size=chunk_size)


@pytest.mark.parametrize("error", ["hidden", "logits"])
def test_head_shared_uniform_and_class_ignore_index(error):
    # ignore_index may be a real class id: rows with that target are dropped
    N, d, V = 20, 10, 33
    h, w, t = head_inputs(N, d, V, seed=7, ignore_index=5, ignored=(0, 4, 19))
    spec = FeedbackSpec(3, 6, d if error == "hidden" else V, seed=2 ** 63, dist="uniform", shared=True)
    sig = check_head(h, w, t, spec, error=error, chunk_size=6, ignore_index=5)[3]
    assert torch.equal(sig[2], sig[0])


@pytest.mark.parametrize("error", ["hidden", "logits"])
@pytest.mark.parametrize("N", [0, 9])
def test_head_all_ignored_gives_zeros(error, N):
    h, w, t = head_inputs(N, 8, 17, ignored=range(N))
    spec = FeedbackSpec(2, 8, 8 if error == "hidden" else 17, seed=3)
    loss, gh, gw, sig = torch.ops.okadfa.triton_dfa_head(h, w, t, *op_args(spec), -100, error == "logits", 4)
    assert sig.shape == (2, N, 8)
    for x in (loss, gh, gw, sig):
        assert torch.equal(x, torch.zeros_like(x))


def test_head_single_row():
    h, w, t = head_inputs(1, 5, 11, seed=8, ignored=())
    check_head(h, w, t, FeedbackSpec(2, 4, 5, seed=1), error="hidden", chunk_size=1)


@pytest.mark.parametrize("dtype, w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("error", ["hidden", "logits"])
def test_head_half_inputs(dtype, w_dtype, error):
    h, w, t = head_inputs(24, 16, 40, seed=9, dtype=dtype, w_dtype=w_dtype)
    check_head(h, w, t, FeedbackSpec(2, 16, 16 if error == "hidden" else 40, seed=4), error=error, chunk_size=10)


def test_head_is_deterministic():
    h, w, t = head_inputs(37, 24, 70, seed=10)
    args = (h, w, t, *op_args(FeedbackSpec(2, 24, 70, seed=6)), -100, True, 9)
    first, second = torch.ops.okadfa.triton_dfa_head(*args), torch.ops.okadfa.triton_dfa_head(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# --- fake implementations ------------------------------------------------------------------------

def test_fake_implementations_match_real_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    h, w, t = head_inputs(6, 8, 12, dtype=torch.bfloat16, w_dtype=torch.float32)
    e, b = randn(6, 12, dtype=torch.float16), randn(3, 5, 12, seed=1)
    calls = [(torch.ops.okadfa.triton_dfa_feedback, (e, None, 2, 7, 1, 0, False)),
             (torch.ops.okadfa.triton_dfa_feedback, (e, b, 0, 0, 0, 0, False)),
             (torch.ops.okadfa.triton_dfa_head, (h, w, t, None, 2, 7, 1, 0, False, -100, False, 4)),
             (torch.ops.okadfa.triton_dfa_head, (h, w, t, b, 0, 0, 0, 0, False, -100, True, 4))]
    mode = FakeTensorMode()
    for op, args in calls:
        real = op(*args)
        with mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
        assert [(x.shape, x.dtype) for x in fake] == [(x.shape, x.dtype) for x in real]
