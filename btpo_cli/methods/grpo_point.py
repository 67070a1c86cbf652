"""GRPO (point) — a pointwise judge trained with GRPO on a paired-comparison reward (METHOD.md §6; J1 style).

Objective. The judge prompt (``templates.GRPO_POINT_PROMPT``) shows the conversation and ONE
response and asks for a rationale, then a score ``<score>N</score>`` with ``1 ≤ N ≤ 10``. Per
rollout, each pair gives two prompts (``y_w`` and ``y_l``), each sampled ``G = rollout.n`` times.
Sample ``k`` of ``y_w`` is paired with sample ``k`` of ``y_l``: ``w_k`` earns 1 iff
``score(w_k) > score(l_k)``, and symmetrically ``l_k`` earns 1 iff ``score(l_k) < score(w_k)``, so
both members of a correctly ranked pair of samples are rewarded and an unparsable score on either
side fails the comparison (0 for both) (:func:`paired_rewards`). Advantages are standardized within
each group, the ``G`` samples of one response; the policy minimizes the clipped surrogate over the
completion tokens, plus ``β · k3`` KL when ``grpo.beta > 0``. The loop is ``methods/grpo_common.py``.

Evaluation (METHOD.md §7): a greedy rationale and score per response; ``pointwise_result(score_w,
score_l)`` — higher chosen score correct, equal scores a tie (0.5), a parse failure on either side a
format error. The rationales go to ``eval/<dataset>.rationales.jsonl``.

Differences from J1: J1's pointwise variant is trained from pairwise data with a reward on the
score difference and its own prompt; here the reward is METHOD.md §6's paired comparison, ``G = 8``
is our choice, and ties between the two samples earn 0.

Run it::

    btpo train --method grpo-point --model tiny-qwen2 --data data/synthetic --out runs/grpo-point --max-steps 5
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from btpo_cli.config import Config
from btpo_cli.data.pairs import PairRecord
from btpo_cli.judging.judge import TOO_LONG, Item, Score, judge_for_eval
from btpo_cli.judging.parsers import ParseStats, ScoreParse, parse_score
from btpo_cli.judging.protocol import PairResult, pointwise_result
from btpo_cli.judging.templates import (
    GRPO_POINT_PROMPT,
    PLACEHOLDER_PROMPT,
    encode_judge_prompts,
    pointwise_messages,
    render,
)
from btpo_cli.methods import Card, MethodSpec, grpo_common, register_method
from btpo_cli.methods.grpo_common import train as grpo_train
from btpo_cli.plan.estimate import Geometry, PlanInputs
from btpo_cli.runs.folder import Run

if TYPE_CHECKING:
    import torch


@dataclass
class PointUnit:
    """A pair's two judge prompts (int32 arrays keep long prompts small in memory)."""

    index: int
    chosen: array
    rejected: array


def paired_rewards(chosen: list[ScoreParse], rejected: list[ScoreParse]) -> tuple[list[float], list[float]]:
    """Rewards of the ``G`` samples of ``y_w`` and of ``y_l``: sample ``k`` of each against sample ``k`` of the other.

    ``w_k`` gets 1 iff ``score(w_k) > score(l_k)``; ``l_k`` gets 1 iff ``score(l_k) < score(w_k)``;
    a missing score on either side, or a tie, gives 0 to both.
    """
    out_w, out_l = [], []
    for w, lo in zip(chosen, rejected, strict=True):
        ok = w.score is not None and lo.score is not None and w.score > lo.score
        out_w.append(1.0 if ok else 0.0)
        out_l.append(1.0 if ok else 0.0)
    return out_w, out_l


class PointTask:
    name = "grpo-point"
    queries_per_unit = 2

    def encode(self, tok: Any, records: list[PairRecord], max_length: int) -> tuple[list[PointUnit], dict[str, int]]:
        enc, stats = encode_judge_prompts(tok, records, (
            lambda r, p: pointwise_messages(p, r.chosen_text, r.aspect),
            lambda r, p: pointwise_messages(p, r.rejected_text, r.aspect)), max_length)
        return [PointUnit(k, array("i", w), array("i", lo)) for k, (w, lo) in enc], stats

    def queries(self, units: list[PointUnit], rollout: int, seed: int) -> list[grpo_common.Query]:
        return [grpo_common.Query(ids.tolist(), label) for u in units
                for ids, label in ((u.chosen, "chosen"), (u.rejected, "rejected"))]

    def parse(self, text: str, finished: bool) -> grpo_common.Parse:
        return parse_score(text, finished=finished)

    def new_stats(self) -> ParseStats:
        return ParseStats.scores()

    def rewards(self, queries: list[grpo_common.Query], parses: list[list[grpo_common.Parse]]) -> torch.Tensor:
        import torch  # heavy: imported on use

        rows: list[list[float]] = []
        for i in range(0, len(queries), 2):
            assert queries[i].label == "chosen" and queries[i + 1].label == "rejected"
            rw, rl = paired_rewards(parses[i], parses[i + 1])                    # type: ignore[arg-type]
            rows.extend((rw, rl))
        return torch.tensor(rows, dtype=torch.float32)


