"""Shared fixtures: the `backend` fixture every op test is parametrised by, and test inputs.

Tolerances live in tests/tolerances.py; the O(T²) definitions every test trusts are
okadfa.reference.*_naive."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import okadfa

HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend as the tests drive it: its name, where its tensors live, the dtypes it takes."""
    name: str
    device: str
    dtypes: tuple[torch.dtype, ...]

    @property
    def exact(self) -> torch.dtype:
        """The most precise dtype the backend computes in: float64, else float32."""
        return torch.float64 if torch.float64 in self.dtypes else torch.float32

    def put(self, *xs, dtype=None, grad=False):
        """Copies of xs on the backend's device in dtype (default `exact`), leaves of the graph."""
        out = [x.detach().to(self.device, dtype or self.exact).requires_grad_(grad) for x in xs]
        return out[0] if len(out) == 1 else out

    def skip_unless(self, dtype):
        if dtype not in self.dtypes:
            pytest.skip(f"{self.name} does not take {dtype} (its refusal is tested separately)")

    def op(self, name):
        """The registered op behind this backend: okadfa::<name> (cpu, cuda) or okadfa::triton_<name>."""
        if self.name == "reference":
            pytest.skip("the reference backend is plain PyTorch, not a registered op")
        return getattr(torch.ops.okadfa, f"triton_{name}" if self.name == "triton" else name)


ALL_FLOAT = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_DTYPES = {"triton": (torch.float32, torch.bfloat16, torch.float16)}
_ON_GPU = torch.cuda.is_available()


def backend_info(name: str) -> Backend:
    """The Backend `name`, or a skip with the reason it cannot run here."""
    status = okadfa.backends()[name]
    if not status["available"]:
        pytest.skip(f"{name}: {status['reason']}")
    device = "cuda" if name == "cuda" or (name == "triton" and _ON_GPU) else "cpu"
    return Backend(name, device, _DTYPES.get(name, ALL_FLOAT))


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.triton) if name == "triton" else name
                        for name in ("reference", "cpu", "triton", "cuda")])
def backend(request) -> Backend:
    """Every backend (reference, cpu, triton, cuda): skipped, with the reason, where it cannot run."""
    return backend_info(request.param)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the OS reports them (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split()[2:])
    except (OSError, StopIteration):
        return set()


@pytest.fixture(params=["amx", "onednn", "float32"])
def cpu_bf16(request, monkeypatch) -> Backend:
    """The cpu backend with its bfloat16 GEMMs forced onto one engine through OKADFA_CPU_HALF_GEMM:
    AMX tiles, oneDNN, or float32 GEMMs. oneDNN and float32 run on every x86 CPU (oneDNN emulates
    bfloat16 where the CPU lacks it); AMX only where the CPU has it."""
    if request.param == "amx" and not {"amx_bf16", "avx512_bf16"} <= cpu_flags():
        pytest.skip("this CPU has no AMX-BF16 with AVX512-BF16")
    if request.param == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch is built without oneDNN")
    monkeypatch.setenv("OKADFA_CPU_HALF_GEMM", request.param)
    return backend_info("cpu")


@pytest.fixture(params=["cpu", "cuda"])
def native(request) -> Backend:
    """The native (okadfa._C) backends only, for what only they have (thread splits, raw-op checks)."""
    return backend_info(request.param)


