"""Collect eval results from run folders into the paper's results table (Appendix B).

Layout: one row per backbone (``model``) × ``method`` — methods in the order of
:func:`method_order` (the method registry), unknown methods after them alphabetically — and one column per dataset,
plus an ``avg`` column. Figures are accuracies in percent (METHOD.md §7).

Rules (also in ``btpo compare --help``):

- **Shown figure.** The clipped accuracy (``max(raw, 50)``) by default; where a run was clipped the
  raw figure follows in brackets, ``50.0 [43.2]``. ``show="raw"`` shows the raw accuracy instead,
  and then ranks, averages and deltas use the raw figures.
- **Seeds.** Several runs with the same (model, method, dataset), e.g. seeds, make one cell: the
  mean over the runs of each run's figure (each run is clipped on its own before averaging), ± the
  sample standard deviation (ddof = 1), and ``n=K`` the number of runs. One run: no ± and no n.
- **avg.** Per backbone block, the mean of a row's cell means over the datasets that every row of
  that block has; datasets only some rows have are left out of every row's avg, so the column
  compares like with like within a block. The datasets used are listed per model (``avg_datasets``).
  No ± on avg.
- **Best.** Per backbone block (as the paper marks the best method for each model) and per column
  (avg included), the highest shown figure, compared at the displayed precision (one decimal),
  so ties are all marked. Marked only where at least two rows of the block have a figure.
  Markdown: bold; rich table: bold green with a trailing ``*``; csv: ``<ds>_best``; json: ``best``.
- **Delta to BT.** For every non-BT row, shown figure minus the BT row of the same backbone and
  dataset (percentage points, ``(+3.2)``), when that BT cell exists.
- **What is left out, and said so.** Eval files whose ``eval_version`` differs from this version
  of btpo's (:data:`btpo_cli.judging.protocol.EVAL_VERSION`) are never mixed in: they are listed as
  skipped, as are invalid JSON, empty evals and folders that are not run folders. A run folder
  with no usable eval is listed as not evaluated. A folder that is not a run folder but holds run
  folders (``runs/``) is expanded one level.
- **Stale evals.** An eval whose model or data changed since it ran (:func:`btpo_cli.runs.provenance.staleness`:
  a resumed or overwritten run, a replaced dataset) is left out of the table and listed in ``stale``
  with its reason; ``include_stale`` keeps it, its cell marked ``‡`` (json: ``stale``, csv: ``stale``).
- **Eval settings that differ.** Within a backbone block, rows (or the runs of one row) whose evals
  ran with different settings that move a judge's figure — thought budget, engine, sampled
  thoughts, ``yes_no_normalize`` (:func:`eval_settings_of`) — get a warning naming the values and
  rows, and the rows are marked ``†`` (csv/json: ``settings_differ``). Settings a method does not
  read (a BT row's engine) are not compared.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table as RichTable

from btpo_cli.config import EvalConfig, config_from_dict, valid_keys
from btpo_cli.errors import BtpoError
from btpo_cli.judging.protocol import EVAL_VERSION
from btpo_cli.methods import get_method, method_names
from btpo_cli.runs.folder import Run
from btpo_cli.runs.launched import launch_of
from btpo_cli.runs.provenance import staleness

BASELINE = "bt"
SHOW = ("clipped", "raw")


class PlotDependencyMissing(BtpoError, ImportError):
    """matplotlib is not installed (a BtpoError for the CLI, an ImportError for callers that catch that)."""


@dataclass
class RunEvals:
    """One run folder and its usable eval summaries."""

    path: Path
    name: str
    model: str
    method: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)   # dataset → eval summary
    stale: dict[str, str] = field(default_factory=dict)
    """dataset → why its eval is stale (only with ``include_stale``: otherwise stale evals are left out)."""


@dataclass
class Collected:
    runs: list[RunEvals]
    datasets: list[str]
    missing_eval: list[str]
    skipped: list[str]
    stale: list[dict[str, Any]] = field(default_factory=list)
    """Evals whose model or data changed since (``run``, ``path``, ``dataset``, ``reason``, ``detail``)."""
    include_stale: bool = False


@dataclass
class Cell:
    """One (model, method, dataset) figure, aggregated over runs. Percent."""

    acc: float                 # mean of the clipped accuracies
    acc_std: float | None      # sample std over runs (None with one run)
    raw: float
    raw_std: float | None
    k: int                     # runs aggregated
    clipped: bool              # any of them clipped
    runs: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)       # per-run clipped figure
    raw_values: list[float] = field(default_factory=list)   # per-run raw figure
    n_pairs: int | None = None  # test pairs (None if the runs differ)
    tie_rate: float | None = None
    format_error_rate: float | None = None
    order_disagreement: float | None = None
    """Pairwise judges: how often the two orders disagree (mean over runs; ``position_bias`` in the eval JSON)."""
    first_slot_wins: float | None = None
    """Pairwise judges: the fraction of verdicts that chose the first slot (0.5 = no position bias)."""
    best: bool = False
    delta_bt: float | None = None
    stale: str | None = None
    """Why (one of) its evals is stale, when shown with ``include_stale``."""

    def shown(self, show: str) -> float:
        return self.raw if show == "raw" else self.acc

    def shown_std(self, show: str) -> float | None:
        return self.raw_std if show == "raw" else self.acc_std


@dataclass
class TableRow:
    model: str
    method: str
    runs: list[RunEvals]
    cells: dict[str, Cell]
    avg: Cell | None = None
    settings_differ: list[str] = field(default_factory=list)
    """Eval settings (:data:`SETTING_KEYS`) in which this row's evals differ from another's of its block."""


@dataclass
class Table:
    rows: list[TableRow]
    datasets: list[str]
    avg_datasets: dict[str, list[str]]      # model → datasets its avg column covers
    show: str
    missing_eval: list[str]
    skipped: list[str]
    warnings: list[str] = field(default_factory=list)
    stale: list[dict[str, Any]] = field(default_factory=list)
    include_stale: bool = False


# ----------------------------------------------------------------------------- collecting


def _expand(paths: Iterable[Path]) -> tuple[list[Path], list[str]]:
    """Run folders among ``paths`` (a folder of run folders is expanded one level), deduplicated."""
    out, skipped, seen = [], [], set()
    for p in paths:
        if not p.is_dir():
            skipped.append(f"{p}: not a folder")
            continue
        if (p / "config.yaml").exists():
            cands = [p]
        else:
            cands = sorted(q for q in p.iterdir() if q.is_dir() and (q / "config.yaml").exists())
            if not cands:
                skipped.append(f"{p}: not a run folder")
                continue
        for q in cands:
            key = q.resolve()
            if key not in seen:
                seen.add(key)
                out.append(q)
    return out, skipped


def collect(run_dirs: Iterable[Path], include_stale: bool = False) -> Collected:
    """The usable evals of the run folders; stale ones (:func:`btpo_cli.runs.provenance.staleness`) are
    listed in ``stale`` and left out, or kept and marked with ``include_stale``."""
    dirs, skipped = _expand(run_dirs)
    runs, datasets, missing, stale = [], set(), [], []
    for d in dirs:
        evals = sorted((d / "eval").glob("*.json")) if (d / "eval").is_dir() else []
        rec: RunEvals | None = None
        for e in evals:
            try:
                s = json.loads(e.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                skipped.append(f"{e}: invalid JSON")
                continue
            if not isinstance(s, dict):
                skipped.append(f"{e}: not an eval summary")
                continue
            if s.get("eval_version") != EVAL_VERSION:
                skipped.append(f"{e}: eval_version {s.get('eval_version')!r} != {EVAL_VERSION!r} (re-run btpo eval)")
                continue
            if any(k not in s for k in ("model", "method", "dataset", "accuracy", "raw_accuracy")):
                skipped.append(f"{e}: not an eval summary (missing keys)")
                continue
            if s["accuracy"] is None and not s.get("n"):
                skipped.append(f"{e}: no pairs evaluated")
                continue
            problem = summary_problem(s)
            if problem:
                skipped.append(f"{e}: {problem}")
                continue
            if not s["n"]:
                skipped.append(f"{e}: no pairs evaluated")
                continue
            why, detail = staleness(s, e)
            if why:
                stale.append({"run": d.name, "path": str(e), "dataset": str(s["dataset"]), "reason": why,
                              "detail": detail})
                if not include_stale:
                    continue
            if rec is None:
                rec = RunEvals(path=d, name=d.name, model=str(s["model"]), method=method_label(s))
            elif (s["model"], method_label(s)) != (rec.model, rec.method):
                skipped.append(f"{e}: model/method {s['model']}/{s['method']} differ from the run's other evals "
                               f"({rec.model}/{rec.method})")
                continue
            rec.results[str(s["dataset"])] = s
            if why:
                rec.stale[str(s["dataset"])] = why
            datasets.add(str(s["dataset"]))
        if rec is None:
            if not any(Path(x["path"]).parent.parent == d for x in stale):   # only stale evals: listed there
                missing.append(str(d))
        else:
            runs.append(rec)
    return Collected(runs, sorted(datasets), missing, skipped, stale, include_stale)


SETTING_KEYS = ("thought_budget", "engine", "samples", "yes_no_normalize")
DIFFER_MARK = " †"
STALE_MARK = " ‡"


def eval_settings_of(s: dict[str, Any]) -> dict[str, Any]:
    """The eval settings of a summary that make figures comparable (``eval_settings``, written by btpo eval).
    An older summary did not record them: they are derived from its ``eval_config`` and ``engine`` by the
    same ``judging.run_eval.eval_settings`` (``legacy``: what those do not tell, e.g. ``yes_no_normalize``,
    is left out)."""
    got = s.get("eval_settings")
    if isinstance(got, dict):
        return {k: got[k] for k in SETTING_KEYS if k in got}
    from btpo_cli.judging.run_eval import eval_settings  # heavy: imported on use

    method = s.get("method")
    if method not in method_names():
        return {}
    conf = s.get("eval_config") if isinstance(s.get("eval_config"), dict) else {}
    known = set(valid_keys(EvalConfig))
    cfg = config_from_dict({"method": method, "eval": {k: v for k, v in conf.items() if k in known}},
                           "eval summary")
    if get_method(str(method)).generative and not s.get("engine"):
        return {}
    out = eval_settings(cfg, engine=s.get("engine"), legacy=True)
    return {k: out[k] for k in SETTING_KEYS if k in out}


def _settings_warnings(model: str, block: list[TableRow]) -> list[str]:
    """Mark the rows of one backbone block whose evals differ in a setting; one warning per setting."""
    out = []
    for key in SETTING_KEYS:
        where: dict[str, list[str]] = {}          # value → rows
        per_row: dict[int, set[str]] = {}       # row index → its values
        for i, r in enumerate(block):
            for s in (s for run in r.runs for s in run.results.values()):
                st = eval_settings_of(s)
                if key in st:
                    v = json.dumps(st[key])
                    per_row.setdefault(i, set()).add(v)
                    rows = where.setdefault(v, [])
                    if r.method not in rows:
                        rows.append(r.method)
        if len(where) < 2:
            continue
        for i in per_row:
            block[i].settings_differ.append(key)
        vals = "; ".join(f"{v} ({', '.join(rows)})" for v, rows in sorted(where.items()))
        out.append(f"{model}: eval setting '{key}' differs between evals: {vals} — rows marked{DIFFER_MARK}, "
                   "their figures are not comparable on this setting")
    return out


def row_label(r: TableRow) -> str:
    """The method column: the method (and tag), ``†`` when its eval settings differ from the block's."""
    return r.method + (DIFFER_MARK if r.settings_differ else "")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summary_problem(s: dict[str, Any]) -> str | None:
    """What makes an eval summary unusable (a field of the wrong type or range), or ``None``."""
    for key in ("model", "method", "dataset"):
        if not isinstance(s.get(key), str) or not s[key]:
            return f"field '{key}': expected a non-empty string, got {s.get(key)!r}"
    if s.get("tag") is not None and not isinstance(s["tag"], str):
        return f"field 'tag': expected a string, got {s['tag']!r}"
    for key in ("accuracy", "raw_accuracy"):
        if not _is_num(s.get(key)) or not 0 <= s[key] <= 1:
            return f"field '{key}': expected a number in [0, 1], got {s.get(key)!r}"
    if not isinstance(s.get("n"), int) or isinstance(s["n"], bool) or s["n"] < 0:
        return f"field 'n': expected a count of pairs, got {s.get('n')!r}"
    for key in ("tie_rate", "format_error_rate"):
        if s.get(key) is not None and (not _is_num(s[key]) or not 0 <= s[key] <= 1):
            return f"field '{key}': expected a number in [0, 1], got {s[key]!r}"
    if "clipped" in s and not isinstance(s["clipped"], bool):
        return f"field 'clipped': expected true or false, got {s['clipped']!r}"
    return None


