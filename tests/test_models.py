"""OKADFAModel with the DFA engine: gradients routed as docs/design.md §4 says, BP equal to
plain autograd, seeded == stored feedback, ortho term, checkpoints, compile."""
import pytest
import torch
import torch.nn.functional as F

from okadfa.training.checkpoint import load_checkpoint, save_checkpoint
from okadfa.diagnostics import attention_similarity, gradient_alignment, orthogonality_violation
from okadfa.models import OKADFACache, OKADFAConfig, OKADFAModel
from okadfa.ortho import model_orthogonality_loss
from tolerances import DEEP, EXACT, REORDERED, assert_close


def _model(**overrides):
    torch.manual_seed(0)
    cfg = OKADFAConfig.preset("tiny", d_model=32, n_heads=4, n_layers=3, max_seq_len=64, nb_features=16,
                              **overrides)
    return OKADFAModel(cfg).double()


def _batch(T=24, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, T), generator=g)
    y = torch.randint(0, 256, (B, T), generator=g)
    y[0, :3] = -100
    return x, y


def _plain_dfa_segments(model):
    """The trunk cut at DFA's feedback points, written out from the block's sub-steps (not
    through `trunk_points`): [(point name, f(stream, hidden) -> raw activation, parameters)].
    A segment reads the residual stream (and, for a micro MLP output, the hidden activation)
    and is trained only by its own point's signal."""
    c = model.config
    segs = []
    for i, b in enumerate(model.blocks):
        attn = list(b.ln1.parameters()) + list(b.attn.parameters())
        mlp_in = list(b.mlp[0].parameters()) + (list(b.ln2.parameters()) if c.norm == "pre" else [])
        mlp_out = list(b.mlp[2].parameters()) + (list(b.ln2.parameters()) if c.norm == "post" else [])
        if c.points == "block":
            segs.append((f"block{i}", lambda x, a, b=b: b(x), list(b.parameters())))
            continue
        segs.append((f"block{i}.attn", lambda x, a, b=b: b.attention_step(x), attn))
        if c.points == "sublayer":
            segs.append((f"block{i}.mlp", lambda x, a, b=b: b.mlp_output(x, b.mlp_hidden(x)), mlp_in + mlp_out))
        else:                                       # micro: the hidden activation is a point of its own
            segs.append((f"block{i}.hidden", lambda x, a, b=b: b.mlp_hidden(x), mlp_in))
            segs.append((f"block{i}.mlp", lambda x, a, b=b: b.mlp_output(x, a), mlp_out))
    return segs


def _plain_dfa_gradients(model, x, y):
    """DFA by its definition (docs/design.md §4) with plain autograd: {id(param): gradient}."""
    c = model.config
    emb_params = [model.tok_emb.weight, model.pos_emb.weight]

    def point(name, raw):                           # point_norm: the signal enters at a LayerNorm
        return F.layer_norm(raw, raw.shape[-1:]) if c.point_norm and not name.endswith("hidden") else raw

    reads, stream, hidden = [], model.embed(x).detach(), None
    with torch.no_grad():                           # the activations each segment reads
        for name, f, _ in _plain_dfa_segments(model):
            reads.append((stream, hidden))
            if name.endswith("hidden"):
                hidden = f(stream, hidden)
            else:
                stream = f(stream, hidden)
    x_last = stream.clone().requires_grad_()
    h = model.ln_f(x_last)
    logits = model.lm_head(h)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    errors = dict(zip(("stream", "hidden", "logits"), torch.autograd.grad(loss, (x_last, h, logits), retain_graph=True)))
    e = errors[c.error].flatten(0, 1)
    expected = {}

    def add(params, out, name):
        signal = (e @ model.dfa.feedback_matrix(name).double().T).view_as(out)
        for p, g in zip(params, torch.autograd.grad(out, params, signal, allow_unused=True)):
            if g is not None:
                expected[id(p)] = expected.get(id(p), 0) + g

    head = list(model.ln_f.parameters()) + [model.lm_head.weight]
    for p, g in zip(head, torch.autograd.grad(loss, head, allow_unused=True)):
        expected[id(p)] = g
    for k, ((name, f, params), (stream, hidden)) in enumerate(zip(_plain_dfa_segments(model), reads)):
        if k == 0 and not c.dfa_embed:              # block 1 backpropagates into the embedding
            stream, params = model.embed(x), params + emb_params
        add(list(dict.fromkeys(params)), point(name, f(stream, hidden)), name)
    if c.dfa_embed:
        add(emb_params, point("embed", model.embed(x)), "embed")
    return expected


