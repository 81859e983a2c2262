"""Whole-model time and memory: FAVOR+ against softmax (SDPA) attention, DFA against
backprop, at long sequence lengths. This is what the prototype's headline claims
("8–10× faster for T > 1024", "~500 MB vs ~5 GB training memory at gpt2-small
scale") are about, so they are measured here rather than taken on trust.

    python -m bench.model [--preset gpt2-small] [--seq-lens 1024,2048] [--batch 1] [--out bench/results]

For each T and attention (favor, softmax), on `--preset` with max_seq_len = T:
  forward      inference: model.eval(), no grad, logits for every position
  train dfa    forward + backward with DFA (into existing .grad)
  train bp     the same with backprop
median time (bench.common.median_time, at least 3 runs) and the peak bytes torch's
CPU allocator held during one call beyond what existed before it
(bench.common.peak_memory): activations, workspaces, logits, gradient
temporaries. The gradients themselves already exist when a step starts: freeing
them inside the measured call (zero_grad(set_to_none=True)) made the profiler's
count vary by ±15% between identical calls, since it cannot see frees of blocks
allocated before it started. Parameters, gradients (1×) and AdamW state (2×) do not
depend on the method and are reported once in the header. Writes
model_<preset>.{json,md} under --out.
"""
from __future__ import annotations

import argparse

import torch

from bench.common import cpu_meta, median_time, peak_memory, write_results
from okadfa.models import OKADFAConfig, OKADFAModel

MODES = ("forward", "train dfa", "train bp")


def make_call(preset: str, attention: str, mode: str, T: int, batch: int, seed: int = 0):
    """The callable one row times: a fresh model of `preset` with the given attention and mode."""
    training = "bp" if mode == "forward" else mode.split()[1]
    torch.manual_seed(seed)
    model = OKADFAModel(OKADFAConfig.preset(preset, attention=attention, training=training, max_seq_len=T))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(model.config.vocab_size, (batch, T), generator=g)
    y = torch.randint(model.config.vocab_size, (batch, T), generator=g)
    if mode == "forward":
        model.eval()

        def call():
            with torch.no_grad():
                model(x)
    else:
        model.train()

        def call():
            model(x, y).loss.backward()
    return model, call


def run(preset: str, seq_lens, batch: int):
    rows = []
    for T in seq_lens:
        for attention in ("favor", "softmax"):
            for mode in MODES:
                model, call = make_call(preset, attention, mode, T, batch)
                seconds = median_time(call, min_runs=3, min_seconds=0.0)
                peak = peak_memory(call)
                rows.append(dict(T=T, attention=attention, mode=mode, median_s=seconds, peak_mb=peak / 2**20))
                print(f"  T={T:5d} {attention:7s} {mode:9s} {seconds:8.3f} s  {peak / 2**20:8.0f} MB", flush=True)
                del model, call
    return rows


def table(rows) -> str:
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--seq-lens", default="1024,2048")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    config = OKADFAConfig.preset(args.preset)
    n_params = OKADFAModel(config).num_parameters()
    meta = cpu_meta(preset=args.preset, batch=args.batch, config=config.to_dict(), parameters=n_params,
                    parameter_mb=4 * n_params / 2**20)
    print(f"{args.preset}: {n_params / 1e6:.1f}M parameters, batch {args.batch}, {meta['threads']} threads", flush=True)
    rows = run(args.preset, seq_lens, args.batch)
    header = (f"Device: CPU ({meta['processor']}), {meta['threads']} threads; torch {meta['torch']}; {meta['date']}. "
              f"`{args.preset}` ({n_params / 1e6:.1f}M parameters: {meta['parameter_mb']:.0f} MB in float32, "
              f"gradients as much, AdamW state twice that), batch {args.batch}, float32. Peak MB = torch's CPU "
              f"allocator beyond the model and its gradients (activations, workspaces, logits, temporaries).")
    md = header + "\n\n" + table(rows) + "\n"
    print("\n" + md)
    write_results(args.out, f"model_{args.preset}", meta, rows, md)


if __name__ == "__main__":
    main()