# ----------------------------------------------------------------------------- skip reports

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


# ----------------------------------------------------------------------------- the table


def method_label(summary: dict[str, Any]) -> str:
    """The row label: the method, with the run's ``tag`` (a variant such as ``no-omega``) in brackets."""
    tag = summary.get("tag") or ""
    return f"{summary['method']} ({tag})" if tag else str(summary["method"])


def method_order() -> list[str]:
    """Row order: the registry's (``MethodSpec.order``); unknown methods follow alphabetically."""
    return method_names()


def method_rank(method: str) -> tuple[int, str]:
    base = method.split(" (")[0]
    order = method_order()
    return (order.index(base), method) if base in order else (len(order), method)


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def _mean_opt(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _cell(entries: list[tuple[str, dict[str, Any]]]) -> Cell:
    vals = [100 * float(s["accuracy"]) for _, s in entries]
    raws = [100 * float(s["raw_accuracy"]) for _, s in entries]
    ns = {s.get("n") for _, s in entries}
    return Cell(acc=sum(vals) / len(vals), acc_std=_std(vals), raw=sum(raws) / len(raws), raw_std=_std(raws),
                k=len(entries), clipped=any(bool(s.get("clipped")) for _, s in entries),
                runs=[r for r, _ in entries], values=vals, raw_values=raws,
                n_pairs=ns.pop() if len(ns) == 1 else None,
                tie_rate=_mean_opt([s.get("tie_rate") for _, s in entries]),
                format_error_rate=_mean_opt([s.get("format_error_rate") for _, s in entries]),
                order_disagreement=_mean_opt([_bias(s, "order_disagreement") for _, s in entries]),
                first_slot_wins=_mean_opt([_bias(s, "first_slot_wins") for _, s in entries]))


def _bias(s: dict[str, Any], key: str) -> float | None:
    pb = s.get("position_bias")
    v = pb.get(key) if isinstance(pb, dict) else None
    return float(v) if _is_num(v) else None


def _mark_best(cells: list[Cell], show: str) -> None:
    if len(cells) < 2:
        return
    top = max(round(c.shown(show), 1) for c in cells)
    for c in cells:
        c.best = round(c.shown(show), 1) == top


def build_table(c: Collected, show: str = "clipped") -> Table:
    """Aggregate runs into rows (model × method), mark the best per block, compute avg and deltas to BT."""
    if show not in SHOW:
        raise BtpoError(f"show={show!r}: expected one of {', '.join(SHOW)}")
    groups: dict[tuple[str, str], list[RunEvals]] = {}
    for r in c.runs:
        groups.setdefault((r.model, r.method), []).append(r)
    rows = []
    warnings = []
    for (model, method), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], method_rank(kv[0][1]))):
        runs = sorted(runs, key=lambda r: r.name)
        cells = {}
        for ds in c.datasets:
            entries = [(r.name, r.results[ds]) for r in runs if ds in r.results]
            if entries:
                cells[ds] = _cell(entries)
                cells[ds].stale = next((r.stale[ds] for r in runs if ds in r.stale), None)
                if cells[ds].n_pairs is None:
                    warnings.append(f"{model}/{method}/{ds}: runs were evaluated on different numbers of pairs")
        rows.append(TableRow(model, method, runs, cells))

    avg_datasets: dict[str, list[str]] = {}
    for model in dict.fromkeys(r.model for r in rows):
        block = [r for r in rows if r.model == model]
        common = [ds for ds in c.datasets if all(ds in r.cells for r in block)]
        avg_datasets[model] = common
        for r in block:
            if common:
                acc = sum(r.cells[ds].acc for ds in common) / len(common)
                raw = sum(r.cells[ds].raw for ds in common) / len(common)
                r.avg = Cell(acc=acc, acc_std=None, raw=raw, raw_std=None, k=min(r.cells[ds].k for ds in common),
                             clipped=False, runs=sorted({n for ds in common for n in r.cells[ds].runs}),
                             stale=next((r.cells[ds].stale for ds in common if r.cells[ds].stale), None))
        for ds in c.datasets:
            _mark_best([r.cells[ds] for r in block if ds in r.cells], show)
        _mark_best([r.avg for r in block if r.avg is not None], show)
        warnings.extend(_settings_warnings(model, block))
        for ds in c.datasets:
            ns = {r.method: r.cells[ds].n_pairs for r in block if ds in r.cells}
            if len(set(ns.values())) > 1:
                warnings.append(f"{model}/{ds}: rows were evaluated on different numbers of pairs ("
                                + ", ".join(f"{m}: {n if n is not None else 'mixed'}" for m, n in ns.items())
                                + ") — their figures are not on the same pairs")
        base = next((r for r in block if r.method == BASELINE), None)
        if base is not None:
            for r in block:
                if r is base:
                    continue
                for ds, cell in r.cells.items():
                    if ds in base.cells:
                        cell.delta_bt = cell.shown(show) - base.cells[ds].shown(show)
                if r.avg is not None and base.avg is not None:
                    r.avg.delta_bt = r.avg.shown(show) - base.avg.shown(show)
    return Table(rows, c.datasets, avg_datasets, show, c.missing_eval, c.skipped, warnings, c.stale,
                 c.include_stale)


