"""Property-based tests (hypothesis) of every public op: favor_attention, linear_attention,
favor_sdpa, dfa_feedback and dfa_head.

* Accuracy: on every backend (reference, cpu, triton, cuda; skipped with the reason where it
  cannot run), random shapes (size 1 and odd sizes, T = 1, B/H broadcast, grouped-query heads,
  non-causal L ≠ S), random memory layouts (transposed and back, a step-2 slice, a stride-0
  expand) and dtypes (float64, float32, bfloat16, those the backend takes) against the float64
  reference on the same rounded inputs, output and gradients, at tests/tolerances.py's accuracy.
* Causality: what comes after position t does not change the causal outputs up to t.
* Bad input: a valid call with one thing broken (rank, size, dtype, device, a non-tensor, a bad
  keyword, an out-of-range target, a bad FeedbackSpec field) raises ValueError or TypeError from
  the public op: no other exception, no result.

Cases are drawn from a fixed seed (derandomize) so that CI runs the same examples every time;
the interpreted Triton kernels (~0.5 s a call) get fewer examples than the others. The
narrowest case of each bug the properties found is kept at the end of the file as a regression
test.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import okadfa
from conftest import HALF, backend_info
from okadfa.feedback import FeedbackSpec, materialize_feedback
from okadfa.reference import dfa_feedback as ref_feedback, dfa_head as ref_head
from okadfa.reference import favor_attention_naive, linear_attention_naive
from tolerances import (REORDERED, UNCHANGED, ZERO_EXPECTED, assert_close, assert_half_close, assert_max_rel_close,
                        assert_rms_close)

f64, f32, bf16 = torch.float64, torch.float32, torch.bfloat16

settings.register_profile("okadfa-properties", deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile("okadfa-properties")   # used by this file only, never loaded globally

BACKENDS = [pytest.param(n, marks=pytest.mark.triton) if n == "triton" else n
            for n in ("reference", "cpu", "triton", "cuda")]
# Examples per property and backend: the Triton interpreter is ~1000x slower than the others.
EXAMPLES = {"reference": 30, "cpu": 40, "triton": 6, "cuda": 40}
BAD_EXAMPLES = {"reference": 60, "cpu": 60, "triton": 25, "cuda": 60}


def run(examples, strategy, check, **overrides):
    """check(case) for `examples` cases drawn from strategy, reproducibly."""
    @settings(PROFILE, max_examples=examples, **overrides)
    @given(case=strategy)
    def prop(case):
        check(case)
    prop()


# ------------------------------------------------------------------------------------ helpers
LAYOUTS = ("contiguous", "transposed", "step2", "expanded")
# q, k, v and a projection, whose rows are features, not a batch: all of them equal would make
# the gradients of q and the projection 0 up to cancellation (every backend then misses).
LAYOUTS_QKVW = st.tuples(*[st.sampled_from(LAYOUTS)] * 3, st.sampled_from(LAYOUTS[:3]))


def lay_out(x, layout):
    """x with other strides, differentiably (the same function is applied to the float64 copy):
    transposed and back (the Hugging Face (B, T, H, D) layout), every other element of a twice
    as long last dim, or its first row expanded with stride 0 over dim 0."""
    if layout == "transposed" and x.dim() >= 2:
        dims = (-3, -2) if x.dim() >= 3 else (0, 1)
        return x.transpose(*dims).contiguous().transpose(*dims)
    if layout == "step2" and x.dim() >= 1:
        return x.repeat_interleave(2, dim=-1)[..., ::2]
    if layout == "expanded" and x.dim() >= 1 and x.shape[0] > 1:
        return x[:1].expand_as(x)
    return x


def broadcast_heads(*xs):
    """(B, H, ·, ·) tensors broadcast over B and H as SDPA's enable_gqa: kv head j serves query
    heads j·G … j·G + G − 1."""
    B, H = max(x.shape[0] for x in xs), max(x.shape[1] for x in xs)
    return [(x.repeat_interleave(H // x.shape[1], 1) if 1 < x.shape[1] < H else x).expand(B, H, *x.shape[2:])
            for x in xs]


def assert_accurate(actual, expected, baseline, dtype, grad=False, what=""):
    """tests/tolerances.py's accuracy; half types also against plain PyTorch at that precision."""
    if dtype in HALF:
        assert_half_close(actual, expected, baseline, dtype, grad=grad, what=what)
    else:
        assert_rms_close(actual, expected, dtype, grad=grad, what=what)


def float_dtypes(backend):
    return [d for d in (f64, f32, bf16) if d in backend.dtypes]


def generator(seed):
    return torch.Generator().manual_seed(seed)


def check_differentiable(backend, case, op, naive, tensors, kwargs):
    """op(*laid out tensors rounded to case's dtype, on the backend) against naive (float64, on
    the same values): the output and the gradient of every tensor."""
    dtype, layouts = case["dtype"], case["layouts"]
    leaves = backend.put(*tensors, dtype=dtype, grad=True)
    exact = [x.detach().cpu().double().requires_grad_() for x in leaves]
    base = [x.detach().cpu().requires_grad_() for x in leaves]           # plain PyTorch in dtype
    seen = [lay_out(x, lay) for x, lay in zip(leaves, layouts)]
    out = op(*seen, **kwargs, backend=backend.name)
    expected, baseline = (naive(*[lay_out(x, lay) for x, lay in zip(xs, layouts)]) for xs in (exact, base))
    assert out.dtype == dtype and out.device.type == backend.device
    assert out.shape == expected.shape, (tuple(out.shape), tuple(expected.shape))
    # the output gradient is an input too: rounded to dtype for every computation
    g = torch.randn(expected.shape, generator=generator(case["seed"] + 1), dtype=f64).to(dtype).double()
    got = torch.autograd.grad(out, leaves, g.to(out))
    want = torch.autograd.grad(expected, exact, g)
    bgrads = torch.autograd.grad(baseline, base, g.to(dtype)) if dtype in HALF else [None] * len(got)
    assert_accurate(out, expected, baseline, dtype, what="out")
    for i, (a, e, b) in enumerate(zip(got, want, bgrads)):
        assert a.dtype == dtype and a.shape == e.shape and a.device.type == backend.device, i
        assert_accurate(a, e, b, dtype, grad=True, what=f"grad {i}")


