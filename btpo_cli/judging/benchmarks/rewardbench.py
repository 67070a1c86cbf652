"""RewardBench (v1): ``allenai/reward-bench`` split ``filtered`` — ``prompt``, ``chosen``, ``rejected``,
``subset``, ``id``.

Per example: 1 when the chosen response wins outright, else 0 (a tie is 0, as in the official
``run_rm.py``: ``1 if chosen > rejected else 0``). Per subset: the mean. Sections (Chat, Chat Hard,
Safety, Reasoning): the subset accuracies weighted by the official example counts (PRM-Math counts 984,
upweighted to equal the code subsets), as ``rewardbench.utils.calculate_scores_per_section`` does; the
score is the mean of the four sections present.
"""

from __future__ import annotations

from typing import Any

from btpo_cli.judging.benchmarks.base import (
    BenchItem,
    Benchmark,
    Outcome,
    accuracy_table,
    prompt_of,
    record_id,
    register_benchmark,
    text,
)

EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100,
    "refusals-offensive": 100, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136, "hep-cpp": 164,
    "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
"""The official weights (``rewardbench.constants.EXAMPLE_COUNTS``)."""

SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
"""Sections → subsets (``rewardbench.constants.SUBSET_MAPPING``)."""


def parse(raw: dict[str, Any], num: int) -> BenchItem:
    return BenchItem(record_id(raw, "id", num), prompt_of(raw.get("prompt"), "prompt"),
                     [text(raw, "chosen")], [text(raw, "rejected")], text(raw, "subset"))


def section_scores(per_subset: dict[str, float]) -> dict[str, float]:
    """Sections from subset accuracies, weighted by :data:`EXAMPLE_COUNTS` (a section with none of its
    subsets present scores 0, as the official helper does)."""
    out = {}
    for section, subsets in SECTIONS.items():
        got = [(per_subset[s], EXAMPLE_COUNTS[s]) for s in subsets if s in per_subset]
        total = sum(w for _, w in got)
        out[section] = sum(a * w for a, w in got) / total if total else 0
    return out


def example_results(outcomes: list[Outcome]) -> list[int]:
    return [int(o.win(0, 0, 1) == 1.0) for o in outcomes]


def aggregate(items: list[BenchItem], outcomes: list[Outcome]) -> dict[str, Any]:
    groups: dict[str, list[float]] = {}
    for it, r in zip(items, example_results(outcomes), strict=True):
        groups.setdefault(it.subset, []).append(r)
    table = accuracy_table(groups)
    per_subset = {k: v["accuracy"] for k, v in table.items() if k in EXAMPLE_COUNTS}
    sections = section_scores(per_subset)
    present = [s for s, subs in SECTIONS.items() if any(x in per_subset for x in subs)]
    score = sum(sections[s] for s in present) / len(present) if present else None
    unknown = sorted(set(table) - set(EXAMPLE_COUNTS))
    return {"aggregate": score, "scores": {s: sections[s] for s in present}, "subsets": table,
            "unweighted_subsets": unknown}


register_benchmark(Benchmark(
    "rewardbench", "RewardBench", ("prompt", "chosen", "rejected", "subset"), parse, aggregate,
    hub_id="allenai/reward-bench", hub_split="filtered",
    how="mean of the Chat / Chat Hard / Safety / Reasoning sections (subsets weighted by the official counts)"))
