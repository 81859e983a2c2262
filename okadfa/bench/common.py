"""What the favor_attention benchmarks run, shared by the pytest-benchmark file and
okadfa/bench/report.py: one callable per (backend, pass) on CPU tensors, a timer reporting
median and spread, peak-memory measurement, and the FLOP count of the chunked algorithm."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import okadfa
from okadfa.models import _PRESETS
from okadfa.training.cli import ArgumentParser, positive_int
from okadfa.training.files import write_text

B, H, M, D = 1, 8, 256, 64
PRESETS = tuple(_PRESETS)      # the model sizes a --preset may name


def inputs(T, *, m=M, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(3))
    return q, k, v, okadfa.random_features(m, D, generator=g, dtype=dtype)


def _performer_attention(m, fast_kernel=True):
    """performer-pytorch's FastAttention, on fast-transformers' CPU causal kernel
    when that is installed, else on performer-pytorch's own CPU path."""
    import contextlib
    import io

    from performer_pytorch import FastAttention
    from performer_pytorch.performer_pytorch import causal_linear_attention

    with contextlib.redirect_stdout(io.StringIO()):   # it prints that it found no CUDA kernel
        attn = FastAttention(dim_heads=D, nb_features=m, causal=True)
    if fast_kernel:
        # performer-pytorch selects the fast-transformers kernel only when its CUDA
        # build imports; its CausalDotProduct dispatches CPU tensors to the CPU kernel.
        attn.causal_linear_fn = causal_linear_attention
    return attn


def _fast_transformers_attention(m):
    """fast-transformers' CPU causal product on FAVOR+ features (okadfa.favor_features),
    normalised as its CausalLinearAttention does."""
    from fast_transformers.causal_product import causal_dot_product

    w = okadfa.random_features(m, D)

    def attn(q, k, v):
        fq, fk = okadfa.favor_features(q, w), okadfa.favor_features(k, w)
        den = torch.einsum("...tm,...tm->...t", fq, fk.cumsum(-2)) + 1e-6
        return causal_dot_product(fq, fk, v) / den[..., None]
    return attn


def _importable(name):
    try:
        __import__(name)
        return True
    except Exception:
        return False


def peers():
    """Peer implementations importable here: name -> factory(m) returning f(q, k, v)."""
    performer = _importable("performer_pytorch")
    fast = _importable("fast_transformers.causal_product")
    if performer and fast:
        return {"performer+fast-transformers": _performer_attention}
    if performer:
        return {"performer-pytorch": lambda m: _performer_attention(m, fast_kernel=False)}
    if fast:
        return {"fast-transformers": _fast_transformers_attention}
    return {}


def make_forward(name, q, k, v, w, causal=True):
    """A zero-argument forward for one row of the tables."""
    if name in ("cpu", "reference"):
        return lambda: okadfa.favor_attention(q, k, v, w, causal=causal, backend=name)
    if name == "sdpa":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    attn = peers()[name](w.shape[0])
    return lambda: attn(q, k, v)


def make_step(name, T, passes, m=M, dtype=torch.float32):
    """Callable for `passes` ("fwd" or "fwd+bwd") with inputs in `dtype` prepared outside the timing."""
    q, k, v, w = inputs(T, m=m, dtype=dtype)
    if passes == "fwd":
        fwd = make_forward(name, q, k, v, w)

        def run():
            with torch.no_grad():
                fwd()
        return run
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    fwd = make_forward(name, q, k, v, w)
    grad = torch.randn(B, H, T, D, dtype=dtype)

    def run():
        for x in (q, k, v):
            x.grad = None
        fwd().backward(grad)
    return run


# A timing whose interquartile range exceeds this fraction of its median is flagged noisy.
NOISY_IQR = 0.10
NOISY_MARK = "†"
NOISY_NOTE = (f"{NOISY_MARK} noisy: IQR above {NOISY_IQR:.0%} of the median; rerun on a quieter machine "
              "before comparing.")