def make_inputs(B, H, T, Dk, Dv, M, dtype=torch.float64, seed=0, magnitude=1.0):
    """q, k (B, H, T, Dk), v (B, H, T, Dv) standard normal (q, k times magnitude), projection (M, Dk)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) * magnitude
    k = torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) * magnitude
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    w = okadfa.random_features(M, Dk, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, w)]


def make_features(B, H, T, M, Dv, seed=0, dtype=torch.float64):
    """Positive features q_feat, k_feat = elu(N(0, 1)) + 1 (B, H, T, M) and values (B, H, T, Dv)."""
    g = torch.Generator().manual_seed(seed)
    fq = torch.nn.functional.elu(torch.randn(B, H, T, M, generator=g, dtype=torch.float64)) + 1
    fk = torch.nn.functional.elu(torch.randn(B, H, T, M, generator=g, dtype=torch.float64)) + 1
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (fq, fk, v)]


def check_against_float64(op, naive, backend, inputs, dtype, causal, grad_names, **kw):
    """op(inputs rounded to dtype, on the backend) against naive (the float64 brute force) on the
    same rounded values: the output and every input gradient, at tests/tolerances.py's accuracy;
    half types also against `naive` run in plain PyTorch at that precision."""
    from tolerances import assert_half_close, assert_rms_close
    exact = [x.to(dtype).double().requires_grad_() for x in inputs]
    low = backend.put(*exact, dtype=dtype, grad=True)
    expected = naive(*exact, causal=causal)
    out = op(*low, causal=causal, backend=backend.name, **kw)
    assert out.dtype == dtype and out.shape == expected.shape and out.device.type == backend.device
    g = torch.randn_like(expected)
    got, want = torch.autograd.grad(out, low, g.to(out)), torch.autograd.grad(expected, exact, g)
    if dtype in HALF:
        base_in = [x.detach().to(dtype).requires_grad_() for x in exact]
        base = naive(*base_in, causal=causal)
        assert_half_close(out, expected, base, dtype, what="out")
        for name, a, e, b in zip(grad_names, got, want, torch.autograd.grad(base, base_in, g.to(dtype))):
            assert a.dtype == dtype, name
            assert_half_close(a, e, b, dtype, grad=True, what=name)
        return
    assert_rms_close(out, expected, dtype, what="out")
    for name, a, e in zip(grad_names, got, want):
        assert a.dtype == dtype and a.device.type == backend.device, name
        assert_rms_close(a, e, dtype, grad=True, what=name)


def check_double_backward(backend, fn, inputs):
    """create_graph=True through fn (an attention op on `backend`): exact second derivatives on
    the reference (gradgradcheck); a clear refusal from the kernels, whose backward is not
    differentiable, never a silent 0 (a plain backward still works)."""
    if backend.name == "reference":
        assert torch.autograd.gradgradcheck(fn, inputs)
        return
    g, = torch.autograd.grad(fn(*inputs).square().sum(), inputs[0], create_graph=False)
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(fn(*inputs).square().sum(), inputs[0], create_graph=True)


def assert_refused_or_same(call, reference_call, name):
    """A raw op given a strided (non-contiguous) input either refuses it, naming the argument, or
    reads it correctly: the same result as on the contiguous input."""
    try:
        got = call()
    except (RuntimeError, ValueError, TypeError) as exc:
        assert f"okadfa: {name}" in str(exc), exc
        return
    want = reference_call()
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(a, b), f"{name}: a strided input gave a different result"


def within(seconds, call):
    """call() under a SIGALRM deadline: a call that would take hours fails the test instead."""
    import signal

    class Timeout(Exception):
        pass

    def alarm(*_):
        raise Timeout
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return call()
    except Timeout:
        pytest.fail(f"still running after {seconds} s", pytrace=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def shape_id(shape):
    B, H, T, Dk, Dv, M, C = shape
    return f"B{B}-H{H}-T{T}-Dk{Dk}-Dv{Dv}-M{M}-C{C}"


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("OKADFA_BACKEND", raising=False)


FEEDBACK_KINDS = ["normal", "uniform", "shared", "stored"]


def make_feedback(kind, P, d, E, seed, dtype, device):
    """(the feedback argument of the DFA ops, the same matrices (P, d, E) in float64 on the CPU):
    a seeded FeedbackSpec of that kind, or a stored (P, d, E) tensor in dtype."""
    from okadfa.feedback import FeedbackSpec, materialize_feedback
    if kind == "stored":
        b = torch.randn(P, d, E, generator=torch.Generator().manual_seed(seed % 2 ** 63), dtype=torch.float64)
        b = (b / E ** 0.5).to(dtype)
        return b.to(device), b.double()
    spec = FeedbackSpec(P, d, E, seed=seed, dist="uniform" if kind == "uniform" else "normal",
                        shared=kind == "shared")
    return spec, materialize_feedback(spec, dtype=torch.float64)


def make_head_inputs(N, d, V, seed=0, ignored=(0, 5), ignore_index=-100):
    """h (N, d), w_dec (V, d) / √d in float64 and targets (N,) with rows `ignored` set to ignore_index."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64) / d ** 0.5
    t = torch.randint(0, V, (N,), generator=g)
    t[[i for i in ignored if i < N]] = ignore_index
    return h, w, t
