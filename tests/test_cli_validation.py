"""`okadfa train` / `okadfa compare` refuse nonsense in one line (issue 15, item 11): every numeric
option, every `--set FIELD=VALUE` (against the OKADFAConfig field types and the config's own
validation), the choices; user errors are one line without a traceback, `--debug` shows it."""
import os
import subprocess
import sys

import pytest

import okadfa.training.train as train_mod

SMALL = ["--set", "n_layers=1", "--set", "d_model=16", "--set", "n_heads=2", "--set", "nb_features=8",
         "--max-bytes", "20000", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress",
         "--sample-tokens", "0", "--threads", "1"]

BAD_OPTIONS = [
    ("--stop-after", "0"), ("--stop-after", "-3"), ("--ckpt-every", "-1"), ("--grad-clip", "-1"),
    ("--grad-clip", "inf"), ("--warmup", "-5"), ("--warmup", "2.5"), ("--steps", "0"), ("--steps", "abc"),
    ("--steps", "1e3"), ("--batch-size", "0"), ("--batch-size", "-4"), ("--seq-len", "0"), ("--lr", "0"),
    ("--lr", "-1e-3"), ("--lr", "nan"), ("--lr", "inf"), ("--eval-every", "0"), ("--log-every", "-1"),
    ("--eval-batches", "0"), ("--threads", "0"), ("--threads", "-2"), ("--max-bytes", "0"),
    ("--max-bytes", "-100"), ("--sample-tokens", "-1"), ("--align-every", "-1"), ("--weight-decay", "-0.1"),
    ("--weight-decay", "nan"), ("--adam-beta2", "1"), ("--adam-beta2", "-0.1"), ("--adam-beta2", "nan"),
    ("--ortho-lambda", "-1"), ("--ortho-lambda", "nan"), ("--ortho-warmup", "-1"), ("--seed", "-1"),
    ("--seed", "x"), ("--preset", "huge"), ("--device", "gpu0"), ("--device", "cuda:x"), ("--precision", "fp8"),
    ("--precision", "float16"), ("--precision", "BF16"), ("--precision", ""),
]


def _error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return [line for line in err.splitlines() if "error:" in line]


@pytest.mark.parametrize("option,value", BAD_OPTIONS, ids=[f"{o}={v}" for o, v in BAD_OPTIONS])
def test_bad_option_values_are_refused_naming_the_option(option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        train_mod.parse_args([option, value])
    assert exc.value.code == 2
    lines = _error_line(capsys)
    assert len(lines) == 1 and option in lines[0], lines


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_choices_parse(precision):
    assert train_mod.parse_args(["--precision", precision]).precision == precision
    assert train_mod.parse_args([]).precision == "fp32"


def test_a_precision_torch_would_not_autocast_is_refused_naming_the_option(monkeypatch, capsys):
    """torch only warns and trains in float32 when it cannot autocast to a dtype on the device; okadfa train
    refuses instead, in one line (here with a stand-in dtype no device autocasts to)."""
    import torch

    from okadfa.training import precision as precision_mod
    monkeypatch.setitem(precision_mod.PRECISIONS, "fp16", torch.float64)
    with pytest.raises(SystemExit) as exc:
        train_mod.parse_args(["--device", "cpu", "--precision", "fp16"])
    assert exc.value.code == 2
    lines = _error_line(capsys)
    assert len(lines) == 1 and "--precision" in lines[0] and "cannot autocast" in lines[0], lines


BAD_SETS = [
    ("n_layers=abc", "n_layers"), ("d_model=128.0", "d_model"), ("nb_features=true", "nb_features"),
    ("d_ff=-5", "d_ff"), ("d_ff=0", "d_ff"), ("d_ff=1.5", "d_ff"), ("n_heads=0", "n_heads"), ("n_heads=3", "n_heads"),
    ("redraw_interval=0", "redraw_interval"), ("redraw_interval=-2", "redraw_interval"), ("norm=middle", "norm"),
    ("tie_weights=maybe", "tie_weights"), ("point_norm=2", "point_norm"), ("ortho_lambda=nan", "ortho_lambda"),
    ("ortho_lambda=-1", "ortho_lambda"), ("feedback_seed=-1", "feedback_seed"), ("feature_seed=0.5", "feature_seed"),
    ("backend=gpu", "backend"), ("vocab_size=100", "vocab_size"), ("max_seq_len=8", "max_seq_len"),
    ("n_layers=none", "n_layers"), ("attention=linear", "attention"), ("no_such_field=3", "FIELD=VALUE"),
    ("n_layers", "FIELD=VALUE"), ("=3", "FIELD=VALUE"),
]


@pytest.mark.parametrize("item,name", BAD_SETS, ids=[s for s, _ in BAD_SETS])
def test_bad_set_values_are_refused_before_torch_sees_them(item, name, capsys):
    """A --set value of the wrong type or out of range never reaches torch: one argparse error
    naming the field (checked against OKADFAConfig's field types and its own validation)."""
    with pytest.raises(SystemExit) as exc:
        train_mod.parse_args(["--seq-len", "16", "--set", item])
    assert exc.value.code == 2
    lines = _error_line(capsys)
    assert len(lines) == 1 and "--set" in lines[0] and name in lines[0], lines


def test_good_set_values_keep_their_types():
    args = train_mod.parse_args(["--seq-len", "16", "--set", "n_layers=2", "--set", "tie_weights=false",
                                 "--set", "d_ff=none", "--set", "redraw_interval=100", "--set", "ortho_lambda=1",
                                 "--set", "norm=pre", "--set", "point_norm=TRUE", "--set", "max_seq_len=64"])
    config = train_mod.build_config(args, 256)
    assert (config.n_layers, config.tie_weights, config.d_ff, config.redraw_interval) == (2, False, None, 100)
    assert isinstance(config.ortho_lambda, float) and config.ortho_lambda == 1.0
    assert (config.norm, config.point_norm, config.max_seq_len) == ("pre", True, 64)


def _okadfa(*argv, env=None, timeout=120):
    env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "okadfa.training.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_user_errors_are_one_line_without_traceback(tmp_path):
    """Through the `okadfa` command: a wrong --set type (which used to fail inside torch), a bad
    option value and a missing data source each print one line; --debug adds the traceback."""
    env = {"OKADFA_CACHE_DIR": str(tmp_path / "cache")}
    for argv in (["train", *SMALL, "--set", "n_layers=abc", "--out", str(tmp_path / "a")],
                 ["train", *SMALL, "--stop-after", "0", "--out", str(tmp_path / "b")],
                 ["train", *SMALL, "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c")]):
        run = _okadfa(*argv, env=env)
        assert run.returncode in (1, 2) and "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "missing.txt" in run.stderr and "does not exist" in run.stderr
    debug = _okadfa("--debug", "train", *SMALL, "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c"),
                    env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "missing.txt" in debug.stderr


