"""``btpo compare --skips``: the records skipped in training and in each eval, per run and reason."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.table import Table as RichTable

from btpo_cli.compare.table import _expand

SKIP_COLUMNS = ["run", "stage", "data", "records", "skipped", "reason", "count", "where"]


def _skip_rows(run: str, stage: str, data: Any, records: Any, report: dict[str, Any]) -> list[dict[str, Any]]:
    total = int(report.get("total", 0))
    base = {"run": run, "stage": stage, "data": str(data or ""), "records": records, "skipped": total}
    by_reason = report.get("by_reason") or {}
    where = report.get("where") or {k: [v] for k, v in (report.get("first_seen") or {}).items()}
    if not by_reason:
        return [{**base, "reason": "", "count": 0, "where": ""}]
    return [{**base, "reason": str(k), "count": int(v), "where": ", ".join(map(str, where.get(k, [])))}
            for k, v in sorted(by_reason.items(), key=lambda kv: (-int(kv[1]), kv[0]))]


def collect_skips(run_dirs: Iterable[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Skipped records per run: training (``RUN/data_skips.json``, per split) and each eval
    (``data_skips`` in ``RUN/eval/*.json``). Returns the rows (one per run × stage × reason) and
    the problems (unreadable reports, runs without any report)."""
    dirs, problems = _expand(run_dirs)
    rows: list[dict[str, Any]] = []
    for d in dirs:
        found = False
        sources = [(d / "data_skips.json", None)] + [(e, "eval") for e in sorted((d / "eval").glob("*.json"))
                                                       if (d / "eval").is_dir()]
        for path, kind in sources:
            if not path.exists():
                continue
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                if kind is None:
                    for split, rep in doc.items():
                        rows.extend(_skip_rows(d.name, split, rep.get("data"), rep.get("records"), rep["skipped"]))
                        found = True
                elif isinstance(doc, dict) and isinstance(doc.get("data_skips"), dict):
                    rep = doc["data_skips"]
                    rows.extend(_skip_rows(d.name, f"eval {doc.get('dataset')}/{doc.get('split')}", doc.get("data_path"),
                                           rep.get("records"), rep))
                    found = True
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError,
                    KeyError) as e:
                problems.append(f"{path}: unreadable skip report ({type(e).__name__})")
        if not found:
            problems.append(f"no skip report: {d} (trained and evaluated before btpo recorded skipped records?)")
    return rows, problems


def skips_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The rows as text cells in :data:`SKIP_COLUMNS` order."""
    return [["" if r[c] is None else str(r[c]) for c in SKIP_COLUMNS] for r in rows]


def format_skips(rows: list[dict[str, Any]], fmt: str) -> Any:
    """``table`` → a rich Table; ``markdown`` / ``csv`` / ``json`` → text."""
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    cells = skips_rows(rows)
    if fmt in ("csv", "tsv"):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n", delimiter="\t" if fmt == "tsv" else ",")
        w.writerow(SKIP_COLUMNS)
        w.writerows(cells)
        return buf.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(SKIP_COLUMNS) + " |", "|" + "---|" * len(SKIP_COLUMNS)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"

    rt = RichTable(title="records skipped (by reason; where = file:line of the first few)")
    for c in SKIP_COLUMNS:
        rt.add_column(c, justify="right" if c in ("records", "skipped", "count") else "left")
    for row in cells:
        rt.add_row(*row)
    return rt