# ----------------------------------------------------------------------------- attention cases
@st.composite
def attention_shapes(draw, cross=True, broadcast=True):
    """Batch and head sizes of q, k (= v's): B and H broadcast (1), kv heads dividing q's
    (grouped-query) or q's heads 1 (all of them equal unless `broadcast`); lengths L, S (S ≠ L
    only non-causal, when `cross`)."""
    causal = draw(st.booleans())
    B = draw(st.integers(1, 2))
    hq = draw(st.sampled_from([1, 2, 3, 4]))
    hkv = draw(st.sampled_from([d for d in range(1, hq + 1) if hq % d == 0] if hq > 1 else [1, 2, 3]))
    L = draw(st.integers(1, 40))
    S = L if causal or not cross or draw(st.booleans()) else draw(st.integers(1, 40))
    bq, bk, bv = (draw(st.sampled_from([1, B])) for _ in range(3))
    if not broadcast:
        bq, bk, bv, hkv = B, B, B, hq
    return dict(causal=causal, bq=bq, bk=bk, bv=bv, hq=hq, hkv=hkv, L=L, S=S)


CHUNKS = st.one_of(st.none(), st.integers(1, 48), st.just(1024))
SCALES = st.one_of(st.none(), st.floats(0.05, 1.0))


@st.composite
def favor_cases(draw, backend):
    dtype = draw(st.sampled_from(float_dtypes(backend)))
    return dict(**draw(attention_shapes(broadcast=dtype not in HALF)), Dk=draw(st.integers(1, 24)),
                Dv=draw(st.integers(1, 24)), M=draw(st.integers(1, 24)), scale=draw(SCALES), chunk=draw(CHUNKS),
                magnitude=draw(st.sampled_from([0.5, 1.0])), dtype=dtype,
                layouts=draw(LAYOUTS_QKVW),
                seed=draw(st.integers(0, 2 ** 16)))


def favor_inputs(c):
    g = generator(c["seed"])
    q = torch.randn(c["bq"], c["hq"], c["L"], c["Dk"], generator=g, dtype=f64) * c["magnitude"]
    k = torch.randn(c["bk"], c["hkv"], c["S"], c["Dk"], generator=g, dtype=f64) * c["magnitude"]
    v = torch.randn(c["bv"], c["hkv"], c["S"], c["Dv"], generator=g, dtype=f64)
    return q, k, v, okadfa.random_features(c["M"], c["Dk"], generator=g, dtype=f64)


@st.composite
def linear_cases(draw, backend):
    dtype = draw(st.sampled_from(float_dtypes(backend)))
    return dict(**draw(attention_shapes(cross=False, broadcast=dtype not in HALF)), M=draw(st.integers(1, 24)),
                Dv=draw(st.integers(1, 24)), chunk=draw(CHUNKS), dtype=dtype,
                layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3)),
                seed=draw(st.integers(0, 2 ** 16)))


def linear_inputs(c):
    """Positive features elu(N(0, 1)) + 1 and standard normal values."""
    g = generator(c["seed"])
    fq = torch.nn.functional.elu(torch.randn(c["bq"], c["hq"], c["L"], c["M"], generator=g, dtype=f64)) + 1
    fk = torch.nn.functional.elu(torch.randn(c["bk"], c["hkv"], c["S"], c["M"], generator=g, dtype=f64)) + 1
    return fq, fk, torch.randn(c["bv"], c["hkv"], c["S"], c["Dv"], generator=g, dtype=f64)


@pytest.mark.parametrize("name", BACKENDS)
def test_favor_attention_matches_float64(name):
    backend = backend_info(name)

    def check(c):
        naive = lambda q, k, v, w: favor_attention_naive(*broadcast_heads(q, k, v), w, causal=c["causal"],
                                                         scale=c["scale"])
        check_differentiable(backend, c, okadfa.favor_attention, naive, favor_inputs(c),
                             dict(causal=c["causal"], scale=c["scale"], chunk_size=c["chunk"]))
    run(EXAMPLES[name], favor_cases(backend), check)


@pytest.mark.parametrize("name", BACKENDS)
def test_linear_attention_matches_float64(name):
    backend = backend_info(name)

    def check(c):
        naive = lambda fq, fk, v: linear_attention_naive(*broadcast_heads(fq, fk, v), causal=c["causal"])
        check_differentiable(backend, c, okadfa.linear_attention, naive, linear_inputs(c),
                             dict(causal=c["causal"], chunk_size=c["chunk"]))
    run(EXAMPLES[name], linear_cases(backend), check)


