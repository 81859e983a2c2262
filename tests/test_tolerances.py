"""The assertions of tests/tolerances.py fail on the broken cases they guard."""
import pytest
import torch

from tolerances import RMS_TOL, assert_half_close, assert_max_rel_close, assert_rms_close


def _noisy(x, rel, seed):
    g = torch.Generator().manual_seed(seed)
    return x + rel * x.pow(2).mean().sqrt() * torch.randn(x.shape, generator=g, dtype=x.dtype)


def test_half_baseline_rejects_a_result_worse_than_plain_pytorch():
    """Within bfloat16's fixed tolerance but 3× the baseline's error: refused."""
    exact = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    baseline = _noisy(exact, 2e-3, 1)
    assert_half_close(_noisy(exact, 2e-3, 2), exact, baseline, torch.bfloat16)      # as good: accepted
    worse = _noisy(exact, 6e-3, 3)
    assert_rms_close(worse, exact, torch.bfloat16)                                    # the fixed bound passes it
    with pytest.raises(AssertionError, match="plain PyTorch"):
        assert_half_close(worse, exact, baseline, torch.bfloat16)


def test_rms_and_max_error_refuse_a_wrong_value():
    exact = torch.randn(50, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with pytest.raises(AssertionError, match="relative RMS error"):
        assert_rms_close(_noisy(exact, 3 * RMS_TOL[torch.float32], 5), exact, torch.float32)
    one_off = exact.clone()
    one_off[7] += 1e-4 * exact.abs().max()              # one entry: invisible in RMS terms, not in max
    with pytest.raises(AssertionError, match="max error"):
        assert_max_rel_close(one_off, exact, torch.float32)


def test_an_expected_zero_must_come_out_zero():
    with pytest.raises(AssertionError, match="expected 0"):
        assert_rms_close(torch.full((4,), 1e-4), torch.zeros(4, dtype=torch.float64), torch.float32)
    assert_rms_close(torch.full((4,), 1e-7), torch.zeros(4, dtype=torch.float64), torch.float32)
