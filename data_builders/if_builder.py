"""The IF builder: AdvancedIF prompts → sampled responses → rubric judgments → preference pairs.

**Not the paper's data.** The paper's IF set (14,407 / 784 pairs) was built from an internal
"ComplexIF" prompt set with the authors' own generators and judges; it is not public. This
builder is a public stand-in following the same recipe on ``facebook/AdvancedIF``
(METHOD.md §8), whose prompts (multi-turn carried context, system steerability, complex
instructions) and rubrics differ from ComplexIF, so the resulting pairs, their number and their
difficulty differ too. **AdvancedIF is licensed CC-BY-NC-4.0: the data and anything built from
it are for non-commercial use only.**

Stages (each cached under ``<out>/.cache/``, append-only JSONL with ``fsync`` per batch, reused
when the settings match, as in :mod:`data_builders.math_builder`):

1. **prompts**: :func:`~data_builders.advancedif.read_advancedif` (conversation + rubrics).
2. **sample** (``if-responses.jsonl``): ``n_samples`` responses per prompt from the generator,
   prompted with its chat template (``apply_chat_template(messages, add_generation_prompt=True)``).
3. **judge** (``if-judgments.jsonl``): every (response, rubric) is judged by

   * a local judge model through the rollout engine (`--engine`), greedy, asked "Does the
     response satisfy this rubric? Answer Yes or No." (chat template), or
   * an OpenAI-compatible endpoint (``judge_url``: ``POST {url}/chat/completions``, temperature 0;
     an API key is taken from ``BTPO_JUDGE_API_KEY`` or ``OPENAI_API_KEY`` when set).

   The reply is parsed for a leading Yes / No; anything else counts as *not satisfied* and is
   counted under ``judging.unparsable``.
4. **assemble**: per prompt the response satisfying the most rubrics is chosen and one of the
   responses satisfying the fewest is rejected (each seeded among equals); a prompt whose
   responses all satisfy the same number is skipped and counted (``ties``). Aspect
   ``"following all instructions"``. Pairs are shuffled with the seed; the first
   ``ceil(test_fraction * pairs)`` (at most ``n_test``) form the test split, the rest (at most
   ``n_train``) the train split.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from btpo_cli.data.pairs import PairRecord, RecordSkip, SkipLog, normalize_record, write_dataset
from btpo_cli.errors import BtpoError
from data_builders.advancedif import IFPrompt, read_advancedif
from data_builders.math_builder import (
    HFSampler,
    JsonlCache,
    Progress,
    Sampler,
    batch_seed,
    run_cached_stage,
)
from data_builders.sources import resolve_sources

DEFAULT_GENERATOR = "qwen2.5-7b"
DEFAULT_JUDGE = "qwen2.5-7b"
IF_ASPECT = "following all instructions"
LICENSE_NOTE = "facebook/AdvancedIF is CC-BY-NC-4.0: non-commercial use only"
JUDGE_QUESTION = "Does the response satisfy this rubric? Answer Yes or No."
_YES_NO_RE = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def judge_messages(
    conversation: Sequence[Mapping[str, str]], response: str, rubric: str
) -> list[dict[str, str]]:
    """The judge's prompt for one (response, rubric)."""
    convo = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in conversation)
    return [
        {
            "role": "user",
            "content": (
                f"Conversation:\n{convo}\n\nResponse to the last user turn:\n{response}\n\nRubric: {rubric}\n\n"
                f"{JUDGE_QUESTION}"
            ),
        }
    ]


def parse_verdict(text: str) -> bool | None:
    """``True`` for a reply starting with Yes, ``False`` for No, ``None`` otherwise."""
    m = _YES_NO_RE.match(text or "")
    return None if m is None else m.group(1).lower() == "yes"


