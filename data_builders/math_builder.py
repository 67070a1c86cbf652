"""The Math builder: sample solutions with a generator, grade them, pair a correct with an incorrect one.

Stages (METHOD.md §8), each resumable:

1. **questions**: MetaMathQA (train), GSM8K ``main`` test and MATH-500 (test), read by
   :mod:`data_builders.math_questions`. Questions are numbered in that order; ``shard=(i, n)``
   keeps only those whose number is ``i`` modulo ``n``.
2. **sample**: ``n_samples`` solutions per question from the generator (default
   ``meta-math/MetaMath-Llemma-7B``) through the rollout engine (`--engine`). The prompt is
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

The sampling machinery (:class:`HFSampler`, :class:`JsonlCache`) is shared with
:mod:`data_builders.if_builder`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from btpo_cli.config import ModelConfig
from btpo_cli.data.pairs import (
    PairRecord,
    RecordSkip,
    SkipLog,
    normalize_record,
    seeded_sample,
    write_dataset,
)
from btpo_cli.errors import BtpoError
from btpo_cli.models.aliases import resolve_model
from data_builders.grading import HAS_MATH_VERIFY, answers_match, extract_answer
from data_builders.math_questions import MathQuestion, alpaca_prompt, read_questions
from data_builders.sources import resolve_sources

DEFAULT_GENERATOR = "meta-math/MetaMath-Llemma-7B"
MATH_ASPECT = "correct"
TRAIN_SOURCES = ("metamathqa",)
TEST_SOURCES = ("gsm8k", "math500")
FAULT_ENV = "BTPO_FAULT_AFTER_BATCHES"
FAULT_EXIT_CODE = 75

Progress = Callable[..., None]
"""``progress(label, done, total)``: called after each batch (``total`` may be ``None``)."""


# ----------------------------------------------------------------------------- shared machinery


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


def batch_seed(seed: int, *parts: Any) -> int:
    """A stable 63-bit seed derived from ``seed`` and ``parts``."""
    h = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


class JsonlCache:
    """An append-only JSONL cache keyed by ``key``; lines whose ``settings_key`` differ are ignored."""

    def __init__(self, path: Path, key: str, settings_key: str, settings: Mapping[str, Any]):
        self.path, self.key, self.settings_key, self.settings = path, key, settings_key, dict(settings)

    def load(self) -> dict[str, dict[str, Any]]:
        """The usable lines, ``{key: line}`` (the last line of a key wins)."""
        return load_cache_file(self.path, self.key, self.settings_key, self.settings)

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append rows and ``fsync``: they survive a crash right after this returns."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = (
            self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        )
        with open(self.path, "a", encoding="utf-8") as f:
            if needs_newline:  # a line cut by a crash: start a fresh one
                f.write("\n")
            for row in rows:
                f.write(json.dumps({**row, self.settings_key: self.settings}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def load_cache_file(
    path: Path, key: str, settings_key: str, settings: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if isinstance(row, dict) and row.get(settings_key) == dict(settings) and key in row:
                out[str(row[key])] = row
    return out


def run_cached_stage(items: Sequence[Any], key: Callable[[Any], str], cache: JsonlCache, done: dict[str, Any],
                     batch_size: int, make_rows: Callable[[list[Any], int], list[dict[str, Any]]], label: str,
                     progress: Progress | None, stats: dict[str, int]) -> int:
    """Run one resumable stage: batch by batch, the items whose ``key`` is not in ``done`` go through
    ``make_rows(todo, batch_index)``; the rows are appended to ``cache`` (fsync) and to ``done``.

    Counts ``stats["batches"]``; returns how many items were computed now. A killed stage resumes
    where its cache ends (the batch index, hence each batch's seed, does not depend on what is cached)."""
    n_done = sum(1 for it in items if key(it) in done)
    made = 0
    if progress is not None:
        progress(label, n_done, len(items))
    for b in range(0, len(items), batch_size):
        todo = [it for it in items[b : b + batch_size] if key(it) not in done]
        if not todo:
            continue
        rows = make_rows(todo, b // batch_size)
        cache.append(rows)
        done.update({str(r[cache.key]): r for r in rows})
        stats["batches"] = stats.get("batches", 0) + 1
        n_done += len(todo)
        made += len(todo)
        if progress is not None:
            progress(label, n_done, len(items))
        maybe_fault(stats["batches"])
    return made


def maybe_fault(batches_done: int) -> None:
    """Exit abruptly after the K-th batch when ``BTPO_FAULT_AFTER_BATCHES=K`` (tests: a killed build)."""
    k = os.environ.get(FAULT_ENV)
    if k and k.isdigit() and batches_done >= int(k):
        os._exit(FAULT_EXIT_CODE)


def default_device() -> str:
    import torch  # heavy: imported on use

    return "cuda" if torch.cuda.is_available() else "cpu"


class Sampler(Protocol):
    """What the builders need from a generator: texts in, ``n`` sampled texts out per prompt."""

    calls: int

    def sample(
        self,
        prompts: list[Any],
        n: int,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None,
        chat: bool,
    ) -> list[list[tuple[str, bool]]]: ...


_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}


def _generation_eos(path: str) -> Any:
    """The model's generation stop id(s), read without loading its weights."""
    from transformers import AutoConfig, GenerationConfig  # heavy: imported on use

    try:
        return GenerationConfig.from_pretrained(path).eos_token_id
    except (OSError, ValueError):
        return getattr(AutoConfig.from_pretrained(path), "eos_token_id", None)


class HFSampler:
    """A local model behind a rollout engine (``--engine``: hf, vllm, auto), by name.

    ``prompts`` are plain strings (``chat=False``: tokenized with ``add_special_tokens=True``) or
    message lists (``chat=True``: ``apply_chat_template(..., add_generation_prompt=True)``).
    Returns ``(text, finished)`` per sample; the text is decoded without special tokens.
    """

    def __init__(self, name: str, device: str | None = None, batch_size: int = 16, engine: str = "auto"):
        self.name, self.device, self.batch_size = name, device or default_device(), batch_size
        self.engine_name = engine
        self.calls = 0
        self._tok: Any = None
        self._engine: Any = None

    def _load(self) -> None:
        if self._engine is not None:
            return
        from btpo_cli.engines import EngineSpec, build_engine, resolve_engine_name  # heavy: imported on use
        from btpo_cli.models.loading import load_causal_lm, load_tokenizer  # heavy: imported on use

        engine = resolve_engine_name(self.engine_name)
        key = (self.name, self.device)
        model = None
        if engine == "hf":
            if key not in _MODELS:  # generator and judge may be the same model: load it once
                tok = load_tokenizer(self.name, padding_side="left")
                m = load_causal_lm(ModelConfig(name=self.name), self.device.split(":")[0], inference=True)
                _MODELS[key] = (tok, m.to(self.device).eval())
            self._tok, model = _MODELS[key]
        else:
            self._tok = load_tokenizer(self.name, padding_side="left")
        path = resolve_model(self.name)
        self._engine = build_engine(engine, EngineSpec(model_path=path, pad_token_id=self._tok.pad_token_id,
                                                       device=self.device, module=model,
                                                       prompts_per_batch=self.batch_size))
        stops = {self._tok.eos_token_id} if self._tok.eos_token_id is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) if model is not None \
            else _generation_eos(path)
        stops |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.stop_ids = sorted(stops)

    def encode(self, prompt: Any, chat: bool) -> list[int]:
        if not chat:
            return list(self._tok(prompt, add_special_tokens=True)["input_ids"])
        if not getattr(self._tok, "chat_template", None):
            raise BtpoError(f"model '{self.name}' has no chat template; pick an instruction-tuned model")
        text = self._tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def sample(
        self,
        prompts: list[Any],
        n: int,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None,
        chat: bool,
    ) -> list[list[tuple[str, bool]]]:
        from btpo_cli.engines import SamplingParams  # heavy: imported on use

        self._load()
        self.calls += 1
        ids = [self.encode(p, chat) for p in prompts]
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop_token_ids=self.stop_ids,
            seed=seed,
        )
        groups = self._engine.generate(ids, n, params)
        return [
            [(self._tok.decode(s.token_ids, skip_special_tokens=True).strip(), bool(s.finished)) for s in g]
            for g in groups
        ]


