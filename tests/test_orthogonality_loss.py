"""orthogonality_loss and OrthoSchedule."""
import pytest
import torch

from okadfa.reference import OrthoSchedule, orthogonality_loss


def test_zero_for_orthogonal_and_known_value():
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert orthogonality_loss(q).item() < 1e-20
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)   # WᵀW − I = diag(3, 0)
    assert orthogonality_loss(w).item() == pytest.approx(9.0)


def test_non_square_uses_smaller_gram():
    tall, _ = torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64))       # orthonormal columns
    assert orthogonality_loss(tall).item() < 1e-20
    assert orthogonality_loss(tall.T).item() < 1e-20                          # orthonormal rows
    w = torch.randn(6, 3, dtype=torch.float64)
    expected = ((w.T @ w - torch.eye(3, dtype=torch.float64)) ** 2).sum()
    torch.testing.assert_close(orthogonality_loss([w, w.T]), 2 * expected)


def test_per_head_and_gradcheck():
    w = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    per_head = orthogonality_loss(w, per_head=True, num_heads=2)
    torch.testing.assert_close(per_head, orthogonality_loss(w[:4]) + orthogonality_loss(w[4:]))
    assert torch.autograd.gradcheck(lambda x: orthogonality_loss(x, per_head=True, num_heads=2), (w,))
    assert torch.autograd.gradcheck(orthogonality_loss, (torch.randn(3, 5, dtype=torch.float64,
                                                                     requires_grad=True),))


@pytest.mark.parametrize("weights,kwargs,exc", [
    ([], {}, ValueError), (torch.randn(3), {}, ValueError), (torch.ones(2, 2, dtype=torch.long), {}, TypeError),
    (torch.randn(6, 2), dict(per_head=True, num_heads=4), ValueError),
    (torch.randn(6, 2), dict(per_head=True), ValueError),
])
def test_bad_input(weights, kwargs, exc):
    with pytest.raises(exc):
        orthogonality_loss(weights, **kwargs)


def test_schedule():
    s = OrthoSchedule(0.1, 100)
    assert s(0) == 0.0 and s(50) == pytest.approx(0.05) and s(100) == pytest.approx(0.1) and s(1000) == 0.1
    assert OrthoSchedule(0.2, 0)(0) == 0.2
    with pytest.raises(ValueError):
        OrthoSchedule(-1, 10)
    with pytest.raises(ValueError):
        s(-1)