def test_debug_is_documented_in_help():
    top = _okadfa("--help")
    assert top.returncode == 0 and "--debug" in top.stdout + top.stderr
    train_help = _okadfa("train", "--help")
    assert train_help.returncode == 0 and "--debug" in train_help.stdout


def test_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    """A second `okadfa train` into an --out holding a run fails in one line and changes nothing;
    --overwrite replaces the run; --resume continues it; --resume with --overwrite is refused."""
    env = {"OKADFA_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--steps", "2", "--eval-every", "2", "--out", str(out)]
    assert _okadfa(*argv, env=env).returncode == 0
    before = (out / "metrics.jsonl").read_bytes()
    again = _okadfa(*argv, env=env)
    assert again.returncode == 1 and "holds a run" in again.stderr and "--overwrite" in again.stderr, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and (out / "metrics.jsonl").read_bytes() == before
    assert _okadfa(*argv, "--overwrite", env=env).returncode == 0
    assert (out / "metrics.jsonl").read_text().count('"kind": "config"') == 1
    assert _okadfa(*argv[:-6], "--steps", "3", "--eval-every", "3", "--out", str(out), "--resume",
                   env=env).returncode == 0
    both = _okadfa(*argv, "--resume", "--overwrite", env=env)
    assert both.returncode == 2 and "not allowed with" in both.stderr, both.stderr


def test_version():
    import okadfa
    run = _okadfa("--version")
    assert run.returncode == 0 and run.stdout.startswith(f"okadfa {okadfa.__version__} (torch "), run.stdout


def test_compare_validates_train_options_before_running_any_variant(tmp_path):
    """A bad value forwarded by `okadfa compare` fails at once, in one line, before any variant runs
    (it used to fail inside the first variant's process and end in a CalledProcessError traceback)."""
    env = {"OKADFA_CACHE_DIR": str(tmp_path / "cache")}
    for bad in (["--steps", "0"], ["--set", "d_model=12.5"], ["--grad-clip", "-1"], ["--stepz", "3"],
                ["--set", "attention=softmax"]):
        run = _okadfa("compare", "--out", str(tmp_path / "cmp"), "--variants", "favor+dfa", *SMALL, *bad, env=env)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert bad[0] in run.stderr or bad[1].split("=")[0] in run.stderr, run.stderr
        assert not (tmp_path / "cmp" / "favor+dfa").exists()


def test_compare_own_options_are_validated(tmp_path, capsys):
    from okadfa.training.compare import main as compare
    for bad in (["--variants", "favor+xyz"], ["--variants", ","], ["--precision", "fp8"]):
        with pytest.raises(SystemExit) as exc:
            compare(["--out", str(tmp_path), *bad])
        assert exc.value.code == 2 and bad[0] in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no metrics"):
        compare(["--out", str(tmp_path / "nothing"), "--variants", "favor+dfa", "--report-only"])
