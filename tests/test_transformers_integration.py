"""okadfa.integrations.transformers: FAVOR+ as a Hugging Face attention implementation.

Tiny randomly initialised GPT-2 and Llama (grouped-query) models, nothing downloaded.
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

import okadfa  # noqa: E402
from okadfa.integrations import transformers as hf  # noqa: E402
from padded_batches import SEQS, collate, padded, trainer_losses  # noqa: E402
from tolerances import DEEP, EXACT, REORDERED, assert_close  # noqa: E402

NAME = "okadfa_favor"


def gpt2_config(**overrides):
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, **overrides)


def llama_config(**overrides):
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, **overrides)


CONFIGS = {"gpt2": gpt2_config, "llama": llama_config}


def make_model(arch, attn=NAME, seed=0, **overrides):
    hf.register()
    cfg = CONFIGS[arch](**overrides)
    cfg.pad_token_id = cfg.eos_token_id = 0    # keeps generate() quiet; no input here contains token 0
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def input_ids(batch=2, length=12, seed=1):
    return torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def exact_attention(monkeypatch):
    """Replace favor_sdpa inside the backend by exact softmax SDPA (same arguments), recording the calls:
    the backend must then reproduce the "sdpa" model to float precision, whatever the cache state."""
    calls = []

    def exact(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **options):
        assert attn_mask is None and dropout_p == 0.0
        assert not is_causal or q.shape[-2] == k.shape[-2], "causal favor_sdpa needs L == S"
        calls.append(dict(q=q.shape, k=k.shape, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, **options))
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    monkeypatch.setattr(hf, "favor_sdpa", exact)
    return calls


# ----------------------------------------------------------------------------- registration

def test_register_is_idempotent_and_returns_the_name():
    assert hf.register() == NAME
    assert hf.register() == NAME
    assert NAME in hf._attention_registry()
    if hasattr(transformers, "masking_utils"):    # transformers >= 4.53
        assert transformers.masking_utils.AttentionMaskInterface._global_mapping[NAME] is hf.favor_attention_mask
    model = make_model("llama")
    assert model.config._attn_implementation == NAME
    with pytest.raises(ValueError, match="num_features"):
        hf.register(num_features=0)
    for taken in ("sdpa", "eager", "flash_attention_2"):
        with pytest.raises(ValueError, match="name"):
            hf.register(taken)


def test_register_settings_reach_favor_sdpa(exact_attention):
    try:
        assert hf.register("okadfa_favor_test", num_features=64, seed=5, backend="reference") == "okadfa_favor_test"
        make_model("gpt2", attn="okadfa_favor_test")(input_ids())
        assert exact_attention and all(c["num_features"] == 64 and c["seed"] == 5 and c["backend"] == "reference"
                                       for c in exact_attention)
    finally:
        hf.register("okadfa_favor_test")


def test_importing_okadfa_does_not_import_transformers():
    code = "import sys, okadfa, okadfa.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("order", ["okadfa first", "transformers first"])
def test_available_without_a_register_call(order):
    """A fresh process that imports okadfa, before or after transformers' model code, can pass
    attn_implementation="okadfa_favor" as a plain string: registered by the import hook."""
    imports = ["import okadfa", "import transformers.modeling_utils"]
    code = "\n".join([*(imports if order == "okadfa first" else imports[::-1]),
                      "import torch, transformers",
                      "cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, "
                      "num_attention_heads=4, num_key_value_heads=2, vocab_size=100)",
                      "model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation='okadfa_favor')",
                      "assert model(torch.randint(0, 100, (1, 5))).logits.shape == (1, 5, 100)",
                      "from okadfa.integrations.transformers import _attention_registry",
                      "fn = _attention_registry()['okadfa_favor']",
                      "assert fn.__name__ == 'okadfa_favor_attention_forward', fn"])
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_hook_can_be_turned_off():
    code = ("import okadfa, transformers.modeling_utils as mu, transformers\n"
            "from okadfa.integrations.transformers import _attention_registry\n"
            "assert 'okadfa_favor' not in _attention_registry()")
    env = {**__import__("os").environ, "OKADFA_HF_REGISTER": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_check_reports_unsupported_config_features():
    hf.check(llama_config())
    hf.check(gpt2_config(), training=False)
    with pytest.raises(ValueError, match=r"attn_pdrop=0\.1"):
        hf.check(gpt2_config())
    mistral = transformers.MistralConfig(sliding_window=4, max_position_embeddings=64)
    with pytest.raises(ValueError, match="sliding_window=4"):
        hf.check(mistral)
    hf.check(transformers.MistralConfig(sliding_window=None))
    gemma = transformers.Gemma2Config(attn_logit_softcapping=50.0, attention_dropout=0.0)
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        hf.check(gemma, training=False)


# ----------------------------------------------------------------------------- forward / backward

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_and_backward(arch):
    model = make_model(arch, **({"attn_pdrop": 0.0} if arch == "gpt2" else {})).train()
    ids = input_ids()
    logits = model(ids).logits
    assert logits.shape == (2, 12, 100) and torch.isfinite(logits).all()
    F.cross_entropy(logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1)).backward()
    names = [n for n, p in model.named_parameters() if ".attn." in n or ".self_attn." in n]
    assert len(names) >= 8
    for n, p in model.named_parameters():
        if n in names:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_layer_calls_favor_sdpa_with_the_module_scaling_and_gqa(arch, exact_attention):
    model = make_model(arch)
    model(input_ids())
    assert len(exact_attention) == 2    # one per layer
    heads_kv = 2 if arch == "llama" else 4
    for call in exact_attention:
        assert call["q"] == (2, 4, 12, 8) and call["k"] == (2, heads_kv, 12, 8)    # kv heads not repeated
        assert call["is_causal"] and call["enable_gqa"] == (arch == "llama")
        assert call["scale"] in (None, pytest.approx(8 ** -0.5))    # None (the default) in transformers 4.x GPT-2
        assert call["num_features"] == 256 and call["seed"] == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_plumbing_reproduces_sdpa_when_favor_is_replaced_by_exact_attention(arch, exact_attention):
    """Layouts, scaling, GQA and causal alignment: with exact softmax in favor_sdpa's place the
    backend must equal attn_implementation="sdpa" — prefill, chunked prefill and decoding."""
    model, ref = make_model(arch), make_model(arch, attn="sdpa")
    ids = input_ids()
    with torch.no_grad():
        expected = ref(ids).logits
        assert_close(model(ids).logits, expected, REORDERED)
        parts, cache = [], None
        for a, b in ((0, 5), (5, 9), (9, 10), (10, 12)):    # L = S, 1 < L < S, L = 1, 1 < L < S
            out = model(ids[:, a:b], past_key_values=cache, use_cache=True)
            parts.append(out.logits)
            cache = out.past_key_values
    assert_close(torch.cat(parts, 1), expected, REORDERED)


def test_gpt2_layer_output_is_favor_sdpa_of_its_projections():
    """Independent of the backend's code: recompute layer 0's attention from its weights."""
    model = make_model("gpt2")
    attn, seen = model.transformer.h[0].attn, {}
    attn.register_forward_pre_hook(lambda m, args, kw: seen.update(x=(args or (kw["hidden_states"],))[0]),
                                   with_kwargs=True)
    attn.register_forward_hook(lambda m, args, out: seen.update(out=out[0]))
    with torch.no_grad():
        model(input_ids())
        x = seen["x"]
        q, k, v = (t.view(2, 12, 4, 8).transpose(1, 2) for t in attn.c_attn(x).split(32, dim=2))
        out = okadfa.favor_sdpa(q, k, v, is_causal=True, scale=8 ** -0.5, num_features=256, seed=0)
        expected = attn.c_proj(out.transpose(1, 2).reshape(2, 12, 32))
        exact = attn.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 12, 32))
    assert_close(seen["out"], expected, REORDERED)
    rtol, atol = REORDERED[exact.dtype]
    assert not torch.allclose(seen["out"], exact, rtol=rtol, atol=atol)    # it is not softmax attention


def test_many_features_approach_softmax_attention():
    """With M = 8192 features the Llama hidden states approach the sdpa model's, much closer
    than two wrong answers: uniform causal attention (q = 0) and non-causal softmax."""
    def scaled(attn, q_mult):    # q/k weights ×3: attention clearly away from uniform
        model = make_model("llama", attn=attn)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(q_mult)
                layer.self_attn.k_proj.weight.mul_(3)
        return model

    ids = input_ids()
    try:
        hf.register("okadfa_favor_wide", num_features=8192)
        with torch.no_grad():
            favor = scaled("okadfa_favor_wide", 3).model(ids).last_hidden_state
            ref = scaled("sdpa", 3)
            exact = ref.model(ids).last_hidden_state
            uniform = scaled("sdpa", 0).model(ids).last_hidden_state
            full_mask = torch.ones(2, 1, 12, 12, dtype=torch.bool)    # 4-D masks reach the attention as they are
            noncausal = ref.model(ids, attention_mask=full_mask).last_hidden_state
    finally:
        hf.register("okadfa_favor_wide")

    def err(x):
        return ((x - exact).norm() / exact.norm()).item()

    assert err(favor) < 0.005 and err(favor) < 0.2 * err(uniform) and err(favor) < 0.05 * err(noncausal), \
        (err(favor), err(uniform), err(noncausal))


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_cache_matches_full_recomputation(arch):
    model, ids = make_model(arch), input_ids(batch=1, length=6)
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cached = model.generate(ids, use_cache=True, **kw)
    full = model.generate(ids, use_cache=False, **kw)
    assert cached.sequences.shape == (1, 11)
    assert_close(torch.stack(cached.logits), torch.stack(full.logits), DEEP)
    assert torch.equal(cached.sequences, full.sequences)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_favor_cache_decodes_with_a_constant_size_state(arch):
    """generate with a FavorCache (one FavorState per layer) gives the tokens and, to rounding, the
    logits of HF's own cache, for a left-padded batch too; its state does not grow with the context."""
    if not hasattr(transformers.cache_utils, "CacheLayerMixin"):
        pytest.skip("FavorCache needs transformers >= 4.56 (per-layer cache objects)")
    model = make_model(arch)
    kw = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    for ids, mask in ((input_ids(batch=1, length=6), None), padded(SEQS, "left")):
        dynamic = model.generate(ids, attention_mask=mask, **kw)
        cache = hf.FavorCache()
        favor = model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
        assert torch.equal(favor.sequences, dynamic.sequences)
        assert_close(torch.stack(favor.logits), torch.stack(dynamic.logits), DEEP)
        assert all(layer.length == ids.shape[1] + 7 for layer in cache.layers)    # the last token is not fed back
    # generate() picks it by default for okadfa_favor models, not for sdpa ones
    out = model.generate(input_ids(batch=1, length=6), max_new_tokens=2, do_sample=False,
                         return_dict_in_generate=True)
    assert isinstance(out.past_key_values, hf.FavorCache)
    sdpa = make_model(arch, attn="sdpa").generate(input_ids(batch=1, length=6), max_new_tokens=2, do_sample=False,
                                                  return_dict_in_generate=True)
    assert not isinstance(sdpa.past_key_values, hf.FavorCache)
    sizes = []
    for new in (2, 20):
        cache = hf.FavorCache()
        model.generate(input_ids(batch=1, length=6), past_key_values=cache, max_new_tokens=new, do_sample=False,
                       min_new_tokens=new)
        sizes.append(sum(x.numel() for layer in cache.layers for x in layer.state.carried))
    assert sizes[0] == sizes[1], sizes


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_favor_cache_with_beam_search(arch):
    """Beam search with an explicit FavorCache (reorder_cache selects the beams' states) gives HF's
    cache's tokens."""
    if not hasattr(transformers.cache_utils, "CacheLayerMixin"):
        pytest.skip("FavorCache needs transformers >= 4.56 (per-layer cache objects)")
    model, ids = make_model(arch), input_ids(batch=2, length=6)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3)
    expected = model.generate(ids, past_key_values=transformers.DynamicCache(), **kw)
    assert torch.equal(model.generate(ids, past_key_values=hf.FavorCache(), **kw), expected)


