"""`okadfa compare` / `python -m okadfa.training.compare`: one preset trained four ways, one report.

    okadfa compare --out runs/compare --steps 500 [--variants favor+dfa,favor+bp,softmax+dfa,softmax+bp]
                   [--precision fp32|bf16|fp16] [any other `okadfa train` option]

Each variant runs `okadfa train` in its own process (one after another, so each has
the machine to itself and its peak memory is its own) with the same data, steps,
seed, --precision and options, writing to OUT/<variant>/; the report names the
precision. Then OUT/ gets:
  report.md       final validation loss (and its DFA/BP ratio) / perplexity / bits per
                  byte, train loss, tokens/s, peak memory, block-output norms, train
                  time; the unigram and bigram levels of the validation tokens; DFA/BP
                  gradient alignment per block over training (DFA variants)
  report.json     the same numbers
  val_loss.png    validation loss against steps and wall time, with the unigram and
                  bigram levels drawn
  alignment.png   per-block DFA/BP cosine over training (when a DFA variant ran): the
                  weights that write the residual stream, the LayerNorm and bias
                  parameters, and all parameters, in separate panels
  norms.png       block-output norms over training, per variant
Every variant gets the same architecture: the DFA defaults of the fields that
depend on the training rule (okadfa.models.RULE_DEFAULTS: post-LN, untied head)
unless you `--set` them.
`--report-only` redraws the report from existing runs.

Every `okadfa train` option is checked before the first variant starts (a bad value fails
at once, in one line), OUT/ is locked for the duration (a second `okadfa compare` into it
fails at once, naming the PID), and a malformed line in a metrics.jsonl (e.g. the last
one cut by a kill) is skipped and named in a warning and in report.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings

from .cli import DEBUG_HELP, ArgumentParser, one_line, run_command
from .files import atomic_path, write_text
from .precision import PRECISIONS
from ..models import RULE_DEFAULTS

__all__ = ["main", "read_metrics", "report"]

VARIANTS = ("favor+dfa", "favor+bp", "softmax+dfa", "softmax+bp")


def _malformed(line: str):
    """The record of a metrics line, or (None, why) when it is not a JSON object with a string kind and an int step."""
    try:
        record = json.loads(line)
    except ValueError as exc:
        return None, f"not JSON ({exc.msg})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if not isinstance(record.get("kind"), str):
        return None, "no string 'kind'"
    if not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
        return None, "no integer 'step'"
    return record, None


def read_metrics(path: str, skipped: list | None = None) -> dict[str, list[dict]]:
    """Records of a metrics.jsonl by kind, one per step (a resumed run's later record wins), sorted by step.

    A malformed line (not JSON, e.g. cut half-way by a kill; not an object; no kind or integer step) is skipped
    and named, with its line number, in a UserWarning; `skipped`, if given, receives (line number, reason)."""
    by_kind: dict[str, dict[int, dict]] = {}
    bad = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record, why = _malformed(line)
            if record is None:
                bad.append((number, why))
                continue
            by_kind.setdefault(record["kind"], {})[record["step"]] = record
    if bad:
        if skipped is not None:
            skipped.extend(bad)
        warnings.warn(f"{path}: skipped {len(bad)} malformed line{'s' if len(bad) > 1 else ''} "
                      f"{', '.join(str(n) for n, _ in bad)} ({'; '.join(f'{n}: {why}' for n, why in bad[:5])}"
                      f"{'; ...' if len(bad) > 5 else ''})", UserWarning, stacklevel=2)
    return {kind: [records[s] for s in sorted(records)] for kind, records in by_kind.items()}


class ReportError(ValueError):
    """The runs under OUT cannot be reported on (a variant never ran, or stopped before writing its summary)."""


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def _ratio(rows, r):
    """r's validation loss over that of the backprop run with the same attention (None if absent)."""
    attention, training = r["variant"].split("+")
    bp = next((o for o in rows if o["variant"] == f"{attention}+bp"), None)
    if training != "dfa" or bp is None or r["val_loss"] is None or not bp["val_loss"]:
        return None
    return r["val_loss"] / bp["val_loss"]


def report(out: str, variants) -> str:
    """Write report.md, report.json and the plots for the runs under `out`; returns the markdown."""
    runs, skipped = {}, {}
    for v in variants:
        path = os.path.join(out, v, "metrics.jsonl")
        if not os.path.isfile(path):
            raise ReportError(f"{path}: no metrics (variant {v} has not run; drop --report-only to run it)")
        bad = []
        runs[v] = read_metrics(path, skipped=bad)
        if bad:
            skipped[f"{v}/metrics.jsonl"] = [n for n, _ in bad]
        for kind in ("config", "summary"):
            if not runs[v].get(kind):
                raise ReportError(f"{path}: no {kind!r} record (the run of {v} did not finish? run it again)")
    rows = []
    for v, m in runs.items():
        summary, val = m["summary"][-1], (m.get("val") or [{}])[-1]
        config = m["config"][0].get("config", {})
        norms = (m.get("norms") or [{}])[-1].get("stream") or {}
        rows.append(dict(variant=v, norm=config.get("norm", "pre"), steps=summary["step"], val_loss=val.get("loss"),
                         val_ppl=val.get("ppl"), val_bpb=val.get("bpb"), train_loss=summary.get("train_loss"),
                         tokens_per_s=summary.get("tokens_per_s"), peak_mem_mb=summary.get("peak_mem_mb"),
                         peak_mem_kind=summary.get("peak_mem_kind") or "unknown", train_s=summary.get("train_s") or 0.0,
                         max_block_norm=max(norms.values()) if norms else None))
    for r in rows:
        r["dfa_bp_ratio"] = _ratio(rows, r)
    config = runs[variants[0]]["config"][0]
    args = config["args"]
    baselines = (runs[variants[0]].get("baselines") or [None])[0]
    unit = _unit(args)
    lines = [f"Preset `{args['preset']}` ({config['parameters'] / 1e6:.2f}M parameters), data `{config['corpus']}`, "
             f"{args['steps']} steps of {args['batch_size']}×{args['seq_len']} tokens, precision "
             f"{args.get('precision', 'fp32')}, device {config['device']}, "
             f"{config['world_size']} process(es), torch {config['torch']}. Losses in {unit}."]
    if baselines:
        lines.append(f"Reference levels on the same validation tokens (estimated on the training split): "
                     f"unigram {baselines['unigram']:.3f}, bigram {baselines['bigram']:.3f}.")
    lines += ["", "| variant | norm | val loss | DFA/BP | val ppl | val bits/byte | train loss (last 20) | tokens/s | "
              "peak memory MB | largest block-output norm | train time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['norm']} | {_fmt(r['val_loss'], '.3f')} | {_fmt(r['dfa_bp_ratio'], '.3f')} | "
                     f"{_fmt(r['val_ppl'], '.2f')} | {_fmt(r['val_bpb'], '.3f')} | {_fmt(r['train_loss'], '.3f')} | "
                     f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['peak_mem_mb'], '.0f')} | "
                     f"{_fmt(r['max_block_norm'], '.3g')} | {r['train_s']:.0f} s |")
    kinds = {r["peak_mem_kind"] for r in rows}
    lines.append("")
    lines.append("Peak memory: " + ", ".join(sorted(kinds)).replace(
        "process_peak_rss", "the training process's peak resident set (Python and torch included)").replace(
        "cuda_max_allocated", "torch.cuda.max_memory_allocated") + ". DFA/BP: validation loss over that of the "
        "backprop run with the same attention. Block-output norm: mean per-token L2 norm at the last evaluation.")
    alignment = {v: m["align"] for v, m in runs.items() if m.get("align")}
    for v, records in alignment.items():
        names = list(records[0]["cosine"])
        lines += ["", f"**{v}: cosine between the DFA update and the backprop gradient** (4 fixed validation "
                      "batches; `blocks` = all blocks together): residual writers (attention output projection "
                      "and MLP output) / LayerNorm and bias parameters / all parameters", "",
                  "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for r in records:
            cells = [f"{r.get('writers', {}).get(n, float('nan')):+.2f} / {r.get('norm_bias', {}).get(n, float('nan')):+.2f}"
                     f" / {r['cosine'][n]:+.2f}" for n in names]
            lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Malformed metrics lines, skipped (not read): " + "; ".join(
            f"{name} line{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"
            for name, numbers in skipped.items()) + "."]
    md = "\n".join(lines) + "\n"
    write_text(os.path.join(out, "report.md"), md)
    write_text(os.path.join(out, "report.json"), json.dumps(
        {"rows": rows, "alignment": alignment, "baselines": baselines, "args": args,
         "norms": {v: m.get("norms", []) for v, m in runs.items()}, "skipped_lines": skipped}, indent=1))
    plots = _plots(out, runs, alignment, baselines, unit)
    missing = "; no plots: matplotlib is not installed (pip install matplotlib, then okadfa compare --report-only)"
    print(f"wrote {', '.join(os.path.join(out, name) for name in ['report.md', 'report.json'] + (plots or []))}"
          + (missing if plots is None else ""), flush=True)
    return md