@pytest.mark.parametrize("overrides", [
    dict(), dict(norm="pre"), dict(norm="pre", point_norm=True), dict(points="sublayer"),
    dict(points="sublayer", norm="pre", point_norm=True), dict(points="micro"), dict(points="micro", norm="pre"),
    dict(points="micro", norm="pre", point_norm=True),
    dict(points="micro", feedback_storage="stored", feedback_shared=True), dict(error="logits"),
    dict(error="logits", norm="pre"), dict(dfa_embed=True), dict(dfa_embed=True, norm="pre", point_norm=True),
    dict(tie_weights=False), dict(feedback_dist="uniform", feedback_shared=True), dict(attention="softmax"),
    dict(error="stream", norm="pre"), dict(error="stream", norm="pre", points="micro"),
    dict(feedback_dist="spd", feedback_storage="stored", error="stream", norm="pre"),
    dict(feedback_dist="spd", feedback_storage="stored"), dict(feedback_dist="normal", feedback_storage="seeded",
                                                                feedback_shared=False)], ids=str)
def test_dfa_gradients_are_projected_errors(overrides):
    """Each segment's parameters get exactly the gradient of backpropagating e B_pᵀ
    into that segment alone; the head gets its true gradient."""
    model = _model(**overrides)
    x, y = _batch()
    model(x, y).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    expected = _plain_dfa_gradients(model, x, y)
    for name, p in model.named_parameters():
        assert name in got, name
        assert_close(got[name], expected[id(p)], DEEP, msg=name)


def test_micro_points_are_d_ff_wide_and_independent():
    model = _model(points="micro", feedback_storage="stored")
    assert model.dfa.points[:3] == ["block0.attn", "block0.hidden", "block0.mlp"]
    assert model.dfa.feedback_matrix("block0.hidden").shape == (4 * 32, 32)
    assert model.dfa.feedback_matrix("block0.mlp").shape == (32, 32)
    assert not torch.equal(model.dfa.feedback_matrix("block0.hidden")[:32], model.dfa.feedback_matrix("block0.attn"))
    seeded = _model(points="micro")
    assert_close(seeded.dfa.feedback_matrix("block1.hidden").double(), model.dfa.feedback_matrix("block1.hidden"),
                 EXACT)
    with pytest.raises(ValueError, match="micro.*error='hidden'"):
        OKADFAConfig(points="micro", error="logits")
    with pytest.raises(ValueError, match="point_norm"):
        OKADFAConfig(norm="post", point_norm=True)
    with pytest.raises(ValueError, match="spd.*stored"):
        OKADFAConfig(feedback_dist="spd", feedback_storage="seeded")
    with pytest.raises(ValueError, match="spd.*micro"):
        OKADFAConfig(feedback_dist="spd", points="micro")
    assert OKADFAConfig().feedback_dist == "spd" and OKADFAConfig().feedback_storage == "stored"
    assert OKADFAConfig(error="logits").feedback_dist == "normal"
    assert OKADFAConfig(points="micro").feedback_storage == "seeded"


def test_spd_feedback_is_symmetric_positive_semidefinite_around_identity():
    model = _model(feedback_dist="spd", feedback_storage="stored", error="stream", norm="pre")
    b = model.dfa.feedback_matrix("block1")
    assert_close(b, b.T, REORDERED)
    assert torch.linalg.eigvalsh(b).min() > -1e-6
    assert (torch.diagonal(b) - 1).abs().mean() < 0.3 and b.trace() / 32 > 0.8    # E[G Gᵀ] = I


def test_stream_error_equals_hidden_error_for_post_ln():
    """Post-LN has no final norm, so the error before it is the hidden error."""
    a, b = _model(error="stream"), _model(error="hidden")
    x, y = _batch()
    a(x, y).loss.backward()
    b(x, y).loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert_close(p.grad, q.grad, REORDERED, msg=n)


def test_no_gradient_crosses_between_blocks():
    """With every feedback matrix but block 2's zeroed, only block 2 (and the head) learn."""
    model = _model(feedback_storage="stored")
    with torch.no_grad():
        model.dfa.feedback[:2] = 0
    x, y = _batch()
    model(x, y).loss.backward()
    for i, block in enumerate(model.blocks):
        nonzero = any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
        assert nonzero == (i == 2), i
    assert model.pos_emb.weight.grad is None or model.pos_emb.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_bp_equals_plain_autograd(norm):
    model = _model(training="bp", norm=norm)
    x, y = _batch()
    out = model(x, y)
    out.loss.backward()
    h = model.embed(x)
    for block in model.blocks:
        h = block(h)
    logits = model.lm_head(model.ln_f(h))
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    assert_close(out.loss, loss, REORDERED)
    params = list(model.parameters())
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        assert_close(p.grad, g, DEEP)


