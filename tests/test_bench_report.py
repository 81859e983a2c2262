"""The benchmark report runs end to end on tiny sizes and writes well-formed results and plots."""
import importlib.util
import json
import math
import statistics

import pytest

import okadfa

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed")
PNG = b"\x89PNG"


def _assert_png(path):
    assert path.exists(), path
    assert path.read_bytes()[:4] == PNG


def test_report_quick_run(tmp_path, monkeypatch):
    from okadfa.bench import common, report

    monkeypatch.setattr(common, "H", 2)
    monkeypatch.setattr(report, "H", 2)
    throughputs = iter([100.0, 110.0, 120.0])     # before favor, after favor (= before the head), after the head
    monkeypatch.setattr(report, "matmul_gflops", lambda: next(throughputs))
    report.main(["--device", "cpu", "--quick", "--max-t", "256", "--out", str(tmp_path)])
    if HAVE_MATPLOTLIB:
        for name in ("cpu_favor_attention_quick_time_memory_fwd.png",
                     "cpu_favor_attention_quick_time_memory_fwd_bwd.png", "cpu_dfa_head_quick.png"):
            _assert_png(tmp_path / name)
    data = json.loads((tmp_path / "cpu_favor_attention_quick.json").read_text())
    assert {"date", "torch", "threads", "matmul_gflops"} <= set(data["meta"])
    rows = data["rows"]
    assert {r["backend"] for r in rows} >= {"reference", "sdpa"}
    for r in rows:
        assert r["median_ms"] > 0 and r["peak_mb"] >= 0 and r["T"] == 256
        assert r["iqr_ms"] >= 0 and r["runs"] >= 3 and r["noisy"] == (r["iqr_ms"] > 0.1 * r["median_ms"])
    assert (data["meta"]["matmul_gflops"], data["meta"]["matmul_gflops_after"]) == (100.0, 110.0)
    head_meta = json.loads((tmp_path / "cpu_dfa_head_quick.json").read_text())["meta"]
    assert (head_meta["matmul_gflops"], head_meta["matmul_gflops_after"]) == (110.0, 120.0)   # its own section
    head = json.loads((tmp_path / "cpu_dfa_head_quick.json").read_text())["rows"]
    assert all(r["iqr_ms"] >= 0 and r["runs"] == 5 for r in head)     # a warm-up call, then 5 rounds in turns
    assert "| unfused PyTorch (`unfused`) |" in (tmp_path / "cpu_dfa_head_quick.md").read_text()
    if okadfa.backends()["cpu"]["available"]:
        cpu = [r for r in rows if r["backend"] == "cpu"]
        assert {(r["passes"], r["M"]) for r in cpu} == {("fwd", 256), ("fwd+bwd", 256), ("fwd+bwd", 128)}
        assert all(r["gflops"] > 0 for r in cpu)
    assert "| 256 |" in (tmp_path / "cpu_favor_attention_quick.md").read_text()


def test_report_dtype_axis(tmp_path, monkeypatch):
    """--dtype float32,bfloat16: a result file per dtype, every row labelled with its dtype, the
    header naming the bfloat16 engine; an unknown dtype is refused with a one-line error."""
    from okadfa.bench import common, report

    monkeypatch.setattr(common, "H", 2)
    monkeypatch.setattr(report, "H", 2)
    report.main(["--device", "cpu", "--quick", "--max-t", "256", "--dtype", "float32,bfloat16", "--no-plots",
                 "--out", str(tmp_path)])
    for stem, dtype in (("cpu_favor_attention_quick", "float32"), ("cpu_favor_attention_bf16_quick", "bfloat16"),
                        ("cpu_dfa_head_quick", "float32"), ("cpu_dfa_head_bf16_quick", "bfloat16")):
        data = json.loads((tmp_path / f"{stem}.json").read_text())
        assert data["meta"]["dtype"] == dtype and {r["dtype"] for r in data["rows"]} == {dtype}, stem
        assert "cpu_flags" in data["meta"]
        assert f"bfloat16: {okadfa.backends()['cpu'].get('bfloat16')}" in (tmp_path / f"{stem}.md").read_text()
    with pytest.raises(SystemExit, match="--dtype: takes a comma list of float32, bfloat16, got 'fp8'"):
        report.main(["--device", "cpu", "--quick", "--dtype", "fp8", "--out", str(tmp_path)])


