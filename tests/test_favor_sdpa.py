"""okadfa.favor_sdpa: the SDPA-compatible front end (shapes, GQA, errors, accuracy, compile, autocast)."""
import pytest
import torch
import torch.nn.functional as F

import okadfa
from okadfa.ops.favor_sdpa import cached_projection

from okadfa.reference import favor_attention_naive
from tolerances import EXACT, REORDERED, REORDERED_GRAD, assert_close


def _qkv(shape_q, shape_kv, dtype=torch.float64, seed=0, magnitude=0.5, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=g, dtype=torch.float64) * magnitude
    k = torch.randn(*shape_kv, generator=g, dtype=torch.float64) * magnitude
    v = torch.randn(*shape_kv[:-1], dv or shape_kv[-1], generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_favor_attention_with_the_cached_projection(backend, causal):
    q, k, v = backend.put(*_qkv((2, 3, 37, 12), (2, 3, 37, 12), dv=5))
    out = okadfa.favor_sdpa(q, k, v, is_causal=causal, num_features=24, seed=3, backend=backend.name)
    w = cached_projection(12, 24, 3, backend.device, backend.exact)
    expected = favor_attention_naive(q, k, v, w, causal=causal)
    assert out.shape == (2, 3, 37, 5) and out.dtype == backend.exact
    assert_close(out, expected, REORDERED)
    g = torch.Generator().manual_seed(3)
    assert_close(w, okadfa.random_features(24, 12, generator=g, device=backend.device, dtype=backend.exact), EXACT)


def test_projection_cache_is_keyed_by_dim_features_seed_device_dtype():
    a = cached_projection(16, 32, 0, "cpu", torch.float32)
    assert cached_projection(16, 32, 0, torch.device("cpu"), torch.float32) is a
    assert not torch.equal(cached_projection(16, 32, 1, "cpu", torch.float32), a)
    assert cached_projection(16, 32, 0, "cpu", torch.float64).dtype == torch.float64
    assert cached_projection(16, 48, 0, "cpu", torch.float32).shape == (48, 16)
    q, k, v = _qkv((1, 2, 9, 16), (1, 2, 9, 16), dtype=torch.float32)
    explicit = okadfa.favor_sdpa(q, k, v, projection=a)
    assert_close(okadfa.favor_sdpa(q, k, v, num_features=32), explicit, EXACT)


def test_3d_and_5d_inputs_and_broadcast_batch_dims():
    q, k, v = _qkv((4, 11, 8), (4, 11, 8))
    out3 = okadfa.favor_sdpa(q, k, v, is_causal=True, num_features=16)
    ref3 = okadfa.favor_sdpa(q[:, None], k[:, None], v[:, None], is_causal=True, num_features=16)[:, 0]
    assert out3.shape == (4, 11, 8)
    assert_close(out3, ref3, EXACT)
    q, k, v = _qkv((2, 3, 4, 10, 8), (1, 3, 4, 10, 8))       # key/value broadcast over dim 0
    out5 = okadfa.favor_sdpa(q, k, v, num_features=16)
    assert out5.shape == (2, 3, 4, 10, 8)
    for i in range(2):
        for j in range(3):
            assert_close(out5[i, j], okadfa.favor_sdpa(q[i, j][None], k[0, j][None], v[0, j][None],
                                                       num_features=16)[0], REORDERED)


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention(causal):
    q, k, v = _qkv((2, 6, 13, 8), (2, 2, 13, 8))
    out = okadfa.favor_sdpa(q, k, v, is_causal=causal, enable_gqa=True, num_features=16)
    rep = okadfa.favor_sdpa(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=causal,
                            num_features=16)
    assert_close(out, rep, REORDERED)
    # one key head broadcasts without enable_gqa, as in SDPA
    one = okadfa.favor_sdpa(q, k[:, :1], v[:, :1], is_causal=causal, num_features=16)
    assert_close(one, okadfa.favor_sdpa(q, k[:, :1].expand(2, 6, 13, 8), v[:, :1].expand(2, 6, 13, 8),
                                        is_causal=causal, num_features=16), REORDERED)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        okadfa.favor_sdpa(q, k, v, is_causal=causal)
    with pytest.raises(ValueError, match="multiple"):
        okadfa.favor_sdpa(q, k[:, :1].expand(2, 4, 13, 8), v[:, :1].expand(2, 4, 13, 8), enable_gqa=True)


def test_non_contiguous_inputs_in_the_hugging_face_layout():
    q, k, v = _qkv((2, 19, 3, 8), (2, 19, 3, 8))          # (B, L, H, E), then transposed
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    assert not q.is_contiguous()
    out = okadfa.favor_sdpa(q, k, v, is_causal=True, num_features=16)
    assert_close(out, okadfa.favor_sdpa(*(x.contiguous() for x in (q, k, v)), is_causal=True, num_features=16),
                 EXACT)


def test_cross_attention_of_different_lengths():
    q, _, _ = _qkv((2, 3, 7, 8), (2, 3, 7, 8))
    _, k, v = _qkv((2, 3, 7, 8), (2, 3, 20, 8), seed=1, dv=6)
    out = okadfa.favor_sdpa(q, k, v, num_features=32)
    expected = favor_attention_naive(q, k, v, cached_projection(8, 32, 0, "cpu", torch.float64), causal=False)
    assert out.shape == (2, 3, 7, 6)
    assert_close(out, expected, REORDERED)


def test_error_against_softmax_attention_falls_with_the_number_of_features():
    """The approximation error, measured: random q, k of entries N(0, 0.25²) (so scale·q·k has
    standard deviation 1/16, Dk = 64), T = 256, causal and not, 3 seeds per M."""
    q, k, v = _qkv((2, 4, 256, 64), (2, 4, 256, 64), dtype=torch.float32, magnitude=0.25)
    errors = {}
    for causal in (False, True):
        exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        for m in (64, 256, 4096):
            outs = [okadfa.favor_sdpa(q, k, v, is_causal=causal, num_features=m, seed=s) for s in range(3)]
            errors[causal, m] = sum(((o - exact).norm() / exact.norm()).item() for o in outs) / 3
    for causal in (False, True):
        assert errors[causal, 4096] < 0.03, errors
        assert errors[causal, 4096] < errors[causal, 256] / 3 < errors[causal, 64] / 3, errors


@pytest.mark.parametrize("bad, match", [
    (dict(attn_mask=torch.ones(9, 9, dtype=torch.bool).triu(1)), "key padding, alone or with the causal pattern"),
    (dict(attn_mask=torch.randn(9, 9)), "additive masks of 0 and -inf"),
    (dict(attn_mask=torch.ones(9, 9, dtype=torch.int64)), "attn_mask must be bool or floating point"),
    (dict(dropout_p=0.1), "no attention dropout"),
    (dict(is_causal=1), "causal must be a bool"),
    (dict(num_features=0), "num_features"),
])
def test_unsupported_arguments_raise(bad, match):
    q, k, v = _qkv((1, 2, 9, 8), (1, 2, 9, 8))
    with pytest.raises((ValueError, TypeError), match=match):
        okadfa.favor_sdpa(q, k, v, **bad)


def _hf_mask(valid, causal, dtype=None):
    """valid (B, S) bool → the (B, 1, S, S) mask Hugging Face builds: bool, or additive in `dtype`
    (0, finfo.min), rows of padded queries unmasked entirely as HF's SDPA path does."""
    B, S = valid.shape
    allowed = valid[:, None, None, :] & (torch.ones(S, S, dtype=torch.bool).tril() if causal else True)
    allowed = allowed | ~allowed.any(-1, keepdim=True)          # a row attending nothing attends everything
    if dtype is None:
        return allowed
    return torch.zeros(B, 1, S, S, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_padding_masks_become_key_masks(causal, kind):
    """An HF-style padded-batch mask (left padding, right padding, none) gives favor_attention with
    that key_mask, causal or not as the mask's pattern says; padded query rows are 0."""
    q, k, v = _qkv((3, 2, 9, 8), (3, 2, 9, 8))
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[0, :4] = False
    valid[1, 6:] = False
    mask = _hf_mask(valid, causal, None if kind == "bool" else torch.float32)
    w = okadfa.random_features(32, 8, generator=torch.Generator().manual_seed(0))
    out = okadfa.favor_sdpa(q, k, v, attn_mask=mask, projection=w)
    expected = okadfa.favor_attention(q, k, v, w, causal=causal, key_mask=valid)
    assert torch.equal(out, expected)
    assert (out[~valid[:, None, :].expand(3, 2, 9)] == 0).all()
    # the causal pattern alone (no padding) is is_causal
    if causal:
        tril = torch.ones(9, 9, dtype=torch.bool).tril()
        assert torch.equal(okadfa.favor_sdpa(q, k, v, attn_mask=tril, projection=w),
                           okadfa.favor_sdpa(q, k, v, is_causal=True, projection=w))


def test_masks_favor_cannot_apply_are_refused():
    q, k, v = _qkv((2, 2, 9, 8), (2, 2, 9, 8))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, 7:] = False
    per_head = _hf_mask(valid, True).expand(2, 2, 9, 9).clone()
    per_head[0, 1, 3, 2] = False                                  # one head masks one more key
    with pytest.raises(ValueError, match="one attn_mask for every head"):
        okadfa.favor_sdpa(q, k, v, attn_mask=per_head)
    holed = _hf_mask(valid, True).clone()
    holed[1, 0, 5, 2] = False                                     # one real query skips one real key
    with pytest.raises(ValueError, match="key padding, alone or with the causal pattern"):
        okadfa.favor_sdpa(q, k, v, attn_mask=holed)
    with pytest.raises(ValueError, match="key padding, alone or with the causal pattern"):
        okadfa.favor_sdpa(q, k, v, attn_mask=_hf_mask(valid, False), is_causal=True)


def test_bad_shapes_and_dtypes_raise():
    q, k, v = _qkv((1, 2, 9, 8), (1, 2, 9, 8))
    with pytest.raises(ValueError, match="same length"):
        okadfa.favor_sdpa(q, k[:, :, :5], v[:, :, :5], is_causal=True)
    with pytest.raises(ValueError, match="key and value must have the same length"):
        okadfa.favor_sdpa(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="embedding size"):
        okadfa.favor_sdpa(q, k[..., :4], v)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        okadfa.favor_sdpa(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match="same number of dimensions"):
        okadfa.favor_sdpa(q, k[0], v[0])
    with pytest.raises(TypeError, match="dtype"):
        okadfa.favor_sdpa(q, k.float(), v)
    with pytest.raises(ValueError, match="do not broadcast"):
        okadfa.favor_sdpa(q.expand(3, 2, 9, 8), k.expand(2, 2, 9, 8), v.expand(2, 2, 9, 8))


def test_gradcheck():
    q, k, v = (x.requires_grad_() for x in _qkv((1, 2, 6, 4), (1, 2, 6, 4), dv=3))
    assert torch.autograd.gradcheck(lambda q, k, v: okadfa.favor_sdpa(q, k, v, is_causal=True, num_features=5),
                                    (q, k, v))


def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v = _qkv((2, 4, 40, 16), (2, 2, 40, 16), dtype=torch.float32)

    def step(q, k, v):     # a seed no other test uses: the projection is drawn while tracing
        out = okadfa.favor_sdpa(q, k, v, is_causal=True, enable_gqa=True, num_features=32, seed=1234)
        return out, out.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        args = [x.clone().requires_grad_() for x in (q, k, v)]
        out, loss = fn(*args)
        loss.backward()
        results.append((out.detach(), [x.grad for x in args]))
    (out, grads), (expected, expected_grads) = results
    assert_close(out, expected, REORDERED)
    assert_close(grads, expected_grads, REORDERED_GRAD)


def test_autocast_cpu_bfloat16_gives_bfloat16_like_sdpa():
    q, k, v = _qkv((2, 2, 33, 16), (2, 2, 33, 16), dtype=torch.float32)
    full = okadfa.favor_sdpa(q, k, v, is_causal=True, num_features=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = okadfa.favor_sdpa(q, k, v, is_causal=True, num_features=64)
        assert F.scaled_dot_product_attention(q, k, v, is_causal=True).dtype == out.dtype == torch.bfloat16
        as_double = okadfa.favor_sdpa(q.double(), k.double(), v.double(), is_causal=True, num_features=64)
    assert as_double.dtype == torch.float64                   # autocast leaves float64 alone, as for SDPA
    assert ((out.float() - full).norm() / full.norm()).item() < 2e-2


def test_one_query_head_broadcasts_over_key_heads_as_in_sdpa():
    q, k, v = _qkv((2, 1, 10, 8), (2, 3, 10, 8))
    out = okadfa.favor_sdpa(q, k, v, is_causal=True, num_features=16)
    assert out.shape == F.scaled_dot_product_attention(q, k, v, is_causal=True).shape == (2, 3, 10, 8)
    assert_close(out, okadfa.favor_sdpa(q.expand(2, 3, 10, 8), k, v, is_causal=True, num_features=16), EXACT)


def test_empty_sequences_and_bad_backend_raise_clearly():
    q, k, v = _qkv((1, 2, 9, 8), (1, 2, 9, 8))
    with pytest.raises(ValueError, match="at least one query and one key"):
        okadfa.favor_sdpa(q[:, :, :0], k, v)
    with pytest.raises(ValueError, match="backend must be one of"):
        okadfa.favor_sdpa(q[:, :, :4], k, v, backend="bogus")          # the L != S path too


def test_cross_attention_computes_half_types_in_float32():
    q, _, _ = _qkv((2, 2, 5, 16), (2, 2, 5, 16), dtype=torch.float32)
    _, k, v = _qkv((2, 2, 5, 16), (2, 2, 30, 16), dtype=torch.float32, seed=2)
    full = okadfa.favor_sdpa(q, k, v, num_features=64)
    half = okadfa.favor_sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), num_features=64)
    assert half.dtype == torch.bfloat16
    assert ((half.float() - full).norm() / full.norm()).item() < 1e-2