# ----------------------------------------------------------------------------- math


@dataclass(frozen=True)
class GenSettings:
    """The generator and its sampling settings (stored with every cached line)."""

    generator: str
    n_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    prompt: str = "alpaca"


def cache_path(cache_dir: Path, shard: tuple[int, int] | None, stem: str = "math-samples") -> Path:
    if shard is None:
        return cache_dir / f"{stem}.jsonl"
    return cache_dir / f"{stem}.shard-{shard[0]}-of-{shard[1]}.jsonl"


def read_math_questions(
    sources: Mapping[str, str] | None, skips: SkipLog, limit: int | None
) -> tuple[list[MathQuestion], dict[str, str]]:
    specs = resolve_sources("math", sources)
    questions: list[MathQuestion] = []
    used: dict[str, str] = {}
    for name in (*TRAIN_SOURCES, *TEST_SOURCES):
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
) -> dict[str, int]:
    """Sample every question not in the cache (nor in ``also_done``), batch by batch; return statistics."""
    done = {**(also_done or {}), **cache.load()}
    stats = {"questions": len(questions), "cached": sum(1 for q in questions if q.qid in done), "generated": 0,
             "batches": 0}

    def rows(todo: list[MathQuestion], batch: int) -> list[dict[str, Any]]:
        groups = sampler.sample([alpaca_prompt(q.question) for q in todo], settings.n_samples,
                                temperature=settings.temperature, top_p=settings.top_p,
                                max_new_tokens=settings.max_new_tokens,
                                seed=batch_seed(settings.seed, "math", batch), chat=False)
        return [{"qid": q.qid, "samples": [t for t, _ in g], "finished": [f for _, f in g]}
                for q, g in zip(todo, groups, strict=True)]

    stats["generated"] = run_cached_stage(questions, lambda q: q.qid, cache, done, batch_size, rows,
                                          "sample solutions", progress, stats)
    return stats


