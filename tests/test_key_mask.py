"""Key padding masks (`key_mask`) of favor_attention and linear_attention on every backend: against
the float64 brute force with the same mask (okadfa.reference.*_naive), forward and backward; a
padded batch against each sequence run alone (right and left padding); masked positions' contents
reaching nothing; masked query rows; validation. Tolerances: tests/tolerances.py."""
import math

import pytest
import torch

import okadfa
from conftest import make_features, make_inputs
from okadfa.reference import favor_attention_naive, linear_attention_naive
from tolerances import assert_rms_close

CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
OPS = pytest.mark.parametrize("op", ["favor", "linear"])
T = 45


def _mask(B=4):
    """(B, T): left padding past a chunk of 32 (and of 16), right padding, a hole, and none."""
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :35] = False
    mask[1, 40:] = False
    mask[2, 10:13] = False
    return mask


def _inputs(op, B, H=2, seed=0):
    """(tensors, call, naive): the op's float64 inputs, its public call and its brute force."""
    if op == "favor":
        q, k, v, w = make_inputs(B, H, T, 12, 9, 21, seed=seed)
        return ((q, k, v, w), lambda *x, **kw: okadfa.favor_attention(*x, **kw),
                lambda *x, **kw: favor_attention_naive(*x, **kw))
    fq, fk, v = make_features(B, H, T, 11, 9, seed=seed)
    return ((fq, fk, v), lambda *x, **kw: okadfa.linear_attention(*x, **kw),
            lambda *x, **kw: linear_attention_naive(*x, **kw))


@OPS
@CAUSAL
def test_matches_brute_force(backend, op, causal):
    """Output and every gradient against the float64 brute force with the mask, in the backend's
    most precise dtype; chunks of 16 so that padding spans whole chunks."""
    dtype = backend.exact
    tensors, call, naive = _inputs(op, 4)
    mask = _mask()
    exact = [x.to(dtype).double().requires_grad_() for x in tensors]
    low = backend.put(*exact, dtype=dtype, grad=True)
    expected = naive(*exact, causal=causal, key_mask=mask[:, None])
    out = call(*low, causal=causal, key_mask=mask.to(backend.device), backend=backend.name, chunk_size=16)
    g = torch.randn_like(expected)
    assert_rms_close(out, expected, dtype, what="out")
    got, want = torch.autograd.grad(out, low, g.to(out)), torch.autograd.grad(expected, exact, g)
    for i, (a, e) in enumerate(zip(got, want)):
        assert_rms_close(a, e, dtype, grad=True, what=f"gradient {i}")


@OPS
@CAUSAL
def test_masked_positions_reach_nothing(backend, op, causal):
    """NaN in every input at masked positions changes no output; masked query rows are exactly 0
    and get exactly zero gradients, as do masked keys and values; a fully masked sequence is 0."""
    tensors, call, _ = _inputs(op, 4, seed=1)
    mask = _mask()
    mask[3] = False                                   # nothing real at all
    dev = backend.device
    clean = backend.put(*tensors, grad=True)
    out = call(*clean, causal=causal, key_mask=mask.to(dev), backend=backend.name, chunk_size=16)
    m = mask.to(dev)[:, None, :].expand(-1, out.shape[1], -1)       # (B, H, T)
    dirty = [x.detach().clone() for x in clean]
    for x in dirty[:3]:
        x[~m] = math.nan
    poisoned = call(*dirty, causal=causal, key_mask=mask.to(dev), backend=backend.name, chunk_size=16)
    assert torch.equal(poisoned, out)
    assert torch.equal(out[~m], torch.zeros_like(out[~m]))
    grads = torch.autograd.grad(out, clean[:3], torch.randn_like(out))
    for i, gr in enumerate(grads):
        assert torch.isfinite(gr).all() and torch.equal(gr[~m], torch.zeros_like(gr[~m])), f"gradient {i}"


@OPS
# left padding is what causal decoding batches; without causality both sides test the same thing
@pytest.mark.parametrize("side, causal", [("right", True), ("right", False), ("left", True)],
                         ids=["causal-right", "full-right", "causal-left"])
