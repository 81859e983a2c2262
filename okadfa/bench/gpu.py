"""GPU benchmarks: favor_attention against flash attention, and the fused DFA head.

    python -m okadfa.bench.gpu [--quick] [--max-t 32768] [--out bench/results]

1. Causal attention, bf16, B·H = 32 (B=4, H=8), M = 256 features, D = 64, T from
   1k to 32k: forward and forward+backward median time and peak memory of every
   okadfa GPU backend (triton, cuda) against scaled_dot_product_attention forced
   to its flash kernel, and flash-linear-attention's chunk_linear_attn when
   importable (fed FAVOR+ features computed beforehand, scale=1.0, normalised).
2. dfa_head at gpt2-small scale (d=768, V=50257, 12 points, N=8192 tokens,
   error="hidden", bf16 h and w_dec): the fused op with seeded feedback against
   the unfused PyTorch path (full N×V logits, cross-entropy, autograd for the
   error, matmul with stored feedback).

Timing follows the device method: warm-up, CUDA-event times of single calls
(triton.testing.do_bench), several input sets rotated so small sizes do not run
from cache; every row records median_ms, iqr_ms, runs and noisy
(okadfa.bench.common.Timing), the tables "median ±IQR/2", † where noisy. Peak
memory is torch.cuda.max_memory_allocated above what was held before the call. `--device cpu` runs the same harness on the CPU (for tests).
"""
from __future__ import annotations

import datetime
import inspect
import itertools
import json
import os

import torch
import torch.nn.functional as F

import okadfa
from okadfa.training.cli import device_name, positive_int

from .common import Timing, ms_cell, noisy_footnote, peak_memory, script_parser, time_calls

BATCH, HEADS, FEATURES, HEAD_DIM = 4, 8, 256, 64
HEAD = dict(d=768, V=50257, points=12, N=8192)
INPUT_SETS = 3


def _timing(fn, device) -> dict:
    """Timing.row() of fn: CUDA-event times of single calls on a GPU, wall times on the CPU."""
    if device.type == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="all")
        return Timing.of([t / 1e3 for t in ms]).row()
    return time_calls(fn, min_runs=3, min_seconds=0.2).row()


def _peak_mb(fn, device):
    if device.type != "cuda":
        return peak_memory(fn) / 2 ** 20
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _rotating(make):
    """A zero-argument callable cycling over INPUT_SETS prepared closures."""
    calls = itertools.cycle([make(seed) for seed in range(INPUT_SETS)])
    return lambda: next(calls)()


def _fla_linear_attention():
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:
        return None
    head_first = "head_first" in inspect.signature(chunk_linear_attn).parameters

    def attend(fq, fk, v):                  # (B, H, T, ·) -> fla's (B, T, H, ·) layout
        args = [x.transpose(1, 2) for x in (fq, fk, v)]
        kw = dict(head_first=False) if head_first else {}
        return chunk_linear_attn(*args, scale=1.0, normalize=True, **kw)[0].transpose(1, 2)
    return attend


def attention_rows(Ts, device, dtype, backends):
    fla = _fla_linear_attention() if device.type == "cuda" else None
    names = list(backends) + ["sdpa-flash" if device.type == "cuda" else "sdpa"] + (["fla-chunk"] if fla else [])
    rows = []
    for T, name, passes in itertools.product(Ts, names, ("fwd", "fwd+bwd")):
        def make(seed):
            g = torch.Generator(device=device).manual_seed(seed)
            q, k, v = (torch.randn(BATCH, HEADS, T, HEAD_DIM, device=device, dtype=dtype, generator=g)
                       for _ in range(3))
            w = okadfa.random_features(FEATURES, HEAD_DIM, generator=torch.Generator().manual_seed(seed),
                                       device=device, dtype=dtype)
            if name == "fla-chunk":
                q, k = okadfa.favor_features(q, w), okadfa.favor_features(k, w)
                fn = lambda: fla(q, k, v)                                    # noqa: E731
            elif name.startswith("sdpa"):
                fn = lambda: _sdpa(q, k, v, flash=name == "sdpa-flash")      # noqa: E731
            else:
                fn = lambda: okadfa.favor_attention(q, k, v, w, causal=True, backend=name)  # noqa: E731
            if passes == "fwd":
                def run():
                    with torch.no_grad():
                        fn()
                return run
            for x in (q, k, v):
                x.requires_grad_()
            grad = torch.randn(BATCH, HEADS, T, HEAD_DIM, device=device, dtype=dtype, generator=g)

            def run():
                for x in (q, k, v):
                    x.grad = None
                fn().backward(grad)
            return run
        try:
            step = _rotating(make)
            row = dict(backend=name, T=T, passes=passes, **_timing(step, device), peak_mb=_peak_mb(step, device))
        except torch.OutOfMemoryError:
            row = dict(backend=name, T=T, passes=passes, median_ms=None, peak_mb=None, error="out of memory")
        rows.append(row)
        print(f"  {name:>12} T={T:6d} {passes:8s} {_fmt(row)}", flush=True)
    return rows


