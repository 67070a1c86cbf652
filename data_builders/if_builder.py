"""The IF builder: AdvancedIF prompts → sampled responses → rubric judgments → preference pairs.

**Not the paper's data.** The paper's IF set (14,407 / 784 pairs) was built from an internal
"ComplexIF" prompt set with the authors' own generators and judges; it is not public. This
builder is a public stand-in following the same recipe on ``facebook/AdvancedIF``
(METHOD.md §8), whose prompts (multi-turn carried context, system steerability, complex
instructions) and rubrics differ from ComplexIF, so the resulting pairs, their number and their
difficulty differ too. **AdvancedIF is licensed CC-BY-NC-4.0: the data and anything built from
it are for non-commercial use only.**

Stages (each cached under ``<out>/.cache/``, append-only JSONL with ``fsync`` per batch, reused
when the settings match; the skeleton is :mod:`data_builders.generated`, shared with
:mod:`data_builders.math_builder`, and this module supplies its stages, :class:`IFBuild`: the
prompts, the rubric judging and the pairing rule):

1. **prompts**: :func:`~data_builders.advancedif.read_advancedif` (conversation + rubrics).
2. **sample** (``if-responses.jsonl``): ``n_samples`` responses per prompt from the generator,
   prompted with its chat template (``apply_chat_template(messages, add_generation_prompt=True)``).
3. **judge** (``if-judgments.jsonl``): every (response, rubric) is judged by

   * a local judge model through the rollout engine (`--engine`), greedy, asked "Does the
     response satisfy this rubric? Answer Yes or No." (chat template), or
   * an OpenAI-compatible endpoint (``judge_url``: ``POST {url}/chat/completions``, temperature 0;
     an API key is taken from ``BTPO_JUDGE_API_KEY`` or ``OPENAI_API_KEY`` when set;
     :class:`~data_builders.generated.URLJudge`, importable from here too).

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

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from btpo_cli.data.pairs import PairRecord, SkipLog
from data_builders.advancedif import IFPrompt, read_advancedif
from data_builders.generated import (
    Assembled,
    BuildRun,
    DryRun,
    Failed,
    GenOptions,
    JsonlCache,
    Judge,
    LocalJudge,
    Progress,
    Sampler,
    URLJudge,
    base_manifest,
    make_judge,
    pick_pair,
    require_some,
    run_build,
    run_cached_stage,
    sample_stage,
    split_by_fraction,
)
from data_builders.sources import SourceSpec, resolve_sources

__all__ = ["LocalJudge", "URLJudge", "build_if", "judge_messages", "pair_prompt", "parse_verdict"]

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


def _judge_stage(
    prompts: Sequence[IFPrompt],
    responses: Mapping[str, dict[str, Any]],
    cache: JsonlCache,
    judge: Judge,
    batch_size: int,
    progress: Progress | None,
    stats: dict[str, int],
    failed: dict[str, str],
) -> dict[str, dict[str, Any]]:
    """Every (response, rubric) of every prompt through ``judge``; one cached line of verdicts per prompt
    (a prompt with a failed request goes into ``failed`` instead; its answered requests stay cached by
    the judge's client)."""
    done = cache.load()

    def rows(todo: list[IFPrompt], batch: int) -> list[dict[str, Any]]:
        asks = [judge_messages(p.messages, r, rub) for p in todo for r in responses[p.id]["samples"]
                for rub in p.rubrics]
        replies = iter(judge.judge(asks))
        out = []
        for p in todo:
            got = [[next(replies) for _ in p.rubrics] for _ in responses[p.id]["samples"]]
            err = next((r.reason for rs in got for r in rs if isinstance(r, Failed)), None)
            out.append({"id": p.id, "error": err} if err is not None else
                       {"id": p.id, "verdicts": [[parse_verdict(r) for r in rs] for rs in got]})
        return out

    todo = [p for p in prompts if p.id in responses]
    run_cached_stage(todo, lambda p: p.id, cache, done, batch_size, rows, "judge rubrics", progress, stats, failed)
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
    return pick_pair(
        f"if:{seed}:{p.id}",
        [t for s, t in scored if s == hi],
        [t for s, t in scored if s == lo],
        lambda chosen, rejected: {
            "id": f"if-{p.id}",
            "prompt": p.messages,
            "chosen": chosen,
            "rejected": rejected,
            "aspect": IF_ASPECT,
            "source": f"advancedif/{p.benchmark}",
            "meta": {"rubrics": len(p.rubrics), "chosen_satisfied": hi, "rejected_satisfied": lo},
        },
    )


IF_DEFAULTS: dict[str, Any] = {"generator": DEFAULT_GENERATOR, "n_samples": 4, "max_new_tokens": 1024,
                                "batch_size": 8, "n_train": 14407, "n_test": 784}
"""The defaults of :class:`~data_builders.generated.GenOptions` for IF (the paper's sizes)."""


def build_if(
    out: Path | None,
    sources: Mapping[str, str] | None = None,
    *,
    judge: str = DEFAULT_JUDGE,
    judge_url: str | None = None,
    test_fraction: float = 0.05,
    progress: Progress | None = None,
    sampler: Sampler | None = None,
    judge_impl: Judge | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Build the IF preference set (module docstring) and return its manifest.

    The shared flags come as ``options`` (:class:`~data_builders.generated.GenOptions`, by
    :data:`IF_DEFAULTS`); ``sampler`` replaces the generator and ``judge_impl`` the judge (tests)."""
    build = IFBuild(sources, judge, judge_url, test_fraction, judge_impl)
    return run_build(build, out, options, progress, sampler)


class IFBuild:
    """IF's stages in the generated-build skeleton (:func:`~data_builders.generated.run_build`): sample
    responses, judge every (response, rubric), pair the most- with a least-satisfying response, split
    by ``test_fraction``."""

    name = "if"
    what = "prompts"
    defaults: Mapping[str, Any] = IF_DEFAULTS
    pair_needs = "two responses"
    spec: SourceSpec
    """The AdvancedIF input (set by :meth:`read`)."""

    def __init__(
        self, sources: Mapping[str, str] | None, judge: str, judge_url: str | None, test_fraction: float,
        judge_impl: Judge | None,
    ):
        self.sources, self.judge, self.judge_url, self.judge_impl = sources, judge, judge_url, judge_impl
        self.test_fraction = test_fraction
        self.judge_desc = {"url": judge_url, "model": judge} if judge_url else {"model": judge}
        self.responses: dict[str, dict[str, Any]] = {}  # generate's, for assemble
        self.verdicts: dict[str, dict[str, Any]] = {}

    def read(self, o: GenOptions, skips: SkipLog) -> list[IFPrompt]:
        self.spec = resolve_sources("if", self.sources)["advancedif"]
        return read_advancedif(self.spec, skips=skips, limit=o.limit)

    def base_manifest(self, o: GenOptions) -> dict[str, Any]:
        endpoints = {"generator_endpoint": o.describe_generator()}
        if self.judge_url:
            endpoints["judge_endpoint"] = {"url": self.judge_url, "model": self.judge, "retries": o.retries,
                                          "timeout": o.timeout_for("judge")}
        return base_manifest(
            "if", seed=o.seed, aspect=IF_ASPECT, license=LICENSE_NOTE, limit=o.limit,
            sources={"advancedif": self.spec.describe()}, settings=o.settings(),
            judge={**self.judge_desc, "question": JUDGE_QUESTION},
            requested={"train": o.n_train, "test": o.n_test, "test_fraction": self.test_fraction}, **endpoints,
        )

    def dry_run(self, items: list[IFPrompt], cache_dir: Path | None) -> DryRun:
        counts = {"counts": {"prompts": len(items), "rubrics": sum(len(p.rubrics) for p in items)}}
        return counts, [{"id": p.id, "benchmark": p.benchmark, "messages": p.messages, "rubrics": p.rubrics}
                        for p in items[:3]]

    def generate(self, run: BuildRun) -> None:
        """Sample the responses, then judge each against every rubric (both stages cached)."""
        o, prompts = run.options, run.items
        s = o.settings()
        run.stats = {"batches": 0}
        rcache = JsonlCache(run.cache_dir / "if-responses.jsonl", "id", "generator", asdict(s))
        self.responses = responses = rcache.load()
        run.stats["cached_prompts"] = sum(1 for p in prompts if p.id in responses)
        sample_failed: dict[str, str] = {}
        sample_stage(
            prompts, lambda p: p.id, lambda p: p.messages, chat=True, tag="if", sampler=run.sampler, settings=s,
            cache=rcache, done=responses, batch_size=o.batch_size, label="sample responses", progress=run.progress,
            stats=run.stats, failed=sample_failed,
        )
        require_some(prompts, sample_failed, "if: sampling")
        judge_impl = self.judge_impl
        if judge_impl is None:
            judge_impl = make_judge(self.judge, self.judge_url, o, run.sampler, run.cache_dir)
        # the judgments depend on the responses: key them by the generator settings too
        jcache = JsonlCache(
            run.cache_dir / "if-judgments.jsonl", "id", "settings", {"generator": asdict(s), **self.judge_desc}
        )
        judge_failed: dict[str, str] = {}
        self.verdicts = _judge_stage(prompts, responses, jcache, judge_impl, o.batch_size, run.progress, run.stats,
                                     judge_failed)
        require_some([p for p in prompts if p.id in responses], judge_failed, "if: judging")
        run.failed = {**sample_failed, **judge_failed}
        return None

    def assemble(self, run: BuildRun) -> Assembled:
        """Count the verdicts, pair each prompt's responses, split by ``test_fraction``."""
        o, prompts, verdicts = run.options, run.items, self.verdicts
        judging = {"judgments": 0, "satisfied": 0, "not_satisfied": 0, "unparsable": 0}
        pools: list[PairRecord] = []
        ties = 0
        for p in prompts:
            if p.id not in verdicts:  # its sampling or judging failed: counted in "failed", asked again on a re-run
                continue
            for vs in verdicts[p.id]["verdicts"]:
                for v in vs:
                    judging["judgments"] += 1
                    judging["satisfied" if v else "not_satisfied" if v is False else "unparsable"] += 1
            rec = pair_prompt(p, self.responses[p.id]["samples"], verdicts[p.id]["verdicts"], o.seed)
            if rec is None:
                ties += 1
            else:
                pools.append(rec)
        splits = split_by_fraction(pools, self.test_fraction, o.n_train, o.n_test, f"if:split:{o.seed}")
        return splits, {"prompts": len(prompts), "pairs": len(pools), "ties": ties}, {"judging": judging}
