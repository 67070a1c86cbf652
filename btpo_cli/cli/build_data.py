"""``btpo build-data``: build preference-pair datasets in the canonical format (METHOD.md §8)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from btpo_cli.console import console, out
from btpo_cli.engines import check_engine_choice, engine_class, resolve_engine_name
from btpo_cli.errors import check_choice
from btpo_cli.progress import PhaseProgress
from data_builders.generated import default_device
from data_builders.hh import HH_SUBSETS, build_hh
from data_builders.if_builder import build_if
from data_builders.importer import import_pairs
from data_builders.sources import BUILDER_SOURCES, parse_source_args
from data_builders.synthetic import build_synthetic

OVERWRITE_HELP = ("Replace a different dataset already in --out (without it, that is an error naming what differs; "
                  "the same command with the same inputs is a no-op).")


app = typer.Typer(help="Build preference-pair datasets: train.jsonl, test.jsonl and manifest.json in a folder.",
                  no_args_is_help=True)


def _done(manifest: dict, folder: Path) -> None:
    counts = ", ".join(f"{k}={v}" for k, v in manifest.get("counts", {}).items())
    skipped = manifest.get("skipped", {}).get("total", 0)
    for missing in manifest.get("missing") or []:
        console.print(f"[yellow]warning[/]: no {escape(missing)} file in the source; that split has none of it",
                      highlight=False)
    verb = "unchanged (it holds this dataset already)" if manifest.get("unchanged") else "wrote"
    console.print(f"[green]{verb}[/] {escape(str(folder))}  ({counts}; skipped {skipped})", highlight=False)
    out.print(str(folder), markup=False, highlight=False)


# Options several builders share; typer reads these defaults, it never mutates them.
_STRICT = typer.Option(False, "--strict", help="Fail on the first unusable row.")
_DRY_RUN = typer.Option(False, "--dry-run", help="Print the manifest and examples; write nothing.")
_OVERWRITE = typer.Option(False, "--overwrite", help=OVERWRITE_HELP)


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
    name: str = typer.Option("synthetic", "--name", help="Dataset name (eval JSONs, btpo compare's column)."),
    overwrite: bool = _OVERWRITE,
) -> None:
    """Multi-step arithmetic pairs (right result vs near miss): hard to judge without thinking; no Hub."""
    _done(build_synthetic(out_dir, n_train, n_test, seed, digits, ops, label_noise, name=name, overwrite=overwrite),
          out_dir)


def print_manifest(manifest: dict) -> None:
    out.print(json.dumps(manifest, indent=2, ensure_ascii=False), markup=False, highlight=False, soft_wrap=True)


def _finish(manifest: dict, folder: Path, dry_run: bool) -> None:
    if dry_run:
        console.print("[yellow]dry run[/]: nothing written", highlight=False)
        print_manifest(manifest)
    else:
        _done(manifest, folder)


class _Bars:
    """A progress callback: ``progress(label, done[, total])`` → one :class:`PhaseProgress` per label (a bar
    on a terminal, ``[btpo] <label>: row 40/200 …`` lines in a log); the previous label's ends when a new one starts."""

    def __init__(self, unit: str) -> None:
        self.unit, self.phases = unit.rstrip("s") or "row", {}

    def __call__(self, label: str, done: int, total: int | None = None) -> None:
        if label not in self.phases or not self.phases[label].enabled:
            for p in self.phases.values():      # one live display at a time: the stages run one after another
                p.close()
            self.phases[label] = PhaseProgress(total, label, unit=self.unit)
        self.phases[label].update(done, total=total)

    def close(self) -> None:
        for p in self.phases.values():
            p.close()


@contextmanager
def _progress(unit: str = "rows") -> Iterator[_Bars]:
    bars = _Bars(unit)
    try:
        yield bars
    finally:
        bars.close()


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
    strict: bool = _STRICT, dry_run: bool = _DRY_RUN, overwrite: bool = _OVERWRITE,
) -> None:
    """Anthropic/hh-rlhf transcripts → pairs (prompt = shared turns, responses = final assistant turns)."""
    subs = [check_choice("--subsets", s.strip(), HH_SUBSETS) for s in subsets.split(",") if s.strip()] if subsets \
        else list(HH_SUBSETS)
    with _progress() as bars:
        m = build_hh(None if dry_run else out_dir, _sources(source, "hh"), subs, n_train, n_test, seed, limit,
                     strict, dry_run, progress=bars, overwrite=overwrite)
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
    strict: bool = _STRICT, dry_run: bool = _DRY_RUN, overwrite: bool = _OVERWRITE,
) -> None:
    """Import any preference data (file, folder, Hub id) into the canonical pair format."""
    with _progress() as bars:
        m = import_pairs(source, None if dry_run else out_dir, column_map=column_map, split_map=split_map,
                         aspect=aspect, seed=seed, test_fraction=test_fraction, fmt=fmt, strict=strict,
                         limit=limit, dry_run=dry_run, progress=bars, overwrite=overwrite)
    _finish(m, out_dir, dry_run)


