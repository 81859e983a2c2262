"""`okadfa train` / `python -m okadfa.training.train`: train an OKADFA language model on text.

    okadfa train --preset tiny --attention favor --training dfa --steps 500 --out runs/tiny
    okadfa train --out runs/tiny --resume                       # continue from runs/tiny/checkpoint.safetensors
    torchrun --nproc-per-node 2 -m okadfa.training.train ...             # DistributedDataParallel (gloo/nccl)

Data (okadfa.training.data): `--data stdlib` (default: the Python standard library's own
source, byte-level, no download), `wikitext-2`, `wikitext-103`, a WikiText raw
directory, or any text file or folder; `--tokenizer gpt2` for GPT-2 BPE (tiktoken,
local files only).

The batch at step s is drawn from (seed, s) alone and `--batch-size` is the global
batch: rank r of N trains on its own 1/N of the rows, so a run gives the same
updates (to fp32 rounding) on any number of ranks, and resumes on a different one.
FAVOR+ feature redraws and DFA feedback are seeded from the config (and the step),
so replicas never diverge.

`--precision bf16` or `fp16` runs every forward pass (training, validation, the
sample) and the loss under torch.autocast, on the CPU or a GPU, with float32 master
weights: parameters, gradients and AdamW state stay float32. fp16 adds loss scaling
(torch.amp.GradScaler, unscaled before --grad-clip; the DFA signals are scaled with
every other gradient). The DFA head computes in bf16 under bf16, in float32 under
fp16 (okadfa.dfa says why); the orthogonality penalty always in float32
(okadfa.ortho). The DFA/BP alignment and the norm diagnostics run in float32, so runs
in different precisions are measured alike. A run resumes only in the precision it
was trained in (else a one-line error), and then bit-identically to an uninterrupted
run (okadfa.training.precision).

Writes to --out: metrics.jsonl (one JSON object per line: "config" (with
"precision"), "baselines" (unigram and bigram levels of the evaluated tokens),
"train" ("loss": the step's own, "loss_smoothed": the mean of the last 20 steps; fp16:
with "loss_scale"), "val", "norms" (activation norms per feedback
point and block, at every evaluation), "align" (DFA/BP cosine per block: all
parameters, residual writers, matrices, LayerNorm and biases), "summary" (with
"precision"; fp16: "skipped_steps", the updates the loss scaler skipped because a
gradient overflowed) records), checkpoint.safetensors (with the precision and the
loss scaler's state; every --ckpt-every steps, at the end and on Ctrl-C / SIGTERM:
the first signal stops after the current step), sample.txt (generated text), and with
--report-to tensorboard the same scalars as TensorBoard events in OUT/tensorboard (--report-to wandb:
to Weights & Biases; okadfa.training.reporting).
Validation reports loss, perplexity and bits per byte (exact for byte data; for BPE
from the split's bytes per token).

One run per --out: the run holds an exclusive lock on OUT/.lock (with its PID), so a
second run into the same directory fails at once, naming it and that PID; the lock
goes with the process however it ends. An --out holding an earlier run is refused unless
--resume continues it or --overwrite replaces it. Every option value and every --set FIELD=VALUE
(against the OKADFAConfig field's type and the config's own validation) is checked
before anything runs; a user error is one line (exit status 2 for a bad option, 1
otherwise), `okadfa --debug train ...` (or --debug, or OKADFA_DEBUG=1) prints tracebacks.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
import typing

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .cli import (DEBUG_HELP, ArgumentParser, device_name, fraction, nonnegative_float, nonnegative_int, one_line,
                  positive_float, positive_int, run_command, seed_int)
from .data import get_batch, get_tokenizer, load_corpus, ngram_levels, val_batches
from . import reporting
from .files import write_text
from .precision import PRECISIONS, autocast, check as check_precision, grad_scaler
from ..backends import select_backend
from ..diagnostics import activation_norms, mean_alignment
from ..models import _PRESETS, OKADFAConfig, OKADFAModel

__all__ = ["main", "train", "build_parser", "parse_args", "learning_rate", "build_config", "parse_overrides", "run_lock",
           "OPTIMIZER_DEFAULTS"]


# AdamW settings per training rule (betas (0.9, adam_beta2)), measured on the tiny preset (1000 steps):
# bench/results/dfa_sweep_bundle.md (learning rate and warm-up, the fraction of --steps) and
# dfa_sweep_one.md (the rest).
OPTIMIZER_DEFAULTS = {
    "dfa": dict(lr=6e-3, warmup_fraction=0.2, weight_decay=0.1, adam_beta2=0.95, grad_clip=1.0),
    "bp": dict(lr=3e-3, warmup_fraction=0.2, weight_decay=0.1, adam_beta2=0.95, grad_clip=1.0),
}


# The vocabulary of each --tokenizer, to validate a configuration before any data is loaded.
TOKENIZER_VOCAB = {"bytes": 256, "gpt2": 50257}


def _reporters(text) -> list[str]:
    try:
        return reporting.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _nonempty(value) -> str:
    if not str(value).strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return str(value)


def build_parser(prog: str = "okadfa train") -> ArgumentParser:
    """The argument parser of `okadfa train` (parse_args adds the checks across options)."""
    p = ArgumentParser(prog=prog, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(_PRESETS), default="tiny", help="model size (default tiny)")
    p.add_argument("--attention", choices=("favor", "softmax"), default="favor")
    p.add_argument("--training", choices=("dfa", "bp"), default="dfa")
    p.add_argument("--error", choices=("hidden", "logits", "stream"), default="hidden",
                   help="DFA error: at the final hidden state, the logits, or before the final norm")
    p.add_argument("--ortho-lambda", type=nonnegative_float, default=0.0, help="orthogonality penalty weight (>= 0)")
    p.add_argument("--ortho-warmup", type=nonnegative_int, default=0, help="steps of linear warm-up of the penalty")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any OKADFAConfig field, e.g. --set n_layers=2 (repeatable); the value must have "
                        "the field's type (int, float, true/false, a choice, or none where the field allows it)")
    p.add_argument("--data", type=_nonempty, default="stdlib",
                   help="stdlib | wikitext-2 | wikitext-103 | PATH (a regular file or a directory; default stdlib)")
    p.add_argument("--tokenizer", choices=tuple(TOKENIZER_VOCAB), default="bytes",
                   help="bytes, or gpt2 (tiktoken; local cache files only, never downloaded)")
    p.add_argument("--max-bytes", type=positive_int, default=None,
                   help="cap on the text read (stdlib: 16 MiB by default; WikiText: the training split)")
    p.add_argument("--steps", type=positive_int, default=500, help="total optimizer steps")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="stop with a checkpoint after N steps of this run (the LR schedule still spans --steps)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="global batch (sequences per step, all ranks)")
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (AdamW; default by --training, below)")
    p.add_argument("--warmup", type=nonnegative_int, default=None, help="linear LR warm-up steps (default steps/5)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=None, help="AdamW weight decay of matrices")
    p.add_argument("--adam-beta2", type=fraction, default=None, help="AdamW's second-moment decay β2, in [0, 1)")
    p.add_argument("--grad-clip", type=nonnegative_float, default=None, help="max gradient norm (0: off)")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto | cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="fp32 (default) | bf16 | fp16: forward passes and loss under torch.autocast in that dtype "
                        "(CPU and CUDA); parameters, gradients and AdamW state stay float32; fp16 adds loss scaling "
                        "(torch.amp.GradScaler). Recorded in metrics.jsonl and the checkpoint; --resume needs the "
                        "checkpoint's precision")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads per process")
    p.add_argument("--seed", type=seed_int, default=0, help="initialisation and data order")
    p.add_argument("--out", type=_nonempty, default="runs/okadfa",
                   help="output directory (one run at a time: it is locked while a run uses it)")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                      help="resume from CHECKPOINT (default: OUT/checkpoint.safetensors)")
    runs.add_argument("--overwrite", action="store_true",
                      help="replace the run already in --out (its " + ", ".join(RUN_FILES) + "); without it or "
                           "--resume, an --out that holds a run is refused")
    p.add_argument("--log-every", type=positive_int, default=10, help="a train record every N steps (default 10)")
    p.add_argument("--eval-every", type=positive_int, default=100, help="validation every N steps (default 100)")
    p.add_argument("--eval-batches", type=positive_int, default=8, help="validation batches per evaluation (default 8)")
    p.add_argument("--align-every", type=nonnegative_int, default=0,
                   help="DFA/BP gradient alignment every N steps on fixed validation batches (DFA only; 0: off)")
    p.add_argument("--ckpt-every", type=nonnegative_int, default=0,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--sample-tokens", type=nonnegative_int, default=200,
                   help="tokens of text generated at the end (0: none)")
    p.add_argument("--no-progress", action="store_true",
                   help="log lines (every --log-every steps) instead of a progress bar; the bar is tqdm's when tqdm "
                        "is installed, and only drawn on a terminal or in a notebook")
    p.add_argument("--report-to", type=_reporters, default=[], metavar="NAMES",
                   help="also send the metrics to tensorboard (OUT/tensorboard) and/or wandb: a comma list, or none "
                        "(default); the package must be installed")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


def parse_args(argv=None, prog: str = "okadfa train") -> argparse.Namespace:
    """The options of `okadfa train`. Every value is checked here (argparse types, then the --set
    fields against OKADFAConfig), so nonsense fails at once, in one line naming the option."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    defaults = dict(OPTIMIZER_DEFAULTS[args.training])
    if args.warmup is None:
        args.warmup = max(1, round(args.steps * defaults["warmup_fraction"]))
    del defaults["warmup_fraction"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        build_config(args, TOKENIZER_VOCAB[args.tokenizer], usage=True)
    except ValueError as exc:
        p.error(f"argument --set: {one_line(exc)}")
    try:
        check_precision(args.precision, resolve_device(args.device))
    except ValueError as exc:
        p.error(f"argument --precision: {args.precision}: {one_line(exc)}")
    return args


def resolve_device(name: str) -> str:
    """--device with "auto" resolved: cuda when available, else cpu."""
    return name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


def learning_rate(step: int, args) -> float:
    """Linear warm-up to --lr over --warmup steps, then cosine decay to lr/10 at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


# Ranges of the OKADFAConfig fields that OKADFAConfig.__post_init__ does not check itself (everything else is left
# to its own validation): (least, bound) with bound exclusive. feature_seed is bounded so that the FAVOR+ redraw
# seeds (feature_seed·1009 + block)·1000003 + redraw stay within torch's 63-bit generator seeds.
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _field_types() -> dict:
    return typing.get_type_hints(OKADFAConfig)


def _parse_field(name: str, text: str, hint):
    """The value of --set name=text as the field's declared type (int, float, bool, str, or X | None)."""
    options = typing.get_args(hint) or (hint,)
    optional = type(None) in options
    base = next(t for t in options if t is not type(None))
    if optional and text.lower() in ("none", "null"):
        return None
    or_none = " or none" if optional else ""
    if base is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{name}={text!r}: expected true or false{or_none}")
    if base is int:
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ValueError(f"{name}={text!r}: expected an integer{or_none}")
        return int(text)          # its range: OKADFAConfig's own validation
    if base is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name}={text!r}: expected a number{or_none}") from None
        if not math.isfinite(value):
            raise ValueError(f"{name}={text!r}: expected a finite number{or_none}")
        return value
    if not text:
        raise ValueError(f"{name}=: expected a value")
    return text


