"""Hugging Face decoding through the okadfa_favor backend: FavorCache against HF's own cache.

    python -m okadfa.bench.decoding_hf [--contexts 256,1024,4096] [--tokens 16] [--out bench/results]

A randomly initialised Llama (hidden 256, 4 layers, 8 query and 4 key/value heads, vocabulary
1000), eval mode, no grad, batch 1. For each context length T and cache:
  favor + FavorCache    attn_implementation="okadfa_favor" with one FavorState per layer
                        (what generate() uses by default)
  favor + DynamicCache  the same model with HF's cache of every key and value
  sdpa + DynamicCache   softmax attention, HF's usual setting
a prefill over a random prompt of T tokens, then `--tokens` decoding steps of one token each:
  ms/token    median time of one step (the model on one new token with the cache)
  cache MB    bytes the cache holds after the prefill (FavorState's S, z, c; or keys and values)
Writes decoding_hf.{json,md} under --out.
"""
from __future__ import annotations

import statistics
import time

import torch

import okadfa  # noqa: F401  (registers attn_implementation "okadfa_favor")
from okadfa.training.cli import positive_int

from .common import cpu_meta, positive_int_list, script_parser, write_results

VARIANTS = (("okadfa_favor", "FavorCache"), ("okadfa_favor", "DynamicCache"), ("sdpa", "DynamicCache"))


def _model(attn: str, T: int):
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=1000, max_position_embeddings=T + 1024)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def _cache_bytes(cache) -> int:
    from okadfa.integrations.transformers import FavorCache
    if isinstance(cache, FavorCache):
        tensors = [x for layer in cache.layers for x in layer.state.carried]
    else:
        tensors = [x for layer in cache.layers for x in (layer.keys, layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def measure(attn: str, cache_name: str, T: int, tokens: int) -> dict:
    import transformers
    from okadfa.integrations.transformers import FavorCache
    model = _model(attn, T)
    ids = torch.randint(1000, (1, T + tokens), generator=torch.Generator().manual_seed(1))
    cache = FavorCache() if cache_name == "FavorCache" else transformers.DynamicCache()
    t0 = time.perf_counter()
    model(ids[:, :T], past_key_values=cache, use_cache=True)
    prefill = time.perf_counter() - t0
    mb = _cache_bytes(cache) / 2**20
    steps = []
    for t in range(T, T + tokens):
        t0 = time.perf_counter()
        model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(time.perf_counter() - t0)
    return dict(T=T, attention=attn, cache=cache_name, prefill_s=prefill, ms_per_token=1e3 * statistics.median(steps),
                cache_mb=mb)


def table(rows) -> str:
    out = ["| T | attention | cache | prefill s | ms/token | cache MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['T']} | {r['attention']} | {r['cache']} | {r['prefill_s']:.3f} | {r['ms_per_token']:.2f} | "
                   f"{r['cache_mb']:.2f} |")
    return "\n".join(out)


def main(argv=None):
    p = script_parser("decoding_hf", __doc__)
    p.add_argument("--contexts", type=positive_int_list, default="256,1024,4096")
    p.add_argument("--tokens", type=positive_int, default=16)
    args = p.parse_args(argv)
    import transformers
    rows = []
    for T in args.contexts:
        for attn, cache in VARIANTS:
            rows.append(measure(attn, cache, T, args.tokens))
            print(f"  T={T:5d} {attn:13s} {cache:12s} {rows[-1]['ms_per_token']:8.2f} ms/token "
                  f"{rows[-1]['cache_mb']:8.2f} MB", flush=True)
    meta = cpu_meta(transformers=transformers.__version__, tokens=args.tokens)
    md = (f"Device: CPU ({meta['processor']}), {meta['threads']} threads; torch {meta['torch']}; transformers "
          f"{transformers.__version__}; {meta['date']}. Random Llama (hidden 256, 4 layers, 8/4 heads), batch 1, "
          f"median of {args.tokens} steps.\n\n" + table(rows) + "\n")
    print("\n" + md)
    write_results(args.out, "decoding_hf", meta, rows, md)


if __name__ == "__main__":
    main()
