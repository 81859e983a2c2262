"""Token-by-token decoding: FAVOR+ with `FavorState` against softmax with a KV cache.

    python -m okadfa.bench.decoding [--preset gpt2-small] [--contexts 512,2048,8192] [--tokens 16] [--out bench/results]

For each context length T and attention (favor, softmax), on `--preset` with
max_seq_len = T + tokens, in eval mode without grad, batch 1:
  prefill     one pass over a random prompt of T tokens that fills the caches
  ms/token    median time of one decoding step (every block on one new position,
              then the logits of that position), over `--tokens` steps after the prefill
  cache MB    bytes held by the caches after the prefill: FavorState's (S, z, c) per
              block, constant in T; the KV cache's keys and values, linear in T
  recompute   (T ≤ --recompute-max) one step without a cache: the whole window again,
              what `generate(use_cache=False)` pays per token
Writes decoding_<preset>.{json,md} under --out.
"""
from __future__ import annotations

import statistics
import time

import torch

import okadfa
from okadfa.models import OKADFACache, OKADFAConfig, OKADFAModel
from okadfa.training.cli import nonnegative_int, positive_int

from .common import PRESETS, cpu_meta, positive_int_list, script_parser, write_results


def _cache_bytes(caches) -> int:
    total = 0
    for cache in caches:
        tensors = cache.carried if isinstance(cache, okadfa.FavorState) else (cache.keys, cache.values)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


@torch.no_grad()
def measure(preset: str, attention: str, T: int, tokens: int, recompute: bool, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = OKADFAModel(OKADFAConfig.preset(preset, attention=attention, max_seq_len=T + tokens)).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (1, T + tokens), generator=g)
    cache = OKADFACache(model)
    t0 = time.perf_counter()
    model.lm_head(model.ln_f(model._trunk(model.embed(ids[:, :T]), cache)[:, -1]))
    prefill = time.perf_counter() - t0
    steps = []
    for t in range(T, T + tokens):
        t0 = time.perf_counter()
        model.lm_head(model.ln_f(model._trunk(model.embed(ids[:, t:t + 1], t), cache)[:, -1]))
        steps.append(time.perf_counter() - t0)
    row = dict(T=T, attention=attention, prefill_s=prefill, ms_per_token=1e3 * statistics.median(steps),
               cache_mb=_cache_bytes(cache.layers) / 2**20)
    if recompute:
        t0 = time.perf_counter()
        model.lm_head(model.ln_f(model._trunk(model.embed(ids[:, :T + 1]))[:, -1]))
        row["recompute_ms_per_token"] = 1e3 * (time.perf_counter() - t0)
    return row


def table(rows) -> str:
    out = ["| T | attention | prefill s | ms/token (cached) | cache MB | ms/token (no cache) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        rec = f"{r['recompute_ms_per_token']:.0f}" if "recompute_ms_per_token" in r else "—"
        out.append(f"| {r['T']} | {r['attention']} | {r['prefill_s']:.2f} | {r['ms_per_token']:.1f} | "
                   f"{r['cache_mb']:.1f} | {rec} |")
    return "\n".join(out)


def main(argv=None):
    p = script_parser("decoding", __doc__)
    p.add_argument("--preset", choices=PRESETS, default="gpt2-small")
    p.add_argument("--contexts", type=positive_int_list, default="512,2048,8192")
    p.add_argument("--tokens", type=positive_int, default=16)
    p.add_argument("--recompute-max", type=nonnegative_int, default=2048)
    args = p.parse_args(argv)
    meta = cpu_meta(preset=args.preset, tokens=args.tokens)
    rows = []
    for T in args.contexts:
        for attention in ("favor", "softmax"):
            row = measure(args.preset, attention, T, args.tokens, T <= args.recompute_max)
            rows.append(row)
            print(f"  T={T:6d} {attention:7s} prefill {row['prefill_s']:7.2f} s  {row['ms_per_token']:7.1f} ms/token  "
                  f"cache {row['cache_mb']:8.1f} MB", flush=True)
    header = (f"Device: CPU ({meta['processor']}), {meta['threads']} threads; torch {meta['torch']}; {meta['date']}. "
              f"`{args.preset}`, batch 1, float32, eval mode; median of {args.tokens} decoding steps after the "
              f"prefill (`python -m okadfa.bench.decoding`).")
    md = header + "\n\n" + table(rows) + "\n"
    print("\n" + md)
    write_results(args.out, f"decoding_{args.preset}", meta, rows, md)


if __name__ == "__main__":
    main()
