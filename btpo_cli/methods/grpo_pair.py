"""GRPO (pair) — a pairwise judge trained with GRPO on a verdict reward (METHOD.md §6; J1 / RM-R1 / RRM style).

Objective. The judge prompt (``templates.GRPO_PAIR_PROMPT``) shows the conversation and the two
responses as A and B and asks for a rationale, then a verdict ``[[A]]`` or ``[[B]]``. Per rollout,
each pair is shown once, in an order drawn per pair and rollout (seeded by ``train.seed``, the
rollout and the pair, so independent of the number of processes); ``G = grpo.g`` completions are
sampled; a completion earns reward 1 if its parsed verdict (``btpo_cli.parsers.parse_verdict``)
names the preferred response, else 0 (every format error, truncation included, is 0). Advantages
are the rewards standardized within the ``G`` completions, and the policy minimizes the clipped
surrogate over all completion tokens (``grpo.agg``), plus ``β · k3`` KL to the frozen initial model
when ``grpo.beta > 0`` (the reference is loaded only then). The loop is ``methods/grpo_common.py``.

Evaluation (METHOD.md §7): greedy, both orders of every pair (chosen as A, chosen as B) in one
batch; each order earns 1 / 0; the pair's credit is the mean (``evaluation.pairwise_result``). The
rationales go to ``eval/<dataset>.rationales.jsonl``; each prediction's detail holds the parse
error of each order and the per-kind counts.

Differences from the papers: J1 uses a different prompt and an additional consistency reward;
RM-R1 distills rubrics first; here the reward is the plain verdict-correctness of METHOD.md §6,
``G = 8`` is our choice, and the log-probs are taken at the sampling temperature (as in BTPO).

Run it::

    btpo train --method grpo-pair --model tiny-qwen2 --data data/synthetic --out runs/grpo-pair --max-steps 5
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from btpo_cli.config import Config
from btpo_cli.data import PairRecord
from btpo_cli.evaluation import PairResult, pairwise_result
from btpo_cli.methods.grpo_common import EvalJudge, JsonlWriter, Parse, Query, encode_judge
from btpo_cli.methods.grpo_common import train as grpo_train
from btpo_cli.parsers import ParseStats, VerdictParse, parse_verdict
from btpo_cli.runs import Run
from btpo_cli.templates import GRPO_PAIR_PROMPT, TooLong, pairwise_messages
from btpo_cli.trainer import chunks

PROTOCOL = "pairwise"


@dataclass
class PairUnit:
    """A pair's judge prompt in both orders (int32 arrays keep 20k long prompts small in memory)."""

    index: int
    chosen_as_a: array
    chosen_as_b: array


def verdict_reward(parse: VerdictParse, correct: str) -> float:
    """1 if the parsed verdict names the preferred response (``correct`` is its letter), else 0."""
    return 1.0 if parse.verdict is not None and parse.verdict == correct else 0.0


def chosen_first(seed: int, rollout: int, index: int) -> bool:
    """Whether the preferred response is shown as A for this pair in this rollout (a fair, seeded coin)."""
    return random.Random(f"grpo-pair:{seed}:{rollout}:{index}").random() < 0.5


class PairTask:
    name = "grpo-pair"
    queries_per_unit = 1

    def encode(self, tok: Any, records: list[PairRecord], max_length: int) -> tuple[list[PairUnit], dict[str, int]]:
        units, stats = [], {"truncated": 0, "too_long": 0}
        for k, r in enumerate(records):
            try:
                ab, t1 = encode_judge(tok, lambda p, r=r: pairwise_messages(
                    GRPO_PAIR_PROMPT, p, r.chosen_text, r.rejected_text, r.aspect), r.prompt, max_length)
                ba, t2 = encode_judge(tok, lambda p, r=r: pairwise_messages(
                    GRPO_PAIR_PROMPT, p, r.rejected_text, r.chosen_text, r.aspect), r.prompt, max_length)
            except TooLong:
                stats["too_long"] += 1
                continue
            stats["truncated"] += int(t1 or t2)
            units.append(PairUnit(k, array("i", ab), array("i", ba)))
        return units, stats

    def queries(self, units: list[PairUnit], rollout: int, seed: int) -> list[Query]:
        out = []
        for u in units:
            first = chosen_first(seed, rollout, u.index)
            out.append(Query((u.chosen_as_a if first else u.chosen_as_b).tolist(), "A" if first else "B"))
        return out

    def parse(self, text: str, finished: bool) -> Parse:
        return parse_verdict(text, finished)

    def new_stats(self) -> ParseStats:
        return ParseStats.verdicts()

    def rewards(self, queries: list[Query], parses: list[list[Parse]]) -> torch.Tensor:
        return torch.tensor([[verdict_reward(p, q.label) for p in group]            # type: ignore[arg-type]
                             for q, group in zip(queries, parses, strict=True)], dtype=torch.float32)


def train(cfg: Config, run: Run, resume: bool) -> None:
    grpo_train(cfg, run, resume, PairTask())


def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any, progress: Any = None,
             artifacts: Path | None = None) -> list[PairResult]:
    """Greedy verdicts for both orders of every pair → ``pairwise_result`` (METHOD.md §7)."""
    judge = EvalJudge.load(cfg, model_dir, device, cfg.eval.batch_size * 2)
    units, _ = PairTask().encode(judge.tok, records, cfg.data.max_length)
    results: list[PairResult] = []
    with JsonlWriter(artifacts) as out:
        for part in chunks(units, cfg.eval.batch_size):
            gens = judge.greedy([ids.tolist() for u in part for ids in (u.chosen_as_a, u.chosen_as_b)])
            for j, u in enumerate(part):
                rec = records[u.index]
                (t_a, f_a), (t_b, f_b) = gens[2 * j], gens[2 * j + 1]
                p_a, p_b = parse_verdict(t_a, f_a), parse_verdict(t_b, f_b)
                stats = ParseStats.verdicts()
                stats.add(p_a)
                stats.add(p_b)
                results.append(pairwise_result(rec.id, p_a.verdict, p_b.verdict, error_chosen_as_a=p_a.error,
                                               error_chosen_as_b=p_b.error, parse=stats.as_dict()))
                out.write({"id": rec.id, "rationale_chosen_as_a": t_a, "verdict_chosen_as_a": p_a.verdict,
                           "error_chosen_as_a": p_a.error, "rationale_chosen_as_b": t_b,
                           "verdict_chosen_as_b": p_b.verdict, "error_chosen_as_b": p_b.error})
            if progress:
                progress(len(part))
    scored = {u.index for u in units}
    results.extend(pairwise_result(r.id, None, None, reason="too_long")
                   for k, r in enumerate(records) if k not in scored)
    return results
