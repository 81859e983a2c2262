"""random_features: orthogonal blocks, row norms, determinism, validation."""
import math

import pytest
import torch

import okadfa
from conftest import within
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


# ------------------------------------------------------------------ blockwise construction, sizes
def _recording_qr(monkeypatch, max_cols=None):
    """Record the shape of every QR random_features runs; refuse (at once) any wider than max_cols."""
    shapes, qr = [], torch.linalg.qr

    def recording(a, *args, **kwargs):
        shapes.append(tuple(a.shape))
        if max_cols is not None and a.shape[-1] > max_cols:
            raise AssertionError(f"a QR of a {tuple(a.shape)} matrix for {max_cols} rows")
        return qr(a, *args, **kwargs)
    monkeypatch.setattr(torch.linalg, "qr", recording)
    return shapes


@pytest.mark.parametrize("M,D", [(5, 4096), (64, 2048), (1027, 1024)])
def test_a_block_costs_only_the_rows_it_needs(monkeypatch, M, D):
    """A block of k rows is the QR of a D×k Gaussian: M ≪ D costs O(D·M²), not a D×D QR (the
    old construction ran a full 8192×8192 float64 QR for favor_sdpa's 256 features at E = 8192)."""
    shapes = _recording_qr(monkeypatch, max_cols=min(M, D))
    w = okadfa.random_features(M, D, scaling="sqrt", generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert shapes == [(D, min(D, M - start)) for start in range(0, M, D)]
    for start in range(0, M, D):
        block = w[start:start + D]
        assert_close(block @ block.T, D * torch.eye(block.shape[0], dtype=torch.float64), ORTHONORMAL)


@pytest.mark.parametrize("scaling", ["chi", "sqrt"])
def test_full_blocks_keep_the_random_stream(scaling):
    """For M a multiple of D the draws are unchanged: one D×D Gaussian per block (QR, signs of
    R's diagonal folded in), then the norms' N(0, I) draws."""
    M, D = 48, 16
    g = torch.Generator().manual_seed(11)
    blocks = []
    for _ in range(M // D):
        q, r = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    norms = (torch.randn(M, D, generator=g, dtype=torch.float64).norm(dim=1) if scaling == "chi"
             else torch.full((M,), math.sqrt(D), dtype=torch.float64))
    expected = torch.cat(blocks) * norms[:, None]
    got = okadfa.random_features(M, D, scaling=scaling, generator=torch.Generator().manual_seed(11),
                                 dtype=torch.float64)
    assert_close(got, expected, EXACT)


def test_a_partial_block_is_uniformly_oriented():
    """k < D rows of a block are a uniformly random orthonormal k-frame: over many draws each row
    has E[u uᵀ] = I/D and two rows E[u₁ u₂ᵀ] = 0 (to 5 standard errors)."""
    n, D = 2000, 4
    rows = torch.stack([okadfa.random_features(2, D, scaling="sqrt", generator=torch.Generator().manual_seed(s),
                                               dtype=torch.float64) / math.sqrt(D) for s in range(n)])
    u1, u2 = rows[:, 0], rows[:, 1]
    second = torch.einsum("ni,nj->ij", u1, u1) / n
    cross = torch.einsum("ni,nj->ij", u1, u2) / n
    # Var of u_i u_j for a uniform unit vector in R^D: ≤ E[u_i²u_j²] ≤ 3/(D(D+2))
    se = math.sqrt(3 / (D * (D + 2)) / n)
    assert (second - torch.eye(D, dtype=torch.float64) / D).abs().max() < 5 * se
    assert cross.abs().max() < 5 * se
    assert (u1.mean(0)).abs().max() < 5 * math.sqrt(1 / D / n)


@pytest.mark.parametrize("M,D,match", [
    (10 ** 8, 10 ** 8, r"num_features=100000000, head_dim=100000000.*would need .* more than the .* memory"),
    (2 ** 40, 2 ** 40, r"num_features=1099511627776, head_dim=1099511627776.*more than an int64 can count"),
    (10 ** 15, 4, r"num_features=1000000000000000, head_dim=4.*would need"),
])
@pytest.mark.parametrize("orthogonal", [True, False])
def test_absurd_sizes_raise_before_sampling(M, D, match, orthogonal):
    with pytest.raises(ValueError, match=match):
        within(20, lambda: okadfa.random_features(M, D, orthogonal=orthogonal))


def test_favor_attention_modules_draw_through_the_check():
    from okadfa.nn import FavorAttention
    with pytest.raises(ValueError, match="num_features=1000000000000000"):
        within(20, lambda: FavorAttention(8, 2, nb_features=10 ** 15))


def test_bool_sizes_are_refused():
    for kwargs in (dict(num_features=True, head_dim=4), dict(num_features=4, head_dim=True)):
        with pytest.raises(ValueError, match="must be a positive int"):
            okadfa.random_features(**kwargs)