def parse_overrides(items) -> dict:
    """{field: value} of --set FIELD=VALUE items, each value of its OKADFAConfig field's type; ValueError
    (naming the field) for an unknown field or a value of another type."""
    hints, out = _field_types(), {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or key not in hints:
            raise ValueError(f"{item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(hints))}")
        out[key] = _parse_field(key, text.strip(), hints[key])
    return out


def build_config(args, vocab_size: int, *, usage: bool = False) -> OKADFAConfig:
    """The model config of the options and --set overrides, checked by OKADFAConfig's own validation and
    against the tokenizer's vocabulary and --seq-len. SystemExit naming the problem (ValueError if usage)."""
    overrides = dict(attention=args.attention, training=args.training, error=args.error, max_seq_len=args.seq_len,
                     ortho_lambda=args.ortho_lambda, ortho_warmup=args.ortho_warmup, vocab_size=vocab_size)
    try:
        overrides.update(parse_overrides(args.set))
        config = OKADFAConfig.preset(args.preset, **overrides)
        if config.vocab_size < vocab_size:
            raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size}")
        if config.max_seq_len < args.seq_len:
            raise ValueError(f"max_seq_len {config.max_seq_len} is smaller than --seq-len {args.seq_len}")
        try:                            # the backend's own check: a known name that can run on --device
            select_backend(config.backend, torch.device(resolve_device(args.device)))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"backend={config.backend!r}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        if usage:
            raise ValueError(str(exc)) from exc
        raise SystemExit(f"okadfa train: --set: {one_line(exc)}") from exc
    return config