def _train(model, seeds, opt=None):
    """One AdamW step per batch seed; returns the losses."""
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for s in seeds:
        x, y = _batch(seed=s)
        opt.zero_grad()
        loss = model(x, y).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_seeded_and_stored_feedback_train_identically():
    a, b = _model(feedback_dist="normal", feedback_storage="seeded"), _model(feedback_dist="normal",
                                                                             feedback_storage="stored")
    b.load_state_dict(a.state_dict(), strict=False)
    assert "dfa.feedback" in b.state_dict() and "dfa.feedback" not in a.state_dict()
    la, lb = _train(a, range(3)), _train(b, range(3))
    assert la == lb
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_orthogonality_term_and_schedule():
    model = _model(ortho_lambda=0.5, ortho_warmup=4, training="bp")
    x, y = _batch()
    for step in range(6):
        out = model(x, y)
        lam = 0.5 * min(1.0, step / 4)
        assert_close(out.ortho_loss, model_orthogonality_loss(model), REORDERED)
        assert_close(out.loss, out.ce_loss + lam * out.ortho_loss, REORDERED)
    violation = orthogonality_violation(model)
    assert len(violation) == 3 * 6 and all(v >= 0 for v in violation.values())
    assert max(violation[f"blocks.0.{m}"] for m in "qkv") < 1e-5          # orthogonal init


def test_checkpoint_resume_is_bit_identical(tmp_path):
    model = _model(redraw_interval=2)
    _train(model, range(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, range(3, 5), opt)
    save_checkpoint(tmp_path / "ck.safetensors", model, opt, step=5)
    expected = _train(model, range(5, 8), opt)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = _model(redraw_interval=2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    info = load_checkpoint(tmp_path / "ck.safetensors", fresh, fresh_opt)
    assert info["step"] == 5
    assert _train(fresh, range(5, 8), fresh_opt) == expected
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, final[k]), k

    other = _model(feedback_seed=1, redraw_interval=2)
    with pytest.raises(ValueError, match="config mismatch.*feedback_seed"):
        load_checkpoint(tmp_path / "ck.safetensors", other)


def test_training_reduces_loss_and_diagnostics():
    for training in ("dfa", "bp"):
        model = _model(training=training).float()
        x, y = _batch(T=32, B=4)
        y = torch.roll(x, -1, dims=1)                   # learnable: predict the next input token
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        first = None
        for _ in range(40):
            opt.zero_grad()
            loss = model(x, y).loss
            loss.backward()
            opt.step()
            first = first if first is not None else loss.item()
        assert loss.item() < first - 0.5, (training, first, loss.item())
    report = gradient_alignment(model if training == "dfa" else _model().float(), x, y)
    assert set(report) == {"block0", "block1", "block2", "blocks"}
    assert all(-1 <= r[k] <= 1 for r in report.values() for k in ("cosine", "writers", "weights", "norm_bias"))
    assert all(r["rel_error"] >= 0 for r in report.values())
    sim = attention_similarity(_model().float(), x)
    assert set(sim) == {"blocks.0.attn", "blocks.1.attn", "blocks.2.attn"}
    assert all(r["cosine"] > 0.5 for r in sim.values())


def test_generate_and_eval_logits():
    model = _model().float()
    model.eval()
    x, _ = _batch()
    out = model(x)
    assert out.logits.shape == (2, 24, 256) and out.loss is None
    ids = model.generate(x[:, :5], 7, temperature=0)
    assert ids.shape == (2, 12) and torch.equal(ids[:, :5], x[:, :5])
    assert torch.equal(ids, model.generate(x[:, :5], 7, temperature=0))


_BAD_GENERATE = [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="hot"), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=-3), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=1.5), "max_new_tokens"),
    (dict(input_ids=torch.tensor([1, 2, 3])), "input_ids"), (dict(input_ids=torch.ones(1, 3)), "input_ids"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.tensor([[1, 256]])), "input_ids"), (dict(input_ids=torch.tensor([[-1, 2]])), "input_ids"),
]


@pytest.mark.parametrize("kwargs,name", _BAD_GENERATE, ids=[f"{name}-{i}" for i, (_, name) in enumerate(_BAD_GENERATE)])
def test_generate_refuses_bad_arguments_naming_them(kwargs, name):
    """temperature < 0 (or not finite), top_k < 1, a negative or fractional max_new_tokens and
    prompts that are not (B, T>=1) integer ids in [0, vocab) are ValueErrors that name the
    argument, before any sampling (top_k=0 used to fail inside topk, temperature=-1 was taken)."""
    model = _model().float()
    call = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, temperature=0.8, top_k=5) | kwargs
    with pytest.raises(ValueError, match=name):
        model.generate(call.pop("input_ids"), call.pop("max_new_tokens"), **call)
    ok = model.generate(torch.tensor([[1, 2, 3]]), 2, temperature=0.5, top_k=1)
    assert ok.shape == (1, 5) and model.generate(torch.tensor([[1]]), 0).shape == (1, 1)


