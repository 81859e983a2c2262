"""Mixed precision (issue 16, item 3) below the training loop: the DFA engine and the orthogonality
penalty under torch.autocast, loss scaling of the DFA signals, the --precision guard, and
okadfa.bench.model's precision axis. The training runs themselves: tests/test_train.py."""
import json

import pytest
import torch

import okadfa.dfa as dfa_mod
from okadfa.models import OKADFAConfig, OKADFAModel
from okadfa.ortho import orthogonality_loss
from okadfa.training import precision as precision_mod


def _model(**overrides):
    torch.manual_seed(0)
    config = dict(n_layers=2, d_model=32, n_heads=2, nb_features=16, vocab_size=256, max_seq_len=32)
    return OKADFAModel(OKADFAConfig.preset("tiny", **{**config, **overrides}))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(256, (2, 32), generator=g), torch.randint(256, (2, 32), generator=g)


def _spy(monkeypatch, name):
    """Record the dtypes of the tensor arguments of okadfa.dfa.<name> (dfa_head or dfa_feedback)."""
    real, seen = getattr(dfa_mod, name), []

    def spy(*args, **kwargs):
        seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()))
        return real(*args, **kwargs)
    monkeypatch.setattr(dfa_mod, name, spy)
    return seen


@pytest.mark.parametrize("error", ["hidden", "stream", "logits"])
@pytest.mark.parametrize("dtype,head", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_dfa_head_computes_in_bf16_under_bf16_autocast_and_float32_under_fp16(monkeypatch, error, dtype, head):
    """bf16: the fused head gets bf16 h and w_dec, as autocast gives backprop's unembedding (not a silent float32);
    fp16: float32, as okadfa.dfa._head_operands explains. Either way the float32 parameters get finite float32
    gradients."""
    seen = _spy(monkeypatch, "dfa_head")
    model = _model(error=error, ortho_lambda=0.1)
    x, y = _batch()
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, y)
    assert seen and seen[0][:2] == (head, head), seen
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_stream_error_and_the_wider_points_project_in_bf16(monkeypatch):
    """error="stream" takes the head's error back through the final norm (float32 under autocast) and
    points="micro" projects it onto the d_ff-wide points: both projections stay in bf16."""
    seen = _spy(monkeypatch, "dfa_feedback")
    model = _model(error="stream", points="micro", norm="pre")
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, y).loss.backward()
    assert seen and all(dtypes[0] == torch.bfloat16 for dtypes in seen), seen


def _relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("training", ["dfa", "bp"])
def test_a_grad_scaler_scales_the_dfa_signals_like_backprop_gradients(training):
    """The DFA signals are applied in the backward of the loss, multiplied by its incoming gradient, so
    GradScaler.scale(loss).backward() makes every gradient, those of parameters reached only by DFA signals
    included, S times the true one, and unscale_ brings them all back: fp16 autocast on the CPU against a float32
    run (a signal that missed the scale would be off by S = 4096 after unscale_)."""
    x, y = _batch()
    reference = _model(training=training)
    reference(x, y).loss.backward()
    model, scale = _model(training=training), 2.0 ** 12
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(x, y).loss
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(loss).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
    for (name, p), g, ref in zip(model.named_parameters(), scaled, reference.parameters()):
        if training == "dfa" and name.startswith("blocks."):
            assert ref.grad.abs().sum() > 0, name           # reached by DFA signals only
        assert _relative_error(g / scale, ref.grad) < 3e-2, name
        assert _relative_error(p.grad, ref.grad) < 3e-2, name


def test_orthogonality_penalty_stays_float32_under_autocast():
    """bf16 autocast would round the Gram of an orthogonal Q (its diagonal 1 ± tiny) and report ~4e-4."""
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    q = q.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = orthogonality_loss([q, 2 * q])
    assert penalty.dtype == torch.float32
    assert penalty.item() == pytest.approx(64 * 9, rel=1e-6)      # 0 for q, 64·(4 − 1)² for 2q
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert orthogonality_loss(q).item() < 1e-9


def test_check_refuses_an_autocast_torch_would_disable(monkeypatch):
    """torch only warns and stays in float32 for a dtype it cannot autocast to; check makes it an error."""
    precision_mod.check("bf16", "cpu")
    precision_mod.check("fp16", "cpu")
    monkeypatch.setitem(precision_mod.PRECISIONS, "fp16", torch.float64)
    with pytest.raises(ValueError, match="cannot autocast to torch.float64 on cpu"):
        precision_mod.check("fp16", "cpu")


def test_grad_scaler_only_for_fp16():
    assert [precision_mod.grad_scaler(p, "cpu").is_enabled() for p in ("fp32", "bf16", "fp16")] == [
        False, False, True]


# ---------------------------------------------------------------------------------------------------------------
# okadfa.bench.model --precision

def test_bench_model_precision_list_parsing():
    from okadfa.bench.model import precision_list
    assert precision_list("fp32") == ["fp32"]
    assert precision_list(" fp32 , bf16,fp16 ") == ["fp32", "bf16", "fp16"]
    for bad in ("", "fp8", "fp32,fp32", "bf16,float16"):
        with pytest.raises(Exception, match="comma list of fp32, bf16, fp16"):
            precision_list(bad)


def test_bench_model_refuses_a_bad_precision_naming_the_option(capsys):
    from okadfa.bench import model as model_bench
    with pytest.raises(SystemExit) as exc:
        model_bench.main(["--preset", "tiny", "--precision", "fp32,fp8"])
    assert exc.value.code == 2 and "--precision" in capsys.readouterr().err


def test_bench_model_rows_per_precision_under_autocast(tmp_path, monkeypatch):
    """Every row is labelled with its precision, and its forward (inference and training) ran under that
    autocast dtype."""
    from okadfa.bench import model as model_bench
    seen = set()
    real = OKADFAModel.forward

    def forward(self, *args, **kwargs):
        on = torch.is_autocast_enabled("cpu")
        seen.add((self.training, torch.get_autocast_dtype("cpu") if on else torch.float32))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(OKADFAModel, "forward", forward)
    model_bench.main(["--preset", "tiny", "--seq-lens", "8", "--precision", "fp32,bf16", "--out", str(tmp_path)])
    assert seen == {(training, dtype) for training in (False, True) for dtype in (torch.float32, torch.bfloat16)}
    data = json.loads((tmp_path / "model_tiny.json").read_text())
    assert data["meta"]["precisions"] == ["fp32", "bf16"]
    assert {(r["precision"], r["mode"]) for r in data["rows"]} == {
        (p, m) for p in ("fp32", "bf16") for m in model_bench.MODES}
    md = (tmp_path / "model_tiny.md").read_text()
    assert "**fp32**" in md and "**bf16**" in md and "| 8 | favor | train dfa |" in md and "bf16 speed-up" in md
