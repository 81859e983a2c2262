"""The `okadfa` console script: `okadfa train ...`, `okadfa compare ...`."""
from __future__ import annotations

import sys

COMMANDS = {"train": "okadfa.training.train", "compare": "okadfa.training.compare"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: okadfa {train,compare} [options]   (okadfa <command> --help for the options)", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    if argv[0] == "train":
        from .train import cli
        return cli(argv[1:])
    from .compare import main as compare
    compare(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