def _unit(args) -> str:
    return "nats/byte" if args.get("tokenizer", "bytes") == "bytes" else "nats/token"


def _save(fig, out, name, written):
    with atomic_path(os.path.join(out, name)) as tmp:
        fig.savefig(tmp, dpi=110)
    written.append(name)


def _plots(out, runs, alignment, baselines, unit) -> list[str] | None:
    """Draw val_loss.png, alignment.png (DFA runs) and norms.png into `out`; the names written, or None
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    written = []
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for v, m in runs.items():
        val = m.get("val", [])
        by_step.plot([r["step"] for r in val], [r["loss"] for r in val], marker=".", label=v)
        by_time.plot([r["train_s"] for r in val], [r["loss"] for r in val], marker=".", label=v)
    by_step.set(xlabel="step", ylabel=f"validation loss ({unit})", title="against steps")
    by_time.set(xlabel="training wall time (s)", title="against wall time")
    for ax in (by_step, by_time):
        if baselines:
            for name, style in (("unigram", ":"), ("bigram", "--")):
                ax.axhline(baselines[name], color="grey", linestyle=style, linewidth=1,
                           label=f"{name} level ({baselines[name]:.2f})")
        ax.grid(alpha=0.3)
    by_step.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_step.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out, "val_loss.png", written)
    plt.close(fig)
    if alignment:
        groups = (("writers", "residual writers (attn out, MLP out)"), ("norm_bias", "LayerNorm and bias parameters"),
                  ("cosine", "all block parameters"))
        fig, axes = plt.subplots(len(alignment), len(groups), figsize=(5 * len(groups), 3.6 * len(alignment)),
                                 squeeze=False, sharey=True)
        for row, (v, records) in zip(axes, alignment.items()):
            steps = [r["step"] for r in records]
            for ax, (key, title) in zip(row, groups):
                for name in records[0]["cosine"]:
                    ax.plot(steps, [r.get(key, {}).get(name, float("nan")) for r in records], label=name,
                            **({"color": "black", "linewidth": 2.5} if name == "blocks" else {"alpha": 0.7}))
                ax.axhline(0, color="grey", linewidth=0.8)
                ax.set(xlabel="step", title=f"{v}: {title}", ylim=(-1.05, 1.05))
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3)
            row[0].set_ylabel("cos(DFA update, backprop gradient)")
            row[0].legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out, "alignment.png", written)
        plt.close(fig)
    norms = {v: m["norms"] for v, m in runs.items() if m.get("norms")}
    if norms:
        fig, axes = plt.subplots(1, len(norms), figsize=(5 * len(norms), 3.6), squeeze=False, sharey=True)
        for ax, (v, records) in zip(axes[0], norms.items()):
            for name in records[0]["stream"]:
                ax.plot([r["step"] for r in records], [r["stream"][name] for r in records], marker=".", label=name)
            ax.set(xlabel="step", title=v, yscale="log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("block output norm (mean per-token L2)")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out, "norms.png", written)
        plt.close(fig)
    return written


SET_BY_COMPARE = ("--attention", "--training", "--out", "--resume", "--overwrite")


def _forwarded_help() -> str:
    """The help of the `okadfa train` options that compare passes on to every variant."""
    from .train import build_parser
    train = build_parser()
    own = set(SET_BY_COMPARE) | {"-h", "--precision", "--debug", "--no-progress"}
    formatter = argparse.HelpFormatter("okadfa compare")
    formatter.start_section("okadfa train options, passed on to every variant (okadfa train --help says more)")
    formatter.add_arguments([a for a in train._actions if not own & set(a.option_strings)])
    formatter.end_section()
    return formatter.format_help()


def _check_train_args(train_args: list[str], parser) -> None:
    """Refuse, before any variant runs, what `okadfa train` would refuse (argparse's one-line errors)."""
    from .train import parse_args, parse_overrides
    for flag in SET_BY_COMPARE:
        if any(a == flag or a.startswith(flag + "=") for a in train_args):
            parser.error(f"{flag} is set by compare itself")
    sets = [train_args[i + 1] for i, a in enumerate(train_args[:-1]) if a == "--set"]
    sets += [a[len("--set="):] for a in train_args if a.startswith("--set=")]
    try:
        fields = parse_overrides(sets)
    except ValueError as exc:
        parser.error(f"argument --set: {one_line(exc)}")
    for field in ("attention", "training"):
        if field in fields:
            parser.error(f"argument --set: {field} is set by compare itself (--variants)")
    parse_args(train_args + ["--out", "-"], prog="okadfa compare")     # exits with argparse's error on a bad value


def main(argv=None) -> str:
    p = ArgumentParser(prog="okadfa compare", description=__doc__, epilog=_forwarded_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--out", default="runs/compare", help="output directory (locked while compare uses it)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from OUT/<variant>/")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="the precision of every variant (okadfa train --precision: fp32, bf16 or fp16)")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP + " (passed on to each variant's okadfa train)")
    args, train_args = p.parse_known_args(argv)
    train_args += ["--precision", args.precision]         # checked with the other options, below
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"argument --variants: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if len(set(variants)) != len(variants):
        p.error(f"argument --variants: {args.variants!r} names a variant twice")
    if not args.out.strip():
        p.error("argument --out: must not be empty")
    if not args.report_only:
        _check_train_args(train_args, p)
    if not any(a.startswith("--align-every") for a in train_args):
        train_args += ["--align-every", "50"]
    for field, value in RULE_DEFAULTS["dfa"].items():      # every variant on the same architecture
        if not any(a.startswith(field + "=") for a in train_args):
            train_args += ["--set", f"{field}={str(value).lower() if isinstance(value, bool) else value}"]
    if args.debug:
        train_args += ["--debug"]
    from .train import run_lock
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"okadfa compare: --out {args.out}: cannot create the directory: {exc.strerror}") from None
    with run_lock(args.out, "okadfa compare"):
        if not args.report_only:
            for v in variants:
                attention, training = v.split("+")
                run_dir = os.path.join(args.out, v)
                cmd = [sys.executable, "-m", "okadfa.training.train", *train_args, "--attention", attention,
                       "--training", training, "--out", run_dir, "--no-progress", "--overwrite"]   # a fresh run
                print(f"== {v}: {' '.join(cmd[1:])}", flush=True)
                status = subprocess.run(cmd).returncode
                if status:
                    raise SystemExit(f"okadfa compare: variant {v} failed (exit status {status}; its output is "
                                     f"above){'' if args.debug else '; rerun with --debug for tracebacks'}")
        try:
            md = report(args.out, variants)
        except ReportError as exc:
            raise SystemExit(f"okadfa compare: {exc}") from None
    print("\n" + md)
    return md


def _program(argv) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_command("compare", _program, sys.argv[1:]))