# ----------------------------------------------------------------------------------- favor_sdpa
@st.composite
def sdpa_cases(draw, backend):
    """SDPA layouts: 3-d (N, L, E), 4-d (N, H, L, E) or 5-d (N, X, H, L, E) with broadcast leading
    dims, H = 1 broadcast or grouped-query heads (enable_gqa), a cached or an explicit projection."""
    dtype = draw(st.sampled_from(float_dtypes(backend)))
    ndim = draw(st.sampled_from([3, 4, 5]))
    lead = [draw(st.integers(1, 2)) for _ in range(ndim - 2 if ndim < 5 else 2)]
    lead_k = [draw(st.sampled_from([1, n])) for n in lead]
    lead_v = [draw(st.sampled_from([1, n])) for n in lead]
    hq, hkv = 1, 1
    if ndim > 3:
        hq = draw(st.sampled_from([1, 2, 4]))
        hkv = draw(st.sampled_from([d for d in (1, 2, 4) if hq % d == 0] if hq > 1 else [1, 2]))
    if dtype in HALF:           # bfloat16 broadcast: test_half_gradient_of_a_broadcast_input
        lead_k, lead_v, hkv = lead, lead, hq
    causal = draw(st.booleans())
    L = draw(st.integers(1, 40))
    S = L if causal or draw(st.booleans()) else draw(st.integers(1, 40))
    return dict(ndim=ndim, lead=lead, lead_k=lead_k, lead_v=lead_v, hq=hq, hkv=hkv, causal=causal, L=L, S=S,
                E=draw(st.integers(1, 24)), Ev=draw(st.integers(1, 24)), M=draw(st.integers(1, 24)),
                explicit=draw(st.booleans()), gqa=hq != hkv and hkv > 1 or draw(st.booleans()),
                scale=draw(SCALES), dtype=dtype, layouts=draw(LAYOUTS_QKVW),
                seed=draw(st.integers(0, 2 ** 16)))


def sdpa_shape(lead, heads, length, width, ndim):
    return (*lead, *([heads] if ndim > 3 else []), length, width)


@pytest.mark.parametrize("name", BACKENDS)
def test_favor_sdpa_matches_float64(name):
    backend = backend_info(name)

    def check(c):
        g = generator(c["seed"])
        n = c["ndim"]
        q = torch.randn(sdpa_shape(c["lead"], c["hq"], c["L"], c["E"], n), generator=g, dtype=f64)
        k = torch.randn(sdpa_shape(c["lead_k"], c["hkv"], c["S"], c["E"], n), generator=g, dtype=f64)
        v = torch.randn(sdpa_shape(c["lead_v"], c["hkv"], c["S"], c["Ev"], n), generator=g, dtype=f64)
        w = okadfa.random_features(c["M"], c["E"], generator=g, dtype=f64)
        if not c["explicit"]:        # the projection favor_sdpa draws from (num_features, seed), in q's dtype
            w = okadfa.random_features(c["M"], c["E"], generator=generator(c["seed"]), dtype=f64)
            w = w.to(c["dtype"]).double()

        def naive(q, k, v, w):
            lead = torch.broadcast_shapes(q.shape[:-3 if n > 3 else -2], k.shape[:len(c["lead"])],
                                          v.shape[:len(c["lead"])])
            q4, k4, v4 = (x.unsqueeze(1) if n == 3 else x.expand(*lead, *x.shape[-3:]).flatten(0, -4)
                          for x in (q, k, v))
            out = favor_attention_naive(*broadcast_heads(q4, k4, v4), w.to(q.dtype), causal=c["causal"],
                                        scale=c["scale"])
            return out[:, 0] if n == 3 else out.reshape(*lead, *out.shape[-3:])

        kw = dict(is_causal=c["causal"], scale=c["scale"], enable_gqa=c["gqa"], num_features=c["M"],
                  seed=c["seed"])
        if c["explicit"]:
            op = lambda q, k, v, w, backend: okadfa.favor_sdpa(q, k, v, projection=w, backend=backend, **kw)
            check_differentiable(backend, c, op, naive, (q, k, v, w), {})
        else:
            op = lambda q, k, v, backend: okadfa.favor_sdpa(q, k, v, backend=backend, **kw)
            check_differentiable(backend, c, op, lambda q, k, v: naive(q, k, v, w), (q, k, v), {})
    run(EXAMPLES[name], sdpa_cases(backend), check)


# -------------------------------------------------------------------------------- causality
@st.composite
def future_cases(draw, backend, non_finite=False):
    T = draw(st.integers(2, 40))
    return dict(op=draw(st.sampled_from(["favor", "linear"])), T=T, t=draw(st.integers(0, T - 2)),
                M=draw(st.integers(1, 24)), D=draw(st.integers(1, 24)), chunk=draw(CHUNKS),
                which=draw(st.sampled_from(["k", "v"] if non_finite else ["q", "k", "v", "all"])),
                value=draw(st.sampled_from([math.nan, math.inf, -math.inf])),
                dtype=draw(st.sampled_from([d for d in (f64, f32) if d in backend.dtypes])),
                seed=draw(st.integers(0, 2 ** 16)))


