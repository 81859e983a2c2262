"""`okadfa compare` / `python -m okadfa.compare`: one preset trained four ways, one report.

    okadfa compare --out runs/compare --steps 500 [--variants favor+dfa,favor+bp,softmax+dfa,softmax+bp]
                   [any other `okadfa train` option]

Each variant runs `okadfa train` in its own process (one after another, so each has
the machine to itself and its peak memory is its own) with the same data, steps,
seed and options, writing to OUT/<variant>/. Then OUT/ gets:
  report.md       final validation loss / perplexity / bits per byte, train loss,
                  tokens/s, peak memory, train time; DFA/BP gradient alignment per
                  block over training (DFA variants)
  report.json     the same numbers
  val_loss.png    validation loss against steps and against training wall time
  alignment.png   per-block DFA/BP cosine over training (when a DFA variant ran)
`--report-only` redraws the report from existing runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

__all__ = ["main", "read_metrics", "report"]

VARIANTS = ("favor+dfa", "favor+bp", "softmax+dfa", "softmax+bp")


def read_metrics(path: str) -> dict[str, list[dict]]:
    """Records of a metrics.jsonl by kind, one per step (a resumed run's later record wins), sorted by step."""
    by_kind: dict[str, dict[int, dict]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_kind.setdefault(record["kind"], {})[record["step"]] = record
    return {kind: [records[s] for s in sorted(records)] for kind, records in by_kind.items()}


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def report(out: str, variants) -> str:
    """Write report.md, report.json and the plots for the runs under `out`; returns the markdown."""
    runs = {v: read_metrics(os.path.join(out, v, "metrics.jsonl")) for v in variants}
    rows = []
    for v, m in runs.items():
        summary, val = m["summary"][-1], (m.get("val") or [{}])[-1]
        rows.append(dict(variant=v, steps=summary["step"], val_loss=val.get("loss"), val_ppl=val.get("ppl"),
                         val_bpb=val.get("bpb"), train_loss=summary["train_loss"],
                         tokens_per_s=summary["tokens_per_s"], peak_mem_mb=summary["peak_mem_mb"],
                         peak_mem_kind=summary["peak_mem_kind"], train_s=summary["train_s"]))
    config = runs[variants[0]]["config"][0]
    args = config["args"]
    lines = [f"Preset `{args['preset']}` ({config['parameters'] / 1e6:.2f}M parameters), data `{config['corpus']}`, "
             f"{args['steps']} steps of {args['batch_size']}×{args['seq_len']} tokens, AdamW lr {args['lr']}, "
             f"device {config['device']}, {config['world_size']} process(es), torch {config['torch']}.",
             "", "| variant | val loss | val ppl | val bits/byte | train loss (last 20) | tokens/s | "
             "peak memory MB | train time |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {_fmt(r['val_loss'], '.3f')} | {_fmt(r['val_ppl'], '.2f')} | "
                     f"{_fmt(r['val_bpb'], '.3f')} | {_fmt(r['train_loss'], '.3f')} | "
                     f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['peak_mem_mb'], '.0f')} | {r['train_s']:.0f} s |")
    kinds = {r["peak_mem_kind"] for r in rows}
    lines.append("")
    lines.append("Peak memory: " + ", ".join(sorted(kinds)).replace(
        "process_peak_rss", "the training process's peak resident set (Python and torch included)").replace(
        "cuda_max_allocated", "torch.cuda.max_memory_allocated") + ".")
    alignment = {v: m["align"] for v, m in runs.items() if m.get("align")}
    for v, records in alignment.items():
        names = list(records[0]["cosine"])
        lines += ["", f"**{v}: cosine between the DFA update and the backprop gradient** "
                      f"(4 fixed validation batches; `blocks` = all block parameters together)", "",
                  "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {r['step']} | " + " | ".join(f"{r['cosine'][n]:+.2f}" for n in names) + " |" for r in records]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"rows": rows, "alignment": alignment, "args": args}, f, indent=1)
    _plots(out, runs, alignment)
    return md


def _plots(out, runs, alignment):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for v, m in runs.items():
        val = m.get("val", [])
        by_step.plot([r["step"] for r in val], [r["loss"] for r in val], marker=".", label=v)
        by_time.plot([r["train_s"] for r in val], [r["loss"] for r in val], marker=".", label=v)
    by_step.set(xlabel="step", ylabel="validation loss (nats/token)", title="against steps")
    by_time.set(xlabel="training wall time (s)", title="against wall time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "val_loss.png"), dpi=110)
    plt.close(fig)
    if alignment:
        fig, axes = plt.subplots(1, len(alignment), figsize=(5.5 * len(alignment), 4), squeeze=False)
        for ax, (v, records) in zip(axes[0], alignment.items()):
            steps = [r["step"] for r in records]
            for name in records[0]["cosine"]:
                ax.plot(steps, [r["cosine"][name] for r in records], label=name,
                        **({"color": "black", "linewidth": 2.5} if name == "blocks" else {"alpha": 0.7}))
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set(xlabel="step", ylabel="cos(DFA update, backprop gradient)", title=v)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "alignment.png"), dpi=110)
        plt.close(fig)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="okadfa compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from OUT/<variant>/")
    args, train_args = p.parse_known_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    for flag in ("--attention", "--training", "--out", "--resume"):
        if any(a == flag or a.startswith(flag + "=") for a in train_args):
            p.error(f"{flag} is set by compare itself")
    if not any(a.startswith("--align-every") for a in train_args):
        train_args += ["--align-every", "50"]
    if not args.report_only:
        for v in variants:
            attention, training = v.split("+")
            cmd = [sys.executable, "-m", "okadfa.train", *train_args, "--attention", attention, "--training", training,
                   "--out", os.path.join(args.out, v), "--no-progress"]
            run_dir = os.path.join(args.out, v, "metrics.jsonl")
            if os.path.exists(run_dir):
                os.remove(run_dir)      # a fresh run, not appended to an old one
            print(f"== {v}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
    md = report(args.out, variants)
    print("\n" + md + f"\nwrote {args.out}/report.md, report.json, val_loss.png"
          + (", alignment.png" if any("dfa" in v for v in variants) else ""))
    return md


if __name__ == "__main__":
    main()
