"""Evaluate a run folder on a dataset split and write ``eval/<dataset>.json`` (shared by all methods)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from btpo_cli import __version__
from btpo_cli.config import Config, build_config, dump_yaml, eval_budget
from btpo_cli.console import console
from btpo_cli.data.pairs import dataset_name, read_split
from btpo_cli.engines import engine_class, resolve_engine_name
from btpo_cli.errors import BtpoError
from btpo_cli.fsio import atomic_json, atomic_open, atomic_write, run_model
from btpo_cli.judging.benchmarks import get_benchmark
from btpo_cli.judging.judge import override_eval
from btpo_cli.judging.protocol import (
    EVAL_VERSION,
    PairResult,
    batch_block,
    eval_warnings,
    in_record_order,
    summarize,
    thought_stats,
)
from btpo_cli.judging.run_benchmark import no_usable, run_benchmark
from btpo_cli.methods import get_method, method_names
from btpo_cli.models.aliases import resolve_model
from btpo_cli.progress import PhaseProgress
from btpo_cli.runs.final import model_dir_of, read_checkpoint, read_meta, record_eval
from btpo_cli.runs.folder import Run
from btpo_cli.runs.provenance import eval_provenance
from btpo_cli.training.accelerator import use_cpu


def _override_eval(cfg: Config, data: str | None, batch_size: int | None, samples: int | None,
                   max_new_tokens: int | None, engine: str | None, packing: str | None = None) -> None:
    """Apply ``btpo eval``'s flags to the config the judge will run on (a 0 batch size or token
    budget keeps the config's)."""
    if data:
        cfg.data.path = data
    override_eval(cfg, batch_size=batch_size or None, max_new_tokens=max_new_tokens or None,
                  samples=samples, engine=engine, packing=packing)


def evaluate_run(run_dir: str | Path, data: str | None = None, split: str | None = None,
                 batch_size: int | None = None, limit: int | None = None, samples: int | None = None,
                 max_new_tokens: int | None = None, device: str | None = None,
                 engine: str | None = None, which: str = "final", benchmark: str | None = None,
                 packing: str | None = None) -> dict[str, Any]:
    """Run the method's evaluator and the shared protocol on a run's model; write and return the eval summary.

    ``which``: ``final`` (``final/``, results in ``RUN/eval/``) or ``best`` (``best/``, kept by
    ``train.eval_every``; results in ``RUN/eval/best/``). ``benchmark``: judge that benchmark (``data``:
    its published file or folder, default its Hub id) instead of a split. ``packing``: ``train.packing``
    for the judge's batches (default: the run's)."""
    run = Run(run_dir)
    cfg: Config = run.load_config()
    budget_from = _budget_from(cfg, max_new_tokens, trained=True)
    _override_eval(cfg, benchmark_source(benchmark, data) if benchmark else data, batch_size, samples,
                   max_new_tokens, engine, packing)
    return run_protocol(cfg, run.root, str(model_dir_of(run.root, which)), split, limit, device, which=which,
                        benchmark=benchmark, budget_from=budget_from)


def _budget_from(cfg: Config, flag: int | None, trained: bool) -> str:
    """Where the eval's thought / rationale budget comes from (``eval_settings.thought_budget_from``):
    ``flag`` (``--max-new-tokens``), ``config`` (``eval.max_new_tokens`` set: a recipe, ``--set``, or an
    older run's config.yaml), ``training`` (unset: the budget the run was trained with,
    ``rollout.max_new_tokens``) or ``default`` (unset, a model as it is: ``rollout.max_new_tokens``)."""
    if flag:
        return "flag"
    if cfg.eval.max_new_tokens is not None:
        return "config"
    return "training" if trained else "default"


def benchmark_source(benchmark: str, data: str | None) -> str:
    """Where a benchmark is read from: ``--data``, else its Hub id."""
    bench = get_benchmark(benchmark)
    if data:
        return data
    if bench.hub_id is None:
        raise BtpoError(f"--data is required with --benchmark {benchmark} (its published files: a file or folder)")
    return bench.hub_id


