"""PNG plots of the benchmark results written by okadfa/bench/report.py and okadfa/bench/gpu.py.

Attention rows: one figure per pass ("fwd", "fwd+bwd"), median time (error bars:
±IQR/2 where the rows record iqr_ms) and peak memory against T on log-log axes, one
line per backend and peer, and the T from which the okadfa backend (cpu; triton and
cuda on a GPU) is faster than SDPA beyond the spread (see `verdict`) marked with a
dotted line. DFA head rows: horizontal bars of time (with IQR) and peak memory.

matplotlib is imported only when a plot is drawn; without it a note is printed
and nothing is drawn.
"""
from __future__ import annotations

import json
import math
import os

from okadfa.training.files import atomic_path

from .common import DFA_HEAD_LABELS

PASSES = ("fwd", "fwd+bwd")
OKADFA = ("cpu", "triton", "cuda")   # okadfa's own backends; the crossover is marked for these


def _spread(row):
    """log(1 + IQR/(2·median)): the row's half spread as a log factor on its median; 0 without iqr_ms."""
    return math.log1p(row["iqr_ms"] / (2 * row["median_ms"])) if row.get("iqr_ms") is not None else 0.0


def _margin(row, base):
    """(log(m / m_base), s, s_base): the log ratio of the medians and both rows' spreads."""
    return math.log(row["median_ms"] / base["median_ms"]), _spread(row), _spread(base)


def verdict(row, base):
    """Whether `row` is "faster", "slower" or "within noise" of `base`, timings given by median m
    and IQR (ms). Each time stands for the interval [m/(1 + r), m·(1 + r)], r = IQR/(2m) (±IQR/2
    taken as a factor, the same on log axes either side): faster means the ratio of medians
    beats the combined spread, m/m_base < 1/((1 + r)(1 + r_base)), i.e. row's interval lies
    wholly below base's; slower the mirror image; anything between is within noise. A row
    without iqr_ms counts r = 0: the medians alone decide ("medians only")."""
    d, s, s_base = _margin(row, base)
    return "faster" if d + s + s_base < 0 else "slower" if d - s - s_base > 0 else "within noise"


def compare(rows, name, baseline="sdpa", passes="fwd", M=None):
    """{T: (row of name, row of baseline)} for every T both were timed at (median_ms set).
    M: only rows with this feature count (rows without an "M" count always); None takes
    every row, so pass it when rows hold several M per T."""
    def timed(backend):
        return {r["T"]: r for r in rows
                if r["backend"] == backend and r["passes"] == passes and r.get("median_ms")
                and (M is None or r.get("M", M) == M)}

    mine, base = timed(name), timed(baseline)
    return {T: (mine[T], base[T]) for T in sorted(set(mine) & set(base))}


def crossover(rows, name, baseline="sdpa", passes="fwd", M=None):
    """The T from which `name` stays faster than `baseline` (by `verdict`, beyond the spread)
    up to the largest T measured.

    With d(T) = log(m/m_base) + log(1 + r) + log(1 + r_base) (negative exactly where `verdict`
    says faster; without IQRs the log ratio of the medians), between the last T where d ≥ 0
    and the next one d is taken as linear in log T, as straight time curves on log-log axes
    make it, and its zero is the crossover. Returns 0.0 when `name` is faster at every T
    measured, None when it is not faster at the largest T (or there is no T both were
    measured at). M as in `compare`."""
    pairs = compare(rows, name, baseline, passes, M)
    Ts = list(pairs)
    margin = [sum(_margin(*pairs[T])) for T in Ts]     # < 0: name is faster
    if not Ts or margin[-1] >= 0:
        return None
    slower = [i for i, d in enumerate(margin) if d >= 0]
    if not slower:
        return 0.0
    i = slower[-1]
    d0, d1 = margin[i], margin[i + 1]
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
            pts = sorted((r["T"], r["median_ms"], r["peak_mb"], r.get("iqr_ms")) for r in rows
                         if r["backend"] == name and r["passes"] == passes and r.get("median_ms")
                         and r.get("M", m) == feats)
            if not pts:
                continue
            T, ms, mb, iqr = zip(*pts)
            yerr = [0.0 if i is None else i / 2 for i in iqr] if any(i is not None for i in iqr) else None
            bars = ax_t.errorbar(T, ms, yerr=yerr, fmt=style, marker="o", ms=4, capsize=2, label=label,
                                 color=colors.get(name))
            colors[name] = bars.lines[0].get_color()
            mem = [(t, v) for t, v in zip(T, mb) if v > 0]          # log axes: leave out zeros
            if mem:
                ax_m.plot(*zip(*mem), style, marker="o", ms=4, label=label, color=colors[name])
        notes = []
        for name in (n for n in OKADFA if n in names):
            pairs = compare(rows, name, baseline, passes, M=m)
            x = crossover(rows, name, baseline, passes, M=m)
            if x is None:
                note = f"{name}: no crossover ≤ {max(Ts)}"
            elif x == 0:
                note = f"{name}: faster than {baseline} at all T"
            else:
                note = f"{name}: faster than {baseline} from T ≈ {_fmt_T(x)}"
                ax_t.axvline(x, ls=":", color=colors[name])
                # hung from the top of the axes, a few points in from the frame
                ax_t.annotate(f"{name} crossover ≈ {_fmt_T(x)}", (x, 1), xycoords=ax_t.get_xaxis_transform(),
                              xytext=(-3, -6), textcoords="offset points", rotation=90, va="top", ha="right",
                              fontsize=8, color=colors[name])
            ties = [str(T) for T, (r, b) in pairs.items() if verdict(r, b) == "within noise"]
            if ties:
                note += f"; within noise of {baseline} at T={', '.join(ties)}"
            if not all(r.get("iqr_ms") is not None for pair in pairs.values() for r in pair):
                note += " (medians only: no IQR recorded)"
            notes.append(note)
        if notes:   # bottom right, where time curves rising with T leave room, inset from the frame
            ax_t.annotate("\n".join(notes), (1, 0), xycoords="axes fraction", xytext=(-8, 8),
                          textcoords="offset points", ha="right", va="bottom", fontsize=8,
                          bbox=dict(boxstyle="round,pad=0.4", fc="white", ec="0.8", alpha=0.9))
        spread = any(r.get("iqr_ms") is not None for r in rows)
        ax_t.set_title(f"median time vs {baseline}" + (" (bars: ±IQR/2)" if spread else ""), fontsize=10)
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
        _save(fig, path)
        paths.append(path)
    return paths