def _sdpa(q, k, v, flash):
    if not flash:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def head_rows(device, dtype, d, V, points, N):
    """Fused dfa_head (seeded feedback) against the unfused PyTorch head."""
    spec = okadfa.FeedbackSpec(points, d, d, seed=0)
    stored = okadfa.materialize_feedback(spec, device=device)

    def make_inputs(seed):
        g = torch.Generator(device=device).manual_seed(seed)
        h = torch.randn(N, d, device=device, dtype=dtype, generator=g)
        w = (torch.randn(V, d, device=device, dtype=dtype, generator=g) * d ** -0.5)
        t = torch.randint(0, V, (N,), device=device, generator=g)
        return h, w, t

    def fused(seed):
        h, w, t = make_inputs(seed)
        return lambda: okadfa.dfa_head(h, w, t, spec)

    def unfused(seed):
        h, w, t = make_inputs(seed)
        h.requires_grad_()
        w.requires_grad_()

        def run():
            loss = F.cross_entropy((h @ w.T).float(), t)
            grad_h, grad_w = torch.autograd.grad(loss, (h, w))
            return loss, grad_h, grad_w, torch.einsum("ne,pde->pnd", grad_h.float(), stored).to(dtype)
        return run

    rows = []
    for name, make in (("dfa_head fused (seeded)", fused), ("unfused PyTorch (stored)", unfused)):
        step = _rotating(make)
        row = dict(backend=name, d=d, V=V, points=points, N=N, **_timing(step, device), peak_mb=_peak_mb(step, device))
        rows.append(row)
        print(f"  {name:>26} {_fmt(row)}", flush=True)
    return rows


def _fmt(row):
    if row.get("median_ms") is None:
        return row.get("error", "n/a")
    return f"{ms_cell(row, 2):>16} ms {row['peak_mb']:9.1f} MB"


def markdown(attention, head, backends):
    names = sorted({r["backend"] for r in attention}, key=[r["backend"] for r in attention].index)
    base = "sdpa-flash" if "sdpa-flash" in names else "sdpa"

    def cell(name, T, passes):
        return next((r for r in attention if (r["backend"], r["T"], r["passes"]) == (name, T, passes)), None)

    out = []
    for passes in ("fwd", "fwd+bwd"):
        out.append(f"\n**Causal attention, {passes}: median ms ±IQR/2 (peak MB); speed-up vs {base} "
                   "(of the medians)**\n")
        out.append("| T | " + " | ".join(names) + " | " + " | ".join(f"{b} vs {base}" for b in backends) + " |")
        out.append("|---" * (1 + len(names) + len(backends)) + "|")
        for T in sorted({r["T"] for r in attention}):
            cells = []
            for n in names:
                r = cell(n, T, passes)
                cells.append(r.get("error", "") if r["median_ms"] is None else f"{ms_cell(r, 2)} ({r['peak_mb']:.0f})")
            ratios = []
            for b in backends:
                rb, rs = cell(b, T, passes), cell(base, T, passes)
                ok = rb["median_ms"] and rs["median_ms"]
                ratios.append(f"{rs['median_ms'] / rb['median_ms']:.2f}×" if ok else "")
            out.append(f"| {T} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    if head:
        r0 = head[0]
        out.append(f"\n**dfa_head, d={r0['d']}, V={r0['V']}, {r0['points']} points, N={r0['N']}, error=hidden**\n")
        out.append("| path | median ms ±IQR/2 | peak MB |")
        out.append("|---|---|---|")
        for r in head:
            out.append(f"| {r['backend']} | {ms_cell(r, 2)} | {r['peak_mb']:.0f} |")
        fused, unfused = head
        out.append(f"\nfused/unfused: time {fused['median_ms'] / unfused['median_ms']:.2f}×, "
                   f"peak memory {fused['peak_mb'] / unfused['peak_mb']:.3f}×")
    return "\n".join(out + noisy_footnote(attention + head))


def main(argv=None):
    parser = script_parser("gpu", __doc__)
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="T up to 2048 and a smaller head")
    parser.add_argument("--max-t", type=positive_int, default=32768)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    max_t = min(args.max_t, 2048) if args.quick else args.max_t
    Ts = [t for t in (1024, 2048, 4096, 8192, 16384, 32768) if t <= max_t] or [max_t]
    status = okadfa.backends()
    backends = [b for b in (("triton", "cuda") if device.type == "cuda" else ("cpu",)) if status[b]["available"]]
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=device.type,
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, okadfa=okadfa.__version__, dtype="bfloat16",
                shape=dict(B=BATCH, H=HEADS, M=FEATURES, D=HEAD_DIM), backends=status)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print(f"{meta['device_name']}; torch {meta['torch']}; triton {meta['triton']}", flush=True)
    attention = attention_rows(Ts, device, dtype, backends)
    head_shape = HEAD if not args.quick else dict(d=64, V=1000, points=3, N=256)
    head = head_rows(device, dtype, **head_shape)
    header = (f"Device: {meta['device_name']}; torch {meta['torch']}; triton {meta['triton']}; {meta['date']}; "
              f"bf16, B={BATCH}, H={HEADS}, M={FEATURES}, D={HEAD_DIM}")
    md = markdown(attention, head, backends)
    print("\n" + header + "\n" + md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{device.type}_kernels" + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, attention=attention, dfa_head=head), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(header + "\n" + md + "\n")
    print(f"\nwrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
