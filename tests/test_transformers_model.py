"""okadfa.integrations.transformers_model: the OKADFA model as a Hugging Face model.

Tiny OKADFA configs (2 blocks), nothing downloaded.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

import okadfa  # noqa: E402,F401
from okadfa.models import OKADFACache  # noqa: E402
from okadfa.integrations.transformers_model import (OKADFAForCausalLM, OKADFAPretrainedConfig,  # noqa: E402
                                                     register_model)
from padded_batches import SEQS, padded, trainer_losses  # noqa: E402
from tolerances import DEEP, EXACT, REORDERED, assert_close  # noqa: E402

VARIANTS = [("favor", "bp"), ("favor", "dfa"), ("softmax", "bp")]


def make_model(attention="favor", training="bp", seed=0, **overrides):
    cfg = OKADFAPretrainedConfig.preset("tiny", attention=attention, training=training, n_layers=2, d_model=64,
                                        n_heads=4, nb_features=32, max_seq_len=64, **overrides)
    torch.manual_seed(seed)
    return OKADFAForCausalLM(cfg).eval()


def input_ids(batch=2, length=12, seed=1):
    return torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config and registration

def test_config_holds_the_resolved_okadfa_fields_and_hf_aliases(tmp_path):
    cfg = OKADFAPretrainedConfig.preset("tiny", training="dfa")
    assert (cfg.norm, cfg.tie_weights, cfg.tie_word_embeddings, cfg.feedback_dist) == ("post", False, False, "spd")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.max_position_embeddings) == (
        128, 4, 4, 256)
    assert cfg.okadfa_config() == okadfa.models.OKADFAConfig.preset("tiny", training="dfa")
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "okadfa" and saved["norm"] == "post"
    again = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(again) is OKADFAPretrainedConfig and again.okadfa_config() == cfg.okadfa_config()


def test_config_refuses_what_okadfa_config_refuses():
    with pytest.raises(ValueError, match="training must be one of"):
        OKADFAPretrainedConfig(training="backprop")
    with pytest.raises(ValueError, match="contradicts tie_weights"):
        OKADFAPretrainedConfig(training="dfa", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="unknown preset"):
        OKADFAPretrainedConfig.preset("huge")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        OKADFAPretrainedConfig(hidden_size=97, n_heads=4)                 # HF's alias, checked as d_model
    assert OKADFAPretrainedConfig(hidden_size=96, n_heads=4).d_model == 96


def test_registration_hook_can_be_turned_off():
    code = ("import okadfa, transformers\n"
            "try:\n    transformers.AutoConfig.for_model('okadfa')\nexcept ValueError:\n    pass\n"
            "else:\n    raise AssertionError('registered with OKADFA_HF_REGISTER=0')")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OKADFA_HF_REGISTER": "0"})


def test_registered_with_the_auto_classes():
    register_model()
    cfg = OKADFAPretrainedConfig.preset("tiny", n_layers=1)
    assert type(transformers.AutoConfig.for_model("okadfa", n_layers=1)) is OKADFAPretrainedConfig
    assert type(transformers.AutoModelForCausalLM.from_config(cfg)) is OKADFAForCausalLM


# ----------------------------------------------------------------------------- forward, labels, outputs

@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_labels_are_shifted_as_in_hf_causal_lms(attention):
    """loss(labels=ids) is OKADFAModel's loss with targets ids[:, 1:] (the last position unscored), and
    logits are OKADFAModel's; the output is a CausalLMOutputWithPast, subscriptable as Trainer reads it."""
    model = make_model(attention)
    ids = input_ids()
    with torch.no_grad():
        out = model(ids, labels=ids)
        targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
        own = model.okadfa(ids, targets)
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast)
    assert_close(out.loss, own.loss, EXACT)
    assert_close(out.logits, own.logits, EXACT)
    assert out["loss"] is out.loss and out[0] is out.loss
    scored = torch.nn.functional.cross_entropy(own.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert_close(out.loss, scored, REORDERED)
    loss, logits = model(ids, labels=ids, return_dict=False)[:2]
    assert_close(loss, out.loss, EXACT)
    assert_close(logits, out.logits, EXACT)


def test_dfa_training_through_loss_backward():
    """In train mode with training="dfa", loss.backward() delivers DFA's signals: the same gradients
    as OKADFAModel's own DFA step on the same weights (not backprop's), and logits are None."""
    model = make_model(training="dfa").train()
    ids = input_ids()
    out = model(ids, labels=ids)
    assert out.logits is None
    out.loss.backward()
    hf_grads = {n: p.grad.clone() for n, p in model.okadfa.named_parameters()}
    model.zero_grad()
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    model.okadfa(ids, targets).loss.backward()
    for n, p in model.okadfa.named_parameters():
        assert_close(hf_grads[n], p.grad, EXACT)
    model.zero_grad()
    model.okadfa.dfa = None                          # the same weights trained by backprop
    model.okadfa(ids, targets).loss.backward()
    w = "blocks.0.mlp.0.weight"
    assert not torch.allclose(hf_grads[w], dict(model.okadfa.named_parameters())[w].grad, rtol=0.1)


def test_bad_inputs_raise_clear_errors():
    model = make_model()
    ids = input_ids()
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        model(ids, attention_mask=torch.full(ids.shape, 2))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="must be \\(B, S\\) = \\(2, 12\\)"):
        model(ids, attention_mask=torch.ones(2, 20, dtype=torch.long))     # longer than the tokens, no cache
    with pytest.raises(ValueError, match="labels must be integer token ids of the shape"):
        model(ids, labels=ids[:, :5])
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        model(ids, labels=ids.float())
    cache = OKADFACache(model.okadfa)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="must be \\(B, S\\) = \\(2, 13\\)"):
        model(ids[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="holds 2 sequences"):
        model(ids[:1, :1], cache=cache)
    with pytest.raises(NotImplementedError, match="cannot resize"):
        model.resize_token_embeddings(300)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(2, 12, 64))
    with pytest.raises(TypeError, match="OKADFACache"):
        model(ids, past_key_values=transformers.DynamicCache())
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(input_ids(length=65))