class run_lock:
    """`with run_lock(directory, what):` holds an exclusive, non-blocking flock on DIRECTORY/.lock (holding the
    PID) for the block; a second holder fails at once with SystemExit naming the directory and that PID. The
    kernel drops the lock when the process dies, however it dies; a clean exit also removes the file."""

    def __init__(self, directory: str, what: str = "okadfa train"):
        self.directory, self.what = str(directory), what
        self.path, self.fd = os.path.join(self.directory, ".lock"), None

    def __enter__(self):
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise SystemExit(f"{self.what}: cannot create the lock file {self.path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise SystemExit(f"{self.what}: --out {self.directory} is in use by another run "
                                 f"({f'PID {holder}' if holder else 'a process'} holds {self.path}): wait for it to "
                                 f"finish or choose another --out") from None
            except OSError as exc:
                os.close(fd)
                raise SystemExit(f"{self.what}: cannot lock {self.path}: {exc.strerror}") from exc
            try:                        # still the file at that path (a finishing run unlinks it)?
                here, mine = os.stat(self.path), os.fstat(fd)
                if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise SystemExit(f"{self.what}: cannot lock {self.path}: it keeps being replaced")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd) -> int | None:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        except OSError:
            return None

    def __exit__(self, *exc):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


class _Distributed:
    """Rank, world size and device; initialises the process group under torchrun."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device)
        if device == "cuda" and self.world > 1:
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        self.device = torch.device(device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks."""
        if self.world > 1:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world
        return value.item()

    def close(self):
        """Destroy the process group. Free any DDP wrapper first: if the reducer holds the last reference to a gloo
        group, the group is destroyed with the GIL held while its worker threads may need the GIL to free a tensor,
        and the process hangs at exit (seen here about one run in five; pytorch/pytorch#56297)."""
        if self.world > 1 and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