@pytest.mark.parametrize("training", ["bp", "dfa"])
def test_torch_compile_fullgraph_training_steps(training):
    """The whole forward (DFA head included) in one graph, its backward compiled too; three
    steps, so the orthogonality warm-up reads a step counter that the forward advances."""
    model = _model(training=training, ortho_lambda=0.01, ortho_warmup=4).float()
    ref = _model(training=training, ortho_lambda=0.01, ortho_warmup=4).float()
    ref.load_state_dict(model.state_dict())
    x, y = _batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(3):
        loss = compiled(x, y).loss
        loss.backward()
        expected = ref(x, y).loss
        expected.backward()
        assert_close(loss, expected, REORDERED)
    assert int(model.step) == int(ref.step) == 3
    counter = ref.step
    ref(x, y)
    assert ref.step is counter and int(counter) == 4             # eager: advanced in place
    assert "step" in dict(model.named_buffers())                  # compiled: reassigned, still a buffer
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, REORDERED, msg=n)
    bad = y.clone()
    bad[1, 5] = 256
    with pytest.raises(ValueError, match=r"targets must be in \[0, 256\)"):
        compiled(x, bad)


@pytest.mark.parametrize("training", ["bp", "dfa"])
def test_autocast_cpu_bfloat16(training):
    model = _model(training=training).float()
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    assert out.loss.dtype == torch.float32                   # cross-entropy runs in float32 under autocast
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("attention,training", [("favor", "dfa"), ("softmax", "bp")])
def test_key_mask_gives_each_sequence_its_own_outputs(attention, training):
    """Left and right padding (key_mask False): each sequence's logits at its real positions are
    those it gets alone, and the loss (DFA's training forward too) skips the padding."""
    model = _model(attention=attention, training=training).eval()
    x, _ = _batch(T=10, B=3)
    lengths, n = (10, 6, 3), 10
    for side in ("left", "right"):
        model.eval()
        mask = torch.zeros(3, n, dtype=torch.bool)
        for b, m in enumerate(lengths):
            mask[b, slice(n - m, n) if side == "left" else slice(0, m)] = True
        with torch.no_grad():
            logits = model(x, key_mask=mask).logits
            for b in range(3):
                alone = model(x[b:b + 1][:, mask[b]]).logits[0]
                assert_close(logits[b][mask[b]], alone, REORDERED)
        targets = x.roll(-1, 1)              # padded positions get no loss: their targets may be anything
        with torch.no_grad():
            per = [model(x[b:b + 1][:, mask[b]], targets[b:b + 1][:, mask[b]]).loss for b in range(3)]
        expected = sum(loss * m for loss, m in zip(per, lengths)) / sum(lengths)
        assert_close(model(x, targets, key_mask=mask).loss, expected, DEEP)
        model.train()
        assert_close(model(x, targets, key_mask=mask).loss, expected, DEEP)


def test_okadfa_cache_with_padding_equals_the_full_forward():
    """A left-padded prompt through an OKADFACache, then tokens one at a time (one row padded at a
    step): the logits of the whole sequence with the whole key_mask."""
    model = _model().eval()
    x, _ = _batch(T=12, B=2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :4] = mask[1, 9] = False
    cache = OKADFACache(model)
    with torch.no_grad():
        full = model(x, key_mask=mask).logits
        parts = [model(x[:, :7], key_mask=mask[:, :7], cache=cache).logits]
        parts += [model(x[:, t:t + 1], key_mask=mask[:, t:t + 1], cache=cache).logits for t in range(7, 12)]
    got = torch.cat(parts, 1)
    assert_close(got[mask], full[mask], REORDERED)
    assert cache.length == 12 and cache.real.tolist() == [8, 11]


def test_builds_on_the_meta_device():
    """transformers 5 builds models under torch.device("meta") before loading their weights."""
    with torch.device("meta"):
        model = OKADFAModel(OKADFAConfig.preset("tiny", training="dfa", n_layers=1))
    assert model.lm_head.weight.is_meta


def test_key_mask_and_cache_errors():
    model = _model()
    x, y = _batch(T=8)
    with pytest.raises(TypeError, match="key_mask must be a bool tensor"):
        model(x, key_mask=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="shape and device of input_ids"):
        model(x, key_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="a cache is for decoding"):
        model.train()(x, y, cache=OKADFACache(model))


def test_config_validation_and_presets():
    assert OKADFAConfig.preset("gpt2-small").d_model == 768
    assert OKADFAConfig.preset("gpt2-medium").n_layers == 24
    with pytest.raises(ValueError, match="OKADFAConfig.training"):
        OKADFAConfig(training="hebbian")
    with pytest.raises(ValueError, match="unknown preset"):
        OKADFAConfig.preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        OKADFAConfig(d_model=30, n_heads=4)