def causal_outputs(backend, c, change):
    """The causal outputs of the op on random inputs and on the same inputs with positions > t
    replaced by change(x) (in q, k, v or all three)."""
    g = generator(c["seed"])
    T, D, t = c["T"], c["D"], c["t"]
    if c["op"] == "favor":
        q, k, v, w = (*(torch.randn(1, 2, T, D, generator=g, dtype=f64) for _ in range(3)),
                      okadfa.random_features(c["M"], D, generator=g, dtype=f64))
        op = lambda q, k, v: okadfa.favor_attention(q, k, v, w.to(q), causal=True, chunk_size=c["chunk"],
                                                    backend=backend.name)
    else:
        q, k = (torch.rand(1, 2, T, c["M"], generator=g, dtype=f64) + 0.1 for _ in range(2))
        v = torch.randn(1, 2, T, D, generator=g, dtype=f64)
        op = lambda q, k, v: okadfa.linear_attention(q, k, v, causal=True, chunk_size=c["chunk"],
                                                     backend=backend.name)
    original = backend.put(q, k, v, dtype=c["dtype"])
    changed = [x.clone() for x in original]
    for i, name in enumerate("qkv"):
        if c["which"] in (name, "all"):
            changed[i][..., t + 1:, :] = change(changed[i][..., t + 1:, :])
    return [op(*xs)[..., : t + 1, :] for xs in (original, changed)]


@pytest.mark.parametrize("name", BACKENDS)
def test_causal_outputs_ignore_the_future(name):
    """Later positions (scaled by 4 and shifted: for linear attention features stay positive)
    change nothing up to t: no dependence on later positions through a stabiliser or a chunk."""
    backend = backend_info(name)

    def check(c):
        before, after = causal_outputs(backend, c, lambda x: 4 * x + 1)
        assert_close(after, before, UNCHANGED)
    run(EXAMPLES[name], future_cases(backend), check)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")    # the Triton interpreter's NumPy
def test_causal_outputs_ignore_a_non_finite_future(name):
    """As above with NaN or ±Inf at every position after t in k or v (Inf only as a feature of
    linear attention): the outputs up to t are those without it."""
    backend = backend_info(name)

    def check(c):
        value = math.inf if c["op"] == "linear" and c["which"] == "k" and c["value"] < 0 else c["value"]
        before, after = causal_outputs(backend, c, lambda x: torch.full_like(x, value))
        assert_close(after, before, UNCHANGED)
    run(EXAMPLES[name], future_cases(backend, non_finite=True), check)


# -------------------------------------------------------------------------------- DFA ops
FEEDBACK = st.fixed_dictionaries(dict(
    kind=st.sampled_from(["seeded", "shared", "stored"]), P=st.integers(1, 4), dp=st.integers(1, 24),
    seed=st.integers(0, 2 ** 64 - 1), dist=st.sampled_from(["normal", "uniform"]),
    stored_dtype=st.sampled_from([f64, f32, bf16]), layout=st.sampled_from(LAYOUTS)))


def feedback_of(f, E, device):
    """(the feedback argument, the same matrices (P, d_p, E) in float64 on the CPU)."""
    if f["kind"] != "stored":
        spec = FeedbackSpec(f["P"], f["dp"], E, seed=f["seed"], dist=f["dist"], shared=f["kind"] == "shared")
        return spec, materialize_feedback(spec, dtype=f64)
    b = torch.randn(f["P"], f["dp"], E, generator=generator(f["seed"] % 2 ** 63), dtype=f64) / E ** 0.5
    b = lay_out(b.to(device, f["stored_dtype"]), f["layout"])
    return b, b.cpu().double()


def assert_dfa_close(actual, expected, what):
    """Float32 (float64) accumulation rounded once to actual's dtype (tests/tolerances.py)."""
    assert actual.shape == expected.shape, (what, tuple(actual.shape), tuple(expected.shape))
    if actual.dtype == f64:
        assert_close(actual.cpu(), expected, REORDERED, msg=lambda m: f"{what}: {m}")
    elif expected.numel() and expected.abs().max() <= ZERO_EXPECTED:
        assert_rms_close(actual, expected, actual.dtype, what=what)      # 0 up to float64 rounding
    else:
        assert_rms_close(actual, expected, actual.dtype, what=what)
        assert_max_rel_close(actual, expected, actual.dtype, what=what)


@pytest.mark.parametrize("name", BACKENDS)
def test_dfa_feedback_matches_float64(name):
    backend = backend_info(name)
    cases = st.fixed_dictionaries(dict(N=st.integers(0, 24), E=st.integers(1, 24), feedback=FEEDBACK,
                                       dtype=st.sampled_from(float_dtypes(backend)),
                                       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2 ** 16)))

    def check(c):
        e = torch.randn(c["N"], c["E"], generator=generator(c["seed"]), dtype=f64)
        e = lay_out(backend.put(e, dtype=c["dtype"]), c["layout"])
        feedback, b64 = feedback_of(c["feedback"], c["E"], backend.device)
        out = okadfa.dfa_feedback(e, feedback, backend=backend.name)
        assert out.dtype == c["dtype"] and out.device.type == backend.device
        assert_dfa_close(out, ref_feedback(e.cpu().double(), b64), "signals")
        if c["feedback"]["kind"] == "shared":
            assert all(torch.equal(s, out[0]) for s in out)
    run(EXAMPLES[name] * 2, cases, check)


@st.composite
def head_cases(draw, backend):
    N, V = draw(st.integers(0, 24)), draw(st.integers(1, 24))
    ignore_index = draw(st.sampled_from([-100, -1, draw(st.integers(0, V - 1))]))
    return dict(N=N, d=draw(st.integers(1, 24)), V=V, ignore_index=ignore_index,
                ignored=draw(st.lists(st.booleans(), min_size=N, max_size=N)), chunk=draw(CHUNKS),
                error=draw(st.sampled_from(["hidden", "logits"])), feedback=draw(FEEDBACK),
                hdtype=draw(st.sampled_from(float_dtypes(backend))),
                wdtype=draw(st.sampled_from(float_dtypes(backend))),
                layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3)),
                seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("name", BACKENDS)
