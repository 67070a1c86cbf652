"""``btpo build-data``: build preference-pair datasets in the canonical format (METHOD.md §8)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.text import Text

from btpo_cli.console import console, out
from btpo_cli.engines import available_engines, engine_class, resolve_engine_name
from data_builders.hh import HH_SUBSETS, build_hh
from data_builders.importer import import_pairs
from data_builders.sources import BUILDER_SOURCES, parse_source_args
from data_builders.synthetic import build_synthetic

app = typer.Typer(help="Build preference-pair datasets: train.jsonl, test.jsonl and manifest.json in a folder.",
                  no_args_is_help=True)


def _done(manifest: dict, folder: Path) -> None:
    counts = ", ".join(f"{k}={v}" for k, v in manifest.get("counts", {}).items())
    skipped = manifest.get("skipped", {}).get("total", 0)
    for missing in manifest.get("missing") or []:
        console.print(f"[yellow]warning[/]: no {escape(missing)} file in the source; that split has none of it",
                      highlight=False)
    console.print(f"[green]wrote[/] {escape(str(folder))}  ({counts}; skipped {skipped})", highlight=False)
    out.print(str(folder), markup=False, highlight=False)


@app.command("synthetic", epilog="[bold]Example[/]\n\n  btpo build-data synthetic --out data/synthetic --n-train 2000 "
             "--n-test 200 --ops 3 --label-noise 0.1")
def synthetic(
    out_dir: Path = typer.Option(Path("data/synthetic"), "--out", "-o", help="Output folder."),
    n_train: int = typer.Option(2000, "--n-train", min=1, help="Training pairs."),
    n_test: int = typer.Option(200, "--n-test", min=1, help="Test pairs."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    digits: int = typer.Option(1, "--digits", min=1, max=6, help="Digits per operand (difficulty)."),
    ops: int = typer.Option(3, "--ops", min=1, max=8, help="Operations per expression (difficulty)."),
    label_noise: float = typer.Option(0.0, "--label-noise", min=0.0, max=0.5,
                                      help="Fraction of training pairs with chosen/rejected swapped."),
) -> None:
    """Multi-step arithmetic pairs (right result vs near miss): hard to judge without thinking; no Hub."""
    _done(build_synthetic(out_dir, n_train, n_test, seed, digits, ops, label_noise), out_dir)


def print_manifest(manifest: dict) -> None:
    out.print(json.dumps(manifest, indent=2, ensure_ascii=False), markup=False, highlight=False, soft_wrap=True)


def _finish(manifest: dict, folder: Path, dry_run: bool) -> None:
    if dry_run:
        console.print("[yellow]dry run[/]: nothing written", highlight=False)
        print_manifest(manifest)
    else:
        _done(manifest, folder)


class _Bars:
    """A progress callback: ``progress(label, done[, total])`` → one rich bar per label, with rate and ETA."""

    def __init__(self, bar) -> None:
        self.bar, self.tasks = bar, {}

    def __call__(self, label: str, done: int, total: int | None = None) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(label, total=total)
        self.bar.update(self.tasks[label], completed=done, total=total)


@contextmanager
def _progress(unit: str = "rows") -> Iterator[_Bars]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )  # heavy: imported on use

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} {unit}/s" if task.speed else "")

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console) as bar:
        yield _Bars(bar)


def _sources(items: list[str] | None, builder: str) -> dict[str, str]:
    return parse_source_args(items, BUILDER_SOURCES[builder])


_SOURCE_HELP = "NAME=PATH_OR_HUB_ID: read input NAME from a local copy or another Hub id (repeatable)."


@app.command("hh", epilog="[bold]Example[/]\n\n  btpo build-data hh --out data/hh --source hh=./hh-rlhf\n"
                          "  btpo build-data hh --out data/hh-test --source hh=./hh-rlhf/harmless-base/test.jsonl.gz")
def hh(
    out_dir: Path = typer.Option(Path("data/hh"), "--out", "-o", help="Output folder."),
    source: list[str] = typer.Option(None, "--source", help=_SOURCE_HELP + " Name: hh. A local copy may be the "
                                     "Hub layout, one subset's folder, or a single upstream file."),
    subsets: str = typer.Option(None, "--subsets", help="Comma-separated HH subsets (default: the four preference subsets)."),
    n_train: int = typer.Option(20000, "--n-train", min=0, help="Training pairs (0: all)."),
    n_test: int = typer.Option(1000, "--n-test", min=0, help="Test pairs (0: all)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    limit: int = typer.Option(None, "--limit", min=1, help="Read at most N rows per input file."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first unusable row."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the manifest and examples; write nothing."),
) -> None:
    """Anthropic/hh-rlhf transcripts → pairs (prompt = shared turns, responses = final assistant turns)."""
    subs = [s.strip() for s in subsets.split(",") if s.strip()] if subsets else list(HH_SUBSETS)
    with _progress() as bars:
        m = build_hh(None if dry_run else out_dir, _sources(source, "hh"), subs, n_train, n_test, seed, limit,
                     strict, dry_run, progress=bars)
    _finish(m, out_dir, dry_run)


@app.command("import", epilog="[bold]Example[/]\n\n  btpo build-data import shengyuf/BTPO_data --out data/btpo\n"
                              "  btpo build-data import pairs.csv --out data/mine --map prompt=q,chosen=good,rejected=bad")
def import_(
    source: str = typer.Argument(..., help="A JSONL/JSON/CSV/parquet file, a folder, or a Hub id owner/name[:config]."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    column_map: str = typer.Option(None, "--map", help="prompt=COL,chosen=COL,rejected=COL[,id=,aspect=,source=]."),
    split_map: str = typer.Option(None, "--split-map", help="train=SPLIT,test=SPLIT: the source's splits to use."),
    fmt: str = typer.Option("auto", "--format", help="auto, columns or hh-transcript."),
    aspect: str = typer.Option("helpful and harmless", "--aspect", help="Aspect of records without an aspect column."),
    test_fraction: float = typer.Option(0.05, "--test-fraction", min=0.0, max=0.9,
                                        help="Held-out share when the source has no test split."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split."),
    limit: int = typer.Option(None, "--limit", min=1, help="Read at most N rows per split."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first unusable row."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the manifest and examples; write nothing."),
) -> None:
    """Import any preference data (file, folder, Hub id) into the canonical pair format."""
    with _progress() as bars:
        m = import_pairs(source, None if dry_run else out_dir, column_map=column_map, split_map=split_map,
                         aspect=aspect, seed=seed, test_fraction=test_fraction, fmt=fmt, strict=strict,
                         limit=limit, dry_run=dry_run, progress=bars)
    _finish(m, out_dir, dry_run)


def _report_generation(m: dict) -> None:
    g = m.get("generation_run") or m.get("generation")
    if g:
        console.print(f"sampling: {', '.join(f'{k}={v}' for k, v in g.items())}", highlight=False)


def _engine(name: str) -> str:
    if name != "auto" and name not in available_engines():
        raise typer.BadParameter(f"--engine {name}: not one of auto, {', '.join(available_engines())}")
    engine_class(resolve_engine_name(name))      # a one-line error now if it is not installed
    return name


def _generated(build: Callable[..., dict], unit: str, folder: Path, dry_run: bool, engine: str,
               **kw: Any) -> dict | None:
    """Run a generation-based builder (math, if) with progress bars; a dry run's manifest is printed
    (→ ``None``), otherwise the sampling statistics, and the manifest is returned."""
    with _progress(unit) as bars:
        m = build(dry_run=dry_run, engine=_engine(engine), progress=bars, **kw)
    if dry_run:
        _finish(m, folder, True)
        return None
    _report_generation(m)
    return m


# The flags build-data math and if share (each command sets its own defaults where they differ).
_TEMPERATURE = typer.Option(0.8, "--temperature", min=0.0, help="Sampling temperature.")
_TOP_P = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling.")
_DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if present).")
_ENGINE = typer.Option("auto", "--engine", help="Rollout engine for sampling: auto (vllm on a GPU where "
                       "it imports, else hf), hf, vllm.")
_STRICT = typer.Option(False, "--strict", help="Fail on the first unusable row.")
_DRY_RUN = typer.Option(False, "--dry-run", help="Print the manifest and examples; write nothing.")


@app.command("math", epilog="[bold]Example[/]\n\n  btpo build-data math --out data/math --shard 0/4   # on 4 machines\n"
                            "  btpo build-data math --out data/math              # then assemble")
def math(
    out_dir: Path = typer.Option(Path("data/math"), "--out", "-o", help="Output folder (cache in OUT/.cache)."),
    source: list[str] = typer.Option(None, "--source", help=_SOURCE_HELP + " Names: metamathqa, gsm8k, math500."),
    generator: str = typer.Option("meta-math/MetaMath-Llemma-7B", "--generator", help="Generator model."),
    n_samples: int = typer.Option(8, "--n-samples", min=2, help="Solutions sampled per question."),
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Solution length limit."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Questions per generation batch (one cache write each)."),
    n_train: int = typer.Option(16252, "--n-train", min=0, help="Training pairs (0: all)."),
    n_test: int = typer.Option(841, "--n-test", min=0, help="Test pairs (0: all)."),
    shard: str = typer.Option(None, "--shard", help="I/N: only sample questions with index mod N == I (no assembly)."),
    seed: int = typer.Option(0, "--seed", help="Seed of sampling, pairing and down-sampling."),
    limit: int = typer.Option(None, "--limit", min=1, help="Read at most N questions per source."),
    device: str = _DEVICE,
    engine: str = _ENGINE,
    strict: bool = _STRICT,
    dry_run: bool = _DRY_RUN,
) -> None:
    """Sample solutions, grade the final answers, pair a correct with an incorrect one (resumable)."""
    from data_builders.math_builder import build_math  # optional extra: imported on use

    m = _generated(build_math, "questions", out_dir, dry_run, engine, out=out_dir, sources=_sources(source, "math"),
                   generator=generator, n_samples=n_samples, temperature=temperature, top_p=top_p,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, n_train=n_train, n_test=n_test,
                   shard=shard, seed=seed, limit=limit, strict=strict, device=device)
    if m is None:
        return
    if m.get("stage") == "sample":
        console.print(f"[green]shard {m['shard'][0]}/{m['shard'][1]} sampled[/] into {m['cache']}; run without "
                      "--shard to assemble", highlight=False)
        out.print(str(m["cache"]), markup=False, highlight=False)
        return
    g = m["grading"]
    console.print(f"graded {g['samples']} solutions: correct {g['correct']}, incorrect {g['incorrect']}, "
                  f"no answer {g['no_answer']}; {m['no_pair']} question(s) without a pair", highlight=False)
    if not sum(m["counts"].values()):
        console.print("[yellow]warning[/]: no pairs (every question's solutions were all correct or all wrong)",
                      highlight=False)
    _done(m, out_dir)


@app.command("if", epilog="[bold]Example[/]\n\n  btpo build-data if --out data/if --source advancedif=./AdvancedIF "
                          "--generator qwen2.5-7b --judge qwen2.5-7b")
def if_(
    out_dir: Path = typer.Option(Path("data/if"), "--out", "-o", help="Output folder (cache in OUT/.cache)."),
    source: list[str] = typer.Option(None, "--source", help=_SOURCE_HELP + " Name: advancedif."),
    generator: str = typer.Option("qwen2.5-7b", "--generator", help="Generator model (chat template)."),
    judge: str = typer.Option("qwen2.5-7b", "--judge", help="Judge model (local; the model name with --judge-url)."),
    judge_url: str = typer.Option(None, "--judge-url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1."),
    n_samples: int = typer.Option(4, "--n-samples", min=2, help="Responses sampled per prompt."),
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", min=1, help="Response length limit."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per batch (one cache write each)."),
    n_train: int = typer.Option(14407, "--n-train", min=0, help="Training pairs at most (0: all)."),
    n_test: int = typer.Option(784, "--n-test", min=0, help="Test pairs at most (0: no cap)."),
    test_fraction: float = typer.Option(0.05, "--test-fraction", min=0.0, max=0.9, help="Share of pairs held out."),
    seed: int = typer.Option(0, "--seed", help="Seed of sampling, pairing and the split."),
    limit: int = typer.Option(None, "--limit", min=1, help="Read at most N prompts."),
    device: str = _DEVICE,
    engine: str = _ENGINE,
    strict: bool = _STRICT,
    dry_run: bool = _DRY_RUN,
) -> None:
    """AdvancedIF prompts → sampled responses judged per rubric → pairs (CC-BY-NC-4.0: non-commercial)."""
    from data_builders.if_builder import build_if  # optional extra: imported on use

    m = _generated(build_if, "prompts", out_dir, dry_run, engine, out=None if dry_run else out_dir,
                   sources=_sources(source, "if"), generator=generator, judge=judge, judge_url=judge_url,
                   n_samples=n_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                   batch_size=batch_size, n_train=n_train, n_test=n_test, test_fraction=test_fraction, seed=seed,
                   limit=limit, strict=strict, device=device)
    if m is None:
        return
    j = m["judging"]
    console.print(f"judged {j['judgments']} (response, rubric): satisfied {j['satisfied']}, not {j['not_satisfied']}, "
                  f"unparsable {j['unparsable']}; {m['ties']} prompt(s) tied (no pair)", highlight=False)
    _done(m, out_dir)