def evaluate_model(model: str, method: str | None, data: str | None, out: str | Path | None = None,
                   split: str | None = None, batch_size: int | None = None, limit: int | None = None,
                   samples: int | None = None, max_new_tokens: int | None = None, device: str | None = None,
                   engine: str | None = None, recipe: str | None = None, overrides: list[str] | None = None,
                   tag: str = "base", benchmark: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Evaluate a model as it is — an alias, a Hub id or a folder (an untrained base, an off-the-shelf
    reward model, a checkpoint trained elsewhere) — as ``method``'s judge, by the same protocol and judge
    code as :func:`evaluate_run`.

    The result goes to a run folder of its own (``out``, default ``runs/<method>-<tag>-<model>``):
    ``config.yaml`` (the settings the judge ran with; ``tag`` defaults to ``base``) and
    ``eval/<dataset>.json`` marked ``"as_is": true``, so that ``btpo compare`` shows it as the
    method's ``<method> (<tag>)`` row beside the trained runs of the same backbone. Nothing is copied:
    the folder holds no ``final/``; ``checkpoint`` in the JSON names the model that was judged."""
    if benchmark:
        data = benchmark_source(benchmark, data)
    if not data:
        raise BtpoError("--data is required with --model (the pairs to judge)")
    model_dir = resolve_model(model)
    if (Path(model_dir) / "config.yaml").is_file() and (final := run_model(Path(model_dir))) is not None:
        model_dir = str(final)        # a run folder: its final/ model
    meta = read_meta(model_dir) if Path(model_dir).is_dir() else {}
    trained_as = meta.get("method") if isinstance(meta.get("method"), str) else None
    method = method or trained_as
    if not method:
        raise BtpoError(f"--method is required: {model} has no btpo.json naming the method it was trained with "
                        f"(one of {', '.join(method_names())})")
    if trained_as and trained_as != method:
        raise BtpoError(f"{model} was trained as a {trained_as} judge (its btpo.json); evaluate it with "
                        f"--method {trained_as}")
    spec = get_method(method)
    if spec.judge is None:
        raise BtpoError(f"method '{method}' registers no judge (MethodSpec.judge): it cannot evaluate a model")
    check_model_class(model, model_dir, spec.model_class)
    if spec.check_model is not None:
        spec.check_model(model, meta)
    base = None
    if "settings" in meta:          # a btpo checkpoint: the settings it was trained and is judged with

        base = read_checkpoint(model_dir).cfg
    cfg = build_config(recipe, overrides, {"method": method, "model.name": model, "data.path": data}, base=base)
    cfg.tag = tag
    budget_from = _budget_from(cfg, max_new_tokens, trained=base is not None)
    _override_eval(cfg, None, batch_size, samples, max_new_tokens, engine)
    root = Path(out) if out else Path("runs") / f"{method}-{tag}-{_slug(model)}"
    run = Run(root)
    if run.checkpoints() or run.final_dir.exists():
        raise BtpoError(f"{root} holds a trained run (checkpoints or final/); pick another --out")
    cfg.out = str(root)
    root.mkdir(parents=True, exist_ok=True)
    text = dump_yaml(cfg)          # written once the eval succeeded: a failed one leaves the folder as it was
    summary = run_protocol(cfg, root, model_dir, split, limit, device, as_is=True, benchmark=benchmark,
                           budget_from=budget_from)
    atomic_write(root / "config.yaml", text)
    return root, summary


def check_model_class(model: str, model_dir: str, model_class: str) -> None:
    """Refuse a model whose head cannot be the method's judge (a causal LM has no reward head; a reward model
    cannot write thoughts), by ``architectures`` in its ``config.json``; unknown architectures pass."""
    from transformers import AutoConfig  # heavy: imported on use

    try:
        archs = list(AutoConfig.from_pretrained(model_dir).architectures or [])
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BtpoError(f"could not read the config of model '{model}': {first}") from e
    want = "ForSequenceClassification" if model_class == "AutoModelForSequenceClassification" else "ForCausalLM"
    other = "ForCausalLM" if want == "ForSequenceClassification" else "ForSequenceClassification"
    if archs and not any(a.endswith(want) for a in archs) and any(a.endswith(other) for a in archs):
        what = ("a reward model (sequence classification) cannot write thoughts or answer" if want == "ForCausalLM"
                else "a causal LM has no reward head (it would be a random one)")
        raise BtpoError(f"{model} is {', '.join(archs)}: {what}; this method needs a *{want} model")


def _slug(model: str) -> str:
    name = Path(model.rstrip("/")).name if Path(model).exists() else model
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in name).strip("-.") or "model"


def eval_settings(cfg: Config, meta: dict[str, Any] | None = None, *, engine: str | None = None,
                  legacy: bool = False, budget_from: str | None = None) -> dict[str, Any]:
    """The settings that change a judge's figures beyond its weights (``btpo compare`` warns when rows
    differ in them): the engine and thought/rationale budget of a generative judge, then the method's own
    (``MethodSpec.eval_settings``: BTPO's sampled-thought count and ``yes_no_normalize``, bt-prefilled's
    writer budget). ``engine``: the resolved engine, when known; ``legacy``: derive them for an eval summary
    older than ``eval_settings`` (only ``cfg.eval`` and the engine are known; the rest is left out);
    ``budget_from``: where the budget came from (:func:`_budget_from`; ``thought_budget_from``)."""
    impl = get_method(cfg.method)
    out: dict[str, Any] = {}
    if impl.generative:
        out["engine"] = engine or resolve_engine_name(cfg.rollout.engine)
        out["thought_budget"] = eval_budget(cfg)
        out["thought_budget_from"] = budget_from
    if impl.eval_settings is not None:
        out.update(impl.eval_settings(cfg, None if legacy else (meta or {})))
    if getattr(impl.judge, "packs", False) and not legacy and cfg.train.packing != "off":
        out["packing"] = cfg.train.packing      # absent: off (or an eval older than train.packing)
    return {k: v for k, v in out.items() if v is not None}


def run_protocol(cfg: Config, root: Path, model_dir: str, split: str | None, limit: int | None,
                 device: str | None, as_is: bool = False, which: str = "final",
                 benchmark: str | None = None, budget_from: str | None = None) -> dict[str, Any]:
    """METHOD §7 with ``cfg.method``'s judge on ``model_dir``: write ``root/eval/<dataset>.json`` (+ the
    predictions and the method's artifacts) and return the summary. ``benchmark``: judge that benchmark
    (read from ``cfg.data.path``) instead (:mod:`btpo_cli.judging.run_benchmark`). ``budget_from``: where
    the thought budget came from (:func:`_budget_from`). No usable pair: a :class:`BtpoError`, nothing written."""
    impl = get_method(cfg.method)
    if impl.generative:
        engine_class(resolve_engine_name(cfg.rollout.engine))     # not installed: one line now, not mid-eval
        budget_from = budget_from or _budget_from(cfg, None, trained=not as_is)
        cfg.eval.max_new_tokens = eval_budget(cfg)                # eval_config records the budget it ran with
    if benchmark:
        meta = read_meta(model_dir) if Path(model_dir).is_dir() else {}
        return run_benchmark(cfg, root, model_dir, benchmark, cfg.data.path, limit,
                             torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
                             eval_dir(root, which), as_is, which, eval_settings(cfg, meta, budget_from=budget_from))
    split = split or cfg.data.eval_split
    records, skips = read_split(cfg.data.path, split, strict=cfg.data.strict,
                                limit=limit if limit is not None else cfg.eval.limit)
    if skips.total and int(os.environ.get("RANK", "0")) == 0:
        console.print(f"[yellow]{escape(f'{cfg.data.path} [{split}]')}: skipped {skips.total} record(s): "
                      f"{escape(skips.summary())}[/]", highlight=False, soft_wrap=True)
    name = dataset_name(cfg.data.path)
    out_dir = eval_dir(root, which)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = EvalShards.start(len(records), cfg.eval.batch_size)
    dev = shards.device if shards.world > 1 and device is None else \
        torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mine = records[shards.lo:shards.hi]
    artifacts = shards.artifact_dir(out_dir) / name

    with PhaseProgress(len(records), f"eval {root.name} on {name}/{split}", unit="pair",
                       enabled=shards.is_main) as bar:
        results: list[PairResult] = impl.evaluate(cfg, model_dir, mine, dev,
                                                  progress=lambda k: bar.advance(k * shards.world),
                                                  artifacts=artifacts) if mine else []
    results = shards.gather(results, records, out_dir)
    check_judged(results, f"{cfg.data.path} [{split}]", skips, cfg.data.max_length)
    summary = {
        "eval_version": EVAL_VERSION,
        "run": root.name,
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
        "as_is": as_is,
        "btpo_version": __version__,
        "eval_config": cfg.eval.__dict__,
        "eval_settings": eval_settings(cfg, read_meta(model_dir) if Path(model_dir).is_dir() else {},
                                       budget_from=budget_from),
        "engine": resolve_engine_name(cfg.rollout.engine) if impl.generative else None,
    }
    summary["provenance"] = eval_provenance(cfg, model_dir, which, split, as_is, root, summary["eval_settings"],
                                            quiet=not shards.is_main)
    parse_counts: dict[str, int] = {}
    for r in results:
        for kind, n in (r.detail.get("parse") or {}).items():
            parse_counts[kind] = parse_counts.get(kind, 0) + int(n)
    if parse_counts:
        summary["parse"] = dict(sorted(parse_counts.items()))   # generative judges: outcome of every parse

    stats = thought_stats(results)
    if stats:
        summary["thoughts"] = stats    # BTPO: mean thought length, cut fraction, mean Yes+No mass
    if impl.eval_summary is not None:
        summary.update(impl.eval_summary(cfg, results))   # the method's own entries (BTPO: ``sampled``)
    summary["warnings"] = eval_warnings(summary)     # thoughts cut, little Yes/No mass: one line each
    if shards.is_main:                               # predictions first, the summary last: both complete
        with atomic_open(out_dir / f"{name}.predictions.jsonl") as f:
            for r in results:
                f.write(json.dumps({"id": r.id, "credit": r.credit, **r.detail}, ensure_ascii=False) + "\n")
        atomic_json(out_dir / f"{name}.json", summary)
        if not as_is:
            record_eval(Path(model_dir), summary)   # final/btpo.json and its model card learn the result
    shards.wait()
    return summary


def check_judged(results: list[PairResult], where: str, skips: Any, max_length: int) -> None:
    """No pair judged (every one too long for ``data.max_length``): a :class:`BtpoError` naming the data
    and the reasons, before anything is written (a previous result stays)."""
    if not results or any(r.detail.get("reason") != "too_long" for r in results):
        return
    raise BtpoError(no_usable(where, len(results) + skips.total, skips,
                              {f"too long for data.max_length={max_length}": len(results)}))


@dataclass
class EvalShards:
    """This process's share of the test pairs under ``accelerate launch … -m btpo_cli eval``.

    Process ``r`` evaluates one contiguous block of whole ``eval.batch_size`` batches, so every
    batch holds the same pairs as in a one-process run (same padding, same numbers). The results
    are gathered to every process in record order — judged pairs first, then the unjudged ones
    (:func:`~btpo_cli.judging.protocol.with_unjudged`), exactly as one process orders them — and the
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
        from accelerate import PartialState  # heavy: imported on use

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
        from accelerate.utils import gather_object  # heavy: imported on use

        merged = in_record_order(gather_object(results), records)
        self.wait()
        if self.is_main:
            parts = [out_dir / ".parts" / f"rank{r}" for r in range(self.world)]
            for fname in sorted({f.name for d in parts if d.exists() for f in d.iterdir()}):
                with atomic_open(out_dir / fname, "wb") as dst:
                    for d in parts:
                        if (d / fname).exists():
                            dst.write((d / fname).read_bytes())
            shutil.rmtree(out_dir / ".parts", ignore_errors=True)
        return merged

    def wait(self) -> None:
        if self.world > 1:
            from accelerate import PartialState  # heavy: imported on use

            PartialState().wait_for_everyone()


def eval_dir(run_dir: str | Path, which: str = "final") -> Path:
    """Where the results of ``final/`` (``RUN/eval/``) or ``best/`` (``RUN/eval/best/``) go."""
    d = Path(run_dir) / "eval"
    return d / "best" if which == "best" else d


def eval_paths(run_dir: str | Path, summary: dict[str, Any]) -> list[Path]:
    """The files an evaluation wrote: the summary JSON first, then the per-pair predictions."""
    d = eval_dir(run_dir, summary.get("which", "final"))
    return [d / f"{summary['dataset']}.json", d / f"{summary['dataset']}.predictions.jsonl"]


