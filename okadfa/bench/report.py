"""Benchmark report: the microbenchmarks that apply on this machine, with plots.

    okadfa bench [--device auto|cpu|cuda] [--quick] [--max-t N] [--dtype float32,bfloat16]
             [--only favor_attention|dfa_head] [--out bench/results] [--no-plots]
    okadfa bench --replot [--out bench/results]

(`okadfa bench` is `python -m okadfa.bench.report`.)

--device auto (the default) picks cuda when torch sees a GPU, else cpu.

On cpu: causal favor_attention rows for okadfa backends (cpu, reference), SDPA
causal softmax, and peers when importable (performer-pytorch on fast-transformers'
CPU kernel). For T in 256..8192 (--max-t) it measures forward and forward+backward
median time and peak memory (B=1, H=8, M=256, D=64, float32), plus M=128
forward+backward for the cpu backend, the fp32 matmul throughput of the machine
and the cpu backend's achieved GFLOP/s (FLOPs counted by okadfa.bench.common.chunked_flops).
The dfa_head section compares the fused cpu dfa_head (seeded and stored feedback)
with the unfused PyTorch head (okadfa.bench.common.make_dfa_head_step) at d=768, V=50257,
12 points, N=2048 tokens, error="hidden" (--quick: N=256, d=256, V=4096). Writes
cpu_favor_attention[_quick].{json,md} and cpu_dfa_head[_quick].{json,md}.
--dtype (a comma list of float32, bfloat16; default float32) repeats both cpu sections
with every input in each dtype (SDPA and the peers too), a table per dtype, every row
labelled with its dtype; the header names the CPU's matrix features (okadfa.bench.common.cpu_meta).

On cuda: the GPU suite of okadfa/bench/gpu.py (triton and cuda backends, and
flash-linear-attention when importable, against SDPA's flash kernel in bf16; the
fused dfa_head against the unfused head), written to cuda_kernels[_quick].{json,md}.
--quick, --max-t and --out are passed on; --only does not apply.

Plots (okadfa/bench/plots.py, needs matplotlib) go next to the JSON:
<stem>_time_memory_fwd.png and <stem>_time_memory_fwd_bwd.png (median time with
IQR error bars and peak memory against T, log-log, the T where okadfa is faster
than SDPA beyond the spread marked), and cpu_dfa_head[_quick].png or
cuda_kernels[_quick]_dfa_head.png (bars of time and memory per head). --no-plots
skips them; --replot only redraws them from every JSON already in --out, without
benchmarking.

Every timed row records median_ms, iqr_ms (interquartile range of the single-call
times), runs and noisy (IQR above okadfa.bench.common.NOISY_IQR of the median;
marked † in the tables, whose cells read "median ±IQR/2"). The rows compared with
each other (all steps at one T; the DFA heads) are timed in turns
(okadfa.bench.common.time_in_turns). The fp32 matmul
throughput is measured before and after each section; when the two differ by
more than okadfa.bench.common.LOADED_MATMUL a warning is printed and the header
names the machine as loaded. One run on a shared machine: compare ratios within
a run, not absolute times across runs.
"""
from __future__ import annotations

import argparse
import glob
import os

import torch

import okadfa
from ..training.cli import positive_int
from . import plots
from .common import B, D, DFA_HEAD_LABELS, DFA_HEAD_ROWS, DFA_HEAD_SHAPE, H, M, chunked_flops, cpu_meta, \
    dfa_head_flops, load_warning, make_dfa_head_step, make_step, ms_cell, noisy_footnote, peak_memory, peers, \
    script_parser, time_calls, time_in_turns, write_results