def train(cfg: Config, run: Run, resume: bool) -> None:
    grpo_train(cfg, run, resume, PointTask(), templates)


def judge_point(rec_id: str, w: tuple[str, bool], lo: tuple[str, bool]) -> tuple[PairResult, dict[str, Any]]:
    """The two responses' greedy rationales → the pair's pointwise result and its rationale row."""
    (t_w, f_w), (t_l, f_l) = w, lo
    p_w, p_l = parse_score(t_w, finished=f_w), parse_score(t_l, finished=f_l)
    stats = ParseStats.scores()
    stats.add(p_w)
    stats.add(p_l)
    result = pointwise_result(rec_id, p_w.score, p_l.score, error_chosen=p_w.error, error_rejected=p_l.error,
                              parse=stats.as_dict())
    return result, {"id": rec_id, "rationale_chosen": t_w, "score_chosen": p_w.score, "error_chosen": p_w.error,
                    "rationale_rejected": t_l, "score_rejected": p_l.score, "error_rejected": p_l.error}


class PointJudge(grpo_common.RationaleJudge):
    """GRPO (point)'s judge: a greedy rationale per response, then its ``<score>N</score>`` (1..10);
    an unparsable answer has no score and its parser error; ``compare`` gives 1 / ½ / 0."""

    protocol = "pointwise"

    def preference(self, a: float, b: float) -> float:
        return 1.0 if a > b else 0.5 if a == b else 0.0

    def _score_chunk(self, items: list[Item]) -> list[Score]:
        enc = [self.encode(lambda p, it=it: pointwise_messages(p, it.response, it.aspect), it.prompt) for it in items]
        idx = [i for i, e in enumerate(enc) if e is not None]
        gens = self.greedy([enc[i] for i in idx])
        out = [Score(None, TOO_LONG) for _ in items]
        for (text, finished), i in zip(gens, idx, strict=True):
            p = parse_score(text, finished=finished)
            out[i] = Score(p.score, p.error, thought=text, detail={"finished": finished})
        return out

    def pair_result(self, rec_id: str, judged: Any) -> PairResult:
        return judge_point(rec_id, *_gens(judged))[0]


def _gens(judged: tuple[Score, Score]) -> tuple[tuple[str, bool], tuple[str, bool]]:
    return tuple((s.thought or "", s.detail["finished"]) for s in judged)  # type: ignore[return-value]


def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any, progress: Any = None,
             artifacts: Path | None = None) -> list[PairResult]:
    """Greedy score per response → ``pointwise_result(score_w, score_l)`` (METHOD.md §7)."""
    return grpo_common.evaluate_rationales(judge_for_eval(PointJudge, cfg, model_dir, device), records, progress, artifacts,
                               lambda rec_id, judged: judge_point(rec_id, *_gens(judged))[1])


def templates(tok: Any, aspect: str) -> dict[str, Any]:
    """What ``btpo.json`` records of the judge prompt: the string and its chat rendering."""
    return {"strings": {"judge_prompt": GRPO_POINT_PROMPT},
            "rendered": render(tok, pointwise_messages(PLACEHOLDER_PROMPT, "{response}", aspect),
                               add_generation_prompt=True)}


def plan_geometry(inp: PlanInputs) -> Geometry:
    """G rationales for each of the pair's two responses."""
    return Geometry("causal", 2 * inp.n, inp.prompt_tokens + inp.gen_tokens, inp.gen_tokens + 1, True, 2)


def card(meta: dict[str, Any]) -> Card:
    return grpo_common.rationale_card(meta, "a pointwise generative judge trained with GRPO: it writes a rationale, then a "
                                "score <score>N</score> with N in 1..10.", "<score>N</score>")


METHOD = register_method(MethodSpec(
    name="grpo-point", help="GRPO (point): rationale then <score>N</score>, reward for beating the paired sample.",
    train=train, evaluate=evaluate, protocol="pointwise", model_class="AutoModelForCausalLM",
    config_section="grpo", generative=True, order=40, judge=PointJudge,
    rollouts=True, plan_geometry=plan_geometry, plan_inputs=grpo_common.plan_inputs, card=card))
