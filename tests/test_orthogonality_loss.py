"""orthogonality_loss (Σ ‖WᵀW − I‖²_F, smaller Gram side) and OrthoSchedule (linear warm-up)."""
import pytest
import torch

from okadfa.ortho import OrthoSchedule, orthogonality_loss
from tolerances import EXACT, F32_ACCUMULATED, REORDERED, REORDERED_GRAD, assert_close

F64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def orthonormal(rows, cols, seed=0):
    """Orthonormal columns (rows ≥ cols) or rows (rows < cols), from a QR factorisation."""
    q, _ = torch.linalg.qr(randn(max(rows, cols), min(rows, cols), seed=seed))
    return q if rows >= cols else q.T


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12), (1, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_zero_for_orthonormal(shape):
    assert orthogonality_loss(orthonormal(*shape)).item() < 1e-24
    assert orthogonality_loss(2 * orthonormal(*shape)).item() == pytest.approx(9 * min(shape))  # (4 − 1)² per row


def test_hand_computed_values():
    # WᵀW = [[10, 14], [14, 20]]; minus I: 9² + 14² + 14² + 19² = 834
    assert orthogonality_loss(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)).item() == 834.0
    assert orthogonality_loss(torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)).item() == 9.0
    # Wide W = [3, 4]: the smaller Gram is WWᵀ = [25] -> 24² = 576 (WᵀW − I would give 577).
    wide = torch.tensor([[3.0, 4.0]], dtype=F64)
    assert orthogonality_loss(wide).item() == 576.0
    assert orthogonality_loss(wide.T).item() == 576.0


@pytest.mark.parametrize("shape", [(6, 3), (3, 6), (5, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_smaller_gram_side(shape):
    w = randn(*shape)
    k = min(shape)
    gram = w.T @ w if shape[0] >= shape[1] else w @ w.T
    assert gram.shape == (k, k)
    expected = ((gram - torch.eye(k, dtype=F64)) ** 2).sum()
    assert_close(orthogonality_loss(w), expected, EXACT)
    assert_close(orthogonality_loss(w.T), expected, EXACT)   # same smaller side


def test_sum_over_a_list_or_iterable():
    ws = [randn(6, 3, seed=1), randn(3, 6, seed=2), randn(4, 4, seed=3)]
    total = sum(orthogonality_loss(w) for w in ws)
    assert_close(orthogonality_loss(ws), total, REORDERED)
    assert_close(orthogonality_loss(iter(ws)), total, REORDERED)
    assert_close(orthogonality_loss(tuple(ws)), total, REORDERED)


def test_per_head_blocks():
    w = randn(12, 4)
    blocks = sum(orthogonality_loss(w[3 * h:3 * h + 3]) for h in range(4))   # wide (3, 4) blocks: WWᵀ
    assert_close(orthogonality_loss(w, per_head=True, num_heads=4), blocks, REORDERED)
    assert_close(orthogonality_loss(w, per_head=True, num_heads=1), orthogonality_loss(w), REORDERED)
    # Heads with orthonormal columns each, stacked: zero per head, not overall.
    heads = torch.cat([orthonormal(6, 3, seed=s) for s in range(2)])
    assert orthogonality_loss(heads, per_head=True, num_heads=2).item() < 1e-24
    assert orthogonality_loss(heads).item() > 1e-3
    # num_heads is ignored without per_head
    assert_close(orthogonality_loss(w, num_heads=4), orthogonality_loss(w), REORDERED)


def test_gradient():
    w = randn(7, 3).requires_grad_()
    (grad,) = torch.autograd.grad(orthogonality_loss(w), w)
    # d/dW ‖WᵀW − I‖²_F = 4 W (WᵀW − I)
    assert_close(grad, 4 * w.detach() @ (w.detach().T @ w.detach() - torch.eye(3, dtype=F64)), REORDERED_GRAD)


@pytest.mark.parametrize("shape,kwargs", [
    ((4, 4), {}), ((5, 3), {}), ((3, 5), {}), ((6, 4), dict(per_head=True, num_heads=2)),
])
def test_gradcheck(shape, kwargs):
    w = randn(*shape, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: orthogonality_loss(a, **kwargs), (w,))
    v = randn(shape[1], shape[0], seed=5).requires_grad_()            # both orientations in one list
    assert torch.autograd.gradcheck(lambda a, b: orthogonality_loss([a, b], **kwargs), (w, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sums_in_float32(dtype):
    w = randn(16, 8).to(dtype)
    out = orthogonality_loss(w)
    assert out.dtype == torch.float32
    assert_close(out.double(), orthogonality_loss(w.double()), F32_ACCUMULATED)


@pytest.mark.parametrize("weights,kwargs,exc,match", [
    ([], {}, ValueError, "at least one matrix"),
    (randn(3), {}, ValueError, r"weights\[0\] must have shape \(out, in\)"),
    ([randn(2, 2), randn(2, 2, 2)], {}, ValueError, r"weights\[1\] must have shape \(out, in\)"),
    (torch.ones(2, 2, dtype=torch.long), {}, TypeError, r"weights\[0\] must be a floating-point"),
    ([randn(2, 2), "W"], {}, TypeError, r"weights\[1\] must be a torch.Tensor"),
    (randn(6, 2), dict(per_head=True, num_heads=4), ValueError, "not divisible by num_heads=4"),
    (randn(6, 2), dict(per_head=True), ValueError, "num_heads"),
    (randn(6, 2), dict(per_head=True, num_heads=0), ValueError, "num_heads"),
    (randn(6, 2), dict(per_head=1, num_heads=2), TypeError, "per_head must be a bool"),
])
def test_bad_input(weights, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        orthogonality_loss(weights, **kwargs)


def test_schedule_values():
    s = OrthoSchedule(0.1, 100)
    assert s(0) == 0.0
    assert s(50) == pytest.approx(0.05)
    assert s(100) == 0.1
    assert s(1000) == 0.1
    assert OrthoSchedule(1.0, 3)(1) == pytest.approx(1 / 3)
    assert OrthoSchedule(0.2, 0)(0) == 0.2 and OrthoSchedule(0.2, 0)(10) == 0.2
    assert OrthoSchedule(0, 10)(5) == 0.0
    assert isinstance(OrthoSchedule(1, 4)(2), float)
    assert "lambda_max=0.1" in repr(s)


@pytest.mark.parametrize("args,exc,match", [
    ((-1.0, 10), ValueError, "lambda_max"), ((float("nan"), 10), ValueError, "lambda_max"),
    (("0.1", 10), TypeError, "lambda_max"), ((0.1, -1), ValueError, "warmup_steps"),
    ((0.1, 2.5), TypeError, "warmup_steps"),
])
def test_schedule_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        OrthoSchedule(*args)


def test_schedule_rejects_negative_steps():
    with pytest.raises(ValueError, match="step must be >= 0"):
        OrthoSchedule(0.1, 10)(-1)