# A BLAS shim preloaded in front of libtorch_cpu: it counts 2·m·n·k of every sgemm_/dgemm_ call
# (the symbols the cpu kernels call, csrc/cpu_math.cpp) and forwards it, so the FLOP count is
# read from outside the kernels, with nothing compiled into them.
_BLAS_COUNTER = r"""
#include <atomic>
#include <cstdlib>
#include <dlfcn.h>
static std::atomic<long long> flops{0};
// The real symbol: the next one in the global scope, else in libtorch_cpu (loaded RTLD_LOCAL).
static void* real(const char* name) {
  void* f = dlsym(RTLD_NEXT, name);
  if (f) return f;
  void* lib = dlopen(std::getenv("OKADFA_TEST_BLAS_LIB"), RTLD_NOW | RTLD_NOLOAD);
  return lib ? dlsym(lib, name) : nullptr;
}
extern "C" long long okadfa_test_flops(int reset) { return reset ? flops.exchange(0) : flops.load(); }
#define FORWARD(name, T)                                                                              \
  extern "C" void name(const char* ta, const char* tb, const int* m, const int* n, const int* k,     \
                       const T* al, const T* a, const int* lda, const T* b, const int* ldb,          \
                       const T* be, T* c, const int* ldc) {                                          \
    using F = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,       \
                       const T*, const int*, const T*, const int*, const T*, T*, const int*);        \
    static F next = reinterpret_cast<F>(real(#name));                                                \
    flops += 2LL * *m * *n * *k;                                                                     \
    next(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc);                                           \
  }
FORWARD(sgemm_, float)
FORWARD(dgemm_, double)
"""

_COUNT_SCRIPT = """
import ctypes, json, sys, torch, okadfa
counter = ctypes.CDLL(sys.argv[1]).okadfa_test_flops
torch.set_num_threads(1)   # one task per head: no column split
B, H, M, Dk, Dv = 1, 3, 24, 8, 5
counts = {}
for causal in (True, False):
    for T, chunk in ((200, 64), (64, 64), (10, 4)):
        q, k = torch.randn(2, B, H, T, Dk).unbind(0)
        v, w = torch.randn(B, H, T, Dv), okadfa.random_features(M, Dk)
        counter(1)
        out, lognorm = torch.ops.okadfa.favor_attention_fwd(q, k, v, w, None, causal, 0.3, chunk)
        fwd = counter(1)
        torch.ops.okadfa.favor_attention_bwd(torch.randn_like(out), q, k, v, w, out, lognorm, None, causal, 0.3, chunk,
                                             False)
        counts[f"{causal}-{T}-{chunk}"] = (fwd, counter(1))
print(json.dumps(counts))
"""


