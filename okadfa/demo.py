"""`make demo` / `python -m okadfa.demo`: causal FAVOR+ attention on a realistic
shape, checked against the reference path and timed against softmax SDPA.

    python -m okadfa.demo [--batch 2] [--heads 8] [--seq-len 2048] [--head-dim 64] [--features 256]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import okadfa


def _median_ms(fn, runs=5):
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _rms_rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    w = okadfa.random_features(args.features, args.head_dim, generator=g)
    native = okadfa.backends()["cpu"]["available"]
    backend = "cpu" if native else "reference"
    print(f"okadfa {okadfa.__version__} | torch {torch.__version__} | {torch.get_num_threads()} threads")
    print(f"causal FAVOR+ attention, B={args.batch} H={args.heads} T={args.seq_len} D={args.head_dim} "
          f"M={args.features}, float32; backends: "
          + ", ".join(f"{n}={'yes' if s['available'] else 'no'}" for n, s in okadfa.backends().items()))

    # Correctness: the native kernel against the float64 reference, outputs and gradients.
    qs, ks, vs = (x[:, :2, :512].clone().requires_grad_() for x in (q, k, v))
    out = okadfa.favor_attention(qs, ks, vs, w, causal=True, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (qs, ks, vs))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (qs, ks, vs))
    ref = okadfa.reference.favor_attention(q64, k64, v64, w.double(), causal=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
    errors = [_rms_rel(out, ref)] + [_rms_rel(a, b) for a, b in zip(grads, ref_grads)]
    exact = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=True)

    def step(fn, with_grad):
        qq, kk, vv = (x.clone().requires_grad_(with_grad) for x in (q, k, v))
        def run():
            o = fn(qq, kk, vv)
            if with_grad:
                o.backward(torch.ones_like(o))
        return run

    rows = []
    candidates = [(f"okadfa {backend}", lambda a, b, c: okadfa.favor_attention(a, b, c, w, causal=True,
                                                                            backend=backend))]
    if native:
        candidates.append(("okadfa reference", lambda a, b, c: okadfa.favor_attention(
            a, b, c, w, causal=True, backend="reference")))
    candidates.append(("SDPA softmax", lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
        a, b, c, is_causal=True)))
    for name, fn in candidates:
        with torch.no_grad():
            fwd = _median_ms(step(fn, False))
        rows.append((name, fwd, _median_ms(step(fn, True))))

    print("\ncheck (T=512, 2 heads) against the float64 reference, relative RMS error:")
    print(f"  output {errors[0]:.1e} | dq {errors[1]:.1e} | dk {errors[2]:.1e} | dv {errors[3]:.1e}"
          f"\nFAVOR+ against exact softmax attention (the approximation itself, M={args.features}): relative RMS "
          f"{_rms_rel(ref, exact):.2f}, cosine {torch.nn.functional.cosine_similarity(ref.flatten(), exact.flatten(), dim=0):.3f}")
    print(f"\n| implementation | forward ms | forward+backward ms |\n|---|---|---|")
    for name, fwd, full in rows:
        print(f"| {name} | {fwd:.1f} | {full:.1f} |")
    ok = max(errors) < 1e-4
    print("\n" + ("OK: the kernel matches the reference." if ok else "MISMATCH against the reference!"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
