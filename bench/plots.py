"""PNG plots of the benchmark results written by bench/report.py and bench/gpu.py.

Attention rows: one figure per pass ("fwd", "fwd+bwd"), median time and peak
memory against T on log-log axes, one line per backend and peer, and the T at
which the okadfa backend (cpu; triton and cuda on a GPU) overtakes SDPA marked
with a dotted line. DFA head rows: horizontal bars of time and peak memory.

matplotlib is imported only when a plot is drawn; without it a note is printed
and nothing is drawn.
"""
from __future__ import annotations

import json
import math
import os

PASSES = ("fwd", "fwd+bwd")
OKADFA = ("cpu", "triton", "cuda")   # okadfa's own backends; the crossover is marked for these


def crossover(rows, name, baseline="sdpa", passes="fwd", M=None):
    """The T from which `name` stays faster than `baseline` up to the largest T measured.

    Between the last T where `name` is not faster and the next one, both time curves
    are taken as straight lines on log-log axes: the log of the time ratio is then
    linear in log T, and its zero is the crossover. Returns 0.0 when `name` is faster
    at every T measured, None when it is not faster at the largest T (or there is no
    T both were measured at). M: only rows with this feature count (rows without an
    "M" count always); None takes every row, so pass it when rows hold several M per T."""
    def times(backend):
        return {r["T"]: r["median_ms"] for r in rows
                if r["backend"] == backend and r["passes"] == passes and r.get("median_ms")
                and (M is None or r.get("M", M) == M)}

    mine, base = times(name), times(baseline)
    Ts = sorted(set(mine) & set(base))
    logratio = [math.log(mine[T] / base[T]) for T in Ts]     # < 0: name is faster
    if not Ts or logratio[-1] >= 0:
        return None
    slower = [i for i, d in enumerate(logratio) if d >= 0]
    if not slower:
        return 0.0
    i = slower[-1]
    d0, d1 = logratio[i], logratio[i + 1]
    logT = math.log(Ts[i]) + (math.log(Ts[i + 1]) - math.log(Ts[i])) * d0 / (d0 - d1)
    return math.exp(logT)


