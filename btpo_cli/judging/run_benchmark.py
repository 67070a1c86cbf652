"""``btpo eval --benchmark NAME``: a judge on one of the field's benchmarks (:mod:`btpo_cli.judging.benchmarks`),
written as ``RUN/eval/<benchmark>.json`` beside the protocol's evals.

The JSON is an eval summary ``btpo compare`` reads like any other: ``dataset`` is the benchmark's name and
``accuracy`` / ``raw_accuracy`` its official aggregate (never clipped), so each benchmark is one column.
Beside it: ``benchmark`` (the official ``scores`` — sections, subsets, the hard/normal/easy split — and
the per-subset table), ``n`` (every item read and not skipped), ``data_skips`` (the rest, by reason),
``format_error_rate`` (per response judged, or per pair for pairwise judges) and ``position_bias``
(pairwise judges). One process (no ``accelerate launch``
sharding for benchmarks).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from btpo_cli import __version__
from btpo_cli.config import Config
from btpo_cli.console import console
from btpo_cli.data.files import atomic_json, atomic_open
from btpo_cli.data.pairs import SkipLog
from btpo_cli.errors import BtpoError
from btpo_cli.judging.benchmarks import get_benchmark, judge_items, position_bias, read_benchmark
from btpo_cli.judging.judge import judge_for_eval
from btpo_cli.judging.protocol import EVAL_VERSION, eval_warnings, thought_stats
from btpo_cli.methods import get_method
from btpo_cli.progress import PhaseProgress
from btpo_cli.runs.provenance import eval_provenance


def run_benchmark(cfg: Config, root: Path, model_dir: str, name: str, source: str, limit: int | None,
                  device: Any, out_dir: Path, as_is: bool, which: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Judge every item of benchmark ``name`` read from ``source`` with ``cfg.method``'s judge on
    ``model_dir``; write ``out_dir/<name>.json`` and ``<name>.predictions.jsonl``; return the summary.
    No usable item (an empty file, every record skipped, every item too long): a :class:`BtpoError`
    naming ``source`` and the reasons, and nothing is written (a previous result stays)."""
    bench = get_benchmark(name)
    spec = get_method(cfg.method)
    items, skips, records = read_benchmark(name, source, limit=limit, strict=cfg.data.strict)
    if not items:
        raise BtpoError(no_usable(str(source), records, skips))
    if skips.total:
        console.print(f"[yellow]{escape(source)}: skipped {skips.total} record(s): {escape(skips.summary())}[/]",
                      highlight=False, soft_wrap=True)
    t0 = time.monotonic()
    with PhaseProgress(len(items), f"eval {root.name} on {name}", unit="item") as bar, \
            judge_for_eval(spec.judge, cfg, model_dir, device) as judge:
        outcomes = judge_items(judge, bench, items, progress=bar.advance)
        protocol = judge.protocol
    wall = time.monotonic() - t0
    unjudged = [e for o in outcomes if not o.judged() for e in o.errors]
    if len(unjudged) == sum(len(o.errors) for o in outcomes) and set(unjudged) == {"too_long"}:
        raise BtpoError(no_usable(str(source), records, skips,
                                  {f"too long for data.max_length={cfg.data.max_length}": len(items)}))
    agg = bench.aggregate(items, outcomes)
    errors: dict[str, int] = {}
    for o in outcomes:
        for e in o.errors:
            errors[e] = errors.get(e, 0) + 1
    judgements = sum(len(o.orders) if o.orders else len(o.scores or []) for o in outcomes)   # responses or pairs
    value = agg["aggregate"]
    summary = {
        "eval_version": EVAL_VERSION, "run": root.name, "method": cfg.method, "tag": cfg.tag,
        "model": cfg.model.name, "dataset": name, "data_path": str(source), "split": bench.hub_split,
        "protocol": protocol, "n": len(items), "accuracy": value, "raw_accuracy": value, "clipped": False,
        "tie_rate": None,
        "format_error_rate": sum(errors.values()) / judgements if judgements else None,
        "format_errors": dict(sorted(errors.items())),
        "position_bias": position_bias(outcomes),
        "benchmark": {"name": name, "title": bench.title, "aggregate": value, "how": bench.how,
                      **{k: v for k, v in agg.items() if k != "aggregate"}},
        "data_skips": {"records": records, **skips.as_dict()},
        "wall_seconds": round(wall, 2),
        "checkpoint": str(model_dir), "which": which, "as_is": as_is, "btpo_version": __version__,
        "eval_config": cfg.eval.__dict__, "eval_settings": settings,
        "provenance": eval_provenance(cfg, model_dir, which, bench.hub_split, as_is, root, settings, benchmark=True),
    }
    stats = thought_stats(outcomes)              # type: ignore[arg-type]  # Outcome.detail: the same lists
    if stats:
        summary["thoughts"] = stats                  # generative judges: thought lengths, cuts, Yes+No mass
    summary["warnings"] = eval_warnings(summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / f"{name}.predictions.jsonl") as f:     # predictions first, the summary last
        for it, o in zip(items, outcomes, strict=True):
            row: dict[str, Any] = {"id": it.id, "subset": it.subset}
            if o.scores is not None:
                row["scores"] = o.scores
            if o.orders:
                row["orders"] = {f"{i},{j}": list(v) for (i, j), v in o.orders.items()}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_json(out_dir / f"{name}.json", summary)
    return summary


def no_usable(where: str, records: int, skips: SkipLog, unjudged: dict[str, int] | None = None) -> str:
    """The one line of an eval with nothing to judge: where, what was read, every reason with its count."""
    reasons = [f"{why} ×{n}" for why, n in skips.counts.most_common()]
    reasons += [f"{why} ×{n}" for why, n in (unjudged or {}).items()]
    if skips.counts:
        reasons.append(f"first skip at {skips.examples[skips.counts.most_common(1)[0][0]]}")
    read = f"{records} record(s) read" + (f", {skips.total} skipped" if skips.total else "")
    return f"{where}: no usable record ({read}{': ' + '; '.join(reasons) if reasons else ''}); nothing written"
