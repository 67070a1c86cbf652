"""``btpo compare --plot``: accuracy bars per dataset and the training curves of the compared runs."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from btpo_cli.compare.formats import _as_table
from btpo_cli.compare.table import Collected, Table
from btpo_cli.errors import BtpoError
from btpo_cli.methods import method_specs
from btpo_cli.runs.folder import Run


class PlotDependencyMissing(BtpoError, ImportError):
    """matplotlib is not installed (a BtpoError for the CLI, an ImportError for callers that catch that)."""


LOSS = ("train/loss", "training loss")


def curve_keys() -> dict[str, str]:
    """Every curve the plot can draw, metrics key → title: ``train/loss``, then each registered method's
    ``MethodSpec.curves`` in table order."""
    out = dict([LOSS])
    for spec in method_specs():
        for key, title in spec.curves:
            out.setdefault(key, title)
    return out


def _run_curves(t: Table) -> list[tuple[int, str, dict[str, tuple[list[int], list[float]]]]]:
    """Per run of the table: its row, its label and every curve key's (steps, values)."""
    keys = curve_keys()
    out = []
    for i, r in enumerate(t.rows):
        for run in r.runs:
            m = Run(run.path).read_metrics()
            out.append((i, f"{r.model} / {r.method} / {run.name}", {k: _curve(m, k) for k in keys}))
    return out


def _panels(curves: list[tuple[int, str, dict[str, tuple[list[int], list[float]]]]]) -> list[tuple[str, str]]:
    """(key, lettered title) of the curve panels: ``train/loss`` always, a method's curve when a run logged it."""
    titles = curve_keys()
    keys = [k for k in titles if k == LOSS[0] or any(c[2][k][0] for c in curves)]
    return [(k, f"({chr(ord('b') + j)}) {titles[k]}") for j, k in enumerate(keys)]


def plot_panels(t: Table | Collected) -> list[tuple[str, str]]:
    """The training-curve panels :func:`plot` draws for ``t``: (metrics key, title), ``train/loss`` first."""
    return _panels(_run_curves(_as_table(t)))


def _curve(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = sorted((int(r["step"]), float(r[key])) for r in rows
                 if key in r and "step" in r and isinstance(r[key], (int, float)) and math.isfinite(r[key]))
    return [s for s, _ in pts], [v for _, v in pts]


def _band(runs: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Several runs' curves → steps, and per step the mean, min and max over the runs that logged it."""
    at: dict[int, list[float]] = {}
    for xs, ys in runs:
        for x, y in zip(xs, ys, strict=True):
            at.setdefault(x, []).append(y)
    steps = sorted(at)
    return (steps, [statistics.fmean(at[x]) for x in steps], [min(at[x]) for x in steps],
            [max(at[x]) for x in steps])


def _smooth(ys: list[float], w: int) -> list[float]:
    if w <= 1:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot(t: Table | Collected, path: str | Path) -> Path:
    """(a) grouped accuracy bars per dataset (+avg), error bars = std over runs; (b) ``train/loss`` and
    (c), … each method's ``MethodSpec.curves`` that a run logged (BTPO: ``btpo/omega_mean``,
    :func:`plot_panels`): one line per table row — its run, or the mean over its runs
    (seeds) with a min–max band. Curves with more than 60 points are drawn with a trailing moving
    average over ~1/30 of the run (a single run's raw curve faint behind it). Legends of more than 4
    lines are left out of (b), (c), …: the colours are (a)'s."""
    try:
        import matplotlib  # optional extra: imported on use

        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure  # optional extra: imported on use
    except ImportError as e:
        raise PlotDependencyMissing("--plot needs matplotlib: pip install 'btpo[plot]'") from e

    t = _as_table(t)
    path = Path(path)
    curves = _run_curves(t)
    panel_keys = _panels(curves)

    fig = Figure(figsize=(13, 9.5), layout="constrained")
    gs = fig.add_gridspec(2, len(panel_keys), height_ratios=[1.1, 1])
    ax = fig.add_subplot(gs[0, :])
    cmap = matplotlib.colormaps["tab10" if len(t.rows) <= 10 else "tab20"]
    colors = [cmap(i % cmap.N) for i in range(len(t.rows))]
    cols = [*t.datasets, "avg"]
    width = 0.8 / max(1, len(t.rows))
    lo = 100.0
    for i, r in enumerate(t.rows):
        xs, hs, es = [], [], []
        for j, ds in enumerate(cols):
            cell = r.avg if ds == "avg" else r.cells.get(ds)
            if cell is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            hs.append(cell.shown(t.show))
            es.append(cell.shown_std(t.show) or 0.0)
            lo = min(lo, cell.shown(t.show))
        label = f"{r.model} / {r.method}" + (f" (n={max(c.k for c in r.cells.values())})"
                                             if any(c.k > 1 for c in r.cells.values()) else "")
        ax.bar(xs, hs, width=width * 0.95, color=colors[i], label=label)
        err = [(x, h, e) for x, h, e in zip(xs, hs, es, strict=True) if e > 0]
        if err:
            ax.errorbar([x for x, _, _ in err], [h for _, h, _ in err], yerr=[e for _, _, e in err], fmt="none",
                        ecolor="black", elinewidth=1, capsize=3)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylim(max(0.0, min(45.0, lo - 5)), 100)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("accuracy (%)" + (" — raw" if t.show == "raw" else " — clipped at 50"))
    ax.set_title("(a) test accuracy per dataset (error bars: std over runs)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="model / method")

    panels = [(key, title, fig.add_subplot(gs[1, j])) for j, (key, title) in enumerate(panel_keys)]
    for key, title, pax in panels:
        lines = 0
        for i, r in enumerate(t.rows):
            runs_c = [(label, cs[key]) for j, label, cs in curves if j == i and cs[key][0]]
            if not runs_c:
                continue
            if len(runs_c) == 1:
                label, (xs, ys) = runs_c[0]
                lo_ys = hi_ys = None
            else:                       # several seeds: their mean, and a min–max band
                xs, ys, lo_ys, hi_ys = _band([c for _, c in runs_c])
                label = f"{r.model} / {r.method} (mean of {len(runs_c)}, band min–max)"
            w = max(1, len(xs) // 30) if len(xs) > 60 else 1
            if lo_ys is not None and hi_ys is not None:
                pax.fill_between(xs, _smooth(lo_ys, w), _smooth(hi_ys, w), color=colors[i], alpha=0.15, lw=0)
            elif w > 1:
                pax.plot(xs, ys, color=colors[i], alpha=0.2, lw=0.6)
            pax.plot(xs, _smooth(ys, w), color=colors[i], lw=1.4, label=label)
            lines += 1
        pax.set_xlabel("optimizer step")
        pax.set_ylabel(key)
        pax.grid(alpha=0.3)
        if lines == 0:
            pax.text(0.5, 0.5, f"no {key} in metrics.jsonl", ha="center", va="center", transform=pax.transAxes)
        elif lines <= 4:
            pax.legend(fontsize=7, loc="best")
        else:                           # a legend of many lines would hide them: (a)'s colours say which is which
            title += " — colours as in (a)"
        pax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

