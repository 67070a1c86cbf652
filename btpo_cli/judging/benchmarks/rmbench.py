"""RM-Bench: ``THU-KEG/RM-Bench`` — ``id``, ``prompt``, ``chosen`` (3 styles), ``rejected`` (3 styles),
``domain``; the styles in order concise, detailed plain, detailed markdown.

Per domain, the 3 × 3 matrix M[i][j] = the fraction of examples whose chosen response in style i beats
(strictly) the rejected one in style j; hard = the mean of the upper triangle (chosen plainer than
rejected), normal = the diagonal, easy = the lower triangle; a domain's score is the mean of the three,
the total the mean over domains, and hard/normal/easy overall the means over domains — as the authors'
``scripts/utils.py compute_accuracy`` does.
"""

from __future__ import annotations

from typing import Any

from btpo_cli.judging.benchmarks.base import (
    BenchItem,
    Benchmark,
    Outcome,
    prompt_of,
    record_id,
    register_benchmark,
    text,
    texts,
)

STYLES = 3


def parse(raw: dict[str, Any], num: int) -> BenchItem:
    return BenchItem(record_id(raw, "id", num), prompt_of(raw.get("prompt"), "prompt"),
                     texts(raw, "chosen", STYLES), texts(raw, "rejected", STYLES), text(raw, "domain"))


def matrix(outcomes: list[Outcome]) -> list[list[float]]:
    m = [[0.0] * STYLES for _ in range(STYLES)]
    for o in outcomes:
        for i in range(STYLES):
            for j in range(STYLES):
                m[i][j] += float(o.win(i, j, STYLES) == 1.0)
    n = max(1, len(outcomes))
    return [[x / n for x in row] for row in m]


def hard_normal_easy(m: list[list[float]]) -> dict[str, float]:
    pairs = STYLES * (STYLES - 1) / 2
    return {"hard": sum(m[i][j] for i in range(STYLES) for j in range(i + 1, STYLES)) / pairs,
            "normal": sum(m[i][i] for i in range(STYLES)) / STYLES,
            "easy": sum(m[i][j] for i in range(STYLES) for j in range(i)) / pairs}


def aggregate(items: list[BenchItem], outcomes: list[Outcome]) -> dict[str, Any]:
    by: dict[str, list[Outcome]] = {}
    for it, o in zip(items, outcomes, strict=True):
        by.setdefault(it.subset, []).append(o)
    table: dict[str, dict[str, Any]] = {}
    for domain, os_ in sorted(by.items()):
        m = matrix(os_)
        hne = hard_normal_easy(m)
        table[domain] = {"n": len(os_), "accuracy": sum(hne.values()) / 3, **hne, "matrix": m}
    if not table:
        return {"aggregate": None, "scores": {}, "subsets": {}}
    overall = {k: sum(v[k] for v in table.values()) / len(table) for k in ("hard", "normal", "easy")}
    total = sum(v["accuracy"] for v in table.values()) / len(table)
    return {"aggregate": total, "scores": {**overall, **{d: v["accuracy"] for d, v in table.items()}},
            "subsets": table}


register_benchmark(Benchmark(
    "rmbench", "RM-Bench", ("prompt", "chosen", "rejected", "domain"), parse, aggregate,
    hub_id="THU-KEG/RM-Bench", hub_split="train",
    how="3 × 3 style matrix → hard / normal / easy per domain; mean over domains"))
