"""bfloat16 on the CPU: okadfa's cpu attention kernel against itself in float32 and against SDPA,
causal forward+backward, in one process with the variants interleaved (issue 16).

    python -m okadfa.bench.cpu_bf16 [--seq-lens 1024,4096] [--rounds 5] [--out bench/results]

Variants: okadfa fp32; okadfa bf16 with its GEMMs forced (OKADFA_CPU_HALF_GEMM) to float32,
oneDNN and AMX tiles (AMX only where the CPU has it); SDPA fp32 and bf16. B=1, H=8, D=64, M=256. Each round times every
variant (the median of okadfa.bench.common.time_calls); the table gives each variant's best round and the spread
(max/min over rounds). Writes cpu_bf16.{json,md} under --out.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import okadfa
from okadfa.training.cli import positive_int

from .common import cpu_meta, positive_int_list, script_parser, time_calls, write_results


def make_call(variant: str, T: int):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 8, T, 64, generator=g).unbind(0)
    w = okadfa.random_features(256, 64, generator=g)
    kind, dtype, gemm = {"okadfa fp32": ("favor", torch.float32, "float32"),
                         "okadfa bf16, float32 GEMMs": ("favor", torch.bfloat16, "float32"),
                         "okadfa bf16, oneDNN GEMMs": ("favor", torch.bfloat16, "onednn"),
                         "okadfa bf16, AMX GEMMs": ("favor", torch.bfloat16, "amx"),
                         "SDPA fp32": ("sdpa", torch.float32, None),
                         "SDPA bf16": ("sdpa", torch.bfloat16, None)}[variant]

    def call():
        x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        if kind == "sdpa":
            out = F.scaled_dot_product_attention(*x, is_causal=True)
        else:
            os.environ["OKADFA_CPU_HALF_GEMM"] = gemm
            out = okadfa.favor_attention(*x, w.to(dtype), causal=True, backend="cpu")
        out.float().sum().backward()
    return call


VARIANTS = ("okadfa fp32", "okadfa bf16, float32 GEMMs", "okadfa bf16, oneDNN GEMMs", "okadfa bf16, AMX GEMMs",
            "SDPA fp32", "SDPA bf16")


def has_amx() -> bool:
    """Whether okadfa's cpu kernels can use AMX tiles here (forcing them is refused otherwise)."""
    os.environ["OKADFA_CPU_HALF_GEMM"] = "amx"
    try:
        return okadfa.backends()["cpu"]["bfloat16"].startswith("bfloat16 GEMMs on AMX")
    except RuntimeError:
        return False
    finally:
        os.environ.pop("OKADFA_CPU_HALF_GEMM")


def main(argv=None):
    parser = script_parser("cpu_bf16", __doc__)
    parser.add_argument("--seq-lens", type=positive_int_list, default="1024,4096")
    parser.add_argument("--rounds", type=positive_int, default=5)
    args = parser.parse_args(argv)
    seq_lens = args.seq_lens
    variants = [v for v in VARIANTS if "AMX" not in v or has_amx()]
    rows = []
    for T in seq_lens:
        calls = {name: make_call(name, T) for name in variants}
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, call in calls.items():
                times[name].append(time_calls(call, min_runs=3, min_seconds=0.0).median)
        rows += [dict(T=T, variant=name, best_ms=min(ts) * 1e3, spread=max(ts) / min(ts)) for name, ts in times.items()]
    os.environ.pop("OKADFA_CPU_HALF_GEMM", None)
    meta = cpu_meta(cpu_bfloat16=okadfa.backends()["cpu"]["bfloat16"], B=1, H=8, D=64, M=256, rounds=args.rounds)
    md = ["# bfloat16 on the CPU: causal forward+backward, B=1, H=8, D=64, M=256\n",
          f"{meta}\n", "| T | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for T in seq_lens:
        cells = [f"{r['best_ms']:.0f} ms (×{r['spread']:.2f})" for r in rows if r["T"] == T]
        md.append(f"| {T} | " + " | ".join(cells) + " |")
    write_results(args.out, "cpu_bf16", meta, rows, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
