"""Incremental decoding: FavorState / KVCache against the full causal ops, and OKADFAModel.generate."""
import pytest
import torch
import torch.nn.functional as F

import okadfa
from okadfa.models import OKADFAConfig, OKADFAModel

from conftest import make_inputs
from tolerances import REORDERED, assert_close, assert_rms_close


def _decode(state, q, k, v, prompt):
    """Outputs of `state` fed the first `prompt` positions at once, then one by one."""
    outs = [state.extend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])] if prompt else []
    for t in range(prompt, q.shape[2]):
        outs.append(state.step(q[:, :, t], k[:, :, t], v[:, :, t])[:, :, None])
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("prompt", [0, 1, 63, 64, 65, 130])
def test_favor_state_matches_the_causal_op(backend, prompt):
    q, k, v, w = backend.put(*make_inputs(2, 3, 131, 12, 7, 19, seed=prompt))
    full = okadfa.favor_attention(q, k, v, w, causal=True, backend=backend.name)
    state = okadfa.FavorState(w)
    got = _decode(state, q, k, v, prompt)
    assert state.length == 131
    assert_close(got, full, REORDERED)


@pytest.mark.parametrize("magnitude", [1.0, 3.0])
def test_favor_state_float32_to_rounding_with_a_growing_stabiliser(magnitude):
    # magnitude 3: key log-features of order ±30, so later keys raise the running maximum
    # far above the earlier ones and the carried state is rescaled many times.
    q, k, v, w = make_inputs(1, 2, 90, 16, 16, 32, seed=1, magnitude=magnitude)
    exact = okadfa.favor_attention(q, k, v, w, causal=True, backend="reference")
    q32, k32, v32, w32 = (x.float() for x in (q, k, v, w))
    got = _decode(okadfa.FavorState(w32), q32, k32, v32, prompt=20)
    assert got.dtype == torch.float32
    assert_rms_close(got, exact, torch.float32, what="FavorState float32")
    assert_rms_close(okadfa.favor_attention(q32, k32, v32, w32, causal=True), exact, torch.float32, what="op")


def test_favor_state_grouped_heads_broadcast_and_bfloat16():
    q, k, v, w = make_inputs(2, 4, 40, 8, 8, 16, dtype=torch.float32, seed=2)
    k, v = k[:, :2], v[:, :2]                                       # 2 kv heads serve 4 query heads
    full = okadfa.favor_attention(q, k, v, w, causal=True)
    assert_close(_decode(okadfa.FavorState(w), q, k, v, 10), full, REORDERED)
    bq, bk, bv = (x.bfloat16() for x in (q, k, v))
    got = _decode(okadfa.FavorState(w), bq, bk, bv, 10)
    assert got.dtype == torch.bfloat16
    assert_rms_close(got, full, torch.bfloat16, what="FavorState bfloat16")


def test_favor_state_key_mask_equals_the_masked_causal_op():
    """A left-padded batch of prompts fed with key_mask (prompt at once, then a padded step too),
    then decoded token by token, gives the causal op's outputs with the same key_mask: the padded
    positions never enter the state and output 0."""
    q, k, v, w = make_inputs(3, 2, 50, 8, 6, 16, seed=5)
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[0, :17] = False                                             # left padding
    mask[1, :1] = False
    mask[2, 30] = False                                              # a masked step after the prompt
    full = okadfa.favor_attention(q, k, v, w, causal=True, key_mask=mask, backend="reference")
    state = okadfa.FavorState(w)
    outs = [state.extend(q[:, :, :20], k[:, :, :20], v[:, :, :20], key_mask=mask[:, :20])]
    for t in range(20, 50):
        outs.append(state.extend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], key_mask=mask[:, t:t + 1]))
    got = torch.cat(outs, dim=2)
    assert_close(got, full, REORDERED)
    assert (got[~mask[:, None, :].expand(3, 2, 50)] == 0).all()
    alone = okadfa.favor_attention(q[:1, :, 17:], k[:1, :, 17:], v[:1, :, 17:], w, causal=True, backend="reference")
    assert_close(got[:1, :, 17:], alone, REORDERED)


def test_favor_state_rejects_bad_input():
    q, k, v, w = make_inputs(1, 2, 5, 8, 8, 16, dtype=torch.float32)
    state = okadfa.FavorState(w)
    with pytest.raises(ValueError, match=r"q_t must have 3 dimensions"):
        state.step(q, k, v)
    with pytest.raises(ValueError, match="head dim"):
        state.extend(q[..., :4], k[..., :4], v)
    with pytest.raises(TypeError, match="dtype"):
        state.extend(q, k.double(), v)
    state.extend(q, k, v)
    with pytest.raises(ValueError, match="holds batch and heads"):
        state.extend(q.expand(3, 2, 5, 8), k, v)
    with pytest.raises(ValueError, match="projection must have 2 dimensions"):
        okadfa.FavorState(w[0])


def test_kv_cache_matches_causal_sdpa():
    q, k, v, _ = make_inputs(2, 3, 30, 8, 5, 4, dtype=torch.float32, seed=3)
    got = _decode(okadfa.KVCache(), q, k, v, prompt=11)
    assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), REORDERED)


def _tiny(attention, max_seq_len=48):
    torch.manual_seed(0)
    return OKADFAModel(OKADFAConfig.preset("tiny", attention=attention, max_seq_len=max_seq_len,
                                           d_model=32, n_layers=2, n_heads=2, nb_features=16)).double()


@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_generate_with_cache_equals_recomputing_across_window_restarts(attention):
    model = _tiny(attention)
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    cached = model.generate(prompt, 100, temperature=0)              # 109 > 48: the window restarts
    assert torch.equal(cached, model.generate(prompt, 100, temperature=0, use_cache=False))
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    sampled = model.generate(prompt, 30, temperature=1.0, top_k=20, generator=g1)
    assert torch.equal(sampled, model.generate(prompt, 30, temperature=1.0, top_k=20, generator=g2, use_cache=False))
    long_prompt = torch.randint(0, 256, (1, 60))                     # longer than the window
    assert torch.equal(model.generate(long_prompt, 5, temperature=0),
                       model.generate(long_prompt, 5, temperature=0, use_cache=False))


def test_generate_encodes_each_new_token_once(monkeypatch):
    model = _tiny("favor", max_seq_len=256)
    seen = []
    extend = okadfa.FavorState.extend

    def spy(self, q, k, v, **kwargs):
        seen.append(q.shape[2])
        return extend(self, q, k, v, **kwargs)

    monkeypatch.setattr(okadfa.FavorState, "extend", spy)
    model.generate(torch.randint(0, 256, (1, 17)), 12, temperature=0)
    # per block: the prompt once, then one position for each token after the first
    assert seen == [17, 17] + [1, 1] * 11


@pytest.mark.parametrize("max_seq_len", [1, 2, 5])
def test_generate_with_a_tiny_window(max_seq_len):
    model = _tiny("favor", max_seq_len=max_seq_len)
    prompt = torch.randint(0, 256, (1, 3))
    ids = model.generate(prompt, 8, temperature=0)
    assert ids.shape == (1, 11)
    assert torch.equal(ids, model.generate(prompt, 8, temperature=0, use_cache=False))