def grade_and_pair(
    q: MathQuestion, samples: Sequence[str], seed: int, counts: dict[str, int]
) -> PairRecord | None:
    """Grade ``samples`` against ``q.gold_answer`` (updating ``counts``); one pair or ``None``."""
    correct: list[tuple[str, str]] = []
    wrong: list[tuple[str, str | None]] = []
    for text in samples:
        if not text.strip():
            counts["empty"] += 1
            continue
        pred = extract_answer(text)
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
    rng = random.Random(f"math:{seed}:{q.qid}")
    chosen, rejected = rng.choice(correct), rng.choice(wrong)
    try:
        return normalize_record(
            {
                "id": f"math-{q.qid}",
                "prompt": [{"role": "user", "content": q.question}],
                "chosen": chosen[0],
                "rejected": rejected[0],
                "aspect": MATH_ASPECT,
                "source": q.source,
                "meta": {"gold": q.gold_answer, "chosen_answer": chosen[1], "rejected_answer": rejected[1]},
            },
            0,
        )
    except RecordSkip:
        return None


def downsample(pool: Sequence[PairRecord], n: int, seed: int, tag: str) -> list[PairRecord]:
    """A seeded sample of ``n`` records (all, shuffled, when ``n`` is 0 or at least the pool)."""
    return seeded_sample(pool, n, f"{tag}:{seed}")


