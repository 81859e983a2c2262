"""Whole-model time and memory: FAVOR+ against softmax (SDPA) attention, DFA against
backprop, at long sequence lengths. This is what the prototype's headline claims
("8–10× faster for T > 1024", "~500 MB vs ~5 GB training memory at gpt2-small
scale") are about, so they are measured here rather than taken on trust.

    python -m okadfa.bench.model [--preset gpt2-small] [--seq-lens 1024,2048] [--batch 1] [--precision fp32,bf16]
                          [--out bench/results]

For each precision, T and attention (favor, softmax), on `--preset` with max_seq_len = T:
  forward      inference: model.eval(), no grad, logits for every position
  train dfa    forward + backward with DFA (into existing .grad)
  train bp     the same with backprop
--precision (a comma list of fp32, bf16, fp16; default fp32) runs the forward (and the
loss) under torch.autocast in that dtype, as `okadfa train --precision` does; the
parameters stay float32 and no loss scale is applied (the time of a multiply).
median time and IQR (okadfa.bench.common.time_calls, at least 3 runs) and the peak bytes torch's
CPU allocator held during one call beyond what existed before it
(okadfa.bench.common.peak_memory): activations, workspaces, logits, gradient
temporaries. The gradients themselves already exist when a step starts: freeing
them inside the measured call (zero_grad(set_to_none=True)) made the profiler's
count vary by ±15% between identical calls, since it cannot see frees of blocks
allocated before it started. Parameters, gradients (1×) and AdamW state (2×) do not
depend on the method and are reported once in the header. Writes
model_<preset>.{json,md} under --out: every row labelled with its precision, the
tables once per precision, and with several precisions each one's speed-up over the
first.
"""
from __future__ import annotations

import argparse

import torch

from okadfa.models import OKADFAConfig, OKADFAModel
from okadfa.training.cli import positive_int
from okadfa.training.precision import PRECISIONS, autocast, check

from .common import PRESETS, cpu_meta, peak_memory, positive_int_list, script_parser, time_calls, write_results

MODES = ("forward", "train dfa", "train bp")


def precision_list(text: str) -> list[str]:
    """--precision: a comma list of fp32, bf16, fp16, each once, that autocast runs on the CPU."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(PRECISIONS)}, each at most once, "
                                         f"got {text!r}")
    for name in names:
        try:
            check(name, "cpu")
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{name}: {exc}") from None
    return names


def make_call(preset: str, attention: str, mode: str, T: int, batch: int, seed: int = 0, precision: str = "fp32"):
    """The callable one row times: a fresh model of `preset` with the given attention and mode, its forward
    under the autocast of `precision`."""
    training = "bp" if mode == "forward" else mode.split()[1]
    torch.manual_seed(seed)
    model = OKADFAModel(OKADFAConfig.preset(preset, attention=attention, training=training, max_seq_len=T))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(model.config.vocab_size, (batch, T), generator=g)
    y = torch.randint(model.config.vocab_size, (batch, T), generator=g)
    if mode == "forward":
        model.eval()

        def call():
            with torch.no_grad(), autocast(precision, "cpu"):
                model(x)
    else:
        model.train()

        def call():
            with autocast(precision, "cpu"):
                loss = model(x, y).loss
            loss.backward()                 # outside autocast, as in okadfa train
    return model, call


def run(preset: str, seq_lens, batch: int, precisions=("fp32",)):
    rows = []
    for precision in precisions:
        for T in seq_lens:
            for attention in ("favor", "softmax"):
                for mode in MODES:
                    model, call = make_call(preset, attention, mode, T, batch, precision=precision)
                    timing = time_calls(call, min_runs=3, min_seconds=0.0)
                    seconds, peak = timing.median, peak_memory(call)
                    rows.append(dict(precision=precision, T=T, attention=attention, mode=mode, median_s=seconds,
                                     iqr_s=timing.iqr, runs=timing.runs, noisy=timing.noisy, peak_mb=peak / 2**20))
                    print(f"  {precision} T={T:5d} {attention:7s} {mode:9s} {seconds:8.3f} s  {peak / 2**20:8.0f} MB",
                          flush=True)
                    del model, call
    return rows


def table(rows) -> str:
    """The tables of each precision (headed by its name when there are several), then each
    precision's speed-up over the first."""
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    if len(precisions) == 1:
        return _tables(rows)
    parts = [f"**{p}**\n\n" + _tables([r for r in rows if r["precision"] == p]) for p in precisions]
    return "\n\n".join(parts + [_speedups(rows, precisions)])


