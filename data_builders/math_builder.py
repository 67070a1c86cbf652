"""The Math builder: sample solutions with a generator, grade them, pair a correct with an incorrect one.

Stages (METHOD.md §8), each resumable:

1. **questions**: MetaMathQA (train), GSM8K ``main`` test and MATH-500 (test), read by
   :mod:`data_builders.math_questions`; when ``sources`` names any input, only those named are read
   (:func:`chosen_sources`: ``--source gsm8k=FILE`` alone builds test pairs only; the manifest's
   ``splits_without_source`` says which split got no input). Questions are numbered in that order;
   ``shard=(i, n)`` keeps only those whose number is ``i`` modulo ``n``.
2. **sample**: ``n_samples`` solutions per question from the generator (default
   ``meta-math/MetaMath-Llemma-7B``) through the rollout engine (`--engine`), or through an
   OpenAI-compatible server's ``/completions`` (``generator_url``; a question whose request fails
   after its retries is counted in ``failed`` and sampled again by a re-run). The prompt is
   :func:`~data_builders.math_questions.alpaca_prompt` tokenized with ``add_special_tokens=True``
   (no chat template); generation stops on the tokenizer's eos (and the model's generation-config
   eos ids). Questions are cut into fixed batches of ``batch_size``; after each batch one line
   per question ``{"qid", "samples", "finished", "generator"}`` is appended to
   ``<out>/.cache/math-samples[.shard-I-of-N].jsonl`` and flushed with ``fsync``, so a crash or
   Ctrl-C loses at most the batch in flight. A re-run reuses every cached line whose
   ``generator`` settings equal the current ones (a truncated last line is ignored) and generates
   only the rest. Batch ``b`` is sampled with seed ``(seed, b)``-derived, so a resumed build
   draws the same samples as an uninterrupted one (up to GPU non-determinism).
3. **assemble** (skipped with ``shard``): all shard caches are merged; every sample is graded
   (:func:`~data_builders.grading.extract_answer` + :func:`~data_builders.grading.answers_match`;
   a sample with no extractable answer is incorrect, counted apart); per question one correct
   and one incorrect solution are picked (seeded by ``(seed, qid)``) → a
   :class:`~btpo_cli.data.pairs.PairRecord` with ``prompt = [user: question]``, aspect ``"correct"``;
   train pairs come from MetaMathQA, test pairs from GSM8K + MATH-500; each split is seeded
   down-sampled to ``n_train`` / ``n_test`` and written with :func:`~btpo_cli.data.pairs.write_dataset`.

Questions whose samples are all correct or all incorrect give no pair; they are counted in the
manifest (``questions.<source>.all_correct`` / ``all_incorrect``), never an error. Setting the
environment variable ``BTPO_FAULT_AFTER_BATCHES=K`` makes the process exit (code 75) right after
the K-th batch is written: the tests use it to simulate a killed build.

The skeleton (the generator, the resumable stages, pairing, writing) is
:mod:`data_builders.generated`, shared with :mod:`data_builders.if_builder`; this module supplies
its stages (:class:`MathBuild`, run by :func:`~data_builders.generated.run_build`): the questions,
the prompt, the grading and the per-source split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from btpo_cli.data.pairs import PairRecord, SkipLog, seeded_sample
from btpo_cli.errors import BtpoError
from data_builders.generated import (
    Assembled,
    BuildRun,
    DryRun,
    GenOptions,
    GenSettings,
    JsonlCache,
    Progress,
    Sampler,
    base_manifest,
    failure_summary,
    load_cache_file,
    pick_pair,
    require_some,
    run_build,
    sample_stage,
)
from data_builders.grading import HAS_MATH_VERIFY, answers_match, extract_answer
from data_builders.math_questions import MathQuestion, alpaca_prompt, read_questions
from data_builders.sources import resolve_sources

DEFAULT_GENERATOR = "meta-math/MetaMath-Llemma-7B"
MATH_ASPECT = "correct"
TRAIN_SOURCES = ("metamathqa",)
TEST_SOURCES = ("gsm8k", "math500")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``; ``None`` for no shard."""
    if text is None or not str(text).strip():
        return None
    i, sep, n = str(text).partition("/")
    try:
        si, sn = int(i), int(n)
    except ValueError:
        si, sn = -1, 0
    if not sep or sn < 1 or not 0 <= si < sn:
        raise BtpoError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
    return si, sn


