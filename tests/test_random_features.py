"""random_features: orthogonal blocks, row norms, determinism, validation."""
import math

import pytest
import torch

import okadfa
from tolerances import EXACT, ORTHONORMAL, assert_close


@pytest.mark.parametrize("M,D", [(64, 16), (37, 8), (5, 12), (256, 64)])
def test_blocks_are_orthogonal(M, D):
    w = okadfa.random_features(M, D, scaling="sqrt", generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert w.shape == (M, D)
    assert_close(w.norm(dim=1), torch.full((M,), math.sqrt(D), dtype=torch.float64), ORTHONORMAL)
    for start in range(0, M, D):
        block = w[start:start + D]
        gram = block @ block.T
        assert_close(gram, D * torch.eye(block.shape[0], dtype=torch.float64), ORTHONORMAL)


def test_chi_norms_follow_gaussian_vectors():
    w = okadfa.random_features(4096, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sq = w.norm(dim=1) ** 2            # chi-square with 16 degrees of freedom: mean 16, variance 32
    assert abs(sq.mean().item() - 16) < 5 * math.sqrt(32 / 4096)
    assert abs(sq.var().item() - 32) < 0.2 * 32
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    assert_close(block @ block.T, torch.eye(16, dtype=torch.float64), ORTHONORMAL)


def test_iid_rows_when_not_orthogonal():
    w = okadfa.random_features(2048, 8, orthogonal=False, generator=torch.Generator().manual_seed(2),
                               dtype=torch.float64)
    assert abs(w.mean().item()) < 0.05 and abs(w.var().item() - 1) < 0.05
    gram = w[:8] @ w[:8].T
    assert (gram - torch.diag(torch.diagonal(gram))).abs().max() > 0.1   # rows are not orthogonal


def test_generator_determinism_and_dtype():
    a = okadfa.random_features(20, 6, generator=torch.Generator().manual_seed(3))
    b = okadfa.random_features(20, 6, generator=torch.Generator().manual_seed(3))
    c = okadfa.random_features(20, 6, generator=torch.Generator().manual_seed(4))
    assert a.dtype == torch.get_default_dtype()
    assert_close(a, b, EXACT)
    assert not torch.allclose(a, c)
    assert okadfa.random_features(4, 4, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_features=0, head_dim=4), "num_features"),
    (dict(num_features=4, head_dim=-1), "head_dim"),
    (dict(num_features=4, head_dim=4, scaling="unit"), "scaling"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        okadfa.random_features(**kwargs)