def test_padded_batch_equals_each_sequence_alone(backend, op, side, causal):
    """Sequences of lengths 45, 30, 17 and 1 padded to 45 (on the right, or on the left): each one's
    outputs and gradients at its real positions equal those of running it alone, unpadded."""
    tensors, call, _ = _inputs(op, 4, seed=2)
    lengths = [45, 30, 17, 1]
    mask = torch.zeros(4, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    if side == "left":
        mask = mask.flip(-1)
    dev = backend.device
    batch = backend.put(*tensors, grad=True)
    out = call(*batch, causal=causal, key_mask=mask.to(dev), backend=backend.name, chunk_size=16)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, batch[:3], g)
    for b, n in enumerate(lengths):
        real = mask[b].nonzero()[:, 0].to(dev)
        alone = [x.detach()[b:b + 1].index_select(2, real).requires_grad_() for x in batch[:3]] + list(batch[3:])
        ref = call(*alone, causal=causal, backend=backend.name, chunk_size=16)
        assert_rms_close(out[b:b + 1].index_select(2, real), ref, backend.exact, what=f"sequence {b} out")
        ref_grads = torch.autograd.grad(ref, alone[:3], g[b:b + 1].index_select(2, real))
        for i, (a, e) in enumerate(zip(grads, ref_grads)):
            assert_rms_close(a[b:b + 1].index_select(2, real), e, backend.exact, grad=True,
                             what=f"sequence {b} gradient {i}")


@OPS
def test_all_true_mask_changes_nothing(backend, op):
    tensors, call, _ = _inputs(op, 2, seed=3)
    x = backend.put(*tensors)
    ones = torch.ones(2, T, dtype=torch.bool, device=backend.device)
    for causal in (True, False):
        plain = call(*x, causal=causal, backend=backend.name)
        assert torch.equal(call(*x, causal=causal, key_mask=ones, backend=backend.name), plain)


def test_gradcheck_with_mask(backend):
    backend.skip_unless(torch.float64)
    q, k, v, w = backend.put(*make_inputs(2, 1, 11, 4, 3, 5, seed=4), grad=True)
    mask = torch.tensor([[False] * 3 + [True] * 8, [True] * 6 + [False, True, True, False, False]],
                        device=backend.device)
    for causal in (True, False):
        fn = lambda q, k, v, w: okadfa.favor_attention(q, k, v, w, causal=causal, key_mask=mask, backend=backend.name,
                                                       chunk_size=4)
        assert torch.autograd.gradcheck(fn, (q, k, v, w))


def test_broadcast_batch_of_one_mask():
    """A (1, S) mask serves every batch entry."""
    q, k, v, w = make_inputs(3, 2, T, 8, 5, 10)
    mask = _mask()[2:3]                               # a hole
    out = okadfa.favor_attention(q, k, v, w, causal=True, key_mask=mask, backend="reference")
    expected = okadfa.favor_attention(q, k, v, w, causal=True, key_mask=mask.expand(3, T), backend="reference")
    assert torch.equal(out, expected)


def test_cross_attention_masks_keys_only():
    """L ≠ S (non-causal cross-attention): the mask removes keys; no query row is zeroed."""
    q, _, _, w = make_inputs(1, 2, 7, 8, 5, 10)
    _, k, v, _ = make_inputs(1, 2, 12, 8, 5, 10, seed=1)
    mask = torch.tensor([[True] * 9 + [False] * 3])
    out = okadfa.favor_attention(q, k, v, w, key_mask=mask)
    expected = favor_attention_naive(q, k[:, :, :9], v[:, :, :9], w)
    assert_rms_close(out, expected, torch.float64)


@pytest.mark.parametrize("bad, error, match", [
    (torch.ones(2, T), TypeError, "key_mask must be bool"),
    (torch.ones(2, T - 1, dtype=torch.bool), ValueError, r"key_mask must have shape \(B, S\) = \(2, 45\)"),
    (torch.ones(3, T, dtype=torch.bool), ValueError, r"key_mask must have shape"),
    (torch.ones(2, 1, T, dtype=torch.bool), ValueError, r"key_mask must have shape"),
    ([True] * T, TypeError, "key_mask must be a bool tensor"),
    (torch.ones(2, T, dtype=torch.bool, device="meta"), ValueError, "key_mask is on meta"),
], ids=["float", "length", "batch", "3d", "list", "device"])
def test_bad_masks_are_refused(bad, error, match):
    q, k, v, w = make_inputs(2, 2, T, 8, 5, 10, dtype=torch.float32)
    with pytest.raises(error, match=match):
        okadfa.favor_attention(q, k, v, w, causal=True, key_mask=bad)
    with pytest.raises(error, match=match):
        okadfa.linear_attention(q.exp(), k.exp(), v, causal=True, key_mask=bad)