def build_math(
    out: Path | None,
    sources: Mapping[str, str] | None = None,
    *,
    generator: str = DEFAULT_GENERATOR,
    n_samples: int = 8,
    temperature: float = 0.8,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    n_train: int = 16252,
    n_test: int = 841,
    shard: str | tuple[int, int] | None = None,
    seed: int = 0,
    limit: int | None = None,
    strict: bool = False,
    dry_run: bool = False,
    device: str | None = None,
    engine: str = "auto",
    progress: Progress | None = None,
    sampler: Sampler | None = None,
) -> dict[str, Any]:
    """Build the Math preference set (module docstring) and return its manifest.

    With ``shard`` only the sampling stage runs (for that shard) and a summary is returned
    (``stage: "sample"``); a later run without ``shard`` samples whatever is still missing and
    assembles. ``dry_run`` reads the questions and reports what would be generated; it writes
    nothing. ``sampler`` replaces the generator (tests).
    """
    if n_samples < 2:
        raise BtpoError("--n-samples must be at least 2 (a pair needs a correct and an incorrect solution)")
    if n_train < 0 or n_test < 0:
        raise BtpoError("--n-train and --n-test must be >= 0 (0 keeps every pair)")
    if batch_size < 1 or max_new_tokens < 1:
        raise BtpoError("--batch-size and --max-new-tokens must be >= 1")
    shard_t = parse_shard(shard) if isinstance(shard, str) or shard is None else shard
    settings = GenSettings(generator, n_samples, float(temperature), float(top_p), max_new_tokens, seed)
    skips = SkipLog(strict=strict)
    questions, used = read_math_questions(sources, skips, limit)
    if not questions:
        reasons = "; ".join(f"{k} ({v})" for k, v in skips.counts.most_common(3)) or "no rows read"
        raise BtpoError(f"math: no usable questions ({reasons})")
    mine = [q for i, q in enumerate(questions) if shard_t is None or i % shard_t[1] == shard_t[0]]
    base: dict[str, Any] = {
        "builder": "math",
        "name": "math",
        "seed": seed,
        "aspect": MATH_ASPECT,
        "limit": limit,
        "sources": used,
        "generator": asdict(settings),
        "grader": "math-verify" if HAS_MATH_VERIFY else "builtin",
        "requested": {"train": n_train, "test": n_test},
    }
    cache_dir = out / ".cache" if out is not None else None
    if dry_run:
        cached: dict[str, Any] = {}
        if cache_dir is not None and cache_dir.is_dir():
            for p in sorted(cache_dir.glob("math-samples*.jsonl")):
                cached.update(load_cache_file(p, "qid", "generator", asdict(settings)))
        per_src: dict[str, int] = {}
        for q in questions:
            per_src[q.source.split("/")[0]] = per_src.get(q.source.split("/")[0], 0) + 1
        return {
            **base,
            "dry_run": True,
            "shard": list(shard_t) if shard_t else None,
            "question_counts": per_src,
            "counts": {"questions": len(mine)},
            "to_generate": sum(1 for q in mine if q.qid not in cached),
            "skipped": skips.as_dict(),
            "examples": [
                {"qid": q.qid, "source": q.source, "gold": q.gold_answer, "prompt": alpaca_prompt(q.question)}
                for q in mine[:3]
            ],
        }
    if out is None or cache_dir is None:
        raise BtpoError("build_math: an output folder is required unless dry_run is set")
    sampler = sampler or HFSampler(generator, device, batch_size, engine)
    cache = JsonlCache(cache_path(cache_dir, shard_t), "qid", "generator", asdict(settings))
    others: dict[str, Any] = {}
    if shard_t is None:  # questions sampled by shard runs count as done
        for p in sorted(cache_dir.glob("math-samples.shard-*.jsonl")):
            others.update(load_cache_file(p, "qid", "generator", asdict(settings)))
    gen_stats = generate_samples(mine, cache, sampler, settings, batch_size, progress, others)
    if shard_t is not None:
        return {
            **base,
            "stage": "sample",
            "shard": list(shard_t),
            "generation": gen_stats,
            "cache": str(cache.path),
            "counts": {"questions": len(mine)},
            "skipped": skips.as_dict(),
        }
    samples: dict[str, dict[str, Any]] = {}
    for p in sorted(cache_dir.glob("math-samples*.jsonl")):
        samples.update(load_cache_file(p, "qid", "generator", asdict(settings)))
    missing = [q.qid for q in questions if q.qid not in samples]
    if missing:  # cannot happen after the sampling stage above, unless the cache was edited meanwhile
        raise BtpoError(
            f"math: {len(missing)} question(s) have no cached samples (e.g. {missing[0]}); re-run"
        )
    grading = {"correct": 0, "incorrect": 0, "no_answer": 0, "empty": 0}
    per_source: dict[str, dict[str, int]] = {}
    pools: dict[str, list[PairRecord]] = {"train": [], "test": []}
    for i, q in enumerate(questions):
        name = q.source.split("/")[0]
        c = per_source.setdefault(
            name, {"questions": 0, "pairs": 0, "all_correct": 0, "all_incorrect": 0, "selected": 0}
        )
        c["questions"] += 1
        before = grading["correct"]
        rec = grade_and_pair(q, samples[q.qid]["samples"], seed, grading)
        if rec is None:
            c["all_correct" if grading["correct"] > before else "all_incorrect"] += 1
        else:
            c["pairs"] += 1
            pools["train" if name in TRAIN_SOURCES else "test"].append(rec)
        if progress is not None and (i + 1) % 200 == 0:
            progress("grade", i + 1, len(questions))
    splits = {
        "train": downsample(pools["train"], n_train, seed, "math:train"),
        "test": downsample(pools["test"], n_test, seed, "math:test"),
    }
    for split in splits.values():
        for r in split:
            per_source[r.source.split("/")[0]]["selected"] += 1
    graded = sum(grading.values())
    no_pair = sum(c["all_correct"] + c["all_incorrect"] for c in per_source.values())
    manifest = {
        **base,
        "questions": per_source,
        "no_pair": no_pair,
        "grading": {
            "samples": graded,
            **grading,
            "rates": {k: round(v / graded, 4) if graded else 0.0 for k, v in grading.items()},
        },
        "skipped": skips.as_dict(),
    }
    result = write_dataset(out, splits, manifest)
    result["generation_run"] = gen_stats  # not written: differs between a fresh and a resumed build
    return result
