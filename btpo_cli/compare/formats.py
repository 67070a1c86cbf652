"""The results table as text: Markdown, a rich table, JSON and CSV/TSV, with the legend."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from rich.table import Table as RichTable

from btpo_cli.compare.table import (
    DIFFER_MARK,
    STALE_MARK,
    Cell,
    Collected,
    Table,
    baseline_title,
    build_table,
    row_label,
)
from btpo_cli.judging.protocol import EVAL_VERSION
from btpo_cli.runs.launched import launch_of


def _signed(x: float) -> str:
    return f"{x:+.1f}"


def cell_text(cell: Cell | None, show: str, bold: tuple[str, str] = ("", "")) -> str:
    """``74.5 ± 1.2 n=3 (+3.2)``; clipped: ``50.0 [43.2]``; ``bold`` wraps the value when best."""
    if cell is None:
        return "–"
    v = f"{cell.shown(show):.1f}"
    txt = f"{bold[0]}{v}{bold[1]}" if cell.best else v
    if show == "clipped" and cell.clipped:
        txt += f" [{cell.raw:.1f}]"
    std = cell.shown_std(show)
    if std is not None:
        txt += f" ± {std:.1f}"
    if std is not None:
        txt += f" n={cell.k}"
    if cell.delta_bt is not None:
        txt += f" ({_signed(cell.delta_bt)})"
    if cell.stale:
        txt += STALE_MARK
    return txt


def legend(t: Table) -> list[str]:
    fig = "raw accuracy" if t.show == "raw" else "accuracy clipped at 50, raw in [brackets] where clipped"
    lines = [f"{fig} (%); mean ± std over n runs (seeds); (±x) = difference to "
             f"{baseline_title()} of the same backbone; "
             "best per backbone block marked"]
    if any(c.stale for r in t.rows for c in r.cells.values()):
        lines.append(f"{STALE_MARK.strip()} = stale: the model or data changed since this eval (--include-stale; "
                     "see the stale list)")
    if any(r.settings_differ for r in t.rows):
        lines.append(f"{DIFFER_MARK.strip()} = eval settings differ from another row of the block (see the warnings)")
    for model, ds in t.avg_datasets.items():
        if ds != t.datasets:
            lines.append(f"avg for {model} over: {', '.join(ds) if ds else '(no dataset common to all rows)'}")
    return lines


def _as_table(t: Table | Collected) -> Table:
    return build_table(t) if isinstance(t, Collected) else t


def to_markdown(t: Table | Collected) -> str:
    t = _as_table(t)
    cols = [*t.datasets, "avg"]
    lines = ["| model | method | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for r in t.rows:
        cells = [cell_text(r.cells.get(ds), t.show, ("**", "**")) for ds in t.datasets]
        cells.append(cell_text(r.avg, t.show, ("**", "**")))
        lines.append(f"| {r.model} | {row_label(r)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"_{ln}_  " for ln in legend(t))
    return "\n".join(lines) + "\n"


def to_rich(t: Table | Collected) -> Any:
    t = _as_table(t)

    fig = "raw accuracy (%)" if t.show == "raw" else "accuracy (%), clipped at 50, raw in [ ]"
    rt = RichTable(title=fig, caption="* best in its backbone block · ± std over n runs · (±x) vs "
                                                 + baseline_title(),
                   show_lines=False)
    rt.add_column("model", no_wrap=True)
    rt.add_column("method", no_wrap=True)
    for ds in [*t.datasets, "avg"]:
        rt.add_column(ds, justify="right")
    prev = None
    for r in t.rows:
        if prev is not None and r.model != prev:
            rt.add_section()
        prev = r.model
        cells = [cell_text(r.cells.get(ds), t.show, ("[bold green]", "*[/]")) for ds in t.datasets]
        cells.append(cell_text(r.avg, t.show, ("[bold green]", "*[/]")))
        rt.add_row(r.model, row_label(r), *cells)
    return rt


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def _cell_json(cell: Cell, show: str) -> dict[str, Any]:
    return {"value": _r(cell.shown(show)), "std": _r(cell.shown_std(show)), "accuracy": _r(cell.acc),
            "accuracy_std": _r(cell.acc_std), "raw_accuracy": _r(cell.raw), "raw_accuracy_std": _r(cell.raw_std),
            "clipped": cell.clipped, "n_runs": cell.k, "runs": cell.runs, "values": [_r(v) for v in cell.values],
            "raw_values": [_r(v) for v in cell.raw_values], "n_pairs": cell.n_pairs,
            "tie_rate": _r(cell.tie_rate, 4), "format_error_rate": _r(cell.format_error_rate, 4),
            "order_disagreement": _r(cell.order_disagreement, 4), "first_slot_wins": _r(cell.first_slot_wins, 4),
            "best": cell.best, "delta_bt": _r(cell.delta_bt), "stale": cell.stale}


def to_json(t: Table | Collected) -> str:
    t = _as_table(t)
    rows = []
    for r in t.rows:
        rows.append({"model": r.model, "method": r.method, "runs": [x.name for x in r.runs],
                     "run_paths": [str(x.path) for x in r.runs], "settings_differ": r.settings_differ,
                     "launch": [launch_of(x.path) for x in r.runs],     # per run; None: made before it was recorded
                     "cells": {ds: _cell_json(c, t.show) for ds, c in r.cells.items()},
                     "avg": None if r.avg is None else {k: v for k, v in _cell_json(r.avg, t.show).items()
                                                        if k in ("value", "accuracy", "raw_accuracy", "n_runs",
                                                                 "best", "delta_bt")}})
    doc = {"eval_version": EVAL_VERSION, "show": t.show, "datasets": t.datasets, "avg_datasets": t.avg_datasets,
           "rows": rows, "missing_eval": t.missing_eval, "skipped": t.skipped, "warnings": t.warnings,
           "include_stale": t.include_stale, "stale": t.stale}
    return json.dumps(doc, indent=2) + "\n"


def csv_columns(datasets: list[str]) -> list[str]:
    per_ds = ("", "_raw", "_n", "_std", "_runs", "_clipped", "_best", "_delta_bt", "_order_disagreement",
              "_first_slot_wins")
    return (["model", "method", "run"] + [f"{ds}{s}" for ds in datasets for s in per_ds]
            + ["avg", "avg_raw", "avg_best", "avg_delta_bt", "settings_differ", "stale"])


def to_csv(t: Table | Collected, delimiter: str = ",") -> str:
    """One line per (model, method); ``<ds>`` is the shown figure (mean over runs), ``<ds>_n`` test pairs,
    ``<ds>_runs`` runs aggregated, ``run`` the run folder names joined by ``;`` (``delimiter="\\t"``: TSV)."""
    t = _as_table(t)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=csv_columns(t.datasets), lineterminator="\n", delimiter=delimiter)
    w.writeheader()
    for r in t.rows:
        rec: dict[str, Any] = {"model": r.model, "method": r.method, "run": ";".join(x.name for x in r.runs),
                               "settings_differ": ";".join(r.settings_differ),
                               "stale": ";".join(f"{ds}: {c.stale}" for ds, c in r.cells.items() if c.stale)}
        for ds in t.datasets:
            c = r.cells.get(ds)
            if c is None:
                continue
            rec.update({ds: _r(c.shown(t.show)), f"{ds}_raw": _r(c.raw), f"{ds}_n": c.n_pairs,
                        f"{ds}_std": _r(c.shown_std(t.show)), f"{ds}_runs": c.k, f"{ds}_clipped": int(c.clipped),
                        f"{ds}_best": int(c.best), f"{ds}_delta_bt": _r(c.delta_bt),
                        f"{ds}_order_disagreement": _r(c.order_disagreement, 4),
                        f"{ds}_first_slot_wins": _r(c.first_slot_wins, 4)})
        if r.avg is not None:
            rec.update({"avg": _r(r.avg.shown(t.show)), "avg_raw": _r(r.avg.raw), "avg_best": int(r.avg.best),
                        "avg_delta_bt": _r(r.avg.delta_bt)})
        w.writerow(rec)
    return buf.getvalue()


