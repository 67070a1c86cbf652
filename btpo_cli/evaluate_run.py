"""Evaluate a run folder on a dataset split and write ``eval/<dataset>.json`` (shared by all methods)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from btpo_cli import __version__
from btpo_cli.config import Config
from btpo_cli.data import dataset_name
from btpo_cli.errors import BtpoError
from btpo_cli.evaluation import EVAL_VERSION, PairResult, summarize
from btpo_cli.runs import Run


def model_dir_of(run: Run) -> Path:
    if not run.final_dir.exists():
        raise BtpoError(f"{run.root}: no final/ model yet (did training finish? `btpo train --out {run.root} "
                        "--resume` completes it)")
    return run.final_dir


def evaluate_run(run_dir: str | Path, data: str | None = None, split: str | None = None,
                 batch_size: int | None = None, limit: int | None = None, samples: int | None = None,
                 max_new_tokens: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Run the method's evaluator and the shared protocol; write and return the eval summary."""
    from rich.markup import escape

    from btpo_cli.console import console
    from btpo_cli.data import read_split
    from btpo_cli.methods import get_method

    run = Run(run_dir)
    cfg: Config = run.load_config()
    if data:
        cfg.data.path = data
    if batch_size:
        cfg.eval.batch_size = batch_size
    if samples is not None:
        cfg.eval.samples = samples
    if max_new_tokens:
        cfg.eval.max_new_tokens = max_new_tokens
    split = split or cfg.data.eval_split
    model_dir = model_dir_of(run)
    records, skips = read_split(cfg.data.path, split, strict=cfg.data.strict,
                                limit=limit if limit is not None else cfg.eval.limit)
    if skips.total:
        console.print(f"[yellow]{escape(f'{cfg.data.path} [{split}]')}: skipped {skips.total} record(s): "
                      f"{escape(skips.summary())}[/]", highlight=False, soft_wrap=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    impl = get_method(cfg.method)
    name = dataset_name(cfg.data.path)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]eval {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(f"{run.root.name} on {name}/{split}", total=len(records))
        out_dir = run.root / "eval"
        out_dir.mkdir(parents=True, exist_ok=True)
        results: list[PairResult] = impl.evaluate(cfg, str(model_dir), records, dev,
                                                  progress=lambda k: bar.advance(task, k),
                                                  artifacts=out_dir / name)
    summary = {
        "eval_version": EVAL_VERSION,
        "run": run.root.name,
        "method": cfg.method,
        "tag": cfg.tag,
        "model": cfg.model.name,
        "dataset": name,
        "data_path": cfg.data.path,
        "split": split,
        "protocol": getattr(impl, "PROTOCOL", "pointwise"),
        **summarize(results),
        "data_skips": {"records": len(records), **skips.as_dict()},
        "checkpoint": str(model_dir),
        "btpo_version": __version__,
        "eval_config": cfg.eval.__dict__,
    }
    parse_counts: dict[str, int] = {}
    for r in results:
        for kind, n in (r.detail.get("parse") or {}).items():
            parse_counts[kind] = parse_counts.get(kind, 0) + int(n)
    if parse_counts:
        summary["parse"] = dict(sorted(parse_counts.items()))   # generative judges: outcome of every parse
    sampled = [r for r in results if "sampled_chosen" in r.detail]
    if sampled:
        from btpo_cli.evaluation import pointwise_result

        summary["sampled"] = {"samples": cfg.eval.samples, **summarize(
            [pointwise_result(r.id, r.detail["sampled_chosen"], r.detail["sampled_rejected"]) for r in sampled])}
    _atomic_json(out_dir / f"{name}.json", summary)
    with open(out_dir / f"{name}.predictions.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps({"id": r.id, "credit": r.credit, **r.detail}, ensure_ascii=False) + "\n")
    return summary


def eval_paths(run_dir: str | Path, summary: dict[str, Any]) -> list[Path]:
    """The files an evaluation wrote: the summary JSON first, then the per-pair predictions."""
    d = Path(run_dir) / "eval"
    return [d / f"{summary['dataset']}.json", d / f"{summary['dataset']}.predictions.jsonl"]


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