def test_generate_with_a_static_cache_and_a_batch_of_equal_lengths():
    model, ids = make_model("llama"), input_ids(batch=2, length=6)
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    static = model.generate(ids, cache_implementation="static", **kw)
    full = model.generate(ids, use_cache=False, **kw)
    assert_close(torch.stack(static.logits), torch.stack(full.logits), DEEP)


# ----------------------------------------------------------------------------- what is refused



@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padded_batch_logits_equal_each_sequence_alone(arch, side):
    """Each sequence's logits at its real positions equal those of running it alone (positions
    counted from its first real token, as generate does)."""
    model = make_model(arch)
    ids, mask = padded(SEQS, side)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions).logits
        for b, x in enumerate(SEQS):
            alone = model(torch.tensor([x])).logits[0]
            assert_close(logits[b][mask[b].bool()], alone, DEEP)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_left_padded_generation_equals_one_by_one(arch):
    """Greedy generation of a left-padded batch (HF's way of batching prompts) gives each prompt
    the tokens it gets when generated alone, with the cache."""
    model = make_model(arch)
    ids, mask = padded(SEQS, "left")
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, ids.shape[1]:]
    for b, x in enumerate(SEQS):
        alone = model.generate(torch.tensor([x]), max_new_tokens=6, do_sample=False)[0, len(x):]
        # alone stops at the end-of-sequence token (0, also the pad token); the batch pads after it
        assert torch.equal(batched[b][:len(alone)], alone), (b, batched[b], alone)
        assert (batched[b][len(alone):] == 0).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padded_batch_loss_equals_the_per_sequence_losses(arch):
    """HF's loss on a right-padded batch (labels -100 at the padding) is the token-weighted mean of
    each sequence's loss alone."""
    model = make_model(arch)
    batch = collate([{"input_ids": x} for x in SEQS])
    with torch.no_grad():
        loss = model(**batch).loss
        per = [(model(torch.tensor([x]), labels=torch.tensor([x])).loss, len(x) - 1) for x in SEQS]
    expected = sum(l * n for l, n in per) / sum(n for _, n in per)
    assert_close(loss, expected, DEEP)