# ---------------------------------------------------------------- the default projection's cost, sizes
def _projection_cache(monkeypatch):
    """An empty projection cache for this test (so the projection is drawn here)."""
    import importlib
    module = importlib.import_module("okadfa.ops.favor_sdpa")
    monkeypatch.setattr(module, "_PROJECTIONS", {})


def test_default_projection_of_a_wide_head_needs_no_full_qr(monkeypatch):
    """M = 16 features of an E = 4096 head: one QR of a 4096×16 Gaussian, not a 4096×4096 one (at
    E = 8192 the old full QR took most of a minute and 2 GB for a T = 2 call)."""
    _projection_cache(monkeypatch)
    shapes, qr = [], torch.linalg.qr

    def recording(a, *args, **kwargs):
        shapes.append(tuple(a.shape))
        if a.shape[-1] > 16:
            raise AssertionError(f"a QR of a {tuple(a.shape)} matrix for 16 features")
        return qr(a, *args, **kwargs)
    monkeypatch.setattr(torch.linalg, "qr", recording)
    q, k, v = _qkv((1, 1, 2, 4096), (1, 1, 2, 4096))
    out = okadfa.favor_sdpa(q, k, v, num_features=16, seed=3, backend="reference")
    assert shapes == [(4096, 16)] and out.shape == (1, 1, 2, 4096)
    w = cached_projection(4096, 16, 3, q.device, q.dtype)
    assert_close(w, okadfa.random_features(16, 4096, generator=torch.Generator().manual_seed(3),
                                           dtype=torch.float64), EXACT)