def matmul_gflops(n=2048):
    """fp32 GFLOP/s of an n×n matrix product at its median time: how fast this machine is now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / time_calls(lambda: a @ b, min_runs=10).median / 1e9


def run(Ts, names, quick=False, dtype=torch.float32):
    """The favor_attention rows: at each T, every (backend, passes, M) step timed in turns
    (common.time_in_turns), then its peak memory."""
    rows = []
    budget = dict(rounds=3, min_runs=3, min_seconds=0.3) if quick else dict(rounds=5, min_runs=5, min_seconds=1.0)
    for T in Ts:
        steps = {(name, passes, m): make_step(name, T, passes, m=m, dtype=dtype)
                 for name in names for passes in ("fwd", "fwd+bwd")
                 for m in ((M, 128) if name == "cpu" and passes == "fwd+bwd" else (M,))}
        timings = time_in_turns(steps, **budget)
        for (name, passes, m), step in steps.items():
            row = dict(backend=name, dtype=str(dtype).removeprefix("torch."), T=T, M=m, passes=passes,
                       **timings[name, passes, m].row(), peak_mb=peak_memory(step) / 2 ** 20)
            if name == "cpu":
                flops = chunked_flops(T, m=m) + (chunked_flops(T, m=m, backward=True) if passes != "fwd" else 0)
                row["gflops"] = flops / row["median_ms"] / 1e6
            rows.append(row)
            print(f"  {name:>28} T={T:5d} M={m} {passes:8s} {ms_cell(row):>14} ms "
                  f"{row['peak_mb']:8.1f} MB", flush=True)
    return rows


def _ratio(row, base):
    """row's median over base's, "≈ " in front where their spreads overlap (plots.verdict)."""
    close = plots.verdict(row, base) == "within noise"
    return ("≈ " if close else "") + f"{row['median_ms'] / base['median_ms']:.2f}×"


def table(rows, names):
    def find(name, T, passes, m=M):
        return next((r for r in rows if (r["backend"], r["T"], r["passes"], r["M"]) == (name, T, passes, m)), None)

    def cell(name, T, passes, key, m=M):
        r = find(name, T, passes, m)
        return None if r is None else r[key]

    Ts = sorted({r["T"] for r in rows})
    out = []
    for passes in ("fwd", "fwd+bwd"):
        out.append(f"\n**Causal, {passes}, {rows[0]['dtype']}: median ms ±IQR/2 (peak MB); cpu vs sdpa: the ratio "
                   "of medians, ≈ where the spreads overlap**\n")
        out.append("| T | " + " | ".join(names) + " | cpu vs sdpa |")
        out.append("|---" * (len(names) + 2) + "|")
        for T in Ts:
            cells = []
            for n in names:
                r = find(n, T, passes)
                cells.append("" if r is None else f"{ms_cell(r)} ({r['peak_mb']:.0f})")
            cpu, sdpa = find("cpu", T, passes), find("sdpa", T, passes)
            ratio = _ratio(sdpa, cpu) if cpu and sdpa else ""
            out.append(f"| {T} | " + " | ".join(cells) + f" | {ratio} |")
    out.append("\n**cpu backend, fwd+bwd: M=128 (median ms ±IQR/2) vs SDPA (≈ where the spreads overlap), achieved "
               "GFLOP/s (at the median)**\n")
    out.append("| T | cpu M=128 ms | vs sdpa | cpu M=256 GFLOP/s | M=128 GFLOP/s |")
    out.append("|---|---|---|---|---|")
    for T in Ts:
        r128, sdpa = find("cpu", T, "fwd+bwd", 128), find("sdpa", T, "fwd+bwd")
        g256, g128 = cell("cpu", T, "fwd+bwd", "gflops"), cell("cpu", T, "fwd+bwd", "gflops", 128)
        if r128 is not None:
            out.append(f"| {T} | {ms_cell(r128)} | {_ratio(sdpa, r128)} | {g256:.0f} | {g128:.0f} |")
    return "\n".join(out + noisy_footnote(rows))


def run_dfa_head(shape, quick=False, dtype=torch.float32):
    """Median time and IQR, peak memory and GFLOP/s (at the median) of each DFA head row at
    `shape`. The rows take turns (common.time_in_turns), one call each per round, so that a
    shared machine's load hits them alike."""
    names = [n for n in DFA_HEAD_ROWS if not n.startswith("cpu") or okadfa.backends()["cpu"]["available"]]
    steps = {name: make_dfa_head_step(name, **shape, dtype=dtype) for name in names}
    rounds = 5 if quick else 3
    timings = time_in_turns(steps, rounds=rounds, min_runs=rounds, min_seconds=0.0)
    rows = []
    for name, step in steps.items():
        row = dict(backend=name, dtype=str(dtype).removeprefix("torch."), **shape, **timings[name].row(),
                   peak_mb=peak_memory(step) / 2 ** 20)
        row["gflops"] = dfa_head_flops(**shape) / row["median_ms"] / 1e6
        rows.append(row)
        print(f"  dfa_head {name:>10} {ms_cell(row):>16} ms {row['peak_mb']:8.1f} MB", flush=True)
    return rows


