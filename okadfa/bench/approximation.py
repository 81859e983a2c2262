"""How far `okadfa.favor_sdpa` is from softmax attention, by number of features and input size.

    python -m okadfa.bench.approximation [--out bench/results]

q, k, v ~ N(0, σ²), N(0, σ²), N(0, 1) of shape (2, 4, 512, 64); the error is
‖favor_sdpa − SDPA‖ / ‖SDPA‖ over the whole output, averaged over 5 projection seeds,
causal and not. FAVOR+'s variance grows like exp(‖q̂‖² + ‖k̂‖²) (Choromanski et al.
2021, Lemma 2), so the logit scale of the inputs matters as much as M: here
scale·q·k has standard deviation σ² (E = 64, scale = E^-1/2). Writes
approximation.{json,md} under --out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import okadfa
from .common import cpu_meta, script_parser, write_results

SIGMAS = (0.25, 0.5, 0.75)
FEATURES = (64, 256, 1024, 4096)
SEEDS = 5


def errors(sigma: float, causal: bool) -> dict[int, float]:
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 512, 64, generator=g) * sigma for _ in range(2))
    v = torch.randn(2, 4, 512, 64, generator=g)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    result = {}
    for m in FEATURES:
        errs = [((okadfa.favor_sdpa(q, k, v, is_causal=causal, num_features=m, seed=s) - exact).norm()
                 / exact.norm()).item() for s in range(SEEDS)]
        result[m] = sum(errs) / len(errs)
    return result


def main(argv=None):
    args = script_parser("approximation", __doc__).parse_args(argv)
    rows = [dict(sigma=s, causal=c, errors=errors(s, c)) for s in SIGMAS for c in (False, True)]
    head = "| σ of q, k entries (std of scale·q·k) | causal | " + " | ".join(f"M={m}" for m in FEATURES) + " |"
    meta = cpu_meta(shape=[2, 4, 512, 64], seeds=SEEDS)
    lines = [f"torch {meta['torch']}, float32, {meta['date'][:10]}; relative error of `favor_sdpa` against SDPA, "
             f"mean of {SEEDS} seeds (`python -m okadfa.bench.approximation`).", "",
             head, "|---|---|" + "---|" * len(FEATURES)]
    for r in rows:
        lines.append(f"| {r['sigma']} ({r['sigma'] ** 2:.3g}) | {'yes' if r['causal'] else 'no'} | "
                     + " | ".join(f"{r['errors'][m]:.3f}" for m in FEATURES) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    write_results(args.out, "approximation", meta, rows, md)


if __name__ == "__main__":
    main()