def test_trainer_trains_on_padded_batches(tmp_path):
    """transformers.Trainer on batches of unequal lengths (padded, attention_mask and labels -100):
    the training loss is finite and falls over a few steps on a repeated batch."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (make test installs it)")
    losses, _ = trainer_losses(make_model("llama").train(), tmp_path)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_4d_masks_causal_accepted_others_refused():
    model, ids = make_model("llama"), input_ids()
    causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 1, 12, 12)
    with torch.no_grad():
        assert_close(model(ids, attention_mask=causal).logits, model(ids).logits, EXACT)
    window = causal & ~torch.ones(12, 12, dtype=torch.bool).tril(-4)    # a sliding window of 4
    with pytest.raises(ValueError, match="only key padding with causal"):
        model(ids, attention_mask=window)


def test_packed_sequences_and_sliding_windows_are_refused():
    model, ids = make_model("llama"), input_ids()
    if hasattr(transformers, "masking_utils"):    # transformers >= 4.53 detects packed sequences
        packed = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)    # two documents per row
        with pytest.raises(ValueError, match="only key padding with causal"):
            model(ids, position_ids=packed, use_cache=False)    # HF detects packing only without a cache
    cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=100, sliding_window=4)
    mistral = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME).eval()
    mistral(ids[:, :4])    # a window that does not bite is plain causal attention
    with pytest.raises(ValueError, match="only key padding with causal"):
        mistral(ids)


def test_attention_dropout_in_training_raises():
    model, ids = make_model("gpt2"), input_ids()    # GPT-2's default attn_pdrop is 0.1
    model(ids)    # eval: dropout is 0
    with pytest.raises(ValueError, match="attn_pdrop"):
        model.train()(ids)


def test_output_attentions_is_refused():
    model = make_model("llama")
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids(), output_attentions=True)