# ----------------------------------------------------------------------------- padding

@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_padded_batch_logits_equal_each_sequence_alone(attention, side):
    model = make_model(attention)
    ids, mask = padded(SEQS, side)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for b, x in enumerate(SEQS):
            alone = model(torch.tensor([x])).logits[0]
            assert_close(logits[b][mask[b].bool()], alone, REORDERED)


@pytest.mark.parametrize("training", ["bp", "dfa"])
def test_padded_batch_loss_equals_the_per_sequence_losses(training):
    """Right or left padding, labels -100 at the padding: the loss is the token-weighted mean of each
    sequence's loss alone, in eval mode and (training="dfa") in DFA's training forward too."""
    model = make_model(training=training)
    for side in ("right", "left"):
        ids, mask = padded(SEQS, side)
        labels = ids.masked_fill(mask == 0, -100)
        per = [(model(torch.tensor([x]), labels=torch.tensor([x])).loss.detach(), len(x) - 1) for x in SEQS]
        expected = sum(loss * n for loss, n in per) / sum(n for _, n in per)
        assert_close(model(ids, attention_mask=mask, labels=labels).loss.detach(), expected, DEEP)
        model.train()
        assert_close(model(ids, attention_mask=mask, labels=labels).loss.detach(), expected, DEEP)
        model.eval()


# ----------------------------------------------------------------------------- save and load

@pytest.mark.parametrize("attention,training", VARIANTS)
def test_save_pretrained_round_trips_in_safetensors(tmp_path, attention, training):
    model = make_model(attention, training)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".pt", ".pkl", ".py"))]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is OKADFAForCausalLM
    assert (loaded.okadfa.lm_head.weight is loaded.okadfa.tok_emb.weight) == (training == "bp")
    theirs = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    ids = input_ids()
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits, EXACT)


def test_a_checkpoint_missing_a_tensor_of_the_config_is_refused(tmp_path):
    """Saved with training="bp" (no feedback buffer, tied head), loaded as "dfa": transformers would
    leave the missing tensors uninitialised; from_pretrained refuses, naming them."""
    make_model(training="bp").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lacks .*dfa.feedback"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, training="dfa", norm="pre",
                                                          tie_weights=False, tie_word_embeddings=False)
    model, info = OKADFAForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] or info["missing_keys"] == set()


@pytest.mark.parametrize("order", ["okadfa first", "transformers first"])
def test_from_pretrained_in_a_fresh_process(tmp_path, order):
    """`import okadfa` (before or after transformers' auto classes) is the only okadfa line a fresh
    process needs for AutoModelForCausalLM.from_pretrained(dir): the same logits, and generate() works."""
    from safetensors.torch import load_file
    model = make_model(training="dfa")
    model.save_pretrained(tmp_path / "model")
    ids = input_ids()
    imports = ["import okadfa", "from transformers import AutoModelForCausalLM"]
    code = "\n".join([
        *(imports if order == "okadfa first" else imports[::-1]),
        "import torch",
        "from safetensors.torch import save_file",
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}).eval()",
        f"ids = torch.tensor({ids.tolist()})",
        "with torch.no_grad():",
        "    logits = model(ids).logits",
        "tokens = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)",
        f"save_file({{'logits': logits, 'tokens': tokens}}, {str(tmp_path / 'out.safetensors')!r})"])
    subprocess.run([sys.executable, "-c", code], check=True)
    out = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        assert_close(out["logits"], model(ids).logits, EXACT)
    assert torch.equal(out["tokens"], model.okadfa.generate(ids[:, :4], 5, temperature=0))