def _figure(**kw):
    """A matplotlib Figure drawn by the Agg canvas, or None (with a note) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plots drawn")
        return None
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _fmt_T(T):
    return f"{T / 1000:.1f}k" if T >= 1000 else f"{T:.0f}"


def _device(meta):
    if meta.get("device") == "cpu" and "processor" in meta:
        return f"CPU ({meta['processor']}, {meta['threads']} threads)"
    return meta.get("device_name") or meta.get("device", "?")


def plot_attention(rows, meta, stem):
    """Write <stem>_time_memory_fwd.png and <stem>_time_memory_fwd_bwd.png; return their paths."""
    shape = meta.get("shape", {})
    m = shape.get("M")
    names = list(dict.fromkeys(r["backend"] for r in rows))
    baseline = "sdpa-flash" if "sdpa-flash" in names else "sdpa"
    paths = []
    for passes in PASSES:
        Ts = sorted({r["T"] for r in rows if r["passes"] == passes})
        if not Ts:
            continue
        fig = _figure(figsize=(12, 4.8), layout="constrained")
        if fig is None:
            return paths
        from matplotlib.ticker import LogFormatter
        ax_t, ax_m = fig.subplots(1, 2)
        colors = {}
        series = [(name, m, "-", name) for name in names]                 # (backend, M, style, label)
        for other in sorted({r["M"] for r in rows if r["backend"] == "cpu" and r.get("M", m) != m}):
            series.insert(names.index("cpu") + 1, ("cpu", other, "--", f"cpu (M={other})"))
        for name, feats, style, label in series:
            pts = sorted((r["T"], r["median_ms"], r["peak_mb"]) for r in rows
                         if r["backend"] == name and r["passes"] == passes and r.get("median_ms")
                         and r.get("M", m) == feats)
            if not pts:
                continue
            T, ms, mb = zip(*pts)
            line, = ax_t.plot(T, ms, style, marker="o", ms=4, label=label, color=colors.get(name))
            colors[name] = line.get_color()
            mem = [(t, v) for t, v in zip(T, mb) if v > 0]          # log axes: leave out zeros
            if mem:
                ax_m.plot(*zip(*mem), style, marker="o", ms=4, label=label, color=colors[name])
        notes = []
        for name in (n for n in OKADFA if n in names):
            x = crossover(rows, name, baseline, passes, M=m)
            if x is None:
                notes.append(f"{name}: no crossover ≤ {max(Ts)}")
            elif x == 0:
                notes.append(f"{name}: faster than {baseline} at all T")
            else:
                ax_t.axvline(x, ls=":", color=colors[name])
                ax_t.annotate(f"{name} crossover ≈ {_fmt_T(x)}", (x, 0.98), xycoords=ax_t.get_xaxis_transform(),
                              xytext=(-3, 0), textcoords="offset points", rotation=90, va="top", ha="right",
                              fontsize=8, color=colors[name])
        ax_t.set_title(f"median time vs {baseline}" + ("\n" + "; ".join(notes) if notes else ""), fontsize=10)
        ax_m.set_title("peak memory", fontsize=10)
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak memory (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(Ts, [str(t) for t in Ts])
            ax.set_xticks([], minor=True)
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(ylabel)
            ax.yaxis.set_major_formatter(LogFormatter())    # 10, 100 rather than 10^1, 10^2
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
            ax.grid(True, which="both", alpha=0.3)
        fig.legend(*ax_t.get_legend_handles_labels(), loc="outside lower center", ncols=len(series), fontsize=9,
                   frameon=False)
        dims = ", ".join(f"{k}={v}" for k, v in shape.items())
        fig.suptitle(f"Causal attention, {passes}: {_device(meta)}, {meta.get('dtype', '?')}, {dims}")
        path = f"{stem}_time_memory_{passes.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def plot_dfa_head(rows, meta, path):
    """Bars of median time and peak memory, one per head row; write `path`, return [path]."""
    fig = _figure(figsize=(10, 1.4 + 0.5 * len(rows)), layout="constrained")
    if fig is None:
        return []
    names = [r["backend"] for r in rows][::-1]      # first row on top
    for ax, key, label in zip(fig.subplots(1, 2, sharey=True), ("median_ms", "peak_mb"),
                              ("median time (ms)", "peak memory (MB)")):
        values = [r[key] for r in rows][::-1]
        bars = ax.barh(names, values, color=[f"C{i}" for i in range(len(rows))][::-1])
        ax.bar_label(bars, [f" {v:,.0f}" if v >= 100 else f" {v:.3g}" for v in values], fontsize=8)
        ax.set_xlabel(label)
        ax.set_xlim(0, 1.2 * max(values))
        ax.grid(True, axis="x", alpha=0.3)
    r0 = rows[0]
    dims = ", ".join(f"{k}={r0[k]}" for k in r0 if k not in ("backend", "median_ms", "peak_mb", "gflops"))
    fig.suptitle(f"DFA head, error=hidden: {_device(meta)}, {meta.get('dtype', '?')}, {dims}", fontsize=10)
    fig.savefig(path, dpi=110)
    return [path]


def plot_results(json_path):
    """Draw the plots for one results JSON next to it; return the paths written.
    Reads report.py's files ({"rows"}: attention rows have a "T") and gpu.py's
    ({"attention", "dfa_head"})."""
    with open(json_path) as f:
        data = json.load(f)
    stem, meta = os.path.splitext(json_path)[0], data.get("meta", {})
    if "attention" in data:
        paths = plot_attention(data["attention"], meta, stem) if data["attention"] else []
        if data.get("dfa_head"):
            paths += plot_dfa_head(data["dfa_head"], meta, stem + "_dfa_head.png")
        return paths
    rows = data.get("rows") or []
    if rows and "T" in rows[0]:
        return plot_attention(rows, meta, stem)
    if rows:
        return plot_dfa_head(rows, meta, stem + ".png")
    return []