# ----------------------------------------------------------------------------- math


@dataclass(frozen=True)
class MathSettings(GenSettings):
    """The generator settings plus the prompt format (stored with every cached line)."""

    prompt: str = "alpaca"


def cache_path(cache_dir: Path, shard: tuple[int, int] | None, stem: str = "math-samples") -> Path:
    if shard is None:
        return cache_dir / f"{stem}.jsonl"
    return cache_dir / f"{stem}.shard-{shard[0]}-of-{shard[1]}.jsonl"


def load_samples(cache_dir: Path, settings: GenSettings, pattern: str = "math-samples*.jsonl") -> dict[str, Any]:
    """The cached samples of every cache file in ``cache_dir`` matching ``pattern`` (shards included)."""
    out: dict[str, Any] = {}
    if cache_dir.is_dir():
        for p in sorted(cache_dir.glob(pattern)):
            out.update(load_cache_file(p, "qid", "generator", asdict(settings)))
    return out


def chosen_sources(sources: Mapping[str, str] | None) -> tuple[str, ...]:
    """The inputs a build reads: every one (their Hub defaults) when ``sources`` names none, else only
    those it names, so ``--source gsm8k=DIR`` alone builds GSM8K test pairs without MetaMathQA."""
    names = (*TRAIN_SOURCES, *TEST_SOURCES)
    return names if not sources else tuple(n for n in names if n in sources)


def read_math_questions(
    sources: Mapping[str, str] | None, skips: SkipLog, limit: int | None
) -> tuple[list[MathQuestion], dict[str, str]]:
    """The questions of :func:`chosen_sources` and ``{name: where it was read}``."""
    specs = resolve_sources("math", sources)
    questions: list[MathQuestion] = []
    used: dict[str, str] = {}
    for name in chosen_sources(sources):
        spec = specs[name]
        used[name] = spec.describe()
        questions.extend(read_questions(name, spec, skips=skips, limit=limit))
    return questions, used


def generate_samples(
    questions: Sequence[MathQuestion],
    cache: JsonlCache,
    sampler: Sampler,
    settings: GenSettings,
    batch_size: int,
    progress: Progress | None = None,
    also_done: Mapping[str, Any] | None = None,
    failed: dict[str, str] | None = None,
) -> dict[str, int]:
    """Sample every question not in the cache (nor in ``also_done``), batch by batch; return statistics
    (a question whose request failed goes into ``failed``)."""
    done = {**(also_done or {}), **cache.load()}
    stats = {"questions": len(questions), "cached": sum(1 for q in questions if q.qid in done), "generated": 0,
             "batches": 0}
    stats["generated"] = sample_stage(
        questions, lambda q: q.qid, lambda q: alpaca_prompt(q.question), chat=False, tag="math",
        sampler=sampler, settings=settings, cache=cache, done=done, batch_size=batch_size,
        label="sample solutions", progress=progress, stats=stats, failed=failed,
    )
    return stats


def grade_and_pair(
    q: MathQuestion, samples: Sequence[str], seed: int, counts: dict[str, int], marked_only: bool = False
) -> PairRecord | None:
    """Grade ``samples`` against ``q.gold_answer`` (updating ``counts``); one pair or ``None``.
    ``marked_only``: a solution without an answer marker has no answer (not its last number)."""
    correct: list[tuple[str, str | None]] = []
    wrong: list[tuple[str, str | None]] = []
    for text in samples:
        if not text.strip():
            counts["empty"] += 1
            continue
        pred = extract_answer(text, marked_only)
        if pred is None:
            counts["no_answer"] += 1
            wrong.append((text, None))
        elif answers_match(pred, q.gold_answer):
            counts["correct"] += 1
            correct.append((text, pred))
        else:
            counts["incorrect"] += 1
            wrong.append((text, pred))
    if not correct or not wrong:
        return None
    return pick_pair(f"math:{seed}:{q.qid}", correct, wrong, lambda chosen, rejected: {
        "id": f"math-{q.qid}",
        "prompt": [{"role": "user", "content": q.question}],
        "chosen": chosen[0],
        "rejected": rejected[0],
        "aspect": MATH_ASPECT,
        "source": q.source,
        "meta": {"gold": q.gold_answer, "chosen_answer": chosen[1], "rejected_answer": rejected[1]},
    })


