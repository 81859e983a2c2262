"""Where a whole-model training step goes (issue 16, item 4): torch.profiler over one step of
`--preset`, each event's self time attributed to a part of the model.

    python -m okadfa.bench.profile_step [--preset gpt2-small] [--seq-len 1024] [--precision fp32,bf16]
                                 [--out bench/results]

Per precision, for favor+DFA (okadfa's way) and softmax+backprop (the usual one): a fresh model
(okadfa.bench.model.make_call), two warm-up steps, then one profiled step: forward under autocast,
backward, AdamW step, zero_grad. Each profiler event's self CPU time goes to the first of these
parts that it, or an event it runs inside, is named for (names, case-insensitive):

  optimizer   Optimizer.step, zero_grad
  attention   favor_attention, linear_attention, scaled_dot_product, flash_attention, and their backward
  head        dfa_head, _DFAHeadLoss, cross_entropy, log_softmax, nll_loss, and their backward
  feedback    dfa_feedback (the DFA signals of the blocks)
  matmuls     linear, mm, addmm, bmm, matmul and their backward (projections, MLP, unembedding)
  norms       layer_norm and its backward
  other       the rest (casts, copies, elementwise, autograd bookkeeping)

An op that runs inside a named part (a matmul inside a head) belongs to that part. Writes
profile_<preset>_T<seq-len>.{json,md}: milliseconds and shares per part, and the top ops by
self time. One profiled step on a shared machine: shares, not absolute times, are the result.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from okadfa.training.cli import positive_int

from .common import PRESETS, cpu_meta, quiet_stderr, script_parser, write_results
from .model import make_call, precision_list

# part -> name fragments (lower case); the first part in this order whose fragment names an
# event or one of its ancestors takes the event's self time.
PARTS = {
    "optimizer": ("optimizer.step", "optimizer.zero_grad"),
    "attention": ("favor_attention", "favorattention", "linear_attention", "scaled_dot_product", "flash_attention",
                  "sdpa"),
    "head": ("dfa_head", "dfaheadloss", "cross_entropy", "log_softmax", "logsoftmax", "nll_loss", "nllloss"),
    "feedback": ("dfa_feedback",),
    "matmuls": ("aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "mmbackward",
                "addmmbackward", "bmmbackward", "linearbackward"),
    "norms": ("layer_norm", "layernorm"),
}
VARIANTS = (("favor", "train dfa"), ("softmax", "train bp"))


def part_of(event) -> str:
    """The part an event's self time belongs to: the first part of PARTS naming it or an ancestor."""
    names = []
    while event is not None:
        names.append(event.name.lower())
        event = event.cpu_parent
    for part, fragments in PARTS.items():
        if any(f in name for name in names for f in fragments):
            return part
    return "other"


def profile_step(preset: str, attention: str, mode: str, T: int, precision: str):
    """(ms per part, top ops) of one profiled training step, after two warm-up steps."""
    model, call = make_call(preset, attention, mode, T, batch=1, precision=precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        call()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    parts, ops = defaultdict(float), defaultdict(float)
    for event in prof.events():
        parts[part_of(event)] += event.self_cpu_time_total / 1e3
        ops[event.name] += event.self_cpu_time_total / 1e3
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return dict(parts), top


def main(argv=None):
    parser = script_parser("profile_step", __doc__)
    parser.add_argument("--preset", choices=PRESETS, default="gpt2-small")
    parser.add_argument("--seq-len", type=positive_int, default=1024)
    parser.add_argument("--precision", type=precision_list, default=["fp32", "bf16"])
    args = parser.parse_args(argv)
    rows, md = [], []
    for precision in args.precision:
        for attention, mode in VARIANTS:
            parts, top = profile_step(args.preset, attention, mode, args.seq_len, precision)
            total = sum(parts.values())
            rows.append(dict(precision=precision, attention=attention, mode=mode, total_ms=total, parts_ms=parts,
                             top_ops=top))
            print(f"  {precision} {attention} {mode}: {total:.0f} ms "
                  + ", ".join(f"{p} {parts.get(p, 0.0) / total:.0%}" for p in (*PARTS, "other")), flush=True)
    names = (*PARTS, "other")
    meta = cpu_meta(preset=args.preset, T=args.seq_len, batch=1)
    md.append(f"# One training step of {args.preset}, T={args.seq_len}, batch 1: self time per part (torch.profiler)\n")
    md.append(f"{meta}\n")
    md.append("| precision | model | total ms | " + " | ".join(names) + " |")
    md.append("|---" * (len(names) + 3) + "|")
    for r in rows:
        cells = [f"{r['parts_ms'].get(p, 0.0):.0f} ({r['parts_ms'].get(p, 0.0) / r['total_ms']:.0%})" for p in names]
        md.append(f"| {r['precision']} | {r['attention']}, {r['mode']} | {r['total_ms']:.0f} | " + " | ".join(cells)
                  + " |")
    for r in rows:
        md.append(f"\n**Top ops, {r['precision']}, {r['attention']}, {r['mode']}** (self ms): "
                  + "; ".join(f"`{name}` {ms:.0f}" for name, ms in r["top_ops"]))
    write_results(args.out, f"profile_{args.preset}_T{args.seq_len}", meta, rows, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
