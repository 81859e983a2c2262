"""Bad input is rejected before any kernel runs, with the argument named; dispatch rules."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import okadfa
from okadfa.backends import select_backend
from conftest import make_inputs
from tolerances import REORDERED, assert_close


def _inputs():
    return make_inputs(1, 2, 10, 4, 3, 6, dtype=torch.float32)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda q, k, v, w: (q[0], k, v, w), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v, w: (q, k[..., :3], v, w), ValueError, "k must have the head dim"),
    (lambda q, k, v, w: (q, k, v[:, :, :7], w), ValueError, "same sequence length"),
    (lambda q, k, v, w: (q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1), w), ValueError,
     "do not broadcast"),
    (lambda q, k, v, w: (q, k[:, :1], v, w), ValueError, "same number of heads"),
    (lambda q, k, v, w: (q[..., :0], k[..., :0], v, w[:, :0]), ValueError, "q must have at least one feature"),
    (lambda q, k, v, w: (q, k, v, w[:, :2]), ValueError, "projection must have shape"),
    (lambda q, k, v, w: (q, k, v, w[0]), ValueError, "projection must have 2 dimensions"),
    (lambda q, k, v, w: (q.long(), k, v, w), TypeError, "q must be a floating-point tensor"),
    (lambda q, k, v, w: (q, k, v, w.int()), TypeError, "projection must be a floating-point"),
    (lambda q, k, v, w: (q, k.double(), v, w), TypeError, "k has dtype torch.float64"),
    (lambda q, k, v, w: (q, k, v.to("meta"), w), ValueError, "v is on meta"),
    (lambda q, k, v, w: (q, k, v, w.to("meta")), ValueError, "projection is on meta"),
    (lambda q, k, v, w: (q.numpy(), k, v, w), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v, w: (q[:, :, :0], k[:, :, :0], v[:, :, :0], w), ValueError, "at least 1"),
])
def test_favor_attention_rejects(mutate, exc, match):
    with pytest.raises(exc, match=match):
        okadfa.favor_attention(*mutate(*_inputs()))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(scale=0.0), ValueError, "scale must be positive"),
    (dict(scale=float("nan")), ValueError, "scale must be positive"),
    (dict(scale=float("inf")), ValueError, "scale must be positive"),
    (dict(scale="big"), TypeError, "scale must be a float"),
    (dict(scale=1e300), ValueError, "too large"),
    (dict(chunk_size=0), ValueError, "chunk_size must be in"),
    (dict(chunk_size=2.5), TypeError, "chunk_size must be an int"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ValueError, "needs CUDA tensors"),
])
def test_favor_attention_rejects_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        okadfa.favor_attention(*_inputs(), **kwargs)


def test_linear_attention_rejects():
    fq = torch.rand(1, 2, 10, 6)
    v = torch.randn(1, 2, 10, 3)
    with pytest.raises(ValueError, match="same number of features"):
        okadfa.linear_attention(fq, fq[..., :5], v)
    with pytest.raises(TypeError, match="v must be a floating-point"):
        okadfa.linear_attention(fq, fq, v.int())
    with pytest.raises(ValueError, match="q_feat must have 4 dimensions"):
        okadfa.linear_attention(fq[0], fq, v)


def test_triton_backend_is_reported_and_refused(monkeypatch):
    status = okadfa.backends()
    assert set(status) == {"triton", "cuda", "cpu", "reference"}
    assert status["reference"]["available"] is True
    assert all(isinstance(s["reason"], str) and s["reason"] for s in status.values())
    if "failed to import" in status["triton"]["reason"]:
        with pytest.raises(RuntimeError, match="backend 'triton' is unavailable"):
            okadfa.favor_attention(*_inputs(), backend="triton")
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The kernels were built for the interpreter at import: they run on CPU tensors.
        assert status["triton"]["available"] is True
        q, k, v, w = _inputs()
        assert_close(okadfa.favor_attention(q, k, v, w, backend="triton"),
                     okadfa.favor_attention(q, k, v, w, backend="reference"), REORDERED)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for op, args in ((okadfa.favor_attention, _inputs()), (okadfa.linear_attention, [x.abs() for x in _inputs()[:3]])):
        with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
            op(*args, backend="triton")


def test_environment_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("OKADFA_BACKEND", "reference")
    assert select_backend("auto", cpu) == "reference"
    assert select_backend("cpu", cpu) == "cpu" or not okadfa.backends()["cpu"]["available"]
    monkeypatch.setenv("OKADFA_BACKEND", "nope")
    with pytest.raises(ValueError, match="OKADFA_BACKEND"):
        select_backend("auto", cpu)
    monkeypatch.delenv("OKADFA_BACKEND")
    expected = "cpu" if okadfa.backends()["cpu"]["available"] else "reference"
    assert select_backend("auto", cpu) == expected


def test_kernels_package_is_namespaced(tmp_path):
    """The Triton kernels are okadfa.kernels, never a top-level `kernels`, also from the repository's
    root: a top-level kernels/ there once shadowed the PyPI package `kernels`, which transformers
    >= 5.25 imports, and broke `import transformers` model code in a checkout."""
    code = ("import importlib.util, os, okadfa.kernels; s = importlib.util.find_spec('kernels'); "
            "print(s is None or os.path.dirname(s.origin or '') != os.path.dirname(okadfa.kernels.__file__))")
    root = Path(__file__).resolve().parent.parent
    for cwd in (tmp_path, root):
        result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "True", cwd
    assert not (root / "kernels").exists() or not (root / "kernels" / "__init__.py").exists()


def test_native_extension_present_when_required():
    """`make test` builds okadfa._C and sets OKADFA_REQUIRE_NATIVE=1: tests that need the
    extension then must not skip because the build is missing or fails to import."""
    if os.environ.get("OKADFA_REQUIRE_NATIVE") != "1":
        pytest.skip("OKADFA_REQUIRE_NATIVE is not set (a run outside make test)")
    status = okadfa.backends()["cpu"]
    assert status["available"], status["reason"]


def _compile_cases():
    q, k, v, w = make_inputs(1, 2, 8, 4, 3, 6, dtype=torch.float32)
    fq = q.abs()
    spec = okadfa.FeedbackSpec(2, 3, 5)
    return [
        (lambda q: okadfa.favor_attention(q[0], k, v, w), q),
        (lambda q: okadfa.favor_attention(q, k.double(), v, w), q),
        (lambda q: okadfa.favor_attention(q, k, v, w[:, :3].contiguous(), causal=True), q),
        (lambda q: okadfa.favor_attention(q, k, v, w, chunk_size=0), q),
        (lambda q: okadfa.linear_attention(q[..., 0], fq, v), fq),
        (lambda q: okadfa.linear_attention(q, -q, v), fq),          # a data check: when the graph runs
        (lambda e: okadfa.dfa_feedback(e, spec), torch.randn(3, 4)),
        (lambda h: okadfa.dfa_head(h, torch.randn(5, 4), torch.tensor([0, 1]), okadfa.FeedbackSpec(2, 4, 4)),
         torch.randn(3, 4)),
        (lambda q: okadfa.favor_sdpa(q, k, v, dropout_p=0.5), q),
    ]


@pytest.mark.parametrize("index", range(len(_compile_cases())))
def test_errors_under_torch_compile_are_the_eager_ones(index):
    """Under torch.compile(fullgraph=True) bad input raises the ValueError/TypeError of eager mode,
    with its message, not Dynamo's `Unsupported: Observed exception`."""
    fn, arg = _compile_cases()[index]
    with pytest.raises((ValueError, TypeError)) as eager:
        fn(arg)
    torch._dynamo.reset()
    with pytest.raises(type(eager.value), match=re.escape(str(eager.value))):
        torch.compile(fn, fullgraph=True)(arg)