def test_dfa_head_matches_float64(name):
    backend = backend_info(name)

    def check(c):
        g = generator(c["seed"])
        N, d, V = c["N"], c["d"], c["V"]
        h = torch.randn(N, d, generator=g, dtype=f64)
        w = torch.randn(V, d, generator=g, dtype=f64) / d ** 0.5
        t = torch.randint(0, V, (N,), generator=g)
        t[torch.tensor(c["ignored"], dtype=torch.bool)] = c["ignore_index"]
        h, w = backend.put(h, dtype=c["hdtype"]), backend.put(w, dtype=c["wdtype"])
        h, w, t = (lay_out(x, lay) for x, lay in zip((h, w, t.to(backend.device)), c["layouts"]))
        feedback, b64 = feedback_of(c["feedback"], d if c["error"] == "hidden" else V, backend.device)
        kw = dict(ignore_index=c["ignore_index"], error=c["error"])
        got = okadfa.dfa_head(h, w, t, feedback, chunk_size=c["chunk"], backend=backend.name, **kw)
        acc = torch.promote_types(torch.promote_types(c["hdtype"], c["wdtype"]), f32)
        assert [x.dtype for x in got] == [acc, c["hdtype"], c["wdtype"], c["hdtype"]]
        assert all(x.device.type == backend.device for x in got)
        expected = ref_head(h.cpu().double(), w.cpu().double(), t.cpu(), b64, **kw)
        for what, a, e in zip(("loss", "grad_h", "grad_w_dec", "signals"), got, expected):
            assert_dfa_close(a, e, what)
    run(EXAMPLES[name] * 2, head_cases(backend), check)


# ---------------------------------------------------------------------------------- bad input
# A bad call is a valid one (small float32 tensors on the backend's device) with one thing
# broken, described by a mutation tuple (what hypothesis prints on failure):
#   ("rank", arg, "drop"|"add"), ("dtype", arg, an integer or complex dtype), ("mixed", arg,
#   another float dtype), ("meta", arg), ("object", arg, what instead of a tensor),
#   ("arg", keyword, bad value), ("shape", name of a size rule broken), op-specific ones.
BAD_OBJECTS = {"None": None, "float": 1.5, "list": [[1.0, 2.0]], "str": "x"}
BAD_DTYPES = (torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64)
OTHER_DEVICE = "the other device's backend"     # cuda on CPU tensors, cpu on CUDA tensors
BACKEND_BAD = st.sampled_from(["gpu", "CPU", "", None, 0, OTHER_DEVICE])
CHUNK_BAD = st.sampled_from([0, -1, 1025, 2.0, True, "8", math.nan])
SCALE_BAD = st.sampled_from([0, 0.0, -1.0, math.nan, math.inf, -math.inf, 1e300, "0.5", True, [0.5]])
CAUSAL_BAD = st.sampled_from([1, 0, None, "True", 1.0, [True]])


# A known open bug (test_a_meta_query_among_real_tensors_is_rejected), left out of the properties.
META_QUERY = (("meta", "q"), ("meta", "query"))


def tensor_mutations(tensors, mixed=()):
    """A generic break of one tensor argument (mixed: those that must share one float dtype)."""
    which = st.sampled_from(tensors)
    return st.one_of(st.tuples(st.just("rank"), which, st.sampled_from(["drop", "add"])),
                     st.tuples(st.just("dtype"), which, st.sampled_from(BAD_DTYPES)),
                     st.tuples(st.just("meta"), which),
                     st.tuples(st.just("object"), which, st.sampled_from(sorted(BAD_OBJECTS) + ["numpy"])),
                     *([st.tuples(st.just("mixed"), st.sampled_from(mixed),
                                  st.sampled_from([f64, torch.float16, bf16]))] if mixed else []))


def arg_mutations(**choices):
    return st.one_of(*(st.tuples(st.just("arg"), st.just(k), v) for k, v in choices.items()))


def mutate(kwargs, m, device):
    """kwargs with the generic mutation m applied (module comment above)."""
    kind, which = m[0], m[1]
    x = kwargs.get(which)
    if kind == "rank":
        x = x[0] if m[2] == "drop" else x[None]
    elif kind in ("dtype", "mixed"):
        x = x.to(m[2])
    elif kind == "meta":
        x = x.to("meta")
    elif kind == "object":
        x = x.detach().cpu().numpy() if m[2] == "numpy" else BAD_OBJECTS[m[2]]
    elif kind == "arg":
        x = ("cuda" if device == "cpu" else "cpu") if m[2] == OTHER_DEVICE else m[2]
    else:
        raise AssertionError(f"not a generic mutation: {m}")
    return {**kwargs, which: x}


def assert_rejected(call):
    """call() raises ValueError or TypeError (any other exception fails the test as it is)."""
    try:
        result = call()
    except (ValueError, TypeError):
        return
    shapes = [tuple(x.shape) for x in (result if isinstance(result, tuple) else [result])]
    raise AssertionError(f"bad input accepted: returned {shapes}")


def rand(g, *shape, positive=False):
    x = torch.rand(*shape, generator=g, dtype=f64) + 0.1 if positive else torch.randn(*shape, generator=g, dtype=f64)
    return x.to(f32)


def float64_on_triton(backend, kwargs):
    """Every float tensor in float64, which the triton backend does not take (None elsewhere)."""
    if backend.name != "triton":
        return None
    return {n: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for n, x in kwargs.items()}


