"""`okadfa train` and `okadfa compare`: smoke runs of a few steps on a small model,
well-formed metrics, Ctrl-C with a checkpoint, bit-identical resume, and
DistributedDataParallel on 2 CPU processes (gloo) against one process."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import okadfa.training.train as train_mod
from okadfa.training.compare import read_metrics
from tolerances import DDP_STEPS, assert_close

SMALL = ["--set", "n_layers=2", "--set", "d_model=32", "--set", "n_heads=2", "--set", "nb_features=16",
         "--max-bytes", "100000", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--no-progress",
         "--sample-tokens", "8", "--threads", "1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OKADFA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "okadfa-cache"))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_writes_well_formed_metrics(tmp_path, capsys):
    summary = train_mod.main(SMALL + ["--steps", "6", "--eval-every", "3", "--align-every", "3", "--log-every", "2",
                                      "--out", str(tmp_path)])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all({"kind", "step"} <= set(r) for r in records)
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "config" and kinds[-1] == "summary"
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [3, 6]
    for r in vals:
        assert 0 < r["loss"] < 10
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2))     # byte data: one token per byte
    aligns = [r for r in records if r["kind"] == "align"]
    assert [r["step"] for r in aligns] == [3, 6]
    assert set(aligns[0]["cosine"]) == {"block0", "block1", "blocks"}
    assert all(-1 <= c <= 1 for c in aligns[0]["cosine"].values())
    assert summary["step"] == 6 and not summary["interrupted"] and summary["tokens"] == 6 * 4 * 32
    assert summary["tokens_per_s"] > 0 and summary["peak_mem_mb"] > 0
    assert (tmp_path / "checkpoint.safetensors").exists() and (tmp_path / "sample.txt").read_text()
    assert "sample" in capsys.readouterr().out


def test_learning_rate_schedule():
    args = train_mod.parse_args(["--steps", "100", "--lr", "1e-3", "--warmup", "10"])
    lrs = [train_mod.learning_rate(s, args) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert train_mod.learning_rate(100, args) == pytest.approx(1e-4)


@pytest.mark.parametrize("rule", ["dfa", "bp"])
def test_optimizer_defaults_follow_the_rule(rule):
    d = train_mod.OPTIMIZER_DEFAULTS[rule]
    args = train_mod.parse_args(["--training", rule, "--steps", "1000"])
    assert (args.lr, args.warmup, args.weight_decay, args.adam_beta2, args.grad_clip) == (
        d["lr"], round(1000 * d["warmup_fraction"]), d["weight_decay"], d["adam_beta2"], d["grad_clip"])
    assert train_mod.parse_args(["--training", rule, "--steps", "3"]).warmup == 1      # at least one step
    given = train_mod.parse_args(["--training", rule, "--lr", "1e-4", "--warmup", "7"])
    assert (given.lr, given.warmup) == (1e-4, 7)


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        train_mod.main(SMALL + ["--set", "no_such_field=3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no checkpoint"):
        train_mod.main(SMALL + ["--resume", "--out", str(tmp_path / "empty")])
    with pytest.raises(SystemExit):
        train_mod.main(SMALL + ["--steps", "0", "--out", str(tmp_path)])


def test_resume_refuses_pickles_and_corrupted_checkpoints_in_one_line(tmp_path):
    """--resume never unpickles: an old checkpoint.pt is named, not loaded; a corrupted
    checkpoint.safetensors is a one-line error (SystemExit), not a traceback."""
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"format": 1}, old / "checkpoint.pt")
    with pytest.raises(SystemExit, match="checkpoint.pt is a pickle checkpoint of an older okadfa"):
        train_mod.main(SMALL + ["--resume", "--out", str(old)])
    bad = tmp_path / "bad"
    train_mod.main(SMALL + ["--steps", "2", "--out", str(bad)])
    path = bad / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="--resume: .*checksum mismatch"):
        train_mod.main(SMALL + ["--steps", "4", "--resume", "--out", str(bad)])


def _interrupt_at(monkeypatch, at_step):
    """Deliver SIGINT while the batch of step `at_step` is being drawn (as a Ctrl-C would)."""
    real = train_mod.get_batch

    def get_batch(tokens, step, *args, **kwargs):
        if step == at_step:
            signal.raise_signal(signal.SIGINT)
        return real(tokens, step, *args, **kwargs)
    monkeypatch.setattr(train_mod, "get_batch", get_batch)


def test_ctrl_c_checkpoints_and_resume_is_bit_identical(tmp_path, monkeypatch):
    args = SMALL + ["--steps", "6", "--eval-every", "2", "--set", "redraw_interval=2"]
    straight, _ = train_mod.train(train_mod.parse_args(args + ["--out", str(tmp_path / "a")]))
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        _, summary = train_mod.train(train_mod.parse_args(args + ["--out", str(tmp_path / "b")]))
    assert summary["interrupted"] and summary["step"] == 3       # the step under way was finished
    assert train_mod.cli(args + ["--out", str(tmp_path / "c"), "--steps", "1"]) == 0
    resumed, summary = train_mod.train(train_mod.parse_args(args + ["--out", str(tmp_path / "b"), "--resume"]))
    assert summary["step"] == 6 and not summary["interrupted"]
    for k, v in _params(straight).items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    a, b = read_metrics(str(tmp_path / "a" / "metrics.jsonl")), read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
    assert [r["loss"] for r in a["val"]] == [r["loss"] for r in b["val"]]


def _ddp_worker(rank, world, port, argv, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OKADFA_CACHE_DIR=out + "/cache")
    model, _ = train_mod.train(train_mod.parse_args(argv))
    torch.save(_params(model), f"{out}/rank{rank}.pt")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("training", ["dfa", "bp"])
def test_ddp_two_ranks_match_one_process_on_the_combined_batch(tmp_path, training):
    args = SMALL + ["--steps", "4", "--eval-every", "2", "--align-every", "2", "--training", training,
                    "--set", "redraw_interval=1"]
    out = str(tmp_path)
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), args + ["--out", out + "/ddp"], out),
                                          nprocs=2, start_method="spawn")
    single, _ = train_mod.train(train_mod.parse_args(args + ["--out", out + "/single"]))
    r0, r1 = torch.load(out + "/rank0.pt"), torch.load(out + "/rank1.pt")
    for k, v in _params(single).items():
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
        assert_close(r0[k], v, DDP_STEPS, dtype=torch.float32, msg=lambda m: f"{k}: {m}")
    moved = [k for k, v in _params(single).items() if v.is_floating_point() and not torch.equal(v, r0[k])]
    assert not any(k.endswith("projection") for k in moved)   # feature redraws agree exactly
    metrics = read_metrics(out + "/ddp/metrics.jsonl")
    assert metrics["config"][0]["world_size"] == 2 and metrics["summary"][-1]["step"] == 4


def test_torchrun_then_resume_on_one_rank(tmp_path):
    """`okadfa train` unchanged under torchrun (2 gloo ranks), resumed by one process:
    equals an uninterrupted single-process run to fp32 rounding."""
    args = SMALL + ["--steps", "6", "--eval-every", "2", "--sample-tokens", "0"]
    env = dict(os.environ, OKADFA_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "okadfa.training.train"]
    subprocess.run(cmd + args + ["--stop-after", "3", "--out", str(tmp_path / "run")], check=True, env=env,
                   timeout=300)
    summary = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))["summary"][-1]
    assert summary["world_size"] == 2 and summary["step"] == 3
    straight, _ = train_mod.train(train_mod.parse_args(args + ["--out", str(tmp_path / "s")]))
    resumed, _ = train_mod.train(train_mod.parse_args(args + ["--out", str(tmp_path / "run"), "--resume"]))
    for k, v in _params(straight).items():
        assert_close(resumed.state_dict()[k], v, DDP_STEPS, dtype=torch.float32, msg=lambda m: f"{k}: {m}")


def test_cli_entry_points(tmp_path):
    env = dict(os.environ, OKADFA_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "okadfa.training.cli", "train", "--help"], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "--attention" in out and "--resume" in out
    assert subprocess.run([sys.executable, "-m", "okadfa.training.cli", "nonsense"], capture_output=True, env=env).returncode == 2


def test_compare_runs_and_reports(tmp_path):
    from okadfa.training.compare import main as compare
    md = compare(["--out", str(tmp_path), "--variants", "favor+dfa,softmax+bp"] + SMALL
                 + ["--steps", "4", "--eval-every", "2", "--align-every", "2", "--sample-tokens", "0"])
    assert "| favor+dfa |" in md and "| softmax+bp |" in md and "blocks" in md
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["favor+dfa", "softmax+bp"]
    assert all(r["steps"] == 4 and r["val_loss"] > 0 for r in report["rows"])
    assert list(report["alignment"]) == ["favor+dfa"]
    pytest.importorskip("matplotlib", reason="plots need matplotlib")
    for name in ("val_loss.png", "alignment.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_demo_smoke(tmp_path, capsys):
    from okadfa.training.demo import main as demo
    assert demo(["--out", str(tmp_path), "--steps", "2", "--set", "n_layers=1", "--max-bytes", "100000",
                 "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--sample-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert "| favor+dfa |" in out and "| favor+bp |" in out
    assert {"favor+dfa", "favor+bp"} <= {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "report.md").exists()


@pytest.mark.parametrize("old", ["train", "data", "checkpoint", "compare", "demo"])
def test_moved_modules_keep_their_old_import_path(old):
    import importlib
    sys.modules.pop(f"okadfa.{old}", None)
    with pytest.warns(FutureWarning, match=f"okadfa.{old} moved to okadfa.training.{old}"):
        module = importlib.import_module(f"okadfa.{old}")
    assert module is importlib.import_module(f"okadfa.training.{old}")


def test_old_module_path_still_runs_as_a_program():
    run = subprocess.run([sys.executable, "-m", "okadfa.train", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "usage: okadfa train" in run.stdout
    assert "okadfa.train moved to okadfa.training.train" in run.stderr


def test_library_never_imports_the_training_application_or_bench():
    code = ("import sys, okadfa, okadfa.models, okadfa.dfa, okadfa.diagnostics, okadfa.nn, okadfa.integrations; "
            "print(sorted(m for m in sys.modules if m.startswith(('okadfa.training', 'okadfa.bench'))))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# Issue 15, item 14: one run per --out; metrics read tolerantly

def _wait_for(predicate, what, timeout=180):
    import time
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_second_run_into_the_same_out_fails_at_once_and_the_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OKADFA_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "okadfa.training.train", *SMALL, "--steps", "1000000",
                              "--eval-every", "1000000", "--log-every", "1000000", "--sample-tokens", "0",
                              "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        metrics = out / "metrics.jsonl"
        _wait_for(lambda: first.poll() is not None or (metrics.exists() and "baselines" in metrics.read_text()),
                  "the first run to start")
        assert first.poll() is None, first.stderr.read().decode()
        before = metrics.read_text()
        with pytest.raises(SystemExit) as exc:
            train_mod.main(SMALL + ["--steps", "2", "--out", str(out)])
        msg = str(exc.value.code)
        assert str(out) in msg and f"PID {first.pid}" in msg and "\n" not in msg
        assert metrics.read_text() == before                 # nothing interleaved
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    summary = train_mod.main(SMALL + ["--steps", "1", "--sample-tokens", "0", "--out", str(out), "--overwrite"])
    assert summary["step"] == 1                            # the lock went with the killed process


def test_read_metrics_skips_malformed_lines_and_names_them(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"kind": "config", "step": 0, "x": 1}, {"kind": "train", "step": 2, "loss": 3.0},
            {"kind": "train", "step": 4, "loss": 2.5}]
    lines = [json.dumps(good[0]), "{not json", json.dumps(good[1]), "[1, 2]", '{"kind": "val"}',
             '{"kind": "val", "step": "x"}', "", json.dumps(good[2]), '{"kind": "summary", "st']
    path.write_text("\n".join(lines))                     # the last line cut half-way, no newline
    skipped = []
    with pytest.warns(UserWarning, match=r"metrics\.jsonl.*lines? 2, 4, 5, 6, 9") as caught:
        records = read_metrics(str(path), skipped=skipped)
    assert str(path) in str(caught[0].message)
    assert records == {"config": [good[0]], "train": [good[1], good[2]]}
    assert [n for n, _ in skipped] == [2, 4, 5, 6, 9]


def test_a_run_appending_after_a_cut_line_keeps_its_own_records(tmp_path):
    """A run killed mid-write leaves a cut last line; resuming it appends from a new line, so only
    the cut line is lost."""
    out = tmp_path / "run"
    train_mod.main(SMALL + ["--steps", "1", "--sample-tokens", "0", "--out", str(out)])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')                     # the cut last line of a killed run
    cut = len((out / "metrics.jsonl").read_text().splitlines())
    train_mod.main(SMALL + ["--steps", "2", "--sample-tokens", "0", "--out", str(out), "--resume"])
    with pytest.warns(UserWarning, match=f"line {cut}"):
        records = read_metrics(str(out / "metrics.jsonl"))
    assert records["summary"][-1]["step"] == 2 and "args" in records["config"][0]


def _fake_run(directory, variant, cut_last_line):
    directory.mkdir(parents=True)
    args = {"preset": "tiny", "steps": 4, "batch_size": 2, "seq_len": 8, "tokenizer": "bytes"}
    records = [{"kind": "config", "step": 0, "config": {"norm": "post"}, "args": args, "parameters": 1000,
                "corpus": "stdlib", "device": "cpu", "world_size": 1, "torch": "x"},
               {"kind": "val", "step": 4, "train_s": 1.0, "loss": 2.0, "ppl": 7.4, "bpb": 2.9},
               {"kind": "summary", "step": 4, "train_loss": 2.1, "tokens_per_s": 100.0, "peak_mem_mb": 10.0,
                "peak_mem_kind": "process_peak_rss", "train_s": 1.0, "val": None}]
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    if cut_last_line:
        text += '{"kind": "train", "step": 5, "lo'
    (directory / "metrics.jsonl").write_text(text)


def test_compare_report_survives_a_cut_metrics_line_and_reports_it(tmp_path, capsys):
    from okadfa.training.compare import main as compare
    _fake_run(tmp_path / "favor+dfa", "favor+dfa", cut_last_line=True)
    _fake_run(tmp_path / "favor+bp", "favor+bp", cut_last_line=False)
    with pytest.warns(UserWarning, match="line 4"):
        md = compare(["--out", str(tmp_path), "--variants", "favor+dfa,favor+bp", "--report-only"])
    assert "| favor+dfa |" in md and "| favor+bp |" in md
    assert "favor+dfa/metrics.jsonl" in md and "line 4" in md and "skipped" in md


def test_compare_refuses_an_out_in_use(tmp_path):
    from okadfa.training.compare import main as compare
    _fake_run(tmp_path / "favor+bp", "favor+bp", cut_last_line=False)
    with train_mod.run_lock(str(tmp_path), "okadfa compare"):
        with pytest.raises(SystemExit, match=f"{tmp_path}.*in use.*PID {os.getpid()}"):
            compare(["--out", str(tmp_path), "--variants", "favor+bp", "--report-only"])
    assert "| favor+bp |" in compare(["--out", str(tmp_path), "--variants", "favor+bp", "--report-only"])


# ---------------------------------------------------------------------------------------------------------------
# Issue 16, item 3: --precision

def _checkpoint_document(path):
    from okadfa.training.checkpoint import _read
    return _read(str(path))


def _autocast_seen(monkeypatch):
    """{(model.training, the autocast dtype or float32)} of every OKADFAModel forward from now on."""
    from okadfa.models import OKADFAModel
    seen, real = set(), OKADFAModel.forward

    def forward(self, *args, **kwargs):
        on = torch.is_autocast_enabled("cpu")
        seen.add((self.training, torch.get_autocast_dtype("cpu") if on else torch.float32))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(OKADFAModel, "forward", forward)
    return seen


def test_a_bf16_run_learns_in_bf16_keeps_float32_master_weights_and_records_its_precision(tmp_path, monkeypatch):
    args = SMALL + ["--steps", "12", "--eval-every", "4", "--sample-tokens", "0"]
    seen = _autocast_seen(monkeypatch)
    bf16, summary = train_mod.train(train_mod.parse_args(args + ["--precision", "bf16", "--out", str(tmp_path / "b")]))
    assert seen == {(True, torch.bfloat16), (False, torch.bfloat16)}          # training and validation forwards
    fp32, _ = train_mod.train(train_mod.parse_args(args + ["--out", str(tmp_path / "f")]))
    metrics = read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
    val = [r["loss"] for r in metrics["val"]]
    assert val[-1] < val[0] < math.log(256)                                  # it learns
    assert metrics["config"][0]["precision"] == "bf16" and summary["precision"] == "bf16"
    assert "skipped_steps" not in summary and "loss_scale" not in metrics["train"][-1]     # no loss scaling in bf16
    fp32_val = [r["loss"] for r in read_metrics(str(tmp_path / "f" / "metrics.jsonl"))["val"]]
    assert val != fp32_val and val == pytest.approx(fp32_val, rel=2e-2)       # autocast ran, and changed little
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert not any(torch.equal(p, q) for p, q in zip(bf16.parameters(), fp32.parameters()) if p.dim() > 1)
    document, tensors = _checkpoint_document(tmp_path / "b" / "checkpoint.safetensors")
    assert document["precision"] == "bf16" and document["extra"]["args"]["precision"] == "bf16"
    assert {t.dtype for name, t in tensors.items()
            if name.startswith(("optimizer.", "model.")) and t.is_floating_point()} == {torch.float32}


def test_fp16_clips_the_unscaled_gradients(tmp_path, monkeypatch):
    """--grad-clip sees the true gradient norm in fp16 (unscale_ first), not the loss scale times it."""
    norms, real = {}, torch.nn.utils.clip_grad_norm_

    def clip(parameters, max_norm, **kwargs):
        total = real(parameters, max_norm, **kwargs)
        norms.setdefault(precision, []).append(total.item())
        return total
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    for precision in ("fp32", "fp16"):
        train_mod.main(SMALL + ["--steps", "2", "--sample-tokens", "0", "--precision", precision,
                                "--out", str(tmp_path / precision)])
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.05)


def _fp16_scaler_that_overflows(precision, device):
    """A loss scale that doubles after every good step: fp16 overflows every other step or so, so steps are
    skipped and the scaler's state decides the run (resume must restore it)."""
    return torch.amp.GradScaler(torch.device(device).type, init_scale=2.0 ** 16, growth_interval=1,
                                enabled=precision == "fp16")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_is_bit_identical_in_each_precision(tmp_path, monkeypatch, precision):
    """N steps in one run equal N/2 steps, a checkpoint, and N/2 resumed steps, bit for bit."""
    monkeypatch.setattr(train_mod, "grad_scaler", _fp16_scaler_that_overflows)
    args = SMALL + ["--steps", "6", "--eval-every", "2", "--sample-tokens", "0", "--precision", precision,
                    "--set", "redraw_interval=2"]
    straight, summary = train_mod.train(train_mod.parse_args(args + ["--out", str(tmp_path / "a")]))
    train_mod.train(train_mod.parse_args(args + ["--stop-after", "3", "--out", str(tmp_path / "b")]))
    resumed, resumed_summary = train_mod.train(train_mod.parse_args(args + ["--resume", "--out", str(tmp_path / "b")]))
    assert resumed_summary["step"] == 6
    for k, v in _params(straight).items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    a, b = read_metrics(str(tmp_path / "a" / "metrics.jsonl")), read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
    assert [r["loss"] for r in a["val"]] == [r["loss"] for r in b["val"]]
    if precision == "fp16":
        assert 0 < summary["skipped_steps"] == resumed_summary["skipped_steps"]
        assert [r["loss_scale"] for r in a["train"]] == [r["loss_scale"] for r in b["train"]]


def test_resume_in_another_precision_is_refused_in_one_line(tmp_path):
    args = SMALL + ["--steps", "4", "--sample-tokens", "0", "--out", str(tmp_path)]
    train_mod.main(args + ["--stop-after", "2", "--precision", "bf16"])
    for other in ("fp32", "fp16"):
        with pytest.raises(SystemExit) as exc:
            train_mod.main(args + ["--resume", "--precision", other])
        message = str(exc.value.code)
        assert "\n" not in message and f"trained in bf16, this run uses {other}" in message, message
        assert "--precision bf16" in message
    assert train_mod.main(args + ["--resume", "--precision", "bf16"])["step"] == 4


def test_compare_passes_its_precision_to_every_variant(tmp_path):
    from okadfa.training.compare import main as compare
    md = compare(["--out", str(tmp_path), "--variants", "favor+dfa", "--precision", "bf16"] + SMALL
                 + ["--steps", "2", "--eval-every", "2", "--sample-tokens", "0"])
    assert "precision bf16" in md                       # every variant's okadfa train gets the same --precision
    metrics = read_metrics(str(tmp_path / "favor+dfa" / "metrics.jsonl"))
    assert metrics["config"][0]["precision"] == metrics["summary"][-1]["precision"] == "bf16"
