"""Every tolerance of the test suite, per dtype, and the assertions that apply them.

Two kinds of comparison:

* Accuracy: a backend against the float64 ground truth on the same (rounded) inputs, as a
  relative RMS error (`assert_rms_close`). For float16/bfloat16 the kernel must also be at
  most HALF_BASELINE_FACTOR times as far from float64 as the same computation done by plain
  PyTorch at that precision (`assert_half_close`): a bound that follows the dtype instead of a
  number picked once.
* Agreement: two computations of the same value that differ only in the order of their
  roundings (chunking, threads, torch.compile, step-by-step decoding, a module against its
  functional form), elementwise through torch.testing.assert_close (`assert_close(a, b, KIND)`).
"""
import torch

f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# --------------------------------------------------------------------------------------- accuracy
# Relative RMS error allowed against the float64 brute force, per input dtype.
RMS_TOL = {f64: 1e-12, f32: 3e-6, bf16: 2e-2, f16: 4e-3}
# Gradients go through one more matmul chain: allow a little more.
GRAD_RMS_TOL = {f64: 1e-11, f32: 3e-5, bf16: 6e-2, f16: 2e-2}
# An expected value that is 0 up to float64 rounding (max |expected| <= ZERO_EXPECTED; every
# gradient but dv at T = 1): max |actual| allowed, the rounding of g·(v − out) in dtype.
ZERO_EXPECTED = 1e-12
ZERO_ABS = {f64: 1e-13, f32: 1e-5, bf16: 1e-2, f16: 2e-3}
# Max |actual − expected| / max |expected| of ops that accumulate in float32 and round once to
# the output dtype (the DFA ops): float32 accumulation, or that final rounding (2⁻⁹ relative).
MAX_REL = {f64: 1e-12, f32: 1e-5, bf16: 2 ** -8, f16: 2 ** -10}
# float16/bfloat16: error against float64 at most this multiple of same-precision PyTorch's.
HALF_BASELINE_FACTOR = 2.0
# The relative RMS denominator is floored here (test data is O(1)), so that an expected value
# that is nearly 0 compares absolutely.
RMS_FLOOR = 1e-3

# -------------------------------------------------------------------------------------- agreement
# (rtol, atol) for torch.testing.assert_close, per dtype of the expected value.
# The same value, rounded in another order.
REORDERED = {f64: (1e-12, 1e-14), f32: (1e-5, 1e-6), bf16: (1.6e-2, 1e-5), f16: (1e-3, 1e-5)}
# Gradients of the same value through another order (one more matmul chain).
REORDERED_GRAD = {f64: (1e-10, 1e-14), f32: (1e-4, 1e-5)}
# Values that must not move at all but for the rounding of a stabiliser they share (the past
# of a causal op when only the future changes).
UNCHANGED = {f64: (1e-12, 1e-12), f32: (1e-6, 1e-6)}
# Several blocks deep (whole models, training steps, Hugging Face logits).
DEEP = {f64: (1e-9, 1e-12), f32: (1e-4, 1e-5)}
# A few AdamW steps with gradients all-reduced over 2 ranks against one process. AdamW's step
# lr·g/(√v + ε) amplifies the summation-order noise of an entry whose gradient is near ε = 1e-8
# (measured: 9.7e-6 apart at the one entry of a 32×32 matrix whose first gradient was 8e-9, all
# others within 2e-6); a real DDP mistake (other rows, unsynchronised or mis-scaled gradients)
# moves entries by about lr = 3e-3 to 6e-3 per step, 30× this bound.
DDP_STEPS = {f32: (2e-5, 1e-4)}
# A float32 result against float64 on the same inputs: float32 accumulation (losses, lognorms).
F32_ACCUMULATED = {f64: (1e-6, 1e-6)}
# A float32 value computed by two correctly rounded formulas (ln, cos) in another order.
F32_ROUNDING = {f32: (4e-7, 1e-7)}
# Orthonormality of QR-based blocks (w wᵀ against the identity).
ORTHONORMAL = {f64: (0.0, 1e-10), f32: (0.0, 1e-5)}
# Bit for bit.
EXACT = {dtype: (0.0, 0.0) for dtype in (f64, f32, bf16, f16)}


def rms_error(actual, expected):
    """‖actual − expected‖ / max(‖expected‖, RMS_FLOOR) (root mean squares), in float64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(RMS_FLOOR)).item()


def assert_rms_close(actual, expected, dtype, grad=False, what=""):
    """actual (computed from dtype inputs) against the float64 expected value, at dtype's accuracy.
    An expected value that is 0 must come out as 0 up to ZERO_ABS."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.numel():
        return
    if expected.abs().max() <= ZERO_EXPECTED:
        worst = actual.detach().abs().max().item()
        assert worst <= ZERO_ABS[dtype], f"{what}: expected 0, got max |x| {worst:.3g} ({dtype})"
        return
    tol = (GRAD_RMS_TOL if grad else RMS_TOL)[dtype]
    err = rms_error(actual, expected)
    assert err <= tol, f"{what}: relative RMS error {err:.3g} > {tol:.1g} ({dtype})"


def assert_half_close(actual, expected, baseline, dtype, grad=False, what=""):
    """A float16/bfloat16 result against float64: within dtype's accuracy, and at most
    HALF_BASELINE_FACTOR × the error of `baseline`, the same computation in plain PyTorch at dtype."""
    assert_rms_close(actual, expected, dtype, grad=grad, what=what)
    if expected.numel() and expected.abs().max() > ZERO_EXPECTED:
        err, base = rms_error(actual, expected), rms_error(baseline, expected)
        assert err <= HALF_BASELINE_FACTOR * base, (
            f"{what}: relative RMS error {err:.3g} > {HALF_BASELINE_FACTOR:g} × {base:.3g}, that of "
            f"plain PyTorch in {dtype}")


def assert_close(actual, expected, kind, dtype=None, **kwargs):
    """torch.testing.assert_close at kind's (rtol, atol) for dtype (default: expected's dtype)."""
    dtype = dtype or (expected.dtype if isinstance(expected, torch.Tensor) else expected[0].dtype)
    rtol, atol = kind[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kwargs)


def assert_max_rel_close(actual, expected, dtype, what=""):
    """max |actual − expected| <= MAX_REL[dtype] · max |expected| (expected in float64)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.numel():
        return
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err, scale = (a - e).abs().max().item(), e.abs().max().item()
    assert err <= MAX_REL[dtype] * scale, f"{what}: max error {err:.3g} > {MAX_REL[dtype]:.3g} × {scale:.3g}"
