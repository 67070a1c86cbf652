"""Evaluate a run folder on a dataset split and write ``eval/<dataset>.json`` (shared by all methods)."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from btpo_cli import __version__
from btpo_cli.config import Config
from btpo_cli.data import dataset_name
from btpo_cli.engines import available_engines, engine_class, resolve_engine_name
from btpo_cli.errors import BtpoError
from btpo_cli.evaluation import EVAL_VERSION, PairResult, summarize
from btpo_cli.runs import Run


def model_dir_of(run: Run, which: str = "final") -> Path:
    if which == "best":
        if not run.best_dir.exists():
            raise BtpoError(f"{run.root}: no best/ model (it is kept when training with train.eval_every > 0)")
        return run.best_dir
    if which != "final":
        raise BtpoError(f"--which {which}: expected final or best")
    if not run.final_dir.exists():
        raise BtpoError(f"{run.root}: no final/ model yet (did training finish? `btpo train --out {run.root} "
                        "--resume` completes it)")
    return run.final_dir


def evaluate_run(run_dir: str | Path, data: str | None = None, split: str | None = None,
                 batch_size: int | None = None, limit: int | None = None, samples: int | None = None,
                 max_new_tokens: int | None = None, device: str | None = None,
                 engine: str | None = None, which: str = "final") -> dict[str, Any]:
    """Run the method's evaluator and the shared protocol; write and return the eval summary.

    ``which``: ``final`` (``final/``, results in ``RUN/eval/``) or ``best`` (``best/``, kept by
    ``train.eval_every``; results in ``RUN/eval/best/``)."""
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
    impl = get_method(cfg.method)
    if engine:
        if engine != "auto" and engine not in available_engines():
            raise BtpoError(f"--engine {engine}: not one of auto, {', '.join(available_engines())}")
        cfg.rollout.engine = engine
    if impl.generative:
        engine_class(resolve_engine_name(cfg.rollout.engine))     # not installed: one line now, not mid-eval
    split = split or cfg.data.eval_split
    model_dir = model_dir_of(run, which)
    records, skips = read_split(cfg.data.path, split, strict=cfg.data.strict,
                                limit=limit if limit is not None else cfg.eval.limit)
    if skips.total and int(os.environ.get("RANK", "0")) == 0:
        console.print(f"[yellow]{escape(f'{cfg.data.path} [{split}]')}: skipped {skips.total} record(s): "
                      f"{escape(skips.summary())}[/]", highlight=False, soft_wrap=True)
    name = dataset_name(cfg.data.path)
    out_dir = eval_dir(run.root, which)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = EvalShards.start(len(records), cfg.eval.batch_size)
    dev = shards.device if shards.world > 1 and device is None else \
        torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mine = records[shards.lo:shards.hi]
    artifacts = shards.artifact_dir(out_dir) / name

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]eval {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, disable=not shards.is_main) as bar:
        task = bar.add_task(f"{run.root.name} on {name}/{split}", total=len(records))
        results: list[PairResult] = impl.evaluate(cfg, str(model_dir), mine, dev,
                                                  progress=lambda k: bar.advance(task, k * shards.world),
                                                  artifacts=artifacts) if mine else []
    results = shards.gather(results, records, out_dir)
    summary = {
        "eval_version": EVAL_VERSION,
        "run": run.root.name,
        "method": cfg.method,
        "tag": cfg.tag,
        "model": cfg.model.name,
        "dataset": name,
        "data_path": cfg.data.path,
        "split": split,
        "protocol": impl.protocol,
        **summarize(results),
        "data_skips": {"records": len(records), **skips.as_dict()},
        "checkpoint": str(model_dir),
        "which": which,
        "btpo_version": __version__,
        "eval_config": cfg.eval.__dict__,
        "engine": resolve_engine_name(cfg.rollout.engine) if impl.generative else None,
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
    if shards.is_main:
        _atomic_json(out_dir / f"{name}.json", summary)
        with open(out_dir / f"{name}.predictions.jsonl", "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps({"id": r.id, "credit": r.credit, **r.detail}, ensure_ascii=False) + "\n")
        from btpo_cli.checkpoint import record_eval

        record_eval(model_dir, summary)        # final/btpo.json and its model card learn the result
    shards.wait()
    return summary


@dataclass
class EvalShards:
    """This process's share of the test pairs under ``accelerate launch … -m btpo_cli eval``.

    Process ``r`` evaluates one contiguous block of whole ``eval.batch_size`` batches, so every
    batch holds the same pairs as in a one-process run (same padding, same numbers). The results
    are gathered to every process in record order — judged pairs first, then the unjudged ones
    (:func:`~btpo_cli.evaluation.with_unjudged`), exactly as one process orders them — and the
    main process writes the JSON, the predictions and the method's artifacts (each process
    writes its own under ``eval/.parts/rank<r>/``; they are joined in rank order)."""

    world: int
    rank: int
    lo: int
    hi: int
    device: Any = None

    @classmethod
    def start(cls, n: int, batch_size: int) -> EvalShards:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(1, 0, 0, n)
        from accelerate import PartialState

        from btpo_cli.trainer import use_cpu

        state = PartialState(cpu=use_cpu())
        world, rank = state.num_processes, state.process_index
        return cls(world, rank, *batch_block(n, batch_size, rank, world), state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def artifact_dir(self, out_dir: Path) -> Path:
        if self.world == 1:
            return out_dir
        d = out_dir / ".parts" / f"rank{self.rank}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def gather(self, results: list[PairResult], records: list[Any], out_dir: Path) -> list[PairResult]:
        if self.world == 1:
            return results
        from accelerate.utils import gather_object

        merged = in_record_order(gather_object(results), records)
        self.wait()
        if self.is_main:
            parts = [out_dir / ".parts" / f"rank{r}" for r in range(self.world)]
            for fname in sorted({f.name for d in parts if d.exists() for f in d.iterdir()}):
                with open(out_dir / fname, "wb") as dst:
                    for d in parts:
                        if (d / fname).exists():
                            dst.write((d / fname).read_bytes())
            shutil.rmtree(out_dir / ".parts", ignore_errors=True)
        return merged

    def wait(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def batch_block(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Process ``rank``'s records ``[lo, hi)`` of ``n``: one contiguous block of whole batches, so every
    batch holds the same pairs (same padding, same numbers) as in a one-process evaluation."""
    per = math.ceil(math.ceil(n / batch_size) / world) * batch_size
    return min(n, rank * per), min(n, (rank + 1) * per)


def in_record_order(results: list[PairResult], records: list[Any]) -> list[PairResult]:
    """Every process's results → one process's order: judged pairs in record order, then the unjudged."""
    pos = {r.id: k for k, r in enumerate(records)}
    unjudged = [r for r in results if r.detail.get("reason") == "too_long" and r.credit == 0]
    skip = {id(r) for r in unjudged}
    judged = [r for r in results if id(r) not in skip]
    return sorted(judged, key=lambda r: pos.get(r.id, 0)) + sorted(unjudged, key=lambda r: pos.get(r.id, 0))


def eval_dir(run_dir: str | Path, which: str = "final") -> Path:
    """Where the results of ``final/`` (``RUN/eval/``) or ``best/`` (``RUN/eval/best/``) go."""
    d = Path(run_dir) / "eval"
    return d / "best" if which == "best" else d


def eval_paths(run_dir: str | Path, summary: dict[str, Any]) -> list[Path]:
    """The files an evaluation wrote: the summary JSON first, then the per-pair predictions."""
    d = eval_dir(run_dir, summary.get("which", "final"))
    return [d / f"{summary['dataset']}.json", d / f"{summary['dataset']}.predictions.jsonl"]


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