class URLJudge:
    """An OpenAI-compatible chat-completions endpoint as a judge (greedy, a few tokens)."""

    def __init__(self, url: str, model: str, timeout: float = 120.0):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.timeout = model, timeout
        self.calls = 0

    def ask(self, messages: list[dict[str, str]]) -> str:
        self.calls += 1
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 8}
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get("BTPO_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read().decode("utf-8"))
            return str(data["choices"][0]["message"]["content"] or "")
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise BtpoError(f"judge endpoint {self.url} failed: {type(e).__name__}: {str(e)[:200]}") from e

    def judge(self, prompts: list[list[dict[str, str]]]) -> list[str]:
        return [self.ask(p) for p in prompts]


class LocalJudge:
    """A local judge model (greedy, 4 new tokens, chat template)."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def judge(self, prompts: list[list[dict[str, str]]]) -> list[str]:
        groups = self.sampler.sample(
            prompts, 1, temperature=0.0, top_p=1.0, max_new_tokens=4, seed=None, chat=True
        )
        return [g[0][0] for g in groups]


@dataclass(frozen=True)
class IFSettings:
    generator: str
    n_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


def _sample_stage(
    prompts: Sequence[IFPrompt],
    cache: JsonlCache,
    sampler: Sampler,
    s: IFSettings,
    batch_size: int,
    progress: Progress | None,
    stats: dict[str, int],
) -> dict[str, dict[str, Any]]:
    done = cache.load()
    stats["cached_prompts"] = sum(1 for p in prompts if p.id in done)

    def rows(todo: list[IFPrompt], batch: int) -> list[dict[str, Any]]:
        groups = sampler.sample([p.messages for p in todo], s.n_samples, temperature=s.temperature, top_p=s.top_p,
                                max_new_tokens=s.max_new_tokens, seed=batch_seed(s.seed, "if", batch), chat=True)
        return [{"id": p.id, "samples": [t for t, _ in g], "finished": [f for _, f in g]}
                for p, g in zip(todo, groups, strict=True)]

    run_cached_stage(prompts, lambda p: p.id, cache, done, batch_size, rows, "sample responses", progress, stats)
    return done


def _judge_stage(
    prompts: Sequence[IFPrompt],
    responses: Mapping[str, dict[str, Any]],
    cache: JsonlCache,
    judge: Any,
    batch_size: int,
    progress: Progress | None,
    stats: dict[str, int],
) -> dict[str, dict[str, Any]]:
    done = cache.load()

    def rows(todo: list[IFPrompt], batch: int) -> list[dict[str, Any]]:
        asks = [judge_messages(p.messages, r, rub) for p in todo for r in responses[p.id]["samples"]
                for rub in p.rubrics]
        replies = iter(judge.judge(asks))
        return [{"id": p.id, "verdicts": [[parse_verdict(next(replies)) for _ in p.rubrics]
                                          for _ in responses[p.id]["samples"]]} for p in todo]

    run_cached_stage(prompts, lambda p: p.id, cache, done, batch_size, rows, "judge rubrics", progress, stats)
    return done


def pair_prompt(
    p: IFPrompt, samples: Sequence[str], verdicts: Sequence[Sequence[bool | None]], seed: int
) -> PairRecord | None:
    """The most-satisfying response vs one of the least-satisfying ones; ``None`` on a tie."""
    scored = [(sum(1 for v in vs if v), t) for t, vs in zip(samples, verdicts, strict=True) if t.strip()]
    if not scored:
        return None
    hi, lo = max(s for s, _ in scored), min(s for s, _ in scored)
    if hi == lo:
        return None
    rng = random.Random(f"if:{seed}:{p.id}")
    chosen = rng.choice([t for s, t in scored if s == hi])
    rejected = rng.choice([t for s, t in scored if s == lo])
    try:
        return normalize_record(
            {
                "id": f"if-{p.id}",
                "prompt": p.messages,
                "chosen": chosen,
                "rejected": rejected,
                "aspect": IF_ASPECT,
                "source": f"advancedif/{p.benchmark}",
                "meta": {"rubrics": len(p.rubrics), "chosen_satisfied": hi, "rejected_satisfied": lo},
            },
            0,
        )
    except RecordSkip:
        return None


def build_if(
    out: Path | None,
    sources: Mapping[str, str] | None = None,
    *,
    generator: str = DEFAULT_GENERATOR,
    judge: str = DEFAULT_JUDGE,
    judge_url: str | None = None,
    n_samples: int = 4,
    temperature: float = 0.8,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    n_train: int = 14407,
    n_test: int = 784,
    test_fraction: float = 0.05,
    seed: int = 0,
    limit: int | None = None,
    strict: bool = False,
    dry_run: bool = False,
    device: str | None = None,
    engine: str = "auto",
    progress: Progress | None = None,
    sampler: Sampler | None = None,
    judge_impl: Any = None,
) -> dict[str, Any]:
    """Build the IF preference set (module docstring) and return its manifest."""
    if n_samples < 2:
        raise BtpoError("--n-samples must be at least 2 (a pair needs two responses)")
    if n_train < 0 or n_test < 0:
        raise BtpoError("--n-train and --n-test must be >= 0 (0 keeps every pair)")
    if not 0.0 <= test_fraction < 1.0:
        raise BtpoError("--test-fraction must be in [0, 1)")
    if batch_size < 1 or max_new_tokens < 1:
        raise BtpoError("--batch-size and --max-new-tokens must be >= 1")
    spec = resolve_sources("if", sources)["advancedif"]
    skips = SkipLog(strict=strict)
    prompts = read_advancedif(spec, skips=skips, limit=limit)
    if not prompts:
        reasons = "; ".join(f"{k} ({v})" for k, v in skips.counts.most_common(3)) or "no rows read"
        raise BtpoError(f"if: no usable prompts ({reasons})")
    s = IFSettings(generator, n_samples, float(temperature), float(top_p), max_new_tokens, seed)
    judge_desc = {"url": judge_url, "model": judge} if judge_url else {"model": judge}
    base: dict[str, Any] = {
        "builder": "if",
        "name": "if",
        "seed": seed,
        "aspect": IF_ASPECT,
        "license": LICENSE_NOTE,
        "limit": limit,
        "sources": {"advancedif": spec.describe()},
        "generator": asdict(s),
        "judge": {**judge_desc, "question": JUDGE_QUESTION},
        "requested": {"train": n_train, "test": n_test, "test_fraction": test_fraction},
    }
    if dry_run:
        return {
            **base,
            "dry_run": True,
            "counts": {"prompts": len(prompts), "rubrics": sum(len(p.rubrics) for p in prompts)},
            "skipped": skips.as_dict(),
            "examples": [
                {"id": p.id, "benchmark": p.benchmark, "messages": p.messages, "rubrics": p.rubrics}
                for p in prompts[:3]
            ],
        }
    if out is None:
        raise BtpoError("build_if: an output folder is required unless dry_run is set")
    cache_dir = out / ".cache"
    stats = {"batches": 0}
    sampler = sampler or HFSampler(generator, device, batch_size, engine)
    responses = _sample_stage(
        prompts,
        JsonlCache(cache_dir / "if-responses.jsonl", "id", "generator", asdict(s)),
        sampler,
        s,
        batch_size,
        progress,
        stats,
    )
    if judge_impl is None:
        judge_impl = (
            URLJudge(judge_url, judge)
            if judge_url
            else LocalJudge(
                sampler
                if judge == generator and isinstance(sampler, HFSampler)
                else HFSampler(judge, device, batch_size, engine)
            )
        )
    # the judgments depend on the responses: key them by the generator settings too
    jcache = JsonlCache(
        cache_dir / "if-judgments.jsonl", "id", "settings", {"generator": asdict(s), **judge_desc}
    )
    verdicts = _judge_stage(prompts, responses, jcache, judge_impl, batch_size, progress, stats)
    judging = {"judgments": 0, "satisfied": 0, "not_satisfied": 0, "unparsable": 0}
    pools: list[PairRecord] = []
    ties = 0
    for p in prompts:
        for vs in verdicts[p.id]["verdicts"]:
            for v in vs:
                judging["judgments"] += 1
                judging["satisfied" if v else "not_satisfied" if v is False else "unparsable"] += 1
        rec = pair_prompt(p, responses[p.id]["samples"], verdicts[p.id]["verdicts"], seed)
        if rec is None:
            ties += 1
        else:
            pools.append(rec)
    rng = random.Random(f"if:split:{seed}")
    rng.shuffle(pools)
    n_te = (
        min(n_test, math.ceil(test_fraction * len(pools)))
        if n_test
        else math.ceil(test_fraction * len(pools))
    )
    test, train = pools[:n_te], pools[n_te:]
    if n_train:
        train = train[:n_train]
    manifest = {
        **base,
        "prompts": len(prompts),
        "pairs": len(pools),
        "ties": ties,
        "judging": judging,
        "skipped": skips.as_dict(),
    }
    result = write_dataset(out, {"train": train, "test": test}, manifest)
    result["generation_run"] = stats
    return result