def _report_generation(m: dict) -> None:
    g = m.get("generation_run") or m.get("generation")
    if g:
        console.print(f"sampling: {', '.join(f'{k}={v}' for k, v in g.items())}", highlight=False)
    f = m.get("failed") or {}
    if f.get("total"):
        why = "; ".join(f"{r} ({n})" for r, n in list(f["reasons"].items())[:3])
        console.print(f"[yellow]warning[/]: {f['total']} {f['what']} left out, their requests failed: {escape(why)}; "
                      "re-run the same command to ask only for those", highlight=False)


def _engine(name: str) -> str:
    check_engine_choice(name)
    engine_class(resolve_engine_name(name))      # a one-line error now if it is not installed
    return name


def _generated(name: str, build: Callable[..., dict], unit: str, folder: Path, source: list[str] | None,
               flags: dict[str, Any], **kw: Any) -> dict | None:
    """Run the generation-based builder ``name`` (math, if) with progress bars, its ``--source`` items and
    the shared ``flags``; a dry run's manifest is printed (→ ``None``), otherwise the sampling statistics, and the
    manifest is returned."""
    with _progress(unit) as bars:
        sources = _sources(source, name)
        local_model = not flags["generator_url"] or ("judge_url" in kw and not kw["judge_url"])
        engine = _engine(flags["engine"]) if local_model else flags["engine"]   # no engine behind URLs
        if local_model:
            default_device(flags["device"])       # a bad --device: one line now, not after reading the sources
        m = build(sources=sources, **kw, **{**flags, "engine": engine}, progress=bars)
    if flags["dry_run"]:
        _finish(m, folder, True)
        return None
    _report_generation(m)
    return m


# The flags build-data math and if share: name → (type, typer.Option limits, (default, help) per command;
# "" for both). The commands declare only their own flags; _generation_command adds these.
_GENERATION_FLAGS: dict[str, tuple[type, dict[str, Any], dict[str, tuple[Any, str]]]] = {
    "generator": (str, {}, {"math": ("meta-math/MetaMath-Llemma-7B", "Generator model."),
                            "if": ("qwen2.5-7b", "Generator model (chat template).")}),
    "n_samples": (int, {"min": 2}, {"math": (8, "Solutions sampled per question."),
                                    "if": (4, "Responses sampled per prompt.")}),
    "temperature": (float, {"min": 0.0}, {"": (0.8, "Sampling temperature.")}),
    "top_p": (float, {"min": 0.0, "max": 1.0}, {"": (1.0, "Nucleus sampling.")}),
    "max_new_tokens": (int, {"min": 1}, {"math": (512, "Solution length limit."),
                                         "if": (1024, "Response length limit.")}),
    "batch_size": (int, {"min": 1}, {"math": (16, "Questions per generation batch (one cache write each)."),
                                     "if": (8, "Prompts per batch (one cache write each).")}),
    "n_train": (int, {"min": 0}, {"math": (16252, "Training pairs (0: all)."),
                                  "if": (14407, "Training pairs at most (0: all).")}),
    "n_test": (int, {"min": 0}, {"math": (841, "Test pairs (0: all)."), "if": (784, "Test pairs at most (0: no cap).")}),
    "seed": (int, {}, {"math": (0, "Seed of sampling, pairing and down-sampling."),
                       "if": (0, "Seed of sampling, pairing and the split.")}),
    "limit": (int, {"min": 1}, {"math": (None, "Read at most N questions per source."),
                                "if": (None, "Read at most N prompts.")}),
    "device": (str, {}, {"": (None, "cpu, cuda, cuda:1 (default: cuda if present).")}),
    "engine": (str, {}, {"": ("auto", "Rollout engine for sampling: auto (vllm on a GPU where it imports, else hf), "
                                      "hf, vllm.")}),
    "generator_url": (str, {}, {"": (None, "Sample through an OpenAI-compatible server instead of a local model, "
                                           "e.g. http://host:8000/v1 (--generator is the served model name).")}),
    "retries": (int, {"min": 0}, {"": (3, "Retries per request to --generator-url/--judge-url (exponential "
                                          "backoff); a request still failing is skipped and counted.")}),
    "timeout": (float, {"min": 0.001}, {"": (None, "Seconds to wait for one reply from a server (default: 120 for "
                                                   "the judge; for the generator 120 + batch-size × n-samples × "
                                                   "max-new-tokens / 20, a server at 20 tokens/s).")}),
    "backoff": (float, {"min": 0.0}, {"": (1.0, "First retry delay in seconds (then doubled, at most 30).")}),
    "strict": (bool, {}, {"": (False, "Fail on the first unusable row.")}),
    "dry_run": (bool, {}, {"": (False, "Print the manifest and examples; write nothing.")}),
    "overwrite": (bool, {}, {"": (False, "Replace a different dataset already in --out (the samples cached in "
                                         "OUT/.cache are reused).")}),
}