@pytest.mark.parametrize("num_features,E,match", [
    (10 ** 15, 8, r"num_features=1000000000000000, E=8\).*would need"),
    (2 ** 62, 16, r"num_features=4611686018427387904, E=16\).*more than an int64 can count"),
])
def test_absurd_num_features_raise_before_drawing(monkeypatch, num_features, E, match):
    import signal
    _projection_cache(monkeypatch)

    class Timeout(Exception):
        pass

    def alarm(*_):
        raise Timeout
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    try:
        q = torch.randn(1, 1, 2, E)
        with pytest.raises(ValueError, match=match):
            okadfa.favor_sdpa(q, q, q, num_features=num_features)
    except Timeout:
        pytest.fail("still drawing after 20 s", pytrace=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_key_padding_prefers_the_decomposition_with_the_most_real_keys():
    """Queries aligned to the last key (a KV cache, as transformers 4.5x hands GPT-2 its mask): the
    last query attends everything, so "its key is padding, the row was unmasked" fits too; the
    causal reading with every key real must win. With left padding the padded keys stay out."""
    from okadfa.ops.favor_sdpa import key_padding
    tril = torch.ones(2, 12, dtype=torch.bool).tril(10)               # queries at positions 10 and 11
    key_mask, causal = key_padding(tril[None, None], 1, 2, 12, is_causal=False, aligned=True)
    assert causal and key_mask.all()
    left = tril & (torch.arange(12) >= 3)                            # three pad tokens in front
    key_mask, causal = key_padding(left[None, None], 1, 2, 12, is_causal=False, aligned=True)
    assert causal and torch.equal(key_mask[0], torch.arange(12) >= 3)