def _speedups(rows, precisions) -> str:
    """Each later precision's time against the first's, per T, attention and mode."""
    base, others = precisions[0], precisions[1:]
    seconds = {(r["precision"], r["T"], r["attention"], r["mode"]): r["median_s"] for r in rows}
    out = [f"**Speed-up over {base}**", "",
           f"| T | attention | mode | {base} s |" + "".join(f" {p} s | {p} speed-up |" for p in others),
           "|---" * (4 + 2 * len(others)) + "|"]
    for T in sorted({r["T"] for r in rows}):
        for attention in ("favor", "softmax"):
            for mode in MODES:
                first = seconds[(base, T, attention, mode)]
                cells = "".join(f" {seconds[(p, T, attention, mode)]:.2f} | "
                                f"{first / seconds[(p, T, attention, mode)]:.2f}× |" for p in others)
                out.append(f"| {T} | {attention} | {mode} | {first:.2f} |{cells}")
    return "\n".join(out)


def _tables(rows) -> str:
    """favor against softmax, and DFA against backprop, for the rows of one precision."""
    by = {(r["T"], r["attention"], r["mode"]): r for r in rows}
    out = ["| T | mode | favor s | softmax s | favor speed-up | favor peak MB | softmax peak MB |",
           "|---|---|---|---|---|---|---|"]
    for T in sorted({r["T"] for r in rows}):
        for mode in MODES:
            f, s = by[(T, "favor", mode)], by[(T, "softmax", mode)]
            out.append(f"| {T} | {mode} | {f['median_s']:.2f} | {s['median_s']:.2f} | "
                       f"{s['median_s'] / f['median_s']:.2f}× | {f['peak_mb']:.0f} | {s['peak_mb']:.0f} |")
    out += ["", "| T | attention | train dfa vs train bp: time | peak memory |", "|---|---|---|---|"]
    for T in sorted({r["T"] for r in rows}):
        for attention in ("favor", "softmax"):
            d, b = by[(T, attention, "train dfa")], by[(T, attention, "train bp")]
            out.append(f"| {T} | {attention} | {d['median_s'] / b['median_s']:.2f}× | "
                       f"{d['peak_mb'] / b['peak_mb']:.2f}× |")
    return "\n".join(out)


def main(argv=None):
    p = script_parser("model", __doc__)
    p.add_argument("--preset", choices=PRESETS, default="gpt2-small")
    p.add_argument("--seq-lens", type=positive_int_list, default="1024,2048")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--precision", type=precision_list, default=["fp32"],
                   help="comma list of fp32, bf16, fp16 (default fp32): each row's autocast dtype")
    args = p.parse_args(argv)
    seq_lens = args.seq_lens
    config = OKADFAConfig.preset(args.preset)
    # the two training rules build different models (DFA: untied unembedding, post-LN; models.RULE_DEFAULTS)
    n_params = {rule: OKADFAModel(OKADFAConfig.preset(args.preset, training=rule)).num_parameters()
                for rule in ("bp", "dfa")}
    meta = cpu_meta(preset=args.preset, batch=args.batch, config=config.to_dict(), parameters=n_params,
                    parameter_mb={rule: 4 * n / 2**20 for rule, n in n_params.items()}, precisions=args.precision)
    print(f"{args.preset}: {n_params['bp'] / 1e6:.1f}M parameters (DFA: {n_params['dfa'] / 1e6:.1f}M), "
          f"batch {args.batch}, {meta['threads']} threads", flush=True)
    rows = run(args.preset, seq_lens, args.batch, args.precision)
    precisions = ", ".join("float32" if p == "fp32" else f"{p} (torch.autocast, float32 parameters)"
                           for p in args.precision)
    header = (f"Device: CPU ({meta['processor']}), {meta['threads']} threads; torch {meta['torch']}; {meta['date']}. "
              f"`{args.preset}`: {n_params['bp'] / 1e6:.1f}M parameters for forward and train bp "
              f"({meta['parameter_mb']['bp']:.0f} MB in float32), {n_params['dfa'] / 1e6:.1f}M for train dfa, whose "
              f"default model has its own unembedding ({meta['parameter_mb']['dfa']:.0f} MB); gradients as much, "
              f"AdamW state twice that, and the optimizer step is not in the times (okadfa.bench.profile_step has it). "
              f"Batch {args.batch}, {precisions}. Peak MB = torch's CPU "
              f"allocator beyond the model and its gradients (activations, workspaces, logits, temporaries).")
    md = header + "\n\n" + table(rows) + "\n"
    print("\n" + md)
    write_results(args.out, f"model_{args.preset}", meta, rows, md)


if __name__ == "__main__":
    main()
