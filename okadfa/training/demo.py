"""`make demo` / `python -m okadfa.training.demo`: the package's showcase, on any machine,
with no GPU and no download.

1. Trains the `tiny` preset (byte-level, 4 blocks of width 128, FAVOR+ attention
   with 64 features) on the embedded corpus (the Python standard library's own
   sources, `okadfa.training.data`) two ways, DFA and backprop, on the same (post-LN)
   architecture with the same data, steps, batches and seed, each rule with its
   own optimizer defaults: `okadfa compare --variants favor+dfa,favor+bp`. It
   prints the comparison table (with the DFA/BP loss ratio and the unigram and
   bigram levels of the validation bytes) and writes OUT/report.md, report.json,
   val_loss.png (with those levels drawn), alignment.png (cosine between the DFA
   update and the backprop gradient per block over training: the weights that
   write the residual stream, LayerNorm and bias parameters, all parameters) and
   norms.png (block-output norms).

    python -m okadfa.training.demo [--out docs/demo] [--steps 1000] [--variants favor+dfa,favor+bp]
                                   [any other `okadfa train` option]

The defaults take about 6 minutes on 2 CPU cores. `make demo` then runs the quick
microbenchmark (`okadfa bench --quick --out OUT`: FAVOR+ attention against SDPA and the
peers, the fused DFA head against the unfused one, with plots).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import okadfa
from . import compare
from .cli import ArgumentParser, positive_int, run_command


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m okadfa.training.demo", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/demo", help="output directory (default docs/demo)")
    p.add_argument("--steps", type=positive_int, default=1000, help="training steps per variant (default 1000)")
    p.add_argument("--variants", default="favor+dfa,favor+bp")
    args, train_args = p.parse_known_args(argv)
    every = str(max(1, args.steps // 10))
    print(f"okadfa {okadfa.__version__} | torch {torch.__version__} | {torch.get_num_threads()} threads | backends: "
          + ", ".join(n for n, s in okadfa.backends().items() if s["available"]), flush=True)
    t0 = time.perf_counter()
    compare.main(["--out", args.out, "--variants", args.variants, "--preset", "tiny", "--data", "stdlib",
                  "--steps", str(args.steps), "--eval-every", every, "--align-every", every,
                  "--log-every", every] + train_args)
    print(f"training comparison took {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command("demo", main, sys.argv[1:]))