class _StopSignal:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second one interrupts."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step (again to abort)", file=sys.stderr,
              flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Progress:
    """What the run shows while it trains (rank 0): a progress bar, or plain log lines every `every` steps.

    The bar is tqdm's (tqdm.auto: a widget in a notebook) when tqdm is installed, else a one-line bar of our
    own; it is drawn only when `bar` (stderr is a terminal, or a notebook runs us, and no --no-progress)."""

    def __init__(self, total: int, initial: int, every: int, enabled: bool, bar: bool):
        self.total, self.every, self.enabled, self.bar = total, every, enabled, bar
        self.tqdm = None
        if enabled and bar:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.tqdm = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                                 desc="train")

    def update(self, step: int, loss: float, smoothed: float, window: int, tok_s: float, eta_s: float):
        if not self.enabled:
            return
        text = f"loss {loss:.3f} (mean of last {window} {smoothed:.3f}) · {tok_s / 1e3:.1f}k tok/s"
        if self.tqdm is not None:
            self.tqdm.set_postfix_str(text, refresh=False)
            self.tqdm.update(step - self.tqdm.n)
        elif self.bar:
            width = 24
            filled = int(width * step / self.total)
            print(f"\rstep {step}/{self.total} |{'█' * filled}{'·' * (width - filled)}| {text} · ETA {_clock(eta_s)}",
                  end="", file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} {text} · ETA {_clock(eta_s)}", file=sys.stderr, flush=True)

    def message(self, text: str):
        """A line of its own (stdout), above the bar."""
        if not self.enabled:
            return
        if self.tqdm is not None:
            self.tqdm.write(text, file=sys.stdout)
            return
        if self.bar:
            print("\r\033[K", end="", file=sys.stderr, flush=True)     # clear our bar's line (on stderr)
        print(text, flush=True)

    def close(self):
        """End the bar's line (once; later messages print as plain lines)."""
        if self.tqdm is not None:
            self.tqdm.close()
            self.tqdm = None
        elif self.enabled and self.bar:
            print(file=sys.stderr, flush=True)
        self.bar = False


def _show_bar(args) -> bool:
    """A progress bar: unless --no-progress, on a terminal or in a notebook (ipykernel)."""
    return not args.no_progress and (sys.stderr.isatty() or "ipykernel" in sys.modules)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(MB, what): CUDA peak allocated bytes on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