# ----------------------------------------------------------------------------- generate

@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_generate_matches_okadfa_generate_and_no_cache(attention):
    model = make_model(attention)
    ids = input_ids(length=6)
    tokens = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(tokens, model.okadfa.generate(ids, 10, temperature=0))
    assert torch.equal(tokens, model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False))
    sampled = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20)
    assert sampled.shape == (2, 16) and torch.equal(sampled[:, :6], ids)


def test_generate_decodes_through_a_constant_size_favor_state(monkeypatch):
    """generate() hands its OKADFACache to every step, each step feeds one token, and the FavorStates'
    tensors keep their size from a 4-token to a 40-token context."""
    model = make_model()
    steps, sizes = [], []
    forward = OKADFAForCausalLM.forward

    def spy(self, input_ids=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        steps.append((input_ids.shape[1], type(cache).__name__))
        if cache is not None and cache.layers[0].carried is not None:
            sizes.append(sum(x.numel() for layer in cache.layers for x in layer.carried))
        return forward(self, input_ids, **kwargs)

    monkeypatch.setattr(OKADFAForCausalLM, "forward", spy)
    model.generate(input_ids(length=4), max_new_tokens=36, do_sample=False)
    assert steps == [(4, "OKADFACache")] + [(1, "OKADFACache")] * 35
    assert len(sizes) == 35 and len(set(sizes)) == 1


@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_batched_left_padded_generation_equals_one_by_one(attention):
    model = make_model(attention)
    model.generation_config.pad_token_id = 0
    ids, mask = padded(SEQS, "left")
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, ids.shape[1]:]
    for b, x in enumerate(SEQS):
        alone = model.generate(torch.tensor([x]), max_new_tokens=6, do_sample=False)[0, len(x):]
        assert torch.equal(batched[b], alone), (b, batched[b], alone)


@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_beam_search_reorders_the_cache(attention):
    model = make_model(attention)
    ids = input_ids(length=5)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_assisted_decoding_is_refused():
    """The cache cannot roll back rejected draft tokens: generate() says so instead of decoding wrongly."""
    model = make_model()
    with pytest.raises((ValueError, RuntimeError), match="stateful|requires a cache"):   # transformers 5.24 / 5.25
        model.generate(input_ids(batch=1, length=5), assistant_model=make_model(seed=1), max_new_tokens=3, do_sample=False)


def test_generate_limits_and_caches():
    """generate() past max_seq_len raises; HF's own cache is refused; a returned OKADFACache carries on
    (transformers >= 5)."""
    model = make_model()
    ids = input_ids(length=60)
    with pytest.raises(ValueError, match="exceeds max_seq_len 64"):
        model.generate(ids, max_new_tokens=10, do_sample=False)
    with pytest.raises((TypeError, ValueError), match="OKADFACache|instance of `Cache`"):   # okadfa's / HF 4.x's
        model.generate(ids[:, :5], max_new_tokens=3, past_key_values=transformers.DynamicCache())
    if int(transformers.__version__.split(".")[0]) < 5:
        return                       # transformers 4.x reads a past that is no `Cache` as tuples (README)
    first = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = getattr(first, "cache", None) or first.past_key_values
    assert isinstance(cache, OKADFACache) and cache.length == 8      # the last token is not encoded yet
    more = model.generate(first.sequences, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert torch.equal(more, model.generate(ids[:, :5], max_new_tokens=8, do_sample=False))


def test_beam_search_with_left_padding_reorders_the_counts():
    model = make_model()
    ids, mask = padded(SEQS, "left")
    kwargs = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_okadfa_cache_forward_equals_full_forward():
    model = make_model()
    ids = input_ids(length=10)
    cache = OKADFACache(model.okadfa)
    with torch.no_grad():
        full = model(ids).logits
        parts = [model(ids[:, :6], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                          for t in range(6, 10)]
    assert_close(torch.cat(parts, 1), full, REORDERED)


# ----------------------------------------------------------------------------- Trainer

@pytest.mark.parametrize("training", ["bp", "dfa"])
def test_trainer_trains_it_on_padded_batches(tmp_path, training):
    """transformers.Trainer on padded batches of unequal lengths: the training loss falls over a few
    steps on repeated data, with backprop and with DFA (whose backward runs in Trainer's
    loss.backward()); the trained model saves and loads."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (make test installs it)")
    model = make_model(training=training).train()
    losses, trainer = trainer_losses(model, tmp_path)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    trainer.save_model(str(tmp_path / "trained"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    assert torch.equal(loaded.okadfa.blocks[0].mlp[0].weight, model.okadfa.blocks[0].mlp[0].weight)
