"""Benchmark report for causal favor_attention on this machine.

    python -m bench.report [--quick] [--out bench/results]

Rows: okadfa backends (cpu, reference), SDPA causal softmax, and peers when
importable (performer-pytorch on fast-transformers' CPU kernel). For T in
256..8192 it measures forward and forward+backward median time and peak memory
(B=1, H=8, M=256, D=64, float32), plus M=128 forward+backward for the cpu backend,
the fp32 matmul throughput of the machine and the cpu backend's achieved
GFLOP/s (FLOPs counted by bench.common.chunked_flops). Writes JSON and prints
markdown tables. Timings are medians of one run on a shared machine: compare
ratios within a run, not absolute times across runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch

import okadfa
from bench.common import B, D, H, M, chunked_flops, make_step, median_time, peak_memory, peers


def matmul_gflops(n=2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / median_time(lambda: a @ b, min_runs=10) / 1e9


def run(Ts, names, quick=False):
    rows = []
    budget = dict(min_runs=3, min_seconds=0.3) if quick else dict(min_runs=5, min_seconds=1.0)
    for T in Ts:
        for name in names:
            for passes in ("fwd", "fwd+bwd"):
                for m in ((M, 128) if name == "cpu" and passes == "fwd+bwd" else (M,)):
                    step = make_step(name, T, passes, m=m)
                    row = dict(backend=name, T=T, M=m, passes=passes, median_ms=1e3 * median_time(step, **budget),
                               peak_mb=peak_memory(step) / 2 ** 20)
                    if name == "cpu":
                        flops = chunked_flops(T, m=m) + (chunked_flops(T, m=m, backward=True) if passes != "fwd" else 0)
                        row["gflops"] = flops / row["median_ms"] / 1e6
                    rows.append(row)
                    print(f"  {name:>28} T={T:5d} M={m} {passes:8s} {row['median_ms']:9.1f} ms "
                          f"{row['peak_mb']:8.1f} MB", flush=True)
    return rows


def table(rows, names):
    def cell(name, T, passes, key, m=M):
        for r in rows:
            if (r["backend"], r["T"], r["passes"], r["M"]) == (name, T, passes, m):
                return r[key]
        return None

    Ts = sorted({r["T"] for r in rows})
    out = []
    for passes in ("fwd", "fwd+bwd"):
        out.append(f"\n**Causal, {passes}: median ms (peak MB)**\n")
        out.append("| T | " + " | ".join(names) + " | cpu vs sdpa |")
        out.append("|---" * (len(names) + 2) + "|")
        for T in Ts:
            cells = []
            for n in names:
                t, mb = cell(n, T, passes, "median_ms"), cell(n, T, passes, "peak_mb")
                cells.append("" if t is None else f"{t:.1f} ({mb:.0f})")
            cpu, sdpa = cell("cpu", T, passes, "median_ms"), cell("sdpa", T, passes, "median_ms")
            ratio = f"{sdpa / cpu:.2f}×" if cpu and sdpa else ""
            out.append(f"| {T} | " + " | ".join(cells) + f" | {ratio} |")
    out.append("\n**cpu backend, fwd+bwd: M=128 vs SDPA, achieved GFLOP/s**\n")
    out.append("| T | cpu M=128 ms | vs sdpa | cpu M=256 GFLOP/s | M=128 GFLOP/s |")
    out.append("|---|---|---|---|---|")
    for T in Ts:
        t128, sdpa = cell("cpu", T, "fwd+bwd", "median_ms", 128), cell("sdpa", T, "fwd+bwd", "median_ms")
        g256, g128 = cell("cpu", T, "fwd+bwd", "gflops"), cell("cpu", T, "fwd+bwd", "gflops", 128)
        if t128 is not None:
            out.append(f"| {T} | {t128:.1f} | {sdpa / t128:.2f}× | {g256:.0f} | {g128:.0f} |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T up to 1024 and fewer repetitions")
    parser.add_argument("--max-t", type=int, default=8192, help="largest T (default 8192)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    max_t = min(args.max_t, 1024) if args.quick else args.max_t
    Ts = [t for t in (256, 512, 1024, 2048, 4096, 8192) if t <= max_t]
    names = (["cpu"] if okadfa.backends()["cpu"]["available"] else []) + ["reference", "sdpa"] + sorted(peers())
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device="cpu",
                processor=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, okadfa=okadfa.__version__, shape=dict(B=B, H=H, M=M, D=D),
                dtype="float32")
    meta["matmul_gflops"] = matmul_gflops()
    print(f"machine: {meta['threads']} threads, fp32 matmul {meta['matmul_gflops']:.0f} GFLOP/s", flush=True)
    rows = run(Ts, names, quick=args.quick)
    meta["matmul_gflops_after"] = matmul_gflops()
    md = table(rows, names)
    header = (f"Device: CPU ({meta['processor']}), {meta['threads']} threads; torch {meta['torch']}; "
              f"{meta['date']}; fp32 matmul {meta['matmul_gflops']:.0f}/{meta['matmul_gflops_after']:.0f} "
              f"GFLOP/s (before/after)")
    print("\n" + header + "\n" + md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "cpu_favor_attention" + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(header + "\n" + md + "\n")
    print(f"\nwrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