@torch.no_grad()
def evaluate(model, corpus, args, device) -> dict:
    """Mean validation cross-entropy over --eval-batches batches (in --precision); perplexity; bits per byte."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in val_batches(corpus.val, args.batch_size, args.seq_len, args.eval_batches):
        with autocast(args.precision, device):
            loss = model(x.to(device), y.to(device)).loss
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    loss = total / count
    tokens_per_byte = len(corpus.val) / corpus.val_bytes
    return {"loss": loss, "ppl": math.exp(min(loss, 700)), "bpb": loss * tokens_per_byte / math.log(2)}


def _optimizer(model, args):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, args.adam_beta2))


RUN_FILES = ("metrics.jsonl", "checkpoint.safetensors", "sample.txt")     # what a run writes into --out
SMOOTHING = 20          # the train records' loss_smoothed and the summary's train_loss: mean of the last 20 steps


def main(argv=None) -> dict:
    """Train; returns the summary record (also the last line of metrics.jsonl)."""
    return train(parse_args(argv))[1]


def _lock_out(args, ddp) -> run_lock | None:
    """Create --out and lock it (rank 0; every rank fails together when it is in use, or holds an earlier
    run that is neither resumed nor to be overwritten)."""
    lock, failure = None, None
    if ddp.main:
        try:
            os.makedirs(args.out, exist_ok=True)
            lock = run_lock(args.out, "okadfa train").__enter__()
            earlier = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
            if earlier and not args.resume and not args.overwrite:
                raise SystemExit(f"okadfa train: --out {args.out} holds a run ({', '.join(earlier)}): continue it "
                                 f"with --resume, or replace it with --overwrite")
            for f in earlier if args.overwrite else ():
                os.remove(os.path.join(args.out, f))
            if args.overwrite:              # the replaced run's TensorBoard events would be drawn with the new ones
                shutil.rmtree(os.path.join(args.out, "tensorboard"), ignore_errors=True)
        except OSError as exc:
            failure = SystemExit(f"okadfa train: --out {args.out}: {exc.strerror or exc}")
        except SystemExit as exc:
            failure = exc
        if failure is not None and lock is not None:
            lock.__exit__(None, None, None)
            lock = None
    if ddp.any(failure is not None):
        raise failure or SystemExit(f"okadfa train: rank {ddp.rank}: rank 0 could not lock --out {args.out}")
    return lock


def _open_metrics(path: str):
    """metrics.jsonl opened for appending; a last line cut by a killed run is ended first, so that the
    first record of this run stays a line of its own."""
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")              # append mode: at the end
    return open(path, "a")


def _load_data(args):
    """The tokenizer and corpus of --tokenizer / --data, or SystemExit saying what is wrong with them."""
    try:
        tokenizer = get_tokenizer(args.tokenizer)
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"okadfa train: --tokenizer {args.tokenizer}: {one_line(exc)}") from exc
    try:
        corpus = load_corpus(args.data, tokenizer=tokenizer, max_bytes=args.max_bytes)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"okadfa train: --data {args.data}: {one_line(exc)}") from exc
    for split, tokens in (("training", corpus.train), ("validation", corpus.val)):
        if len(tokens) < args.seq_len + 1:
            raise SystemExit(f"okadfa train: --seq-len {args.seq_len}: the {split} split of --data {args.data} has "
                             f"{len(tokens)} tokens, fewer than seq_len + 1; use a shorter --seq-len or more data")
    return corpus


def train(args: argparse.Namespace) -> tuple[OKADFAModel, dict]:
    """Run the training loop for parsed arguments; returns (model, summary record)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ddp = _Distributed(args.device)
    device = ddp.device
    if args.batch_size % ddp.world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the number of ranks ({ddp.world})")
    lock = _lock_out(args, ddp)
    try:
        return _train(args, ddp, device)
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _train(args, ddp, device):
    corpus = _load_data(args)
    config = build_config(args, corpus.vocab_size)
    torch.manual_seed(args.seed)
    model = OKADFAModel(config).to(device)
    optimizer = _optimizer(model, args)
    scaler = grad_scaler(args.precision, device)
    ckpt_path = os.path.join(args.out, "checkpoint.safetensors")
    step, train_s, tokens, skipped = 0, 0.0, 0, 0
    if args.resume:
        path = ckpt_path if args.resume == "auto" else args.resume
        if not os.path.exists(path):
            old = os.path.join(args.out, "checkpoint.pt")
            hint = (f" ({old} is a pickle checkpoint of an older okadfa, which is not loaded because unpickling "
                    f"can run code)" if args.resume == "auto" and os.path.exists(old) else "")
            raise SystemExit(f"--resume: no checkpoint at {path}{hint}")
        try:
            state = load_checkpoint(path, model, optimizer, precision=args.precision)
        except CheckpointError as exc:
            raise SystemExit(f"--resume: {one_line(exc)}") from None
        except OSError as exc:
            raise SystemExit(f"--resume: cannot read {path}: {exc.strerror or exc}") from None
        step, train_s, tokens = state["step"], state["extra"]["train_s"], state["extra"]["tokens"]
        skipped = state["extra"].get("skipped_steps", 0)
        if state["extra"].get("grad_scaler"):        # fp16: the loss scale and its growth counter
            scaler.load_state_dict(state["extra"]["grad_scaler"])
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp.world > 1 else model
    reporters = reporting.Reporters(args.report_to if ddp.main else [], args.out, config=vars(args),
                                    resume_step=step)
    metrics = _open_metrics(os.path.join(args.out, "metrics.jsonl")) if ddp.main else None
    progress = None
    try:
        def log(record):
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                reporters.log(record)

        def checkpoint():
            if ddp.main:
                try:
                    save_checkpoint(ckpt_path, model, optimizer, step=step, precision=args.precision,
                                    extra={"train_s": train_s, "tokens": tokens, "skipped_steps": skipped,
                                           "grad_scaler": scaler.state_dict(), "args": vars(args)})
                except OSError as exc:      # a full disk, a read-only --out: the environment, not a bug
                    raise SystemExit(f"okadfa train: writing the checkpoint failed: {one_line(exc)}") from exc

        log({"kind": "config", "step": step, "config": config.to_dict(), "args": vars(args),
             "precision": args.precision, "loss_scaling": scaler.is_enabled(), "world_size": ddp.world,
             "device": str(device), "parameters": model.num_parameters(), "corpus": corpus.name,
             "train_tokens": len(corpus.train), "val_tokens": len(corpus.val), "torch": torch.__version__})
        if ddp.main and step == 0:
            log({"kind": "baselines", "step": 0,
                 **ngram_levels(corpus.train, corpus.val, args.seq_len, args.batch_size * args.eval_batches)})
        probes = [tuple(t.to(device) for t in b) for b in val_batches(corpus.val, max(1, args.batch_size // 2),
                                                                       args.seq_len, 4)]
        tokens_per_step = args.batch_size * args.seq_len
        if ddp.main:
            print(_summary_line(args, config, model, corpus, device, ddp, step), flush=True)
        progress = _Progress(args.steps, step, args.log_every, ddp.main, bar=_show_bar(args))
        recent, start_step, start_s, interrupted, last_val = [], step, train_s, False, None
        model.train()
        with _StopSignal() as stop:
            while step < args.steps:
                t0 = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, args)
                x, y = get_batch(corpus.train, step, args.batch_size, args.seq_len, seed=args.seed, rank=ddp.rank,
                                 world_size=ddp.world)
                with autocast(args.precision, device):             # the backward runs in the forward's dtypes
                    loss = wrapped(x.to(device), y.to(device)).loss
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()           # fp16: every gradient, DFA signals included, times the scale
                if args.grad_clip > 0:
                    scaler.unscale_(optimizer)          # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                scale = scaler.get_scale()
                scaler.step(optimizer)                  # fp16: skipped when a gradient overflowed
                scaler.update()
                skipped += scaler.get_scale() < scale   # the scale backs off exactly when the step was skipped
                loss_value = ddp.mean(loss)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_s += time.perf_counter() - t0
                step += 1
                tokens += tokens_per_step
                recent = (recent + [loss_value])[-SMOOTHING:]
                smoothed = sum(recent) / len(recent)
                rate = tokens_per_step * (step - start_step) / max(train_s - start_s, 1e-9)
                eta_s = (args.steps - step) * tokens_per_step / rate
                progress.update(step, loss_value, smoothed, len(recent), rate, eta_s)
                if step % args.log_every == 0 or step == args.steps:
                    log({"kind": "train", "step": step, "loss": loss_value, "loss_smoothed": smoothed,
                         "lr": learning_rate(step - 1, args),
                         "tokens": tokens, "train_s": train_s, "tokens_per_s": tokens / train_s,
                         **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {})})
                if ddp.main and (step % args.eval_every == 0 or step == args.steps):
                    last_val = evaluate(model, corpus, args, device)
                    log({"kind": "val", "step": step, "train_s": train_s, "tokens": tokens, **last_val})
                    norms = activation_norms(model, probes[0][0])
                    log({"kind": "norms", "step": step, **norms})
                    progress.message(f"step {step}: val loss {last_val['loss']:.4f}  ppl {last_val['ppl']:.2f}  "
                                     f"bpb {last_val['bpb']:.3f}  largest block-output norm "
                                     f"{max(norms['stream'].values()):.3g}")
                if ddp.main and config.training == "dfa" and args.align_every and (
                        step % args.align_every == 0 or step == args.steps):
                    cosines = mean_alignment(model, probes)
                    log({"kind": "align", "step": step, "cosine": cosines.pop("all"), **cosines})
                if args.ckpt_every and step % args.ckpt_every == 0:
                    checkpoint()
                if ddp.any(stop.requested):
                    interrupted = step < args.steps
                    break
                if step - start_step == args.stop_after:
                    break
        progress.close()
        checkpoint()
        peak, what = peak_memory_mb(device)
        summary = {"kind": "summary", "step": step, "interrupted": interrupted, "train_loss": sum(recent) / len(recent)
                   if recent else None, "val": last_val, "train_s": train_s, "tokens": tokens,
                   "tokens_per_s": tokens / train_s if train_s else None, "peak_mem_mb": peak, "peak_mem_kind": what,
                   "world_size": ddp.world, "precision": args.precision,
                   **({"skipped_steps": skipped} if scaler.is_enabled() else {})}
        log(summary)
        if ddp.main:
            if step < args.steps:
                progress.message(f"stopped at step {step}; checkpoint {ckpt_path}; continue with --resume")
            elif args.sample_tokens:
                summary["sample"] = _sample(model, corpus, args, device)
            progress.message(f"done: step {step}, {summary['tokens_per_s'] or 0:.0f} tok/s, peak memory {peak:.0f} MB "
                             f"({what}); metrics in {os.path.join(args.out, 'metrics.jsonl')}")
    finally:           # also when a user error, Ctrl-C or a bug ends the run: flush what was logged
        if progress is not None:
            progress.close()
        reporters.close()
        if metrics:
            metrics.close()
    del wrapped
    ddp.close()
    return model, summary


