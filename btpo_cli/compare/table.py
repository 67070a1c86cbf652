"""Eval JSONs of run folders → the results table: collect the usable evals, aggregate them into
cells and rows, mark best, avg and deltas, compare eval settings (the rules: :mod:`btpo_cli.compare`)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btpo_cli.config import EvalConfig, config_from_dict, valid_keys
from btpo_cli.errors import BtpoError
from btpo_cli.judging.protocol import EVAL_VERSION
from btpo_cli.methods import get_method, method_names, method_specs
from btpo_cli.runs.provenance import staleness

SHOW = ("clipped", "raw")


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
    """Eval settings (:func:`eval_settings_of`) in which this row's evals differ from another's of its block."""


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


NOT_COMPARED = ("thought_budget_from",)
"""Keys of an eval's ``eval_settings`` that say where a setting came from, not what it was."""
FIRST_KEYS = ("thought_budget", "engine")
"""Compared first (the shared settings of a generative judge); a method's own follow in the order it records them."""
DIFFER_MARK = " †"
STALE_MARK = " ‡"


def eval_settings_of(s: dict[str, Any]) -> dict[str, Any]:
    """The eval settings of a summary that make figures comparable (``eval_settings``, written by btpo eval:
    the engine and thought budget of a generative judge and the method's own ``MethodSpec.eval_settings``).
    An older summary did not record them: they are derived from its ``eval_config`` and ``engine`` by the
    same ``judging.run_eval.eval_settings`` (``legacy``: what those do not tell, e.g. ``yes_no_normalize``,
    is left out)."""
    got = s.get("eval_settings")
    if isinstance(got, dict):
        return {k: v for k, v in got.items() if k not in NOT_COMPARED}
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
    return {k: v for k, v in out.items() if k not in NOT_COMPARED}


def _settings_warnings(model: str, block: list[TableRow]) -> list[str]:
    """Mark the rows of one backbone block whose evals differ in a setting; one warning per setting."""
    per_eval = [(i, eval_settings_of(s)) for i, r in enumerate(block) for run in r.runs for s in run.results.values()]
    keys = [k for k in FIRST_KEYS if any(k in st for _, st in per_eval)]
    keys += [k for k in dict.fromkeys(k for _, st in per_eval for k in st) if k not in keys]
    out = []
    for key in keys:
        where: dict[str, list[str]] = {}          # value → rows
        per_row: dict[int, set[str]] = {}       # row index → its values
        for i, st in per_eval:
            if key in st:
                v = json.dumps(st[key])
                per_row.setdefault(i, set()).add(v)
                rows = where.setdefault(v, [])
                if block[i].method not in rows:
                    rows.append(block[i].method)
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


def baseline_method() -> str | None:
    """The method other rows are measured against (``delta_bt``): the first registered with ``compare_baseline``."""
    return next((s.name for s in method_specs() if s.compare_baseline), None)


def baseline_title() -> str:
    """How the legend names the baseline (``BT``)."""
    return (baseline_method() or "baseline").upper()


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
    """Aggregate runs into rows (model × method), mark the best per block, compute avg and the deltas to the
    baseline method's row (:func:`baseline_method`)."""
    if show not in SHOW:
        raise BtpoError(f"show={show!r}: expected one of {', '.join(SHOW)}")
    groups: dict[tuple[str, str], list[RunEvals]] = {}
    for r in c.runs:
        groups.setdefault((r.model, r.method), []).append(r)
    rows = []
    warnings = []
    baseline = baseline_method()
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
        base = next((r for r in block if r.method == baseline), None)
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


