"""GRPO (pair) — a pairwise judge trained with GRPO on a verdict reward (METHOD.md §6; J1 / RM-R1 / RRM style).

Objective. The judge prompt (``templates.GRPO_PAIR_PROMPT``) shows the conversation and the two
responses as A and B and asks for a rationale, then a verdict ``[[A]]`` or ``[[B]]``. Per rollout,
each pair is shown once, in an order drawn per pair and rollout (seeded by ``train.seed``, the
rollout and the pair, so independent of the number of processes); ``G = rollout.n`` completions are
sampled; a completion earns reward 1 if its parsed verdict (``btpo_cli.judging.parsers.parse_verdict``)
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
from typing import TYPE_CHECKING, Any

from btpo_cli.config import Config
from btpo_cli.data.pairs import PairRecord
from btpo_cli.judging.judge import TOO_LONG, Comparison, Item, judge_for_eval, pairwise_comparison
from btpo_cli.judging.parsers import ParseStats, VerdictParse, parse_verdict
from btpo_cli.judging.protocol import PairResult, pairwise_result
from btpo_cli.judging.templates import (
    GRPO_PAIR_PROMPT,
    PLACEHOLDER_PROMPT,
    encode_judge_prompts,
    pairwise_messages,
    render,
)
from btpo_cli.methods import Card, MethodSpec, register_method
from btpo_cli.methods.grpo_common import (
    Parse,
    Query,
    RationaleJudge,
    evaluate_rationales,
    plan_inputs,
    rationale_card,
)
from btpo_cli.methods.grpo_common import train as grpo_train
from btpo_cli.plan.estimate import Geometry, PlanInputs
from btpo_cli.runs.folder import Run

if TYPE_CHECKING:
    import torch


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
        enc, stats = encode_judge_prompts(tok, records, (
            lambda r, p: pairwise_messages(GRPO_PAIR_PROMPT, p, r.chosen_text, r.rejected_text, r.aspect),
            lambda r, p: pairwise_messages(GRPO_PAIR_PROMPT, p, r.rejected_text, r.chosen_text, r.aspect)),
            max_length)
        return [PairUnit(k, array("i", ab), array("i", ba)) for k, (ab, ba) in enc], stats

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
        import torch  # heavy: imported on use

        return torch.tensor([[verdict_reward(p, q.label) for p in group]            # type: ignore[arg-type]
                             for q, group in zip(queries, parses, strict=True)], dtype=torch.float32)


def train(cfg: Config, run: Run, resume: bool) -> None:
    grpo_train(cfg, run, resume, PairTask(), templates)


def judge_pair(rec_id: str, a: tuple[str, bool], b: tuple[str, bool]) -> tuple[PairResult, dict[str, Any]]:
    """Both orders' greedy rationales (chosen as A, chosen as B) → the pair's result and its rationale row."""
    (t_a, f_a), (t_b, f_b) = a, b
    p_a, p_b = parse_verdict(t_a, f_a), parse_verdict(t_b, f_b)
    stats = ParseStats.verdicts()
    stats.add(p_a)
    stats.add(p_b)
    result = pairwise_result(rec_id, p_a.verdict, p_b.verdict, error_chosen_as_a=p_a.error,
                             error_chosen_as_b=p_b.error, parse=stats.as_dict())
    return result, {"id": rec_id, "rationale_chosen_as_a": t_a, "verdict_chosen_as_a": p_a.verdict,
                    "error_chosen_as_a": p_a.error, "rationale_chosen_as_b": t_b,
                    "verdict_chosen_as_b": p_b.verdict, "error_chosen_as_b": p_b.error}


class PairJudge(RationaleJudge):
    """GRPO (pair)'s judge: both orders of (a, b), a greedy rationale each (one batch), the verdicts
    parsed; each order counts 1 for a, 0 for b, ½ without a verdict, and ``prob_a`` is the mean."""

    protocol = "pairwise"

    def _compare_chunk(self, pairs: list[tuple[Item, Item]]) -> list[Comparison]:
        enc = []
        for a, b in pairs:
            ab = self.encode(lambda p, a=a, b=b: pairwise_messages(GRPO_PAIR_PROMPT, p, a.response, b.response,
                                                                   a.aspect), a.prompt)
            ba = self.encode(lambda p, a=a, b=b: pairwise_messages(GRPO_PAIR_PROMPT, p, b.response, a.response,
                                                                   a.aspect), a.prompt)
            enc.append((ab, ba) if ab is not None and ba is not None else None)
        idx = [i for i, e in enumerate(enc) if e is not None]
        gens = self.greedy([ids for i in idx for ids in enc[i]])                  # (2m,) a as A, a as B per pair
        out = [Comparison(None, None, TOO_LONG) for _ in pairs]
        for j, i in enumerate(idx):
            (t1, f1), (t2, f2) = gens[2 * j], gens[2 * j + 1]
            p1, p2 = parse_verdict(t1, f1), parse_verdict(t2, f2)
            out[i] = pairwise_comparison(p1.verdict, p2.verdict, rationales=[t1, t2], finished=[f1, f2],
                                         errors=[p1.error, p2.error])
        return out

    def pair_result(self, rec_id: str, judged: Any) -> PairResult:
        return judge_pair(rec_id, *_gens(judged))[0]


def _gens(c: Comparison) -> tuple[tuple[str, bool], tuple[str, bool]]:
    (t1, t2), (f1, f2) = c.detail["rationales"], c.detail["finished"]
    return (t1, f1), (t2, f2)


def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any, progress: Any = None,
             artifacts: Path | None = None) -> list[PairResult]:
    """Greedy verdicts for both orders of every pair → ``pairwise_result`` (METHOD.md §7)."""
    return evaluate_rationales(judge_for_eval(PairJudge, cfg, model_dir, device), records, progress, artifacts,
                               lambda rec_id, c: judge_pair(rec_id, *_gens(c))[1])


def templates(tok: Any, aspect: str) -> dict[str, Any]:
    """What ``btpo.json`` records of the judge prompt: the string and its chat rendering."""
    return {"strings": {"judge_prompt": GRPO_PAIR_PROMPT},
            "rendered": render(tok, pairwise_messages(GRPO_PAIR_PROMPT, PLACEHOLDER_PROMPT, "{response_a}",
                                                      "{response_b}", aspect), add_generation_prompt=True)}


def plan_geometry(inp: PlanInputs) -> Geometry:
    """G rationales for the pair's one prompt (one order per rollout)."""
    return Geometry("causal", inp.n, inp.prompt_tokens + inp.gen_tokens, inp.gen_tokens + 1, True, 1)


def card(meta: dict[str, Any]) -> Card:
    return rationale_card(meta, "a pairwise generative judge trained with GRPO: it writes a rationale, then the "
                                "verdict [[A]] or [[B]]; btpo asks both orders.", "[[A]] or [[B]]")


METHOD = register_method(MethodSpec(
    name="grpo-pair", help="GRPO (pair): rationale then [[A]]/[[B]], reward 1 for the preferred verdict.",
    train=train, evaluate=evaluate, protocol="pairwise", model_class="AutoModelForCausalLM",
    config_section="grpo", generative=True, order=30, judge=PairJudge,
    rollouts=True, plan_geometry=plan_geometry, plan_inputs=plan_inputs, card=card))