def _count(n: float) -> str:
    """1234567 -> "1.23M", 999600 -> "1M": three significant digits, the suffix chosen after rounding."""
    value, suffix = float(n), ""
    for bigger in ("k", "M", "G"):
        if float(f"{value:.3g}") < 1000:
            break
        value, suffix = value / 1000, bigger
    return f"{value:.3g}{suffix}" if suffix else str(int(n))


def _summary_line(args, config, model, corpus, device, ddp, step) -> str:
    """What the run is, in one line, before it starts: model, data, schedule, device, output."""
    resumed = f", resuming at step {step}" if step else ""
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    ranks = f", {ddp.world} ranks" if ddp.world > 1 else ""
    return (f"okadfa train: {args.preset} {config.attention}+{config.training}, {_count(model.num_parameters())} "
            f"parameters | data {corpus.name} ({args.tokenizer}): {_count(len(corpus.train))} train / "
            f"{_count(len(corpus.val))} val tokens | {args.steps} steps of {args.batch_size}x{args.seq_len} tokens"
            f"{resumed} | {device}, {args.precision}{threads}{ranks} | out {args.out}")


def _sample(model, corpus, args, device) -> str:
    prompt = torch.as_tensor(corpus.val[:min(32, len(corpus.val))].astype("int64"), device=device)[None]
    g = torch.Generator(device=device).manual_seed(args.seed)
    with autocast(args.precision, device):
        ids = model.generate(prompt, args.sample_tokens, temperature=0.8, top_k=40, generator=g)
    text = corpus.tokenizer.decode(ids[0].tolist())
    write_text(os.path.join(args.out, "sample.txt"), text)
    split = len(corpus.tokenizer.decode(prompt[0].tolist()))
    print(f"--- sample (prompt | generated) ---\n{text[:split]}|{text[split:]}\n---", flush=True)
    return text


def cli(argv=None) -> int:
    summary = main(argv)
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(run_command("train", cli, sys.argv[1:]))
