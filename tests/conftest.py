"""Shared helpers: test inputs and the tolerances (the O(T²) definition is okadfa.reference.*_naive)."""
import math

import pytest
import torch

import okadfa

# Relative RMS error allowed against a float64 brute force, per input dtype.
RMS_TOL = {torch.float64: 1e-11, torch.float32: 3e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# Gradients go through one more matmul chain: allow a little more.
GRAD_RMS_TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 6e-2, torch.float16: 2e-2}

NATIVE_BACKENDS = ["cpu"] if okadfa.backends()["cpu"]["available"] else []
CPU_BACKENDS = NATIVE_BACKENDS + ["reference"]


def rms_error(actual, expected):
    """‖actual − expected‖ / ‖expected‖ (root mean squares), in float64.

    The denominator is floored at 1e-3 (test data is O(1)) so that an expected
    value that is exactly 0, such as dq at T = 1, compares absolutely."""
    a, e = actual.double(), expected.double()
    return ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-3)).item()


def assert_rms_close(actual, expected, dtype, grad=False, what=""):
    tol = (GRAD_RMS_TOL if grad else RMS_TOL)[dtype]
    err = rms_error(actual, expected)
    assert err <= tol, f"{what}: relative RMS error {err:.3g} > {tol:.1g} ({dtype})"


def make_inputs(B, H, T, Dk, Dv, M, dtype=torch.float64, seed=0, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) * magnitude
    k = torch.randn(B, H, T, Dk, generator=g, dtype=torch.float64) * magnitude
    v = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64)
    w = okadfa.random_features(M, Dk, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, w)]


def shape_id(shape):
    B, H, T, Dk, Dv, M, C = shape
    return f"B{B}-H{H}-T{T}-Dk{Dk}-Dv{Dv}-M{M}-C{C}"


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("OKADFA_BACKEND", raising=False)
