"""What the commands tell their user: `okadfa train`'s start-up line, raw and smoothed loss, the progress
bar (tqdm's, or okadfa's own without tqdm), --report-to tensorboard / wandb; `okadfa compare --help` with
the options it forwards and an honest line when matplotlib is missing; `okadfa bench` as a command."""
import importlib.machinery
import re
import subprocess
import sys
import types

import pytest

import okadfa.training.train as train_mod
from okadfa.training import reporting
from okadfa.training.compare import read_metrics
from test_train import _cache, _fake_run  # noqa: F401 - _cache: the autouse fixture of a private token cache

SMALL = ["--set", "n_layers=1", "--set", "d_model=32", "--set", "n_heads=2", "--set", "nb_features=16",
         "--max-bytes", "60000", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress",
         "--sample-tokens", "0", "--threads", "1"]


def test_train_says_what_it_runs_before_it_starts(tmp_path, capsys):
    train_mod.main(SMALL + ["--steps", "2", "--out", str(tmp_path / "run")])
    first = capsys.readouterr().out.splitlines()[0]
    config = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))["config"][0]
    assert first.startswith("okadfa train: tiny favor+dfa, "), first
    for part in (f"{config['parameters'] / 1e3:.3g}k parameters", "data stdlib (bytes)",
                 f"{config['train_tokens'] / 1e3:.3g}k train", "2 steps of 2x16 tokens", "cpu, fp32, 1 threads",
                 f"out {tmp_path / 'run'}"):
        assert part in first, (part, first)


def test_train_records_hold_the_step_loss_and_its_running_mean(tmp_path):
    train_mod.main(SMALL + ["--steps", "25", "--log-every", "1", "--eval-every", "25", "--out", str(tmp_path)])
    records = read_metrics(str(tmp_path / "metrics.jsonl"))["train"]
    raw = [r["loss"] for r in records]
    assert len(raw) == 25 and len(set(raw)) == 25                # each step's own loss, not a mean
    for i, r in enumerate(records):
        window = raw[max(0, i + 1 - train_mod.SMOOTHING):i + 1]
        assert r["loss_smoothed"] == pytest.approx(sum(window) / len(window), rel=1e-12)


@pytest.mark.parametrize("n, text", [(7, "7"), (999, "999"), (1000, "1k"), (863_123, "863k"), (999_600, "1M"),
                                     (1_234_567, "1.23M"), (124_439_808, "124M"), (999_999_999, "1G")])
def test_parameter_counts_read_as_three_digits_and_a_suffix(n, text):
    assert train_mod._count(n) == text


def test_progress_bar_is_tqdm_when_installed(capsys):
    pytest.importorskip("tqdm")
    progress = train_mod._Progress(10, 0, 5, enabled=True, bar=True)
    assert progress.tqdm is not None
    progress.update(3, 2.5, 2.75, 3, 1000.0, 7.0)
    progress.message("step 3: val loss 2.4")
    progress.close()
    out, err = capsys.readouterr()
    assert "step 3: val loss 2.4" in out
    assert "train:" in err and "3/10" in err and "loss 2.500 (mean of last 3 2.750)" in err


def test_progress_bar_without_tqdm_is_our_own(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)        # import tqdm.auto now raises ImportError
    progress = train_mod._Progress(10, 0, 5, enabled=True, bar=True)
    assert progress.tqdm is None
    progress.update(5, 2.5, 2.75, 5, 1000.0, 7.0)
    progress.close()
    err = capsys.readouterr().err
    assert "step 5/10 |" + "█" * 12 in err and "loss 2.500 (mean of last 5 2.750)" in err


def test_log_lines_without_a_bar(capsys):
    progress = train_mod._Progress(10, 0, 5, enabled=True, bar=False)
    for step in range(1, 11):
        progress.update(step, 2.5, 2.75, step, 1000.0, 7.0)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in lines] == ["5/10", "10/10"]


def test_report_to_tensorboard_holds_the_metrics_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train_mod.main(SMALL + ["--steps", "4", "--log-every", "2", "--eval-every", "2", "--out", str(tmp_path),
                            "--report-to", "tensorboard"])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    metrics = read_metrics(str(tmp_path / "metrics.jsonl"))
    for kind, field in (("train", "loss"), ("train", "loss_smoothed"), ("val", "bpb")):
        logged = [(e.step, e.value) for e in events.Scalars(f"{kind}/{field}")]
        assert logged == [(r["step"], pytest.approx(r[field], rel=1e-6)) for r in metrics[kind]]
    assert "norms/stream/block0" in events.Tags()["scalars"]


def test_overwrite_also_replaces_the_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    args = SMALL + ["--steps", "2", "--out", str(tmp_path), "--report-to", "tensorboard"]
    train_mod.main(args)
    first = set((tmp_path / "tensorboard").iterdir())
    train_mod.main(args + ["--overwrite"])
    assert first and not first & set((tmp_path / "tensorboard").iterdir())


