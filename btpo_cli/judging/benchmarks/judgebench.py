"""JudgeBench: GitHub ``ScalerLab/JudgeBench``, ``data/dataset=judgebench,response_model=*.jsonl`` —
``pair_id``, ``source``, ``question``, ``response_A``, ``response_B``, ``label`` (``A>B`` / ``B>A``).

Both orders are judged. Each order's decision counts +1 when it picks the labelled winner and −1 when it
picks the other (a tie or no decision: 0); the pair is correct when the sum is positive, so an
order-inconsistent verdict counts as a tie, i.e. not correct (``utils/metrics.py``). A pointwise judge's
decision is score(A) > score(B) in each order. Accuracy per category (the ``source`` prefix:
``mmlu-pro`` knowledge, ``livebench-reasoning``, ``livebench-math``, ``livecodebench`` coding) and overall.
"""

from __future__ import annotations

from typing import Any

from btpo_cli.data.pairs import RecordSkip
from btpo_cli.judging.benchmarks import base

CATEGORIES = {"mmlu-pro": "knowledge", "livebench-reasoning": "reasoning", "livebench-math": "math",
              "livecodebench": "coding"}


def category(source: str) -> str:
    return next((c for p, c in CATEGORIES.items() if source.startswith(p)), "other")


def parse(raw: dict[str, Any], num: int) -> base.BenchItem:
    a, b = base.text(raw, "response_A"), base.text(raw, "response_B")
    label = raw.get("label")
    if label not in ("A>B", "B>A"):
        raise RecordSkip("label", f"expected 'A>B' or 'B>A', got {label!r}")
    chosen, rejected = (a, b) if label == "A>B" else (b, a)
    source = base.text(raw, "source")
    return base.BenchItem(base.record_id(raw, "pair_id", num), base.prompt_of(base.text(raw, "question"), "question"),
                     [chosen], [rejected], category(source), {"source": source, "label": label})


def example_result(o: base.Outcome) -> int:
    """1 when the two orders' decisions sum in favour of the labelled winner."""
    return int(o.win(0, 0, 1) == 1.0)


def aggregate(items: list[base.BenchItem], outcomes: list[base.Outcome]) -> dict[str, Any]:
    groups: dict[str, list[float]] = {}
    res = [example_result(o) for o in outcomes]
    for it, r in zip(items, res, strict=True):
        groups.setdefault(it.subset, []).append(r)
    acc = sum(res) / len(res) if res else None
    return {"aggregate": acc, "scores": {k: v["accuracy"] for k, v in base.accuracy_table(groups).items()},
            "subsets": base.accuracy_table(groups), "interval_95": base.wilson(sum(res), len(res))}


base.register_benchmark(base.Benchmark(
    "judgebench", "JudgeBench", ("pair_id", "source", "question", "response_A", "response_B", "label"),
    parse, aggregate, file_glob="dataset=judgebench*.jsonl",
    how="accuracy with both orders judged (an order-inconsistent verdict is a tie), per source category"))