def _generation_flag(command: str, name: str) -> inspect.Parameter:
    kind, limits, by_command = _GENERATION_FLAGS[name]
    default, help_ = by_command.get(command) or by_command[""]
    option = typer.Option(default, "--" + name.replace("_", "-"), help=help_, **limits)
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=kind)


def _generation_command(command: str, epilog: str, layout: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Register ``build-data COMMAND`` from a function that declares its own flags and takes the shared
    ones (:data:`_GENERATION_FLAGS`) as one dict, ``flags``; ``layout`` orders all of them in ``--help``."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        own = {k: p for k, p in inspect.signature(fn, eval_str=True).parameters.items() if k != "flags"}

        def run(**kw: Any) -> None:
            fn(**{k: kw.pop(k) for k in own}, flags=kw)

        run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [own[name] if name in own else _generation_flag(command, name) for name in layout])
        run.__name__, run.__doc__ = fn.__name__, fn.__doc__
        app.command(command, epilog=epilog)(run)
        return fn

    return register


@_generation_command("math", "[bold]Example[/]\n\n  btpo build-data math --out data/math --shard 0/4   # on 4 machines\n"
                             "  btpo build-data math --out data/math              # then assemble",
                     ("out_dir", "source", "generator", "n_samples", "temperature", "top_p", "max_new_tokens",
                      "batch_size", "n_train", "n_test", "shard", "marked_only", "seed", "limit", "device", "engine",
                      "generator_url", "retries", "timeout", "backoff", "strict", "dry_run", "overwrite"))
def math(
    out_dir: Path = typer.Option(Path("data/math"), "--out", "-o", help="Output folder (cache in OUT/.cache)."),
    source: list[str] = typer.Option(None, "--source", help=_SOURCE_HELP + " Names: metamathqa, gsm8k, math500."),
    shard: str = typer.Option(None, "--shard", help="I/N: only sample questions with index mod N == I (no assembly)."),
    marked_only: bool = typer.Option(False, "--marked-only", help="Grade only answers a solution marks ('The answer "
                                     "is:', '####', \\boxed{}); unmarked ones count as no answer, not their last "
                                     "number (a small generator's last number is often right by accident)."),
    *,
    flags: dict[str, Any],
) -> None:
    """Sample solutions, grade the final answers, pair a correct with an incorrect one (resumable)."""
    from data_builders.math_builder import build_math  # optional extra: imported on use

    m = _generated("math", build_math, "questions", out_dir, source, flags, out=out_dir, shard=shard,
                   marked_only=marked_only)
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
        per = m["questions"].values()
        console.print(f"[yellow]warning[/]: no pairs: of {sum(c['questions'] for c in per)} question(s), "
                      f"{sum(c['all_correct'] for c in per)} had all solutions correct, "
                      f"{sum(c['all_incorrect'] for c in per)} all wrong, {sum(c['failed'] for c in per)} failed",
                      highlight=False)
    for split, names in (m.get("splits_without_source") or {}).items():
        console.print(f"note: no {split} pairs: no {'/'.join(names)} source read (--source names only "
                      f"{', '.join(m['sources']) or 'none'})", highlight=False)
    _done(m, out_dir)


@_generation_command("if", "[bold]Example[/]\n\n  btpo build-data if --out data/if --source advancedif=./AdvancedIF "
                           "--generator qwen2.5-7b --judge qwen2.5-7b",
                     ("out_dir", "source", "generator", "judge", "judge_url", "n_samples", "temperature", "top_p",
                      "max_new_tokens", "batch_size", "n_train", "n_test", "test_fraction", "seed", "limit", "device",
                      "engine", "generator_url", "retries", "timeout", "backoff", "strict", "dry_run", "overwrite"))
def if_(
    out_dir: Path = typer.Option(Path("data/if"), "--out", "-o", help="Output folder (cache in OUT/.cache)."),
    source: list[str] = typer.Option(None, "--source", help=_SOURCE_HELP + " Name: advancedif."),
    judge: str = typer.Option("qwen2.5-7b", "--judge", help="Judge model (local; the model name with --judge-url)."),
    judge_url: str = typer.Option(None, "--judge-url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1."),
    test_fraction: float = typer.Option(0.05, "--test-fraction", min=0.0, max=0.9, help="Share of pairs held out."),
    *,
    flags: dict[str, Any],
) -> None:
    """AdvancedIF prompts → sampled responses judged per rubric → pairs (CC-BY-NC-4.0: non-commercial)."""
    m = _generated("if", build_if, "prompts", out_dir, source, flags, out=None if flags["dry_run"] else out_dir,
                   judge=judge, judge_url=judge_url, test_fraction=test_fraction)
    if m is None:
        return
    j = m["judging"]
    console.print(f"judged {j['judgments']} (response, rubric): satisfied {j['satisfied']}, not {j['not_satisfied']}, "
                  f"unparsable {j['unparsable']}; {m['ties']} prompt(s) tied (no pair)", highlight=False)
    _done(m, out_dir)