# fp32 matmul throughput measured before and after a section differing by more than this
# fraction (of the lower one) means the machine's load changed during the section.
LOADED_MATMUL = 0.20


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call over `runs` timed calls: the median and the interquartile range
    iqr = Q3 − Q1 (quartiles interpolated linearly between order statistics, as numpy's and
    torch.quantile's defaults). runs is None where the timer does not say (triton's do_bench)."""
    median: float
    iqr: float
    runs: int | None

    @classmethod
    def of(cls, times):
        if len(times) < 2:
            raise ValueError("a spread needs at least 2 timed calls")
        q1, q2, q3 = statistics.quantiles(times, n=4, method="inclusive")
        return cls(q2, q3 - q1, len(times))

    @property
    def noisy(self) -> bool:
        return self.iqr > NOISY_IQR * self.median

    def row(self) -> dict:
        """The fields every timed row of a results JSON carries, in milliseconds."""
        return dict(median_ms=1e3 * self.median, iqr_ms=1e3 * self.iqr, runs=self.runs, noisy=self.noisy)


def _timed_calls(fn, times, *, min_runs, min_seconds, max_runs):
    """Append the wall time of each call of fn() to times: at least min_runs calls and
    min_seconds, at most max_runs calls."""
    start, first = time.perf_counter(), len(times)
    while len(times) - first < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) - first >= max_runs:
            break


def time_calls(fn, *, min_runs=5, min_seconds=1.0, warmup=1, max_runs=50) -> Timing:
    """Median and IQR of fn()'s wall time over at least min_runs calls and min_seconds (at
    most max_runs calls), after `warmup` untimed calls. An own loop rather than
    torch.utils.benchmark.Timer: that one times blocks of calls (block means hide the spread
    of single calls) on one thread unless told otherwise, and cannot interleave rows."""
    for _ in range(warmup):
        fn()
    times = []
    _timed_calls(fn, times, min_runs=max(min_runs, 2), min_seconds=min_seconds, max_runs=max_runs)
    return Timing.of(times)


def time_in_turns(fns: dict, *, rounds, min_runs=5, min_seconds=1.0, warmup=1, max_runs=50) -> dict:
    """{name: Timing} of each fn in fns, timed in turns: every round times each fn for its
    share of the budget (min_runs/rounds calls, rounded up, and min_seconds/rounds) before
    the next fn runs, so that load on a shared machine coming and going hits all of them
    alike and their ratios hold where their absolute times do not. `warmup` untimed calls
    of each first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    share = dict(min_runs=-(-min_runs // rounds), min_seconds=min_seconds / rounds,
                 max_runs=max(1, max_runs // rounds))
    for _ in range(rounds):
        for name, fn in fns.items():
            _timed_calls(fn, times[name], **share)
    return {name: Timing.of(t) for name, t in times.items()}


def ms_cell(row, digits=1) -> str:
    """A row's time for a markdown table: "median ±IQR/2" in ms, with NOISY_MARK when noisy;
    the median alone for rows without an IQR."""
    cell = f"{row['median_ms']:.{digits}f}"
    if row.get("iqr_ms") is not None:
        cell += f" ±{row['iqr_ms'] / 2:.{digits}f}"
    return cell + (NOISY_MARK if row.get("noisy") else "")


def noisy_footnote(rows) -> list:
    """[NOISY_NOTE] when any row is noisy, else []: the line under a table that uses ms_cell."""
    return ["", NOISY_NOTE] if any(r.get("noisy") for r in rows) else []


def load_warning(before, after) -> str | None:
    """A warning when the fp32 matmul GFLOP/s before and after a section differ by more than
    LOADED_MATMUL of the lower one: something else ran on the machine meanwhile."""
    if max(before, after) <= (1 + LOADED_MATMUL) * min(before, after):
        return None
    return (f"loaded machine: fp32 matmul {before:.0f} GFLOP/s before, {after:.0f} after "
            f"(more than {LOADED_MATMUL:.0%} apart); timings of this section are suspect")


@contextlib.contextmanager
def quiet_stderr():
    """Send file descriptor 2 to /dev/null inside the block. The profiler's kineto library
    writes its start/stop log lines (USDT: ... profiler_start) from C++ straight to fd 2,
    where contextlib.redirect_stderr cannot catch them. Python exceptions still propagate;
    warnings fn() raises show on its first, unprofiled call."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn):
    """Peak bytes allocated through torch's CPU allocator during fn() (on top of what
    existed before), from the profiler's memory events. The okadfa kernels take their
    workspaces from that allocator too, so nothing of theirs is missed."""
    fn()  # warm caches and lazy initialisation outside the measurement
    from torch.profiler import ProfilerActivity, profile
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    # Allocations (+) and frees (−) in time order; the peak of the running sum is the
    # most memory held at once beyond what existed before the call.
    changes = sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    peak = held = 0
    for _, nbytes in changes:
        held += nbytes
        peak = max(peak, held)
    return peak


def chunked_flops(T, *, m=M, dk=D, dv=D, chunk=64, causal=True, backward=False, bh=B * H):
    """Floating-point operations (2 per multiply-add) of the matrix products the cpu
    backend's chunked algorithm performs (csrc/chunked_attention.h), feature maps
    included; exponentials and other element-wise work are not counted.
    tests/test_bench_report.py checks it against the GEMMs the kernel really runs.
    W = Dv + 1: the normaliser rides along as an extra value column."""
    w = dv + 1
    total = 0
    for j, t0 in enumerate(range(0, T, chunk)):
        n = min(chunk, T - t0)
        feat = 2 * n * m * dk            # a feature-map GEMM, or one back through the projection
        state = 2 * n * m * w            # a product with an (M×W) state operand
        carry = 0 if j == 0 else state   # nothing is carried into the first chunk
        if not backward:
            if causal:                   # features, A, A·vx, fq·S, state update
                total += 2 * feat + 2 * n * n * m + 2 * n * n * w + carry + state
            else:                        # keys: features, state; queries: features, fq·S
                total += 2 * feat + 2 * state
        elif causal:
            total += feat + state                                   # pass 1: states
            total += 2 * feat + 2 * n * n * m + 2 * n * n * w       # pass 2: features, A, B
            total += 2 * n * n * m + carry                          # dfq = B·fk + E·S_jᵀ
            total += 2 * n * n * m + state                          # dfk = Bᵀ·fq + vx·R_jᵀ
            total += 2 * n * n * dv + 2 * n * m * dv                # dv = Aᵀ·g' + fk·R_j
            total += carry + 2 * feat                               # R update; dq, dk through W
        else:
            total += feat + state                                   # pass 1: the state
            total += 2 * feat + 2 * state                           # queries: features, E·Sᵀ, R, dq
            total += 2 * feat + state + 2 * n * m * dv              # keys: features, vx·Rᵀ, fk·R, dk
    return bh * total


# ------------------------------------------------------------------------------------------- dfa_head
# The DFA output head at gpt2-small scale (docs/design.md §4): error="hidden", 12 feedback points.
DFA_HEAD_SHAPE = dict(N=2048, d=768, V=50257, P=12)
DFA_HEAD_ROWS = ("cpu", "cpu-stored", "unfused")
# What each row is, for tables and plots (the JSON keeps the backend names above).
DFA_HEAD_LABELS = {"cpu": "fused, seeded feedback", "cpu-stored": "fused, stored feedback",
                   "unfused": "unfused PyTorch"}


def make_dfa_head_step(name, N=2048, d=768, V=50257, P=12, seed=0, dtype=torch.float32):
    """One DFA head step, inputs (h, w_dec, the stored feedback) in `dtype` prepared outside the timing:

    cpu:        okadfa.dfa_head (backend="cpu"), seeded feedback generated in the kernel;
    cpu-stored: the same with the feedback stored as a (P, d, d) tensor;
    unfused:    plain PyTorch: full N×V logits, F.cross_entropy, autograd for the head
                gradients and e = ∂loss/∂h, then e B_pᵀ with a stored (P, d, d) feedback."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g)
    w = torch.randn(V, d, generator=g) * d ** -0.5
    t = torch.randint(0, V, (N,), generator=g)
    h, w = h.to(dtype), w.to(dtype)
    spec = okadfa.FeedbackSpec(P, d, d, seed=seed)
    if name == "cpu":
        return lambda: okadfa.dfa_head(h, w, t, spec, backend="cpu")
    stored = (torch.randn(P, d, d, generator=g) * d ** -0.5).to(dtype)   # any fixed matrices will do
    if name == "cpu-stored":
        return lambda: okadfa.dfa_head(h, w, t, stored, backend="cpu")
    h, w = h.requires_grad_(), w.requires_grad_()

    def unfused():
        h.grad = w.grad = None
        torch.nn.functional.cross_entropy(h @ w.T, t).backward()
        return torch.matmul(h.grad, stored.transpose(1, 2))
    return unfused


def dfa_head_flops(N=2048, d=768, V=50257, P=12):
    """Matrix-product FLOPs of one head step: logits, grad_h, grad_w_dec (2·N·V·d each)
    and the projection of the hidden error (2·N·d·d per point)."""
    return 3 * 2 * N * V * d + P * 2 * N * d * d


# The CPU features that decide the speed of float32 and bfloat16 matrix products (the flag names
# of /proc/cpuinfo).
MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_capabilities() -> dict:
    """The CPU's model name and which of MATRIX_FLAGS it has, as Linux reports them (/proc/cpuinfo;
    only the processor name elsewhere)."""
    info = {"model": platform.processor() or platform.machine(), "flags": None}
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("processor"))
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["model"] = fields.get("model name", info["model"])
    have = set(fields.get("flags", "").split())
    info["flags"] = [flag for flag in MATRIX_FLAGS if flag in have]
    return info


def cpu_meta(**extra) -> dict:
    """What every result file records about the run: date, CPU and its matrix features, threads,
    versions."""
    caps = cpu_capabilities()
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device="cpu", processor=caps["model"],
                cpu_flags=caps["flags"], threads=torch.get_num_threads(), torch=torch.__version__,
                okadfa=okadfa.__version__, **extra)


def script_parser(module: str, doc: str, *, out: bool = True, prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of `python -m okadfa.bench.<module>` (or `prog`): okadfa's ArgumentParser
    (a user error is one line, not a traceback), the module's docstring as its help, and --out."""
    parser = ArgumentParser(prog=prog or f"python -m okadfa.bench.{module}", description=doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    if out:
        parser.add_argument("--out", default="bench/results",
                            help="directory for the JSON and markdown results (default bench/results)")
    return parser


def positive_int_list(text) -> list:
    """argparse type: a comma list of positive integers, e.g. "1024,2048"."""
    return [positive_int(t) for t in str(text).split(",")]


def write_results(out_dir: str, stem: str, meta: dict, rows: list, md: str) -> str:
    """Write <out_dir>/<stem>.json ({meta, rows}) and <stem>.md (md); return the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem)
    write_text(path + ".json", json.dumps(dict(meta=meta, rows=rows), indent=1))
    write_text(path + ".md", md)
    print(f"wrote {path}.json and {path}.md")
    return path