# ----------------------------------------------------------------------------- formatting


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
    lines = [f"{fig} (%); mean ± std over n runs (seeds); (±x) = difference to BT of the same backbone; "
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
    rt = RichTable(title=fig, caption="* best in its backbone block · ± std over n runs · (±x) vs BT",
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


# ----------------------------------------------------------------------------- the figure


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
    (c) ``btpo/omega_mean`` (when logged): one line per table row — its run, or the mean over its runs
    (seeds) with a min–max band. Curves with more than 60 points are drawn with a trailing moving
    average over ~1/30 of the run (a single run's raw curve faint behind it). Legends of more than 4
    lines are left out of (b)/(c): the colours are (a)'s."""
    try:
        import matplotlib  # optional extra: imported on use

        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure  # optional extra: imported on use
    except ImportError as e:
        raise PlotDependencyMissing("--plot needs matplotlib: pip install 'btpo[plot]'") from e

    t = _as_table(t)
    path = Path(path)
    curves: list[tuple[int, str, dict[str, tuple[list[int], list[float]]]]] = []
    for i, r in enumerate(t.rows):
        for run in r.runs:
            m = Run(run.path).read_metrics()
            curves.append((i, f"{r.model} / {r.method} / {run.name}",
                           {k: _curve(m, k) for k in ("train/loss", "btpo/omega_mean")}))
    has_omega = any(c[2]["btpo/omega_mean"][0] for c in curves)

    fig = Figure(figsize=(13, 9.5), layout="constrained")
    gs = fig.add_gridspec(2, 2 if has_omega else 1, height_ratios=[1.1, 1])
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

    panels = [("train/loss", "(b) training loss", fig.add_subplot(gs[1, 0]))]
    if has_omega:
        panels.append(("btpo/omega_mean", "(c) BTPO misalignment weight ω̂ (mean)", fig.add_subplot(gs[1, 1])))
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
