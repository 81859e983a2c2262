"""`--report-to tensorboard,wandb`: the scalars of metrics.jsonl, also sent to TensorBoard or Weights & Biases.

metrics.jsonl stays the record of a run; a reporter gets the same records (rank 0 only) and logs every number
of the "train", "val", "align" and "norms" records as a scalar named "<kind>/<field>" ("<kind>/<field>/<key>"
for a field holding a dict, e.g. norms/stream/block0) at the record's step.

tensorboard  torch.utils.tensorboard.SummaryWriter (needs the `tensorboard` package) into OUT/tensorboard; on
             --resume the events after the checkpoint's step are purged (those at it are kept: the resumed run
             does not log that step again), so a killed run's tail is not drawn twice.
wandb        wandb.init(project=$WANDB_PROJECT or "okadfa", name=the --out directory's name, dir=OUT,
             config=the run's config); WANDB_MODE=offline and the other WANDB_* variables apply as usual.

Each package is imported only when asked for; a missing one is a one-line error before training starts
(`parse`); one that fails to start (wandb not logged in, say) is a one-line error too.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

from .cli import one_line

REPORTERS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}
SCALAR_KINDS = ("train", "val", "align", "norms")


def parse(text: str) -> list[str]:
    """The reporters of a --report-to value: a comma list of REPORTERS, or "none" (nothing). ValueError for an
    unknown name or one whose package is not installed."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"{name!r}: choose from none, {', '.join(REPORTERS)} (a comma list)")
        module, install = REPORTERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"{name}: the {module} package is not installed ({install})")
    return list(dict.fromkeys(names))


def scalars(record: dict) -> dict[str, float]:
    """{"<kind>/<field>": value} of a metrics record's numbers (one level of dicts flattened); {} for the kinds
    that are not time series (config, baselines, summary)."""
    kind, out = record.get("kind"), {}
    if kind not in SCALAR_KINDS:
        return out
    for field, value in record.items():
        if field in ("kind", "step"):
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, number in items:
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                out[f"{kind}/{field}" + (f"/{key}" if key is not None else "")] = float(number)
    return out


class Reporters:
    """The chosen reporters of one run: `log(record)` for every metrics record, `close()` at the end."""

    def __init__(self, names, out: str, *, config: dict, resume_step: int = 0):
        self._writers = []
        for name in names:
            try:
                self._writers.append(self._start(name, out, config, resume_step))
            except Exception as exc:  # noqa: BLE001 - a reporter that cannot start is the environment, not a bug
                self.close()
                raise SystemExit(f"okadfa train: --report-to {name} could not start: {type(exc).__name__}: "
                                 f"{one_line(exc)}") from exc

    @staticmethod
    def _start(name, out, config, resume_step):
        """(write(values, step), close) of one reporter."""
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: events at steps >= it, a killed run's tail past the checkpoint, are dropped
            writer = SummaryWriter(os.path.join(out, "tensorboard"),
                                   purge_step=resume_step + 1 if resume_step else None)

            def write(values, step):
                for key, value in values.items():
                    writer.add_scalar(key, value, step)
            return write, writer.close
        wandb = importlib.import_module("wandb")
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "okadfa"),
                         name=os.path.basename(os.path.abspath(out)), dir=out, config=config)
        return (lambda values, step: run.log(values, step=step)), run.finish

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values:
            for write, _ in self._writers:
                write(values, int(record["step"]))

    def close(self) -> None:
        for _, close in self._writers:
            close()
        self._writers = []