def dfa_head_table(rows):
    base = next((r for r in rows if r["backend"] == "unfused"), None)
    s = rows[0]
    out = [f"\n**DFA head, {s['dtype']}, error=hidden, N={s['N']}, d={s['d']}, V={s['V']}, {s['P']} points: "
           "median ms ±IQR/2, peak MB; time vs unfused: the ratio of medians, ≈ where the spreads overlap**\n",
           "| head (JSON backend) | median ms ±IQR/2 | peak MB | GFLOP/s | time vs unfused | memory vs unfused |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        ratio_t = ratio_m = ""
        if base:
            ratio_t = "1.00×" if r is base else _ratio(r, base)
            ratio_m = f"{r['peak_mb'] / base['peak_mb']:.2f}×"
        out.append(f"| {DFA_HEAD_LABELS[r['backend']]} (`{r['backend']}`) | {ms_cell(r, 0)} | {r['peak_mb']:.0f} | "
                   f"{r['gflops']:.0f} | {ratio_t} | {ratio_m} |")
    return "\n".join(out + noisy_footnote(rows))


def _write(out_dir, stem, meta, rows, md, plot=True):
    warning = load_warning(meta["matmul_gflops"], meta["matmul_gflops_after"])
    meta = dict(meta, loaded=warning is not None)
    header = (f"Device: CPU ({meta['processor']}; {', '.join(meta['cpu_flags'] or ['flags unknown'])}; "
              f"bfloat16: {meta['cpu_bfloat16']}), {meta['threads']} threads; torch {meta['torch']}; "
              f"{meta['date']}; fp32 matmul {meta['matmul_gflops']:.0f}/{meta['matmul_gflops_after']:.0f} "
              f"GFLOP/s (before/after)" + (f"\n\n**Warning, {warning}.**" if warning else ""))
    if warning:
        print(f"warning: {warning}", flush=True)
    print("\n" + header + "\n" + md)
    path = write_results(out_dir, stem, meta, rows, header + "\n" + md + "\n")
    if plot:
        _plot(path + ".json")


def _plot(json_path):
    for png in plots.plot_results(json_path):
        print(f"wrote {png}")


CPU_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_dtype_list(text) -> list:
    """argparse type of --dtype: a comma list of CPU_DTYPES' names."""
    names = str(text).split(",")
    if not all(n in CPU_DTYPES for n in names):
        raise argparse.ArgumentTypeError(f"takes a comma list of {', '.join(CPU_DTYPES)}, got {text!r}")
    return names


def run_cpu(args):
    for name in args.dtype:
        dtype = CPU_DTYPES[name]
        suffix = ("" if dtype == torch.float32 else "_bf16") + ("_quick" if args.quick else "")
        meta = cpu_meta(dtype=name, cpu_bfloat16=okadfa.backends()["cpu"].get("bfloat16"))
        meta["matmul_gflops"] = matmul_gflops()
        print(f"machine: {meta['threads']} threads, fp32 matmul {meta['matmul_gflops']:.0f} GFLOP/s; {name}", flush=True)
        if args.only in (None, "favor_attention"):
            max_t = args.max_t or 8192
            max_t = min(max_t, 1024) if args.quick else max_t
            Ts = [t for t in (256, 512, 1024, 2048, 4096, 8192) if t <= max_t]
            names = (["cpu"] if okadfa.backends()["cpu"]["available"] else []) + ["reference", "sdpa"] + sorted(peers())
            rows = run(Ts, names, quick=args.quick, dtype=dtype)
            meta["matmul_gflops_after"] = matmul_gflops()
            _write(args.out, "cpu_favor_attention" + suffix, dict(meta, shape=dict(B=B, H=H, M=M, D=D)), rows,
                   table(rows, names), plot=not args.no_plots)
        if args.only in (None, "dfa_head"):
            if "matmul_gflops_after" in meta:      # the favor section ran: its "after" is this one's "before"
                meta["matmul_gflops"] = meta.pop("matmul_gflops_after")
            shape = dict(N=256, d=256, V=4096, P=12) if args.quick else dict(DFA_HEAD_SHAPE)
            rows = run_dfa_head(shape, quick=args.quick, dtype=dtype)
            meta["matmul_gflops_after"] = matmul_gflops()
            _write(args.out, "cpu_dfa_head" + suffix, dict(meta, shape=shape), rows, dfa_head_table(rows),
                   plot=not args.no_plots)


def run_cuda(args):
    from . import gpu

    if args.only:
        print(f"--only {args.only} does not apply on cuda: okadfa.bench.gpu runs both sections")
    argv = ["--device", "cuda", "--out", args.out] + (["--quick"] if args.quick else []) + \
        (["--max-t", str(args.max_t)] if args.max_t else [])
    gpu.main(argv)
    if not args.no_plots:
        _plot(os.path.join(args.out, "cuda_kernels" + ("_quick" if args.quick else "") + ".json"))


def parse_args(argv=None, prog="python -m okadfa.bench.report"):
    parser = script_parser("report", __doc__, prog=prog)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="which microbenchmarks to run (auto: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    parser.add_argument("--debug", action="store_true", help="with `okadfa bench`: a traceback for every error")
    parser.add_argument("--max-t", type=positive_int, help="largest T (default 8192 on cpu, 32768 on cuda)")
    parser.add_argument("--only", choices=("favor_attention", "dfa_head"), help="run one cpu section (default: both)")
    parser.add_argument("--dtype", type=cpu_dtype_list, default="float32", help="cpu: a comma list of float32, bfloat16")
    parser.add_argument("--no-plots", action="store_true", help="write JSON and markdown only")
    parser.add_argument("--replot", action="store_true", help="only redraw the plots of the JSON files in --out")
    return parser.parse_args(argv)


def main(argv=None, prog="python -m okadfa.bench.report"):
    args = parse_args(argv, prog)
    if args.replot:
        for path in sorted(glob.glob(os.path.join(args.out, "*.json"))):
            _plot(path)
        return
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        run_cuda(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