SIZES = st.fixed_dictionaries(dict(B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 5),
                                   D=st.integers(1, 5), Dv=st.integers(1, 5), M=st.integers(1, 5),
                                   causal=st.booleans(), seed=st.integers(0, 2 ** 16)))


def attention_size_breaks(s, feature):
    """{rule: {argument: shape (or keyword: value)}}: sizes that no broadcast rule allows."""
    B, H, T, D, Dv, M = (s[n] for n in ("B", "H", "T", "D", "Dv", "M"))
    q, k = ("q_feat", "k_feat") if feature else ("q", "k")
    W = M if feature else D
    breaks = {
        "k width": {k: (B, H, T, W + 1)},
        "v length": {"v": (B, H, T + 1, Dv)},
        "k and v heads": {"v": (B, H + 1, T, Dv)},
        "heads not a multiple": {q: (B, 3, T, W), k: (B, 2, T, W), "v": (B, 2, T, Dv)},
        "batch": {q: (2, H, T, W), k: (3, H, T, W), "v": (3, H, T, Dv)},
        "empty length": {q: (B, H, 0, W), k: (B, H, 0, W), "v": (B, H, 0, Dv)},
        "empty values": {"v": (B, H, T, 0)},
    }
    if feature:
        breaks["q length"] = {q: (B, H, T + 1, M)}
        breaks["no features"] = {q: (B, H, T, 0), k: (B, H, T, 0)}
    else:
        breaks["causal L != S"] = {k: (B, H, T + 1, D), "v": (B, H, T + 1, Dv), "causal": True}
        breaks["empty q length"] = {q: (B, H, 0, D), "causal": False}
        breaks["projection width"] = {"projection": (M, D + 1)}
        breaks["no features"] = {"projection": (0, D)}
        breaks["empty head dim"] = {q: (B, H, T, 0), k: (B, H, T, 0), "projection": (M, 0)}
    return breaks


def bad_attention_mutations(feature):
    names = ["q_feat", "k_feat", "v"] if feature else ["q", "k", "v", "projection"]
    mutations = tensor_mutations(names, names[:3]).filter(lambda m: m not in META_QUERY)
    rules = sorted(attention_size_breaks(dict.fromkeys(("B", "H", "T", "D", "Dv", "M"), 1), feature))
    return st.one_of(
        mutations,
        st.tuples(st.just("shape"), st.sampled_from(rules)),
        arg_mutations(chunk_size=CHUNK_BAD, causal=CAUSAL_BAD, backend=BACKEND_BAD,
                      **({} if feature else dict(scale=SCALE_BAD))),
        *([st.tuples(st.just("negative feature"), st.sampled_from(names[:2]))] if feature else []),
        st.tuples(st.just("float64 on triton")))


def bad_attention_call(backend, s, m, feature):
    g = generator(s["seed"])
    B, H, T, D, Dv, M = (s[n] for n in ("B", "H", "T", "D", "Dv", "M"))
    if feature:
        kw = dict(q_feat=rand(g, B, H, T, M, positive=True), k_feat=rand(g, B, H, T, M, positive=True),
                  v=rand(g, B, H, T, Dv))
    else:
        kw = dict(q=rand(g, B, H, T, D), k=rand(g, B, H, T, D), v=rand(g, B, H, T, Dv), projection=rand(g, M, D))
    kw = {n: x.to(backend.device) for n, x in kw.items()}
    kw.update(causal=s["causal"], chunk_size=None, backend=backend.name)
    if m[0] == "shape":
        for n, shape in attention_size_breaks(s, feature)[m[1]].items():
            kw[n] = shape if n == "causal" else rand(g, *shape, positive=feature and n != "v").to(backend.device)
        return kw
    if m[0] == "negative feature":
        x = kw[m[1]].clone()
        x.view(-1)[-1] = -1.0
        return {**kw, m[1]: x}
    if m[0] == "float64 on triton":
        return float64_on_triton(backend, kw)
    return mutate(kw, m, backend.device)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("op", ["favor_attention", "linear_attention"])
def test_attention_rejects_bad_input(op, name):
    backend = backend_info(name)
    feature = op == "linear_attention"

    def check(case):
        kwargs = bad_attention_call(backend, *case, feature)
        if kwargs is not None:
            assert_rejected(lambda: getattr(okadfa, op)(**kwargs))
    run(BAD_EXAMPLES[name], st.tuples(SIZES, bad_attention_mutations(feature)), check)


