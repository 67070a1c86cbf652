"""RMB: GitHub ``Zhou-Zoey/RMB-Reward-Model-Benchmark``, ``RMB_dataset/{Pairwise_set,BoN_set}/**.json``.

- Pairwise set: ``pair_uid``, ``conversation_input`` (messages), ``chosen`` / ``reject``
  (``{"llm_name", "answer"}``), ``category_path``. Correct when the chosen answer wins outright (the
  authors' ``my_run_rm.py``: ``1 if chosen > rejected else 0``).
- BoN set: ``bon_uid``, ``conversation_input``, ``bon_best``, ``loser_list`` (answers), ``category_path``.
  Correct when the best answer beats every loser outright.

Accuracy per category path (``Helpfulness/Code/…``), per set × goal (pairwise / BoN × helpfulness /
harmlessness: the paper's four columns, each the mean over its examples) and the score: the mean of the
four columns present. The repository publishes no aggregation script; this is btpo's reading of the
paper's table.
"""

from __future__ import annotations

from typing import Any

from btpo_cli.data.pairs import RecordSkip
from btpo_cli.judging.benchmarks.base import (
    BenchItem,
    Benchmark,
    Outcome,
    accuracy_table,
    need,
    prompt_of,
    register_benchmark,
    text,
)


def _answer(v: Any, key: str) -> str:
    if not isinstance(v, dict):
        raise RecordSkip(key, f"expected an object with 'answer', got {type(v).__name__}")
    a = v.get("answer")
    if not isinstance(a, str) or not a.strip():
        raise RecordSkip(f"{key}.answer", "missing, empty or not a string")
    return a


def parse(raw: dict[str, Any], num: int) -> BenchItem:
    path = text(raw, "category_path")
    prompt = prompt_of(need(raw, "conversation_input"), "conversation_input")
    if "bon_best" in raw or "loser_list" in raw:
        losers = need(raw, "loser_list")
        if not isinstance(losers, list) or not losers:
            raise RecordSkip("loser_list", "expected a non-empty list")
        rejected = [_answer(x, f"loser_list[{k}]") for k, x in enumerate(losers)]
        return BenchItem(f"bon-{raw.get('bon_uid', num)}", prompt, [_answer(need(raw, "bon_best"), "bon_best")],
                         rejected, path, {"set": "bon"})
    return BenchItem(f"pair-{raw.get('pair_uid', num)}", prompt, [_answer(need(raw, "chosen"), "chosen")],
                     [_answer(need(raw, "reject"), "reject")], path, {"set": "pairwise"})


def example_result(it: BenchItem, o: Outcome) -> int:
    return int(all(o.win(0, j, 1) == 1.0 for j in range(len(it.rejected))))


def column(it: BenchItem) -> str:
    goal = "harmlessness" if "Harmlessness" in it.subset else "helpfulness"
    return f"{it.extra['set']}/{goal}"


def aggregate(items: list[BenchItem], outcomes: list[Outcome]) -> dict[str, Any]:
    cats: dict[str, list[float]] = {}
    cols: dict[str, list[float]] = {}
    for it, o in zip(items, outcomes, strict=True):
        r = example_result(it, o)
        cats.setdefault(it.subset, []).append(r)
        cols.setdefault(column(it), []).append(r)
    table = accuracy_table(cols)
    score = sum(v["accuracy"] for v in table.values()) / len(table) if table else None
    return {"aggregate": score, "scores": {k: v["accuracy"] for k, v in table.items()},
            "subsets": accuracy_table(cats)}


register_benchmark(Benchmark(
    "rmb", "RMB", ("conversation_input", "category_path"), parse, aggregate, file_glob="*.json",
    how="pairwise and best-of-N accuracy (helpfulness, harmlessness); mean of the four"))