def downsample(pool: Sequence[PairRecord], n: int, seed: int, tag: str) -> list[PairRecord]:
    """A seeded sample of ``n`` records (all, shuffled, when ``n`` is 0 or at least the pool)."""
    return seeded_sample(pool, n, f"{tag}:{seed}")


MATH_DEFAULTS: dict[str, Any] = {"generator": DEFAULT_GENERATOR, "n_samples": 8, "max_new_tokens": 512,
                                  "batch_size": 16, "n_train": 16252, "n_test": 841}
"""The defaults of :class:`~data_builders.generated.GenOptions` for Math (the paper's sizes)."""


def build_math(
    out: Path | None,
    sources: Mapping[str, str] | None = None,
    *,
    shard: str | tuple[int, int] | None = None,
    progress: Progress | None = None,
    sampler: Sampler | None = None,
    marked_only: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Build the Math preference set (module docstring) and return its manifest.

    ``marked_only`` (``--marked-only``): grade only answers a solution marks (``The answer is:``,
    ``####``, ``\\boxed{}``); an unmarked one counts as no answer instead of its last number.

    Keyword ``options``: the fields of :class:`~data_builders.generated.GenOptions`, unset ones from
    :data:`MATH_DEFAULTS`. With ``shard`` only the sampling stage runs (for that shard) and a summary
    is returned (``stage: "sample"``); a later run without ``shard`` samples whatever is still
    missing and assembles. ``dry_run`` reads the questions and reports what would be generated; it
    writes nothing. ``sampler`` replaces the generator (tests).
    """
    return run_build(MathBuild(sources, shard, marked_only), out, options, progress, sampler)


class MathBuild:
    """Math's stages in the generated-build skeleton (:func:`~data_builders.generated.run_build`):
    sample solutions (of one shard, optionally), grade them against the gold answer, pair a correct
    with an incorrect one, MetaMathQA → train and GSM8K / MATH-500 → test."""

    name = "math"
    what = "questions"
    defaults: Mapping[str, Any] = MATH_DEFAULTS
    pair_needs = "a correct and an incorrect solution"
    test_fraction = None
    # set by read(), for the later stages
    shard: tuple[int, int] | None
    settings: MathSettings
    used: dict[str, str]
    """``{source name: where it was read}``."""
    mine: list[MathQuestion]
    """This shard's questions (all without a shard)."""

    def __init__(
        self, sources: Mapping[str, str] | None, shard: str | tuple[int, int] | None, marked_only: bool
    ):
        self.sources, self.shard_arg, self.marked_only = sources, shard, marked_only

    def read(self, o: GenOptions, skips: SkipLog) -> list[MathQuestion]:
        shard = self.shard_arg
        self.shard = parse_shard(shard) if isinstance(shard, str) or shard is None else shard
        self.settings = o.settings(MathSettings)
        questions, self.used = read_math_questions(self.sources, skips, o.limit)
        sh = self.shard
        self.mine = [q for i, q in enumerate(questions) if sh is None or i % sh[1] == sh[0]]
        return questions

    def base_manifest(self, o: GenOptions) -> dict[str, Any]:
        base = base_manifest(
            "math", seed=o.seed, aspect=MATH_ASPECT, limit=o.limit, sources=self.used, settings=self.settings,
            grader="math-verify" if HAS_MATH_VERIFY else "builtin",
            answers="marked only" if self.marked_only else "marked, else the last number",
            requested={"train": o.n_train, "test": o.n_test},
            generator_endpoint=o.describe_generator(),
        )
        base["splits_without_source"] = {
            split: list(names) for split, names in (("train", TRAIN_SOURCES), ("test", TEST_SOURCES))
            if not any(n in self.used for n in names)}
        return base

    def dry_run(self, items: list[MathQuestion], cache_dir: Path | None) -> DryRun:
        cached = load_samples(cache_dir, self.settings) if cache_dir is not None else {}
        per_src: dict[str, int] = {}
        for q in items:
            per_src[q.source.split("/")[0]] = per_src.get(q.source.split("/")[0], 0) + 1
        counts = {"shard": list(self.shard) if self.shard else None, "question_counts": per_src,
                  "counts": {"questions": len(self.mine)},
                  "to_generate": sum(1 for q in self.mine if q.qid not in cached)}
        return counts, [
            {"qid": q.qid, "source": q.source, "gold": q.gold_answer, "prompt": alpaca_prompt(q.question)}
            for q in self.mine[:3]
        ]

    def generate(self, run: BuildRun) -> dict[str, Any] | None:
        """The sampling stage (this shard's questions); a shard's run ends here with its summary."""
        cache = JsonlCache(cache_path(run.cache_dir, self.shard), "qid", "generator", asdict(self.settings))
        others: dict[str, Any] = {}
        if self.shard is None:  # questions sampled by shard runs count as done
            others = load_samples(run.cache_dir, self.settings, "math-samples.shard-*.jsonl")
        run.stats = generate_samples(self.mine, cache, run.sampler, self.settings, run.options.batch_size,
                                     run.progress, others, run.failed)
        require_some(self.mine, run.failed, "math: sampling")
        if self.shard is None:
            return None
        return {
            **run.base,
            "stage": "sample",
            "shard": list(self.shard),
            "generation": run.stats,
            "cache": str(cache.path),
            "failed": failure_summary(run.failed, "questions"),
            "counts": {"questions": len(self.mine)},
            "skipped": run.skips.as_dict(),
        }

    def assemble(self, run: BuildRun) -> Assembled:
        """Grade every question's solutions (every shard's), pair a correct with an incorrect one,
        down-sample the splits."""
        o, questions, failed = run.options, run.items, run.failed
        samples = load_samples(run.cache_dir, self.settings)
        missing = [q.qid for q in questions if q.qid not in samples and q.qid not in failed]
        if missing:  # cannot happen after the sampling stage, unless the cache was edited meanwhile
            raise BtpoError(
                f"math: {len(missing)} question(s) have no cached samples (e.g. {missing[0]}); re-run"
            )
        grading = {"correct": 0, "incorrect": 0, "no_answer": 0, "empty": 0}
        per_source: dict[str, dict[str, int]] = {}
        pools: dict[str, list[PairRecord]] = {"train": [], "test": []}
        for i, q in enumerate(questions):
            name = q.source.split("/")[0]
            c = per_source.setdefault(
                name, {"questions": 0, "pairs": 0, "all_correct": 0, "all_incorrect": 0, "failed": 0, "selected": 0}
            )
            c["questions"] += 1
            if q.qid in failed:  # its request failed: counted, asked again on a re-run
                c["failed"] += 1
                continue
            before = grading["correct"]
            rec = grade_and_pair(q, samples[q.qid]["samples"], o.seed, grading, self.marked_only)
            if rec is None:
                c["all_correct" if grading["correct"] > before else "all_incorrect"] += 1
            else:
                c["pairs"] += 1
                pools["train" if name in TRAIN_SOURCES else "test"].append(rec)
            if run.progress is not None and (i + 1) % 200 == 0:
                run.progress("grade", i + 1, len(questions))
        splits = {
            "train": downsample(pools["train"], o.n_train, o.seed, "math:train"),
            "test": downsample(pools["test"], o.n_test, o.seed, "math:test"),
        }
        for split in splits.values():
            for r in split:
                per_source[r.source.split("/")[0]]["selected"] += 1
        graded = sum(grading.values())
        no_pair = sum(c["all_correct"] + c["all_incorrect"] for c in per_source.values())
        scoring = {"grading": {
            "samples": graded,
            **grading,
            "rates": {k: round(v / graded, 4) if graded else 0.0 for k, v in grading.items()},
        }}
        return splits, {"questions": per_source, "no_pair": no_pair}, scoring