SDPA_SIZE_BREAKS = {   # query, key, value (and projection) shapes with one rule of SDPA's broken
    "rank 2": ((5, 4), (5, 4), (5, 4)),
    "ranks differ": ((1, 2, 5, 4), (2, 5, 4), (2, 5, 4)),
    "causal L != S": ((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 4)),
    "key and value lengths": ((1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 6, 4)),
    "embedding sizes": ((1, 2, 5, 4), (1, 2, 5, 3), (1, 2, 5, 4)),
    "heads without enable_gqa": ((1, 4, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4)),
    "heads not a multiple": ((1, 3, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4)),
    "key and value heads": ((1, 2, 5, 4), (1, 2, 5, 4), (1, 1, 5, 4)),
    "batch": ((2, 1, 2, 5, 4), (3, 1, 2, 5, 4), (3, 1, 2, 5, 4)),
    "empty query": ((1, 2, 0, 4), (1, 2, 5, 4), (1, 2, 5, 4)),
    "empty key": ((1, 2, 5, 4), (1, 2, 0, 4), (1, 2, 0, 4)),
    "projection width": ((1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4), (6, 3)),
    "projection rank": ((1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4), (6,)),
    "projection rows": ((1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4), (0, 4)),
}
SDPA_NAMES = ("query", "key", "value", "projection")
SDPA_BAD = st.one_of(
    tensor_mutations(SDPA_NAMES, SDPA_NAMES[:3]).filter(lambda m: m not in META_QUERY),
    st.tuples(st.just("shape"), st.sampled_from(sorted(SDPA_SIZE_BREAKS))),
    arg_mutations(attn_mask=st.sampled_from([torch.bool, f32]), dropout_p=st.sampled_from([0.1, 1.0, -0.5]),
                  is_causal=CAUSAL_BAD, scale=SCALE_BAD, backend=BACKEND_BAD),
    # these two only matter for the cached projection (projection=None)
    st.tuples(st.just("cached"), st.just("num_features"), st.sampled_from([0, -1, 2.5, True, "8", None])),
    st.tuples(st.just("cached"), st.just("seed"), st.sampled_from([1.5, None, "0", True, 2 ** 64, -2 ** 63 - 1])),
    st.tuples(st.just("float64 on triton")))


@pytest.mark.parametrize("name", BACKENDS)
def test_favor_sdpa_rejects_bad_input(name):
    backend = backend_info(name)

    def check(case):
        m, seed = case
        g = generator(seed)
        put = lambda *shape: rand(g, *shape).to(backend.device)
        kw = dict(query=put(1, 2, 5, 4), key=put(1, 2, 5, 4), value=put(1, 2, 5, 4), projection=put(6, 4),
                  backend=backend.name)
        if m[0] == "shape":
            shapes = SDPA_SIZE_BREAKS[m[1]]
            kw.update({n: put(*shape) for n, shape in zip(SDPA_NAMES, shapes)},
                      is_causal=m[1] == "causal L != S", enable_gqa=m[1] == "heads not a multiple")
        elif m[:2] == ("arg", "attn_mask"):
            # neither key padding nor the causal pattern (anti-causal; as a float mask, biases of 1)
            kw["attn_mask"] = torch.ones(5, 5, device=backend.device).triu(1).to(m[2])
        elif m[0] == "cached":
            kw.update(projection=None, **{m[1]: m[2]})
        elif m[0] == "float64 on triton":
            kw = float64_on_triton(backend, kw)
        elif m == ("object", "projection", "None"):
            return                                  # projection=None is valid: the cached one
        else:
            kw = mutate(kw, m, backend.device)
        if kw is not None:
            assert_rejected(lambda: okadfa.favor_sdpa(**kw))
    run(BAD_EXAMPLES[name], st.tuples(SDPA_BAD, st.integers(0, 2 ** 16)), check)


SPEC_FIELD_BREAKS = [(field, value) for field, values in {
    "points": [0, -1, 1.5, True, "3", None], "dim": [0, -2, 2.0, False], "error_dim": [0, 3.0, None],
    "seed": [-1, 2 ** 64, 1.5, None, True, "0"], "dist": ["gauss", None, 0, "Normal"],
    "shared": [1, 0, "yes", None], "storage": ["disk", None, 1]}.items() for value in values]
FEEDBACK_BREAKS = ["spec error_dim", "stored error_dim", "rank 2", "rank 4", "int", "meta", "list", "str", "None",
                   "dict"]


def dfa_mutations(tensors):
    return st.one_of(tensor_mutations(tensors),
                     st.tuples(st.just("feedback"), st.sampled_from(FEEDBACK_BREAKS)),
                     st.tuples(st.just("spec field"), st.sampled_from(SPEC_FIELD_BREAKS)),
                     arg_mutations(backend=BACKEND_BAD),
                     st.tuples(st.just("float64 on triton")))


def bad_dfa_call(backend, op, kw, m, E, g):
    """A call of op with kw broken by m; a bad FeedbackSpec field raises when the spec is made."""
    if m[0] == "spec field":
        fields = dict(points=2, dim=3, error_dim=E, seed=0, dist="normal", shared=False, storage="seeded")
        return lambda: op(**{**kw, "feedback": FeedbackSpec(**{**fields, m[1][0]: m[1][1]})})
    if m[0] == "feedback":
        stored = lambda *shape: torch.randn(*shape, generator=g).to(backend.device)
        kw = {**kw, "feedback": {
            "spec error_dim": FeedbackSpec(2, 3, E + 1), "stored error_dim": stored(2, 3, E + 1),
            "rank 2": stored(3, E), "rank 4": stored(1, 2, 3, E), "int": stored(2, 3, E).long(),
            "meta": stored(2, 3, E).to("meta"), "list": [[[1.0] * E]], "str": "seeded", "None": None,
            "dict": dict(points=2, dim=3, error_dim=E)}[m[1]]}
    elif m[0] == "float64 on triton":
        kw = float64_on_triton(backend, kw)
        if kw is None:
            return None
    else:
        kw = mutate(kw, m, backend.device)
    return lambda: op(**kw)


@pytest.mark.parametrize("name", BACKENDS)
def test_dfa_feedback_rejects_bad_input(name):
    """The feedback is stored (on the error's device) so that a meta error is among real tensors."""
    backend = backend_info(name)

    def check(case):
        (N, E, seed), m = case
        g = generator(seed)
        kw = dict(error=rand(g, N, E).to(backend.device), feedback=rand(g, 2, 3, E).to(backend.device),
                  backend=backend.name)
        call = bad_dfa_call(backend, okadfa.dfa_feedback, kw, m, E, g)
        if call is not None:
            assert_rejected(call)
    sizes = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2 ** 16))
    run(BAD_EXAMPLES[name], st.tuples(sizes, dfa_mutations(["error"])), check)


