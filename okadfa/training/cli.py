"""The `okadfa` console script: `okadfa [--debug] {train,compare,bench} ...`.

Also the pieces every command shares: argparse types that refuse nonsense numbers naming the
option (`positive_int`, `nonnegative_int`, `positive_float`, `nonnegative_float`, `fraction`),
and `run_command`, which turns a user error into one line on stderr (SystemExit with a message,
or argparse's error) and keeps tracebacks for real bugs behind `--debug`.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import traceback

USAGE = """usage: okadfa [--debug] {train,compare,bench} [options]   (okadfa <command> --help for the options)
       okadfa --version

  train     train an OKADFA language model on text
  compare   train one preset four ways (FAVOR+/softmax x DFA/backprop) and write a report
  bench     microbenchmarks of this machine: FAVOR+ attention against SDPA, the DFA head (okadfa.bench.report)

  --debug   print the full traceback of any error (also: OKADFA_DEBUG=1). Without it a user
            error (a bad option value, a missing data source, an --out in use) is one line,
            and an unexpected exception is one line saying it is a bug."""

DEBUG_HELP = ("print the traceback of any error (default: a user error is one line, an unexpected exception "
              "one line saying it is a bug); also OKADFA_DEBUG=1")


# ----------------------------------------------------------------------------------------------------------------
# argparse with errors that carry their message

class UsageError(SystemExit):
    """argparse's error as an exception: exit status 2 (`code`), and the message as its text, so that a caller
    catching SystemExit (or pytest.raises(SystemExit, match=...)) sees what was wrong."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose error() prints one line, "prog: error: ... (prog --help lists the options)"
    (no usage block), then raises UsageError (status 2) holding that line."""

    def error(self, message):
        line = f"{self.prog}: error: {one_line(message)} ({self.prog} --help lists the options)"
        print(line, file=sys.stderr, flush=True)
        raise UsageError(line)


# ----------------------------------------------------------------------------------------------------------------
# argparse types: each raises ArgumentTypeError, which argparse prints as "argument --name: <message>"

def _integer(text) -> int:
    text = str(text).strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(text)


def _real(text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _ranged(parse, accept, what: str):
    """An argparse type: parse(text), kept if accept(value), else an error saying `what`."""
    def check(text):
        value = parse(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return check


positive_int = _ranged(_integer, lambda x: x >= 1, "a positive integer (>= 1)")
nonnegative_int = _ranged(_integer, lambda x: x >= 0, "a non-negative integer (>= 0)")
seed_int = _ranged(_integer, lambda x: 0 <= x < 2 ** 63, "an integer in [0, 2**63)")
positive_float = _ranged(_real, lambda x: x > 0, "a positive number (> 0)")
nonnegative_float = _ranged(_real, lambda x: x >= 0, "a non-negative number (>= 0)")
fraction = _ranged(_real, lambda x: 0 <= x < 1, "in [0, 1)")        # e.g. Adam's beta2


def device_name(text) -> str:
    """"auto", "cpu", "cuda" or "cuda:N" (N an existing GPU)."""
    text = str(text).strip()
    if text in ("auto", "cpu"):
        return text
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    import torch
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (use cpu or auto)")
    if index and int(index) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return text


# ----------------------------------------------------------------------------------------------------------------
# Running a command

def one_line(text) -> str:
    """text with its line breaks folded, for a one-line error message."""
    return " ".join(str(text).split())


def debug_requested(argv) -> bool:
    """--debug on the command line (before a bare "--") or OKADFA_DEBUG set to a true value."""
    argv = list(argv)
    if "--" in argv:
        argv = argv[:argv.index("--")]
    return "--debug" in argv or os.environ.get("OKADFA_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def run_command(name: str, fn, argv) -> int:
    """fn(argv) as the program `okadfa <name>`: its return value is the exit status. A SystemExit
    (argparse's errors and the commands' own one-line user errors) passes through; Ctrl-C outside
    the training loop's own handling is exit status 130; any other exception is a bug: one line
    (with the hint to rerun with --debug), or, with --debug, the traceback. With --debug a user
    error also prints the traceback of where it was raised."""
    argv = list(argv)
    debug = debug_requested(argv)
    try:
        status = fn(argv)
        return 0 if status is None else int(status)
    except SystemExit as exc:
        if debug and exc.code not in (None, 0) and not isinstance(exc.code, int):
            traceback.print_exc()
        raise
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"okadfa {name}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the point: no traceback for the user unless --debug
        if debug:
            raise
        print(f"okadfa {name}: internal error (a bug; rerun with --debug for the traceback): "
              f"{type(exc).__name__}: {one_line(exc)}", file=sys.stderr, flush=True)
        return 1


def _train(argv):
    from .train import cli
    return cli(argv)


def _compare(argv):
    from .compare import main as compare
    compare(argv)
    return 0


def _bench(argv):
    from ..bench.report import main as bench
    bench(argv, prog="okadfa bench")
    return 0


COMMANDS = {"train": _train, "compare": _compare, "bench": _bench}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = False
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if argv and argv[0] in ("-V", "--version"):
        import torch
        from okadfa import __version__
        print(f"okadfa {__version__} (torch {torch.__version__})")
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"okadfa: error: unknown command {argv[0]!r}: choose from {', '.join(COMMANDS)} (okadfa --help)",
                  file=sys.stderr)
            return 2
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if debug and "--debug" not in rest:
        rest = ["--debug"] + rest
    return run_command(command, COMMANDS[command], rest)


if __name__ == "__main__":
    sys.exit(main())
