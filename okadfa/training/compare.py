"""`okadfa compare` / `python -m okadfa.training.compare`: one preset trained four ways, one report.

    okadfa compare --out runs/compare --steps 500 [--variants favor+dfa,favor+bp,softmax+dfa,softmax+bp]
                   [any other `okadfa train` option]

Each variant runs `okadfa train` in its own process (one after another, so each has
the machine to itself and its peak memory is its own) with the same data, steps,
seed and options, writing to OUT/<variant>/. Then OUT/ gets:
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
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from ..models import RULE_DEFAULTS

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


def _ratio(rows, r):
    """r's validation loss over that of the backprop run with the same attention (None if absent)."""
    attention, training = r["variant"].split("+")
    bp = next((o for o in rows if o["variant"] == f"{attention}+bp"), None)
    if training != "dfa" or bp is None or r["val_loss"] is None or not bp["val_loss"]:
        return None
    return r["val_loss"] / bp["val_loss"]


def report(out: str, variants) -> str:
    """Write report.md, report.json and the plots for the runs under `out`; returns the markdown."""
    runs = {v: read_metrics(os.path.join(out, v, "metrics.jsonl")) for v in variants}
    rows = []
    for v, m in runs.items():
        summary, val = m["summary"][-1], (m.get("val") or [{}])[-1]
        config = m["config"][0]["config"]
        rows.append(dict(variant=v, norm=config.get("norm", "pre"), steps=summary["step"], val_loss=val.get("loss"),
                         val_ppl=val.get("ppl"), val_bpb=val.get("bpb"), train_loss=summary["train_loss"],
                         tokens_per_s=summary["tokens_per_s"], peak_mem_mb=summary["peak_mem_mb"],
                         peak_mem_kind=summary["peak_mem_kind"], train_s=summary["train_s"],
                         max_block_norm=max(m["norms"][-1]["stream"].values()) if m.get("norms") else None))
    for r in rows:
        r["dfa_bp_ratio"] = _ratio(rows, r)
    config = runs[variants[0]]["config"][0]
    args = config["args"]
    baselines = (runs[variants[0]].get("baselines") or [None])[0]
    unit = _unit(args)
    lines = [f"Preset `{args['preset']}` ({config['parameters'] / 1e6:.2f}M parameters), data `{config['corpus']}`, "
             f"{args['steps']} steps of {args['batch_size']}×{args['seq_len']} tokens, device {config['device']}, "
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
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"rows": rows, "alignment": alignment, "baselines": baselines, "args": args,
                   "norms": {v: m.get("norms", []) for v, m in runs.items()}}, f, indent=1)
    _plots(out, runs, alignment, baselines, unit)
    return md


def _unit(args) -> str:
    return "nats/byte" if args.get("tokenizer", "bytes") == "bytes" else "nats/token"


def _plots(out, runs, alignment, baselines, unit):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
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
    fig.savefig(os.path.join(out, "val_loss.png"), dpi=110)
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
        fig.savefig(os.path.join(out, "alignment.png"), dpi=110)
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
        fig.savefig(os.path.join(out, "norms.png"), dpi=110)
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
    for field, value in RULE_DEFAULTS["dfa"].items():      # every variant on the same architecture
        if not any(a.startswith(field + "=") for a in train_args):
            train_args += ["--set", f"{field}={str(value).lower() if isinstance(value, bool) else value}"]
    if not args.report_only:
        for v in variants:
            attention, training = v.split("+")
            cmd = [sys.executable, "-m", "okadfa.training.train", *train_args, "--attention", attention, "--training", training,
                   "--out", os.path.join(args.out, v), "--no-progress"]
            run_dir = os.path.join(args.out, v, "metrics.jsonl")
            if os.path.exists(run_dir):
                os.remove(run_dir)      # a fresh run, not appended to an old one
            print(f"== {v}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
    md = report(args.out, variants)
    print("\n" + md + f"\nwrote {args.out}/report.md, report.json, val_loss.png, norms.png"
          + (", alignment.png" if any("dfa" in v for v in variants) else ""))
    return md


if __name__ == "__main__":
    main()
