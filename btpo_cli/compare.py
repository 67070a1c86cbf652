"""Collect eval results from run folders into the paper's results table (rows: backbone × method)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btpo_cli.evaluation import EVAL_VERSION

METHOD_ORDER = ["bt", "bt-prefilled", "gram", "grpo-pair", "grpo-point", "btpo"]


@dataclass
class Row:
    model: str
    method: str
    run: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)   # dataset → eval summary


@dataclass
class Collected:
    rows: list[Row]
    datasets: list[str]
    missing_eval: list[str]
    skipped: list[str]


def collect(run_dirs: list[Path]) -> Collected:
    rows, datasets, missing, skipped = [], [], [], []
    for d in run_dirs:
        evals = sorted((d / "eval").glob("*.json")) if (d / "eval").is_dir() else []
        if not (d / "config.yaml").exists():
            skipped.append(f"{d}: not a run folder")
            continue
        if not evals:
            missing.append(str(d))
            continue
        row = None
        for e in evals:
            try:
                s = json.loads(e.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                skipped.append(f"{e}: invalid JSON")
                continue
            if s.get("eval_version") != EVAL_VERSION:
                skipped.append(f"{e}: eval_version {s.get('eval_version')!r} != {EVAL_VERSION}")
                continue
            row = row or Row(model=s["model"], method=s["method"], run=d.name)
            row.results[s["dataset"]] = s
            if s["dataset"] not in datasets:
                datasets.append(s["dataset"])
        if row:
            rows.append(row)
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    rows.sort(key=lambda r: (r.model, rank.get(r.method, 99), r.run))
    return Collected(rows, sorted(datasets), missing, skipped)


def table_rows(c: Collected) -> list[dict[str, Any]]:
    """Flat records: one per run, accuracy (percent) per dataset."""
    out = []
    for r in c.rows:
        rec: dict[str, Any] = {"model": r.model, "method": r.method, "run": r.run}
        for ds in c.datasets:
            s = r.results.get(ds)
            rec[ds] = None if s is None else round(100 * s["accuracy"], 2)
            rec[f"{ds}_raw"] = None if s is None else round(100 * s["raw_accuracy"], 2)
            rec[f"{ds}_n"] = None if s is None else s["n"]
        out.append(rec)
    return out


def to_csv(c: Collected) -> str:
    rows = table_rows(c)
    buf = io.StringIO()
    cols = ["model", "method", "run"] + [k for ds in c.datasets for k in (ds, f"{ds}_raw", f"{ds}_n")]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def to_markdown(c: Collected) -> str:
    head = "| model | method | " + " | ".join(c.datasets) + " |"
    sep = "|---|---|" + "---:|" * len(c.datasets)
    lines = [head, sep]
    for r in table_rows(c):
        cells = ["–" if r[ds] is None else f"{r[ds]:.1f}" for ds in c.datasets]
        lines.append(f"| {r['model']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
