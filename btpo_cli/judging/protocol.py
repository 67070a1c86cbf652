"""The evaluation protocol every method shares (METHOD.md §7).

- Pointwise methods (BT, BT-prefilled, BTPO, GRPO-point) give each response a score; a pair is
  correct iff ``score(chosen) > score(rejected)``; a tie counts 0.5; a missing score (format
  failure) counts 0.
- Pairwise methods (GRAM, GRPO-pair) are asked twice, chosen as A and chosen as B; each order
  earns 1 / 0.5 (tie) / 0 (wrong or format failure) and the pair's credit is the mean.
- Accuracy below 50% is clipped to 50%; the raw figure, the tie rate and the format-error rate
  are reported beside it, and for a pairwise judge its position bias (how often the two orders
  disagree, how often the first slot wins).

The eval JSON carries ``eval_version``; ``btpo compare`` only puts results of one version side by side.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btpo_cli.fsio import atomic_open

EVAL_VERSION = "btpo-eval/1"


@dataclass
class PairResult:
    """The outcome of one test pair."""

    id: str
    credit: float
    """In [0, 1]: 1 correct, 0.5 tie, 0 wrong or format failure (mean over orders for pairwise)."""
    ties: int = 0
    """Judgements that were ties (0..2 for pairwise, 0..1 for pointwise)."""
    format_errors: int = 0
    """Unparsable outputs: 0..2 (pointwise: one per response; pairwise: one per order)."""
    judgements: int = 1
    """How many judgements the pair took (1 pointwise comparison, or 2 orders)."""
    detail: dict[str, Any] = field(default_factory=dict)


def pointwise_result(pair_id: str, score_chosen: float | None, score_rejected: float | None,
                     **detail: Any) -> PairResult:
    """Correct iff score(chosen) > score(rejected); tie 0.5; a missing score is a format error (0)."""
    errors = int(score_chosen is None) + int(score_rejected is None)
    if errors:
        return PairResult(pair_id, 0.0, 0, errors, 1, dict(detail, chosen=score_chosen, rejected=score_rejected))
    if score_chosen > score_rejected:
        credit, tie = 1.0, 0
    elif score_chosen == score_rejected:
        credit, tie = 0.5, 1
    else:
        credit, tie = 0.0, 0
    return PairResult(pair_id, credit, tie, 0, 1, dict(detail, chosen=score_chosen, rejected=score_rejected))


def order_credit(verdict: str | None, correct: str) -> tuple[float, int, int]:
    """One order of a pairwise judgement → (credit, tie, format_error). ``verdict`` is 'A', 'B', 'tie' or None."""
    if verdict is None:
        return 0.0, 0, 1
    if verdict == "tie":
        return 0.5, 1, 0
    return (1.0 if verdict == correct else 0.0), 0, 0


def pairwise_result(pair_id: str, verdict_chosen_as_a: str | None, verdict_chosen_as_b: str | None,
                    **detail: Any) -> PairResult:
    """Average of the two orders: chosen shown as A (correct verdict 'A'), then as B (correct 'B')."""
    c1, t1, e1 = order_credit(verdict_chosen_as_a, "A")
    c2, t2, e2 = order_credit(verdict_chosen_as_b, "B")
    return PairResult(pair_id, (c1 + c2) / 2, t1 + t2, e1 + e2, 2,
                      dict(detail, chosen_as_a=verdict_chosen_as_a, chosen_as_b=verdict_chosen_as_b))


def with_unjudged(results: list[PairResult], records: Sequence[Any], judged: set[int],
                  protocol: str) -> list[PairResult]:
    """Append a format failure (credit 0, ``reason="too_long"``) for every record whose index is not in
    ``judged`` (a pair too long to judge), so ``n`` always equals the size of the test set."""
    make = pointwise_result if protocol == "pointwise" else pairwise_result
    return results + [make(r.id, None, None, reason="too_long") for k, r in enumerate(records) if k not in judged]


def summarize(results: Sequence[PairResult]) -> dict[str, Any]:
    """Accuracy (clipped at 0.5), raw accuracy, tie and format-error rates (per judgement), and the
    position bias of a pairwise judge (:func:`order_bias`)."""
    n = len(results)
    if n == 0:
        return {"n": 0, "accuracy": None, "raw_accuracy": None, "clipped": False,
                "tie_rate": None, "format_error_rate": None, "position_bias": None}
    raw = sum(r.credit for r in results) / n
    judgements = sum(r.judgements for r in results)
    orders = [(r.detail["chosen_as_a"], r.detail["chosen_as_b"]) for r in results
              if "chosen_as_a" in r.detail and r.detail.get("reason") != "too_long"]
    return {
        "n": n,
        "accuracy": max(raw, 0.5),
        "raw_accuracy": raw,
        "clipped": raw < 0.5,
        "tie_rate": sum(r.ties for r in results) / judgements,
        "format_error_rate": sum(r.format_errors for r in results) / (2 * n),  # 2 scores or 2 orders per pair
        "position_bias": order_bias(orders),    # pairwise judges; None for pointwise ones (no order)
    }


def order_bias(pairs: Sequence[tuple[str | None, str | None]]) -> dict[str, Any] | None:
    """``pairs``: (verdict with chosen as A, verdict with chosen as B) per judged pair. ``order_disagreement``:
    the fraction of pairs with a verdict in both orders whose verdicts do not name the same response
    (a tie in one order and not the other counts as a disagreement); ``first_slot_wins``: the fraction of
    A/B verdicts that chose A (0.5 = no position bias)."""
    both = [(a, b) for a, b in pairs if a is not None and b is not None]
    letters = [v for p in pairs for v in p if v in ("A", "B")]
    if not pairs:
        return None
    agree = sum(1 for a, b in both if (a, b) in (("A", "B"), ("B", "A"), ("tie", "tie")))
    return {"pairs": len(pairs), "both_orders": len(both),
            "order_disagreement": (len(both) - agree) / len(both) if both else None,
            "first_slot_wins": letters.count("A") / len(letters) if letters else None}


def thought_stats(results: Sequence[PairResult]) -> dict[str, Any] | None:
    """How a generative pointwise judge kept its format, over every judged response: mean thought length
    (tokens), the fraction of thoughts cut at the budget, and the mean Yes + No probability mass at
    the answer position (BTPO; near 1 = the judge answers Yes or No, small = it wants to say something
    else). None when the results carry no thoughts (other methods)."""
    got: dict[str, list[float]] = {"thought_tokens": [], "thought_cut": [], "yes_no_mass": []}
    for r in results:
        for key, values in got.items():
            v = r.detail.get(key)
            if isinstance(v, list):
                values.extend(float(x) for x in v if isinstance(x, (int, float)))
    if not any(got.values()):
        return None

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {"responses": max(len(v) for v in got.values()), "thought_tokens_mean": mean(got["thought_tokens"]),
            "thought_cut_fraction": mean(got["thought_cut"]), "yes_no_mass_mean": mean(got["yes_no_mass"])}


CUT_LIMIT = 0.10
"""More than this share of thoughts / rationales cut at the token budget: the eval warns (``warnings``)."""
YES_NO_FLOOR = 0.5
"""A mean Yes + No probability at BTPO's answer position below this: the eval warns. Our choice: below ½ the
judge would rather say something else than answer, so its p(Yes) is mostly the share of a small mass
(a trained judge sits near 1; an untrained base model, or one whose thoughts were cut, far below)."""


def eval_warnings(summary: dict[str, Any]) -> list[str]:
    """One line per sign that the judge did not get to answer: ``thought_cut_fraction`` above
    :data:`CUT_LIMIT` (BTPO's thoughts; GRPO's rationales: ``parse`` counts ``truncated``) and
    ``yes_no_mass`` below :data:`YES_NO_FLOOR`. Each line starts with the key and its value."""
    th = summary.get("thoughts") or {}
    cut = th.get("thought_cut_fraction")
    parse = summary.get("parse") or {}
    total = sum(v for v in parse.values() if isinstance(v, int))
    if cut is None and total:
        cut = parse.get("truncated", 0) / total
    budget = (summary.get("eval_settings") or {}).get("thought_budget")
    out = []
    if cut is not None and cut > CUT_LIMIT:
        out.append(f"thought_cut_fraction {cut:.2f} > {CUT_LIMIT}: {100 * cut:.0f}% of thoughts / rationales hit the "
                   f"{budget}-token budget before answering (raise --max-new-tokens)")
    mass = th.get("yes_no_mass_mean")
    if mass is not None and mass < YES_NO_FLOOR:
        out.append(f"yes_no_mass {mass:.4f} < {YES_NO_FLOOR}: the judge puts little probability on Yes/No at the "
                   "answer position, so its p(Yes) says little")
    return out


class JsonlWriter:
    """``<artifacts><suffix>`` (an evaluation's per-pair rationales or thoughts) when ``artifacts`` is
    given, one JSON object a line, written atomically (:func:`btpo_cli.fsio.atomic_open`: an interrupted
    evaluation leaves the previous file); a no-op otherwise."""

    def __init__(self, artifacts: Path | None, suffix: str = ".rationales.jsonl"):
        self.path = artifacts.parent / (artifacts.name + suffix) if artifacts else None
        self._f: Any = None
        self._ctx: Any = None

    def __enter__(self) -> JsonlWriter:
        if self.path:
            self._ctx = atomic_open(self.path)
            self._f = self._ctx.__enter__()
        return self

    def write(self, row: dict[str, Any]) -> None:
        if self._f:
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def __exit__(self, *exc: Any) -> None:
        if self._ctx:
            self._ctx.__exit__(*exc)


def batch_block(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Process ``rank``'s records ``[lo, hi)`` of ``n``: one contiguous block of whole batches, so every
    batch holds the same pairs (same padding, same numbers) as in a one-process evaluation."""
    per = math.ceil(math.ceil(n / batch_size) / world) * batch_size
    return min(n, rank * per), min(n, (rank + 1) * per)


def in_record_order(results: list[PairResult], records: list[Any]) -> list[PairResult]:
    """Every process's results → one process's order: judged pairs in record order, then the unjudged."""
    pos = {r.id: k for k, r in enumerate(records)}
    unjudged = [r for r in results if r.detail.get("reason") == "too_long" and r.credit == 0]
    skip = {id(r) for r in unjudged}
    judged = [r for r in results if id(r) not in skip]
    return sorted(judged, key=lambda r: pos.get(r.id, 0)) + sorted(unjudged, key=lambda r: pos.get(r.id, 0))