HEAD_BAD = st.one_of(
    dfa_mutations(["h", "w_dec", "targets"]),
    st.tuples(st.just("targets"), st.sampled_from(["float", "int32", "V", "-5", "N+1", "(N, 1)"])),
    arg_mutations(ignore_index=st.sampled_from([None, 1.5, "x", True]),
                  chunk_size=st.sampled_from([0, -1, 2.0, True, "8", math.nan]),
                  error=st.sampled_from(["hid", None, "Hidden", 0, "logit"])),
    st.tuples(st.just("w_dec width")))


@pytest.mark.parametrize("name", BACKENDS)
def test_dfa_head_rejects_bad_input(name):
    backend = backend_info(name)

    def check(case):
        (N, d, V, stored, seed), m = case
        g = generator(seed)
        t = torch.randint(0, V, (N,), generator=g)
        kw = dict(h=rand(g, N, d), w_dec=rand(g, V, d), targets=t,
                  feedback=rand(g, 2, 3, d) if stored else FeedbackSpec(2, 3, d), backend=backend.name)
        kw = {n: x.to(backend.device) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
        if m[0] == "targets":
            t = {"float": t.float(), "int32": t.int(), "V": torch.full_like(t, V), "-5": t - t.max() - 5,
                 "N+1": torch.zeros(N + 1, dtype=torch.int64), "(N, 1)": t[:, None]}[m[1]]
            kw["targets"] = t.to(backend.device)
            call = lambda: okadfa.dfa_head(**kw)
        elif m[0] == "w_dec width":
            kw["w_dec"] = rand(g, V, d + 1).to(backend.device)
            call = lambda: okadfa.dfa_head(**kw)
        elif m == ("dtype", "targets", torch.int64):
            return                                  # int64 targets are the valid ones
        else:
            call = bad_dfa_call(backend, okadfa.dfa_head, kw, m, d, g)
        if call is not None:
            assert_rejected(call)
    sizes = st.tuples(*(st.integers(1, 6) for _ in range(3)), st.booleans(), st.integers(0, 2 ** 16))
    run(BAD_EXAMPLES[name], st.tuples(sizes, HEAD_BAD), check)


# ------------------------------------------------------------------------- bugs found and fixed
# The narrowest case of each bug the properties found, kept as a regression test.

@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("op", ["favor_attention", "favor_sdpa"])
def test_a_meta_query_among_real_tensors_is_rejected(op, name):
    """q on meta, the rest on the backend's device: a ValueError naming the devices (the autocast
    check used to ask torch.is_autocast_enabled('meta') first, a RuntimeError)."""
    backend = backend_info(name)
    q, k, v, w = (rand(generator(0), *shape).to(backend.device) for shape in [(1, 2, 5, 4)] * 3 + [(6, 4)])
    assert_rejected(lambda: getattr(okadfa, op)(q.to("meta"), k, v, w if op == "favor_attention" else None,
                                                backend=name))


BASE_CASE = dict(bq=1, bk=1, bv=1, hq=1, hkv=1, scale=None, chunk=None, magnitude=0.5, dtype=bf16,
                 layouts=["contiguous"] * 4)


@pytest.mark.triton
@pytest.mark.parametrize("op,case", [
    ("favor", dict(causal=True, L=2, S=2, Dk=21, Dv=18, M=1, seed=5)),                  # dq: expected 0
    ("linear", dict(causal=False, L=22, S=22, Dv=20, M=1, seed=28)),                    # dq_feat: expected 0
], ids=["favor", "linear"])
def test_triton_bfloat16_gradients_with_one_feature(op, case):
    """The Triton backward used to read the saved output rounded to bfloat16, so g·(v − out) lost
    its cancellation (dq, exactly 0 here, came out 0.013); the forward op now returns float32."""
    backend = backend_info("triton")
    c = {**BASE_CASE, **case}
    if op == "favor":
        naive = lambda q, k, v, w: favor_attention_naive(*broadcast_heads(q, k, v), w, causal=c["causal"])
        check_differentiable(backend, c, okadfa.favor_attention, naive, favor_inputs(c), dict(causal=c["causal"]))
    else:
        naive = lambda fq, fk, v: linear_attention_naive(*broadcast_heads(fq, fk, v), causal=c["causal"])
        check_differentiable(backend, c, okadfa.linear_attention, naive, linear_inputs(c), dict(causal=c["causal"]))


@pytest.mark.parametrize("name", BACKENDS)
def test_half_gradient_of_a_broadcast_input(name):
    """A bfloat16 input broadcast over B: its gradient used to be rounded once per copy and summed
    in bfloat16 (2.6× plain PyTorch's error); okadfa.validation.prepare now widens it first, so
    the copies are summed in float32."""
    backend = backend_info(name)
    c = {**BASE_CASE, **dict(causal=True, bq=2, bk=2, bv=1, hq=1, hkv=2, L=6, S=6, Dk=16, Dv=1, M=1,
                             magnitude=1.0, seed=333)}
    naive = lambda q, k, v, w: favor_attention_naive(*broadcast_heads(q, k, v), w, causal=True)
    check_differentiable(backend, c, okadfa.favor_attention, naive, favor_inputs(c), dict(causal=True))