def test_resume_keeps_every_step_in_tensorboard(tmp_path):
    """A run stopped at step 2 and resumed: steps 1-4 each logged once (the purge drops only what came after
    the checkpoint, not the checkpoint's own step, which the resumed run does not log again)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = SMALL + ["--steps", "4", "--log-every", "1", "--eval-every", "2", "--out", str(tmp_path),
                    "--report-to", "tensorboard"]
    train_mod.main(args + ["--stop-after", "2"])
    train_mod.main(args + ["--resume"])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4]


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module recording init / log / finish (the real one needs an account or network)."""
    calls = {"init": [], "log": [], "finish": 0}
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_report_to_wandb_logs_each_record_at_its_step(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "okadfa-tests")
    train_mod.main(SMALL + ["--steps", "4", "--log-every", "2", "--eval-every", "4", "--out", str(tmp_path / "r"),
                            "--report-to", "wandb"])
    (init,) = fake_wandb["init"]
    assert init["project"] == "okadfa-tests" and init["name"] == "r" and init["config"]["steps"] == 4
    metrics = read_metrics(str(tmp_path / "r" / "metrics.jsonl"))
    train_logs = [(step, v["train/loss"]) for step, v in fake_wandb["log"] if "train/loss" in v]
    assert train_logs == [(r["step"], r["loss"]) for r in metrics["train"]]
    assert [step for step, v in fake_wandb["log"] if "val/loss" in v] == [4]
    assert fake_wandb["finish"] == 1


def test_a_reporter_that_cannot_start_is_one_line(tmp_path, fake_wandb, monkeypatch):
    def not_logged_in(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)\ncall wandb.login()")
    monkeypatch.setattr(sys.modules["wandb"], "init", not_logged_in)
    with pytest.raises(SystemExit, match=r"^okadfa train: --report-to wandb could not start: RuntimeError: "
                                         r"api_key not configured \(no-tty\) call wandb.login\(\)$"):
        train_mod.main(SMALL + ["--steps", "2", "--out", str(tmp_path), "--report-to", "wandb"])


def test_reporters_are_closed_when_the_run_fails(tmp_path, fake_wandb, monkeypatch):
    """An error inside the training loop still finishes the reporters (flushing what they hold)."""
    def broken_evaluate(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(train_mod, "evaluate", broken_evaluate)
    with pytest.raises(RuntimeError, match="boom"):
        train_mod.main(SMALL + ["--steps", "2", "--eval-every", "1", "--out", str(tmp_path), "--report-to", "wandb"])
    assert fake_wandb["finish"] == 1


def test_report_to_refuses_unknown_or_missing_packages(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit, match="--report-to: 'nothing': choose from none, tensorboard, wandb"):
        train_mod.parse_args(["--report-to", "nothing"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit, match=r"--report-to: wandb: the wandb package is not installed \(pip install"):
        train_mod.parse_args(["--report-to", "tensorboard,wandb"])
    assert train_mod.parse_args(["--report-to", "none"]).report_to == []


def test_scalars_flatten_records_and_leave_the_others_out():
    assert reporting.scalars({"kind": "norms", "step": 3, "stream": {"block0": 1.5}, "note": "x"}) == \
        {"norms/stream/block0": 1.5}
    assert reporting.scalars({"kind": "summary", "step": 3, "tokens_per_s": 10.0}) == {}
    assert reporting.scalars({"kind": "train", "step": 1, "loss": 2, "flag": True}) == {"train/loss": 2.0}


# ---------------------------------------------------------------------------------------------------------------
# okadfa compare, okadfa bench

def _run(*argv):
    return subprocess.run([sys.executable, "-m", "okadfa.training.cli", *argv], capture_output=True, text=True)


def test_compare_help_lists_the_train_options_it_forwards():
    run = _run("compare", "--help")
    assert run.returncode == 0
    forwarded = run.stdout[run.stdout.index("okadfa train options, passed on to every variant"):]
    for option in ("--preset", "--steps", "--batch-size", "--lr", "--report-to", "--set FIELD=VALUE"):
        assert option in forwarded, option
    listed = set(re.findall(r"^  (--[\w-]+)", forwarded, re.M))
    assert {"--preset", "--steps", "--data"} <= listed
    assert not listed & {"--attention", "--training", "--resume", "--overwrite"}     # compare sets these itself


def test_compare_says_which_files_it_wrote(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from okadfa.training.compare import main as compare
    _fake_run(tmp_path / "favor+bp", "favor+bp", cut_last_line=False)
    compare(["--out", str(tmp_path), "--variants", "favor+bp", "--report-only"])
    wrote = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote "))
    assert "val_loss.png" in wrote and "matplotlib" not in wrote
    assert (tmp_path / "val_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_without_matplotlib_says_there_are_no_plots(tmp_path, capsys, monkeypatch):
    from okadfa.training.compare import main as compare
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _fake_run(tmp_path / "favor+bp", "favor+bp", cut_last_line=False)
    compare(["--out", str(tmp_path), "--variants", "favor+bp", "--report-only"])
    wrote = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote "))
    assert ".png" not in wrote and "no plots: matplotlib is not installed" in wrote
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "report.md").exists()


def test_okadfa_help_lists_bench_and_bench_has_its_own_help():
    assert "bench     microbenchmarks" in _run("--help").stdout
    run = _run("bench", "--help")
    assert run.returncode == 0 and run.stdout.startswith("usage: okadfa bench")
    bad = _run("bench", "--max-t", "0")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--max-t" in bad.stderr
    debug = _run("--debug", "bench", "--replot", "--out", "no-such-dir")       # --debug reaches bench too
    assert debug.returncode == 0, debug.stderr
