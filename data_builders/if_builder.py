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
:mod:`data_builders.math_builder`, and this module supplies the prompts, the rubric judging and
the pairing rule):

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
from btpo_cli.errors import BtpoError
from data_builders.advancedif import IFPrompt, read_advancedif
from data_builders.generated import (
    Failed,
    GenOptions,
    JsonlCache,
    Judge,
    LocalJudge,
    Progress,
    Sampler,
    URLJudge,
    base_manifest,
    failure_summary,
    finish,
    make_judge,
    pick_pair,
    require_items,
    require_some,
    run_cached_stage,
    sample_stage,
    split_by_fraction,
)
from data_builders.sources import resolve_sources

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
    o = GenOptions.with_defaults(IF_DEFAULTS, options)
    o.check("two responses", test_fraction)
    spec = resolve_sources("if", sources)["advancedif"]
    skips = SkipLog(strict=o.strict)
    prompts = read_advancedif(spec, skips=skips, limit=o.limit)
    require_items(prompts, "if", "prompts", skips)
    s = o.settings()
    judge_desc = {"url": judge_url, "model": judge} if judge_url else {"model": judge}
    endpoints = {"generator_endpoint": o.describe_generator()}
    if judge_url:
        endpoints["judge_endpoint"] = {"url": judge_url, "model": judge, "retries": o.retries,
                                      "timeout": o.timeout_for("judge")}
    base = base_manifest(
        "if", seed=o.seed, aspect=IF_ASPECT, license=LICENSE_NOTE, limit=o.limit,
        sources={"advancedif": spec.describe()}, settings=s, judge={**judge_desc, "question": JUDGE_QUESTION},
        requested={"train": o.n_train, "test": o.n_test, "test_fraction": test_fraction}, **endpoints,
    )
    if o.dry_run:
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
    sampler = o.sampler(sampler, cache_dir)
    rcache = JsonlCache(cache_dir / "if-responses.jsonl", "id", "generator", asdict(s))
    responses = rcache.load()
    stats["cached_prompts"] = sum(1 for p in prompts if p.id in responses)
    sample_failed: dict[str, str] = {}
    sample_stage(
        prompts, lambda p: p.id, lambda p: p.messages, chat=True, tag="if", sampler=sampler, settings=s,
        cache=rcache, done=responses, batch_size=o.batch_size, label="sample responses", progress=progress,
        stats=stats, failed=sample_failed,
    )
    require_some(prompts, sample_failed, "if: sampling")
    if judge_impl is None:
        judge_impl = make_judge(judge, judge_url, o, sampler, cache_dir)
    # the judgments depend on the responses: key them by the generator settings too
    jcache = JsonlCache(
        cache_dir / "if-judgments.jsonl", "id", "settings", {"generator": asdict(s), **judge_desc}
    )
    judge_failed: dict[str, str] = {}
    verdicts = _judge_stage(prompts, responses, jcache, judge_impl, o.batch_size, progress, stats, judge_failed)
    require_some([p for p in prompts if p.id in responses], judge_failed, "if: judging")
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
        rec = pair_prompt(p, responses[p.id]["samples"], verdicts[p.id]["verdicts"], o.seed)
        if rec is None:
            ties += 1
        else:
            pools.append(rec)
    splits = split_by_fraction(pools, test_fraction, o.n_train, o.n_test, f"if:split:{o.seed}")
    manifest = {
        **base,
        "prompts": len(prompts),
        "pairs": len(pools),
        "ties": ties,
        "failed": failure_summary({**sample_failed, **judge_failed}, "prompts"),
        "judging": judging,
        "skipped": skips.as_dict(),
    }
    return finish(out, splits, manifest, stats, overwrite=o.overwrite)