def plot_dfa_head(rows, meta, path):
    """Bars of median time (error bars ±IQR/2 where recorded) and peak memory, one per head
    row, labelled by common.DFA_HEAD_LABELS (gpu.py's rows carry their label as backend);
    write `path`, return [path]."""
    fig = _figure(figsize=(10, 1.4 + 0.5 * len(rows)), layout="constrained")
    if fig is None:
        return []
    names = [DFA_HEAD_LABELS.get(r["backend"], r["backend"]) for r in rows][::-1]      # first row on top
    iqr = [r.get("iqr_ms") for r in rows][::-1]
    for ax, key, label in zip(fig.subplots(1, 2, sharey=True), ("median_ms", "peak_mb"),
                              ("median time (ms)", "peak memory (MB)")):
        values = [r[key] for r in rows][::-1]
        spread = key == "median_ms" and any(i is not None for i in iqr)
        err = [0.0 if i is None else i / 2 for i in iqr] if spread else None
        bars = ax.barh(names, values, xerr=err, capsize=3, color=[f"C{i}" for i in range(len(rows))][::-1])
        ax.bar_label(bars, [f" {v:,.0f}" if v >= 100 else f" {v:.3g}" for v in values], fontsize=8)
        ax.set_xlabel(label + (" ±IQR/2" if err else ""))
        ax.set_xlim(0, 1.2 * max(values))
        ax.grid(True, axis="x", alpha=0.3)
    r0 = rows[0]
    timing = ("backend", "median_ms", "iqr_ms", "runs", "noisy", "peak_mb", "gflops", "dtype")
    dims = ", ".join(f"{k}={r0[k]}" for k in r0 if k not in timing)
    fig.suptitle(f"DFA head, error=hidden: {_device(meta)}, {meta.get('dtype', '?')}, {dims}", fontsize=10)
    _save(fig, path)
    return [path]


def _save(fig, path):
    """fig as a PNG at path, written atomically (a reader never sees half a plot)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def plot_results(json_path):
    """Draw the plots for one results JSON next to it; return the paths written.
    Reads report.py's files ({"rows"} with a "backend" each: attention rows have a "T")
    and gpu.py's ({"attention", "dfa_head"}); the other benchmarks' files in the same folder
    (rows without a "backend") have no plot and are skipped."""
    with open(json_path) as f:
        data = json.load(f)
    stem, meta = os.path.splitext(json_path)[0], data.get("meta", {})
    if "attention" in data:
        paths = plot_attention(data["attention"], meta, stem) if data["attention"] else []
        if data.get("dfa_head"):
            paths += plot_dfa_head(data["dfa_head"], meta, stem + "_dfa_head.png")
        return paths
    rows = data.get("rows") or []
    if not rows or "backend" not in rows[0]:
        return []
    if "T" in rows[0]:
        return plot_attention(rows, meta, stem)
    return plot_dfa_head(rows, meta, stem + ".png")
