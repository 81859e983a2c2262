"""`python -m okadfa.bench.dfa_sweep`: the measurements behind okadfa's DFA defaults.

Each variant trains the `tiny` preset (byte-level, 4 blocks of width 128, FAVOR+) on the
`stdlib` corpus with `okadfa train`: the same steps, batches (16×128), data order and
seeds for every variant, one thread per run, `--jobs` runs at a time. A variant is the
base settings with one change (`--stage one`), the changes that helped together
(`--stage combine`), or the library's defaults (`--stage bundle`: `okadfa train` with
nothing but the training rule, DFA against backprop on the same architecture, beside a grid
of learning rate × warm-up for each rule, from which the defaults were chosen). The base is post-LN with the
settings okadfa used before the sweep (per-point normal feedback, tied head, AdamW
lr 1e-3, β2 0.95, weight decay 0.1, clip 1.0, block points).

    python -m okadfa.bench.dfa_sweep --stage one --steps 400 --seeds 3 [--jobs 2] [--only NAME ...]
    python -m okadfa.bench.dfa_sweep --stage combine --steps 400 --seeds 3
    python -m okadfa.bench.dfa_sweep --stage bundle --steps 1000 --seeds 3

Runs go to --work/<stage>/<variant>/seed<k>/ (an existing finished run is reused, so an
interrupted sweep continues); results are merged into bench/results/dfa_sweep_<stage>.json
and written as a markdown table beside it: validation loss (nats/byte) mean ± standard
deviation over seeds, min–max, the change against the base, and the unigram and bigram
levels of the evaluated bytes.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from okadfa.training.compare import read_metrics
from okadfa.models import RULE_DEFAULTS
from okadfa.training.cli import positive_int

from .common import cpu_meta, script_parser, write_results

# The base of --stage one: post-LN (issue's diagnosis: feedback points must be normalised)
# with every other setting as okadfa had it before the sweep.
BASE = dict(training="dfa", lr=1e-3, weight_decay=0.1, adam_beta2=0.95, grad_clip=1.0,
            set=dict(norm="post", point_norm=False, points="block", feedback_shared=False, feedback_dist="normal",
                     tie_weights=True, dfa_embed=False))

# name: (description, changes to BASE). "set" entries change OKADFAConfig fields.
ONE_CHANGE = {
    "base": ("post-LN, pre-sweep settings", {}),
    "pre-LN": ("norm=pre (un-normalised residual points: the old default)", {"set": {"norm": "pre"}}),
    "pre-LN+point_norm": ("norm=pre, points at a parameter-free LayerNorm", {"set": {"norm": "pre",
                                                                                    "point_norm": True}}),
    "shared": ("feedback_shared=true (one matrix, TinyDFA)", {"set": {"feedback_shared": True}}),
    "uniform": ("feedback_dist=uniform", {"set": {"feedback_dist": "uniform"}}),
    "untied": ("tie_weights=false", {"set": {"tie_weights": False}}),
    "beta2=0.999": ("AdamW β2 0.999", {"adam_beta2": 0.999}),
    "wd=0": ("weight decay 0", {"weight_decay": 0.0}),
    "clip=0.5": ("grad clip 0.5", {"grad_clip": 0.5}),
    "clip=off": ("no grad clip", {"grad_clip": 0.0}),
    "lr=5e-4": ("lr 5e-4", {"lr": 5e-4}),
    "lr=2e-3": ("lr 2e-3", {"lr": 2e-3}),
    "lr=4e-3": ("lr 4e-3", {"lr": 4e-3}),
    "sublayer": ("points=sublayer (after attention and MLP)", {"set": {"points": "sublayer"}}),
    "micro": ("points=micro (sublayer + MLP hidden activation)", {"set": {"points": "micro"}}),
    "dfa_embed": ("dfa_embed=true (embedding from its own point)", {"set": {"dfa_embed": True}}),
    "pre-LN+spd": ("norm=pre, error=stream, feedback_dist=spd (B = G Gᵀ, okadfa's variant)",
                   {"set": {"norm": "pre", "error": "stream", "feedback_dist": "spd", "feedback_storage": "stored"}}),
    "spd": ("feedback_dist=spd (B = G Gᵀ)", {"set": {"feedback_dist": "spd", "feedback_storage": "stored"}}),
    "bp post-LN": ("backprop, same architecture as base", {"training": "bp"}),
    "bp pre-LN": ("backprop, norm=pre", {"training": "bp", "set": {"norm": "pre"}}),
}

# --stage combine: the changes that helped alone (bench/results/dfa_sweep_one.md), together.
COMBINE = {
    "base": ONE_CHANGE["base"],
    "shared+untied": ("feedback_shared=true, tie_weights=false", {"set": {"feedback_shared": True,
                                                                            "tie_weights": False}}),
    "shared+untied+lr=2e-3": ("the same, lr 2e-3", {"lr": 2e-3, "set": {"feedback_shared": True,
                                                                          "tie_weights": False}}),
    "shared+untied+uniform": ("the same, feedback_dist=uniform (TinyDFA's feedback)",
                              {"set": {"feedback_shared": True, "tie_weights": False, "feedback_dist": "uniform"}}),
    "TinyDFA bundle": ("shared uniform feedback, untied, β2 0.999, no weight decay, clip 0.5",
                       {"adam_beta2": 0.999, "weight_decay": 0.0, "grad_clip": 0.5,
                        "set": {"feedback_shared": True, "tie_weights": False, "feedback_dist": "uniform"}}),
    "shared+untied+spd": ("shared, untied, feedback_dist=spd", {"set": {"feedback_shared": True, "tie_weights": False,
                                                                       "feedback_dist": "spd",
                                                                       "feedback_storage": "stored"}}),
    "shared+untied+spd+lr=2e-3": ("the same, lr 2e-3", {"lr": 2e-3, "set": {
        "feedback_shared": True, "tie_weights": False, "feedback_dist": "spd", "feedback_storage": "stored"}}),
}

# The library's defaults (okadfa train with nothing but --training), DFA against backprop on
# the DFA default architecture; and the old DFA default for reference.
BUNDLE = {
    "dfa (defaults)": ("okadfa train --training dfa, all defaults", {"defaults": "dfa"}),
    "bp (same architecture)": ("okadfa train --training bp with the DFA architecture defaults (RULE_DEFAULTS)",
                               {"defaults": "bp", "set": dict(RULE_DEFAULTS["dfa"])}),
}
# Learning rate × warm-up, each setting explicit (the defaults rows equal "dfa, lr 6e-3, warmup 200"
# and "bp, lr 3e-3, warmup 200" bit for bit: a check that the defaults are what the table says);
# warm-up 50 (steps/20) was the default of both rules before this stage found steps/5 better for both.
for _lr, _warmup in ((2e-3, 50), (3e-3, 50), (4e-3, 50), (5e-3, 50), (6e-3, 50), (8e-3, 50), (4e-3, 200),
                     (6e-3, 200), (8e-3, 200), (6e-3, 400)):
    BUNDLE[f"dfa, lr {_lr:.0e}, warmup {_warmup}".replace("e-0", "e-")] = (
        f"okadfa train --training dfa --lr {_lr:g} --warmup {_warmup}", {"defaults": "dfa", "lr": _lr, "warmup": _warmup})
for _lr, _warmup in ((1e-3, 50), (2e-3, 50), (3e-3, 50), (4e-3, 50), (2e-3, 200), (3e-3, 200), (4e-3, 200),
                     (3e-3, 400)):
    BUNDLE[f"bp, lr {_lr:.0e}, warmup {_warmup}".replace("e-0", "e-")] = (
        f"the backprop row with --lr {_lr:g} --warmup {_warmup}",
        {"defaults": "bp", "lr": _lr, "warmup": _warmup, "set": dict(RULE_DEFAULTS["dfa"])})
BUNDLE.update({
    "dfa, clip 0.5": ("okadfa train --training dfa --lr 4e-3 --warmup 50 --grad-clip 0.5",
                      {"defaults": "dfa", "lr": 4e-3, "warmup": 50, "grad_clip": 0.5}),
    "dfa, wd 0": ("okadfa train --training dfa --lr 4e-3 --warmup 50 --weight-decay 0",
                  {"defaults": "dfa", "lr": 4e-3, "warmup": 50, "weight_decay": 0.0}),
    "dfa, β2 0.99": ("okadfa train --training dfa --lr 4e-3 --warmup 50 --adam-beta2 0.99",
                     {"defaults": "dfa", "lr": 4e-3, "warmup": 50, "adam_beta2": 0.99}),
    "dfa (old defaults)": ("the defaults before the sweep: pre-LN, tied, per-point feedback, lr 1e-3, warm-up 50",
                           {"defaults": "dfa", "lr": 1e-3, "warmup": 50, "weight_decay": 0.1, "adam_beta2": 0.95,
                            "grad_clip": 1.0, "set": {"norm": "pre", "tie_weights": True, "feedback_shared": False,
                                                      "feedback_dist": "normal", "feedback_storage": "seeded"}}),
})


def _merge(base: dict, changes: dict) -> dict:
    out = {**base, **{k: v for k, v in changes.items() if k != "set"}}
    out["set"] = {**base.get("set", {}), **changes.get("set", {})}
    return out


def _command(settings: dict, steps: int, seed: int, out: str) -> list[str]:
    cmd = [sys.executable, "-m", "okadfa.training.train", "--preset", "tiny", "--data", "stdlib", "--steps", str(steps),
           "--batch-size", "16", "--seq-len", "128", "--seed", str(seed), "--threads", "1",
           "--eval-every", str(steps), "--log-every", str(max(1, steps // 10)), "--sample-tokens", "0",
           "--no-progress", "--out", out, "--overwrite"]      # an unfinished earlier run is replaced
    # "defaults": nothing but the training rule, the optimizer settings given and the "set" entries
    cmd += ["--training", settings.get("defaults") or settings["training"]]
    for key in ("lr", "warmup", "weight_decay", "adam_beta2", "grad_clip"):
        if key in settings:
            cmd += ["--" + key.replace("_", "-"), str(settings[key])]
    for key, value in settings.get("set", {}).items():
        cmd += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return cmd


def _run(cmd: list[str], out: str, steps: int) -> dict:
    path = os.path.join(out, "metrics.jsonl")
    done = os.path.exists(path) and read_metrics(path).get("summary", [{}])[-1].get("step") == steps
    if not done:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "log.txt"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    m = read_metrics(path)
    return {"val_loss": m["val"][-1]["loss"], "train_loss": m["summary"][-1]["train_loss"],
            "train_s": m["summary"][-1]["train_s"], "baselines": m["baselines"][0], "args": m["config"][0]["args"],
            "config": m["config"][0]["config"]}


def main(argv=None) -> dict:
    p = script_parser("dfa_sweep", __doc__, out=False)
    p.add_argument("--stage", choices=("one", "combine", "bundle"), default="one")
    p.add_argument("--steps", type=positive_int, default=400)
    p.add_argument("--seeds", type=positive_int, default=3)
    p.add_argument("--jobs", type=positive_int, default=2)
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="run only this variant (repeatable; default: all of the stage)")
    p.add_argument("--work", default="runs/dfa_sweep")
    p.add_argument("--results", default="bench/results")
    args = p.parse_args(argv)
    table = {"one": ONE_CHANGE, "combine": COMBINE, "bundle": BUNDLE}[args.stage]
    names = list(table) if args.only is None else args.only
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(table)}")
    jobs = []
    for name in names:
        settings = table[name][1] if args.stage == "bundle" else _merge(BASE, table[name][1])
        for seed in range(args.seeds):
            out = os.path.join(args.work, args.stage, name.replace(" ", "_"), f"seed{seed}")
            jobs.append((name, seed, _command(settings, args.steps, seed, out), out))
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: (j[0], j[1], j[2], _run(j[2], j[3], args.steps)), jobs))
    stem = f"dfa_sweep_{args.stage}"
    path = os.path.join(args.results, stem + ".json")
    previous = json.load(open(path)) if os.path.exists(path) else {"meta": {}, "rows": []}
    keep = previous["meta"].get("steps") == args.steps
    variants = {row["name"]: row for row in previous["rows"]} if keep else {}
    for name, seed, cmd, r in results:
        row = variants.setdefault(name, {"name": name, "runs": {}})
        row["description"] = table[name][0]
        row["runs"][str(seed)] = {"val_loss": r["val_loss"], "train_loss": r["train_loss"], "train_s": r["train_s"],
                                  "command": " ".join(["python"] + cmd[1:])}
        row["config"] = r["config"]
        row["optimizer"] = {k: r["args"][k] for k in ("lr", "warmup", "weight_decay", "adam_beta2", "grad_clip")}
        baselines = r["baselines"]
    order = [n for n in table if n in variants]
    meta = {"stage": args.stage, "steps": args.steps, "batch": "16x128", "preset": "tiny", "data": "stdlib",
            "threads_per_run": 1, "baselines": {k: baselines[k] for k in ("unigram", "bigram", "tokens")},
            **cpu_meta()}
    rows = [variants[n] for n in order]
    write_results(args.results, stem, meta, rows, _markdown(meta, rows))
    return {"meta": meta, "rows": rows}


def _stats(entry):
    losses = [r["val_loss"] for _, r in sorted(entry["runs"].items())]
    sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
    return statistics.mean(losses), sd, min(losses), max(losses), len(losses)


def _markdown(record: dict, rows: list) -> str:
    b = record["baselines"]
    lines = [f"# DFA sweep, stage `{record['stage']}`", "",
             f"`tiny` preset, `{record['data']}` bytes, {record['steps']} steps of {record['batch']}, one thread per "
             f"run; validation loss in nats/byte on {b['tokens']} held-out bytes, mean ± standard deviation over "
             f"seeds (each seed: its own initialisation and data order, the same for every variant). "
             f"Reference levels on the same bytes (estimated on the training split): unigram {b['unigram']:.3f}, "
             f"bigram {b['bigram']:.3f}. Reproduce: `python -m okadfa.bench.dfa_sweep --stage {record['stage']} "
             f"--steps {record['steps']}`.", "",
             "| variant | what changes | val loss | min – max | seeds | Δ vs first row |", "|---|---|---|---|---|---|"]
    first = None
    for entry in rows:
        name = entry["name"]
        mean, sd, lo, hi, n = _stats(entry)
        first = mean if first is None else first
        lines.append(f"| {name} | {entry['description']} | {mean:.3f} ± {sd:.3f} | {lo:.3f} – {hi:.3f} | {n} | "
                     f"{mean - first:+.3f} |")
    by_name = {r["name"]: r for r in rows}
    dfa, bp = by_name.get("dfa (defaults)"), by_name.get("bp (same architecture)")
    if dfa and bp:
        seeds = sorted(set(dfa["runs"]) & set(bp["runs"]))
        ratios = [dfa["runs"][k]["val_loss"] / bp["runs"][k]["val_loss"] for k in seeds]
        lines += ["", f"DFA/BP validation-loss ratio, defaults against backprop on the same architecture: "
                      f"{_stats(dfa)[0] / _stats(bp)[0]:.3f} (ratio of the means); per seed "
                      + ", ".join(f"{r:.3f}" for r in ratios) + "."]
    return "\n".join(lines) + "\n"


def rewrite_markdown(path: str) -> str:
    """Regenerate the markdown beside a results JSON (after a change to the table's format)."""
    with open(path) as f:
        data = json.load(f)
    md = _markdown(data["meta"], data["rows"])
    with open(path[:-5] + ".md", "w") as f:
        f.write(md)
    return md


if __name__ == "__main__":
    main()