@pytest.fixture(scope="module")
def kernel_gemm_flops(tmp_path_factory):
    """{"causal-T-chunk": (forward FLOPs, backward FLOPs)} of the cpu kernel's BLAS calls."""
    import os
    import shutil
    import subprocess
    import sys

    if not okadfa.backends()["cpu"]["available"]:
        pytest.skip(f"cpu backend: {okadfa.backends()['cpu']['reason']}")
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH: the BLAS counting shim cannot be built")
    work = tmp_path_factory.mktemp("blas_counter")
    (work / "counter.cpp").write_text(_BLAS_COUNTER)
    shim = work / "libblas_counter.so"
    built = subprocess.run(["g++", "-O1", "-shared", "-fPIC", str(work / "counter.cpp"), "-o", str(shim), "-ldl"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    import torch
    env = dict(os.environ, LD_PRELOAD=str(shim),
               OKADFA_TEST_BLAS_LIB=os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    run = subprocess.run([sys.executable, "-c", _COUNT_SCRIPT, str(shim)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(f > 0 and b > 0 for f, b in counts.values()), "the shim saw no GEMM: the kernels bypass sgemm_/dgemm_"
    return counts


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T,chunk", [(200, 64), (64, 64), (10, 4)])
def test_flop_count_matches_the_kernels_gemms(kernel_gemm_flops, causal, T, chunk):
    """okadfa.bench.common.chunked_flops against the GEMMs the cpu kernel actually ran."""
    from okadfa.bench.common import chunked_flops

    fwd, bwd = kernel_gemm_flops[f"{causal}-{T}-{chunk}"]
    kw = dict(m=24, dk=8, dv=5, chunk=chunk, causal=causal, bh=3)
    assert fwd == chunked_flops(T, **kw)
    assert bwd == chunked_flops(T, backward=True, **kw)


def _rows(backend, times, passes="fwd", **extra):
    return [dict(backend=backend, T=T, passes=passes, median_ms=ms, peak_mb=ms / 10, **extra)
            for T, ms in times.items()]


def test_crossover_interpolates_on_log_log_axes():
    from okadfa.bench.plots import crossover

    # cpu: 2 ms flat; sdpa: 1 ms at T=1024, 8 ms at T=4096. log(cpu/sdpa) goes from ln 2 to -ln 4,
    # linearly in log T: zero a third of the way, at T = 1024 · 4^(1/3) ≈ 1625.5.
    rows = _rows("cpu", {512: 1.5, 1024: 2, 4096: 2}) + _rows("sdpa", {512: 0.5, 1024: 1, 4096: 8})
    assert crossover(rows, "cpu") == pytest.approx(1024 * 4 ** (1 / 3))
    assert crossover(rows, "cpu", passes="fwd+bwd") is None              # no rows for that pass
    assert crossover(rows, "sdpa", baseline="cpu") is None                # slower at the largest T


def test_crossover_everywhere_never_and_noise():
    from okadfa.bench.plots import crossover

    sdpa = _rows("sdpa", {256: 1, 512: 4, 1024: 16})
    assert crossover(sdpa + _rows("cpu", {256: 0.5, 512: 1, 1024: 2}), "cpu") == 0.0     # faster at all T
    assert crossover(sdpa + _rows("cpu", {256: 2, 512: 8, 1024: 32}), "cpu") is None     # never faster
    # faster, slower, faster: the crossover is where it becomes faster for good, between 512 and 1024
    x = crossover(sdpa + _rows("cpu", {256: 0.5, 512: 8, 1024: 8}), "cpu")
    assert 512 < x < 1024 and x == pytest.approx(512 * 2 ** (math.log(2) / math.log(4)))
    # M selects rows when there are several per T
    rows = sdpa + _rows("cpu", {256: 2, 512: 8, 1024: 8}, M=256) + _rows("cpu", {256: 0.5, 512: 1, 1024: 2}, M=128)
    assert crossover(rows, "cpu", M=128) == 0.0 and 512 < crossover(rows, "cpu", M=256) < 1024


def test_timer_reports_median_and_iqr_of_the_times(monkeypatch):
    """time_calls: as many calls as asked for, and median and IQR (linearly interpolated
    quartiles) of exactly the times it measured."""
    from okadfa.bench import common

    lasts = iter([1, 1, 4, 2, 3, 10, 2, 2])        # seconds on a fake clock that only fn() advances
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += next(lasts)
    t = common.time_calls(fn, min_runs=7, min_seconds=0.0, warmup=1)
    times = [1, 4, 2, 3, 10, 2, 2]                 # the warm-up's 1 is not timed
    assert t.runs == 7 and t.median == statistics.median(times) == 2
    # sorted 1 2 2 2 3 4 10: Q1 at position 1.5 → 2, Q3 at position 4.5 → 3.5
    assert t.iqr == pytest.approx(3.5 - 2)
    assert t.row() == dict(median_ms=2e3, iqr_ms=pytest.approx(1.5e3), runs=7, noisy=True)
    with pytest.raises(ValueError):
        common.Timing.of([1.0])


def test_rows_timed_in_turns_share_the_load(monkeypatch):
    """time_in_turns: after one warm-up call each, the fns take turns round by round (so a
    burst of load hits them alike), and each Timing is made of that fn's own times."""
    from okadfa.bench import common

    clock, calls = [0.0], []
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def fn(name, seconds):
        def call():
            calls.append(name)
            clock[0] += seconds
        return call
    t = common.time_in_turns({"a": fn("a", 1.0), "b": fn("b", 3.0)}, rounds=3, min_runs=6, min_seconds=0.0)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert (t["a"].runs, t["a"].median, t["b"].runs, t["b"].median) == (6, 1.0, 6, 3.0)


def test_noisy_rows_are_flagged_and_footnoted():
    from okadfa.bench import common, report

    # noisy is relative: 0.2 s of IQR on 10.2 s is tight, 0.4 s on 0.7 s is not
    tight = [common.Timing.of([0.100, 0.102, 0.104]).row(), common.Timing.of([10.0, 10.2, 10.4]).row()]
    loose = tight[:1] + [common.Timing.of([0.5, 0.5, 0.9, 0.9]).row()]
    assert [r["noisy"] for r in tight] == [False, False] and [r["noisy"] for r in loose] == [False, True]
    assert common.ms_cell(loose[1]) == "700.0 ±200.0" + common.NOISY_MARK
    assert common.noisy_footnote(tight) == [] and common.noisy_footnote(loose) == ["", common.NOISY_NOTE]
    rows = [dict(backend=b, dtype="float32", N=8, d=4, V=16, P=2, peak_mb=1.0, gflops=1.0, **t)
            for b, t in zip(("cpu", "unfused"), loose)]
    md = report.dfa_head_table(rows)
    assert "| fused, seeded feedback (`cpu`) | 102 ±1 |" in md and "| 700 ±200† |" in md
    assert md.endswith(common.NOISY_NOTE)
    assert common.NOISY_MARK not in report.dfa_head_table(rows[:1])


def test_matmul_drift_marks_a_loaded_machine(tmp_path, capsys):
    from okadfa.bench import common, report

    assert common.load_warning(100, 115) is None and common.load_warning(100, 80) is not None
    meta = dict(processor="x", cpu_flags=None, cpu_bfloat16="no", threads=2, torch="t", date="d",
                matmul_gflops=100.0, matmul_gflops_after=70.0)
    report._write(str(tmp_path), "t", meta, [], "table", plot=False)
    assert "warning: loaded machine" in capsys.readouterr().out
    assert "**Warning, loaded machine" in (tmp_path / "t.md").read_text()
    assert json.loads((tmp_path / "t.json").read_text())["meta"]["loaded"] is True


def _timed(backend, T, median, iqr, passes="fwd"):
    return dict(backend=backend, T=T, passes=passes, median_ms=median, iqr_ms=iqr, peak_mb=1.0)


def test_faster_needs_the_spreads_apart():
    """verdict: faster only when the medians' ratio beats the combined spread; overlapping
    spreads are within noise, whatever the medians; without IQRs the medians decide."""
    from okadfa.bench.plots import verdict

    base = _timed("sdpa", 1024, 10.0, 1.0)                                   # 10 ± 0.5
    assert verdict(_timed("cpu", 1024, 9.0, 0.4), base) == "faster"         # 9 ± 0.2 clear of it
    assert verdict(_timed("cpu", 1024, 9.6, 0.4), base) == "within noise"   # 9.8 reaches into 9.5..10.5
    assert verdict(_timed("cpu", 1024, 9.0, 2.0), base) == "within noise"   # 9 ± 1 overlaps
    assert verdict(_timed("cpu", 1024, 12.0, 1.0), base) == "slower"
    medians = [dict(r, iqr_ms=None) for r in (_timed("cpu", 1024, 9.6, 0.4), base)]
    assert verdict(*medians) == "faster"
    from okadfa.bench.report import _ratio                                    # the tables' ratio columns
    assert _ratio(_timed("cpu", 1024, 9.6, 0.4), base) == "≈ 0.96×"
    assert _ratio(_timed("cpu", 1024, 9.0, 0.4), base) == "0.90×"


def test_crossover_respects_the_spread():
    """A T where the medians say faster but the spreads overlap does not count: the crossover
    moves to where the spreads part, and faster-at-all-T needs every T clear."""
    from okadfa.bench.plots import crossover

    sdpa = [_timed("sdpa", T, ms, 0.1 * ms) for T, ms in ((256, 1), (512, 4), (1024, 16))]
    clear = [_timed("cpu", T, ms, 0.1 * ms) for T, ms in ((256, 0.5), (512, 1), (1024, 2))]
    assert crossover(sdpa + clear, "cpu") == 0.0
    close = [_timed("cpu", 256, 0.95, 0.1)] + clear[1:]                      # 0.95 ± 0.05 vs 1 ± 0.05
    x = crossover(sdpa + close, "cpu")
    assert 256 < x < 512
    assert crossover([dict(r, iqr_ms=None) for r in sdpa + close], "cpu") == 0.0   # medians only
    assert crossover(sdpa + [_timed("cpu", T, 0.98 * r["median_ms"], 0.2 * r["median_ms"]) for T, r in
                             zip((256, 512, 1024), sdpa)], "cpu") is None           # within noise everywhere


@needs_matplotlib
def test_plot_says_within_noise_and_medians_only(tmp_path, monkeypatch):
    """The notes of the attention plot (its annotations, recorded): "within noise" where the
    spreads overlap, "medians only" for rows without an IQR (old result files)."""
    import matplotlib.axes

    from okadfa.bench import plots

    notes = []
    sdpa = [_timed("sdpa", T, ms, 0.1 * ms) for T, ms in ((256, 1), (512, 4), (1024, 16))]
    cpu = [_timed("cpu", 256, 0.95, 0.1), _timed("cpu", 512, 1, 0.1), _timed("cpu", 1024, 2, 0.2)]
    annotate = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **kw: notes.append(text) or annotate(self, text, *a, **kw))
    plots.plot_attention(sdpa + cpu, {}, str(tmp_path / "a"))
    assert any("within noise of sdpa at T=256" in n and "medians only" not in n for n in notes)
    notes.clear()
    plots.plot_attention([dict(r, iqr_ms=None) for r in sdpa + cpu], {}, str(tmp_path / "b"))
    assert any("faster than sdpa at all T (medians only" in n for n in notes)


def test_peak_memory_is_silent(capfd):
    """The profiler's kineto log lines (written by C++ to fd 2) do not reach the terminal."""
    import torch

    from okadfa.bench.common import peak_memory

    a = torch.randn(64, 64)
    assert peak_memory(lambda: a @ a) > 0
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def _gpu_results():
    """cuda_kernels.json as okadfa.bench.gpu writes it, with made-up numbers: triton overtakes
    flash attention between 2k and 4k, cuda is faster at every T, one row ran out of memory."""
    Ts = (1024, 2048, 4096, 8192)
    attention = []
    for passes in ("fwd", "fwd+bwd"):
        attention += _rows("triton", {T: T / 1500 for T in Ts}, passes)
        attention += _rows("cuda", {T: T / 5000 for T in Ts}, passes)
        attention += _rows("sdpa-flash", {T: (T / 2048) ** 2 for T in Ts}, passes)
        attention += _rows("fla-chunk", {T: T / 1000 for T in Ts[:-1]}, passes)
        attention.append(dict(backend="fla-chunk", T=8192, passes=passes, median_ms=None, peak_mb=None,
                              error="out of memory"))
    head = [dict(backend="dfa_head fused (seeded)", d=768, V=50257, points=12, N=8192, median_ms=9.5, peak_mb=60.0),
            dict(backend="unfused PyTorch (stored)", d=768, V=50257, points=12, N=8192, median_ms=21.0,
                 peak_mb=1700.0)]
    meta = dict(device="cuda", device_name="NVIDIA H100 80GB HBM3", dtype="bfloat16",
                shape=dict(B=4, H=8, M=256, D=64))
    return dict(meta=meta, attention=attention, dfa_head=head)


def test_gpu_crossovers():
    from okadfa.bench.plots import crossover

    rows = _gpu_results()["attention"]
    assert 2048 < crossover(rows, "triton", "sdpa-flash") < 4096
    assert crossover(rows, "cuda", "sdpa-flash", passes="fwd+bwd") == 0.0


GPU_PNGS = ("cuda_kernels_time_memory_fwd.png", "cuda_kernels_time_memory_fwd_bwd.png", "cuda_kernels_dfa_head.png")


@needs_matplotlib
def test_replot_draws_gpu_results(tmp_path):
    from okadfa.bench import report

    (tmp_path / "cuda_kernels.json").write_text(json.dumps(_gpu_results()))
    report.main(["--replot", "--out", str(tmp_path)])
    for name in GPU_PNGS:
        _assert_png(tmp_path / name)


@needs_matplotlib
def test_device_cuda_runs_the_gpu_suite_and_plots_it(tmp_path, monkeypatch):
    """--device cuda hands over to okadfa.bench.gpu.main (replaced here: no GPU needed) and plots what it wrote."""
    from okadfa.bench import gpu, report

    calls = []

    def fake_gpu_main(argv):
        calls.append(argv)
        (tmp_path / "cuda_kernels.json").write_text(json.dumps(_gpu_results()))
    monkeypatch.setattr(gpu, "main", fake_gpu_main)
    report.main(["--device", "cuda", "--out", str(tmp_path)])
    assert calls == [["--device", "cuda", "--out", str(tmp_path)]]
    for name in GPU_PNGS:
        _assert_png(tmp_path / name)


def test_no_plots(tmp_path, monkeypatch):
    from okadfa.bench import report

    monkeypatch.setattr(report, "matmul_gflops", lambda: 1.0)
    report.main(["--device", "cpu", "--quick", "--only", "dfa_head", "--no-plots", "--out", str(tmp_path)])
    assert (tmp_path / "cpu_dfa_head_quick.json").exists()
    assert not list(tmp_path.glob("*.png"))


def test_model_bench_tiny(tmp_path):
    from okadfa.bench import model as model_bench
    model_bench.main(["--preset", "tiny", "--seq-lens", "16,24", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "model_tiny.json").read_text())
    # DFA's default model has its own unembedding (V·d) and, post-LN, no final LayerNorm (2d)
    n, V, d = data["meta"]["parameters"], data["meta"]["config"]["vocab_size"], data["meta"]["config"]["d_model"]
    assert n["dfa"] - n["bp"] == V * d - 2 * d
    rows = data["rows"]
    assert {(r["T"], r["attention"], r["mode"]) for r in rows} == {
        (T, a, m) for T in (16, 24) for a in ("favor", "softmax") for m in model_bench.MODES}
    assert all(r["median_s"] > 0 and r["peak_mb"] > 0 for r in rows)
    train = {(r["T"], r["attention"]): r["peak_mb"] for r in rows if r["mode"] == "train bp"}
    fwd = {(r["T"], r["attention"]): r["peak_mb"] for r in rows if r["mode"] == "forward"}
    assert all(train[k] > fwd[k] for k in train)      # a training step keeps activations for backward
    md = (tmp_path / "model_tiny.md").read_text()
    assert "| 24 | train dfa |" in md and "favor speed-up" in md


def test_dfa_sweep_runs_merges_and_reuses(tmp_path):
    """A 2-step stage: every variant with the same seeds and steps, the table with the n-gram levels,
    finished runs reused on a second call, an interrupted run (summary before --steps) redone."""
    from okadfa.bench import dfa_sweep

    argv = ["--stage", "bundle", "--only", "dfa (defaults)", "--only", "bp (same architecture)", "--steps", "2",
            "--seeds", "1", "--jobs", "2", "--work", str(tmp_path / "work"), "--results", str(tmp_path)]
    first = dfa_sweep.main(argv)
    rows = {r["name"]: r for r in first["rows"]}
    assert set(rows) == {"dfa (defaults)", "bp (same architecture)"}
    dfa, bp = rows["dfa (defaults)"], rows["bp (same architecture)"]
    assert dfa["config"]["training"] == "dfa" and bp["config"]["training"] == "bp"
    assert bp["config"]["norm"] == dfa["config"]["norm"] == "post"          # same architecture
    from okadfa.training.train import OPTIMIZER_DEFAULTS
    assert dfa["optimizer"]["lr"] == OPTIMIZER_DEFAULTS["dfa"]["lr"] != bp["optimizer"]["lr"]
    md = (tmp_path / "dfa_sweep_bundle.md").read_text()
    assert "unigram" in md and "| dfa (defaults) |" in md and "DFA/BP validation-loss ratio" in md
    metrics = tmp_path / "work" / "bundle" / "dfa_(defaults)" / "seed0" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns
    bp_metrics = tmp_path / "work" / "bundle" / "bp_(same_architecture)" / "seed0" / "metrics.jsonl"
    lines = bp_metrics.read_text().splitlines()
    summary = json.loads(lines[-1])
    bp_metrics.write_text("\n".join(lines[:-1] + [json.dumps({**summary, "step": 1})]) + "\n")
    second = dfa_sweep.main(argv)
    assert metrics.stat().st_mtime_ns == stamp                              # reused
    assert json.loads(bp_metrics.read_text().splitlines()[-1])["step"] == 2  # redone
    assert second["rows"][0]["runs"]["0"]["val_loss"] == dfa["runs"]["0"]["val_loss"]
def test_profile_step_tiny(tmp_path):
    """okadfa.bench.profile_step attributes every profiled microsecond to a part, the attention, head and
    optimizer of both models show up, and only the DFA model has DFA feedback to generate."""
    from okadfa.bench import profile_step
    profile_step.main(["--preset", "tiny", "--seq-len", "32", "--precision", "fp32,bf16", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "profile_tiny_T32.json").read_text())
    assert {(r["precision"], r["attention"]) for r in data["rows"]} == {
        (p, a) for p in ("fp32", "bf16") for a in ("favor", "softmax")}
    for r in data["rows"]:
        assert set(r["parts_ms"]) <= {*profile_step.PARTS, "other"}
        assert math.isclose(sum(r["parts_ms"].values()), r["total_ms"])
        assert r["parts_ms"]["attention"] > 0 and r["parts_ms"]["optimizer"] > 0 and r["parts_ms"]["head"] > 0
        if r["attention"] == "softmax":
            assert r["parts_ms"].get("feedback", 0) == 0
    assert "| bf16 | favor, train dfa |" in (tmp_path / "profile_tiny_T32.md").read_text()


def test_profile_parts_follow_the_ancestors():
    """A matmul inside a named part belongs to that part; a bare matmul to matmuls."""
    from types import SimpleNamespace as E
    from okadfa.bench.profile_step import part_of
    head = E(name="okadfa::dfa_head", cpu_parent=None)
    assert part_of(E(name="aten::mm", cpu_parent=head)) == "head"
    assert part_of(E(name="aten::mm", cpu_parent=E(name="aten::linear", cpu_parent=None))) == "matmuls"
    assert part_of(E(name="aten::add_", cpu_parent=E(name="Optimizer.step#AdamW.step", cpu_parent=None))) == "optimizer"
    assert part_of(E(name="aten::copy_", cpu_parent=None)) == "other"


def test_hf_decoding_bench_runs_and_the_favor_cache_does_not_grow(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    from okadfa.bench import decoding_hf
    decoding_hf.main(["--contexts", "8,32", "--tokens", "2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "decoding_hf.json").read_text())["rows"]
    assert {(r["T"], r["attention"], r["cache"]) for r in rows} == {
        (T, a, c) for T in (8, 32) for a, c in decoding_hf.VARIANTS}
    mb = {(r["T"], r["attention"], r["cache"]): r["cache_mb"] for r in rows}
    assert mb[8, "okadfa_favor", "FavorCache"] == mb[32, "okadfa_favor", "FavorCache"]
    assert mb[32, "sdpa", "DynamicCache"] == 4 * mb[8, "sdpa", "DynamicCache"]


@pytest.mark.parametrize("module, argv", [
    ("approximation", ["--bogus"]),
    ("cpu_bf16", ["--rounds", "0"]),
    ("decoding", ["--preset", "huge"]),
    ("decoding_hf", ["--contexts", "256,x"]),
    ("dfa_sweep", ["--jobs", "0"]),
    ("gpu", ["--max-t", "-1"]),
    ("model", ["--seq-lens", "0"]),
    ("profile_step", ["--seq-len", "0"]),
    ("report", ["--max-t", "0"]),
    ("report", ["--dtype", "float32,float16"]),
])
def test_bench_scripts_refuse_bad_arguments_in_one_line(module, argv, capsys):
    """Every `python -m okadfa.bench.<module>` refuses a bad option before measuring anything:
    exit status 2 and one line naming the command and the option, no traceback."""
    import importlib

    main = importlib.import_module(f"okadfa.bench.{module}").main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith(f"python -m okadfa.bench.{module}: error: ")
