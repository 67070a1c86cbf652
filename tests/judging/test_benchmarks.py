"""The benchmark registry: readers (counted skips, schema errors), official aggregates (hand-computed cases and
the official ``rewardbench`` package's scoring code), the real JudgeBench / RMB files when present, and
``btpo eval --benchmark`` end to end on a tiny judge."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from btpo_cli.errors import DataError
from btpo_cli.judging.benchmarks import (
    Outcome,
    benchmark_names,
    judgebench,
    order_bias,
    read_benchmark,
    rewardbench,
    rewardbench2,
    rmb,
    rmbench,
)
from tests.conftest import ONE_THREAD, REPO, run_btpo

DATA = REPO / "tests" / "data" / "benchmarks"
SOURCES = {"judgebench": DATA / "judgebench", "rmb": DATA / "rmb", "rewardbench": DATA / "rewardbench.jsonl",
           "rewardbench2": DATA / "rewardbench2.jsonl", "rmbench": DATA / "rmbench.jsonl"}


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize(("name", "n", "skipped"), [("judgebench", 6, 2), ("rmb", 4, 1), ("rewardbench", 4, 1),
                                                     ("rewardbench2", 3, 1), ("rmbench", 2, 1)])
def test_every_record_is_an_item_or_a_counted_skip(name: str, n: int, skipped: int) -> None:
    items, skips, records = read_benchmark(name, SOURCES[name])
    assert (len(items), skips.total, records) == (n, skipped, n + skipped)
    assert all(loc.split(":")[0].startswith(str(DATA)) for locs in skips.where.values() for loc in locs)


def test_registry_names_every_benchmark() -> None:
    assert benchmark_names() == ["judgebench", "rewardbench", "rewardbench2", "rmb", "rmbench"]


def test_a_file_in_another_schema_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"rewardbench\.jsonl:1 field 'pair_id': missing: not a JudgeBench file"):
        read_benchmark("judgebench", SOURCES["rewardbench"])
    bad = tmp_path / "x.jsonl"
    bad.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"x\.jsonl:1: expected a JSON object, got list: not a RM-Bench file"):
        read_benchmark("rmbench", bad)


def test_judgebench_orients_chosen_by_the_label() -> None:
    items, _, _ = read_benchmark("judgebench", SOURCES["judgebench"])
    b = next(it for it in items if it.id == "jb-1")          # label B>A
    assert b.chosen == ["12 * 12 = 144."] and b.subset == "math" and b.extra["label"] == "B>A"


# ----------------------------------------------------------------------------- official rules, hand-computed


def test_judgebench_inconsistent_orders_are_a_tie_not_a_win() -> None:
    def acc(*orders: tuple[str | None, str | None]) -> float:
        items = [read_benchmark("judgebench", SOURCES["judgebench"])[0][0]] * len(orders)
        return judgebench.aggregate(items, [Outcome(orders={(0, 0): o}) for o in orders])["aggregate"]

    assert acc(("A", "B")) == 1.0          # chosen picked in both orders
    assert acc(("A", "A")) == 0.0          # first slot both times: inconsistent → tie → not correct
    assert acc(("A", "tie")) == 1.0        # +1 + 0 > 0
    assert acc(("A", None)) == 1.0         # a missing decision counts 0 (as utils/metrics.py)
    assert acc(("B", "B"), ("A", "B")) == 0.5
    # pointwise: equal scores are a tie, so not correct
    it = read_benchmark("judgebench", SOURCES["judgebench"])[0][0]
    assert judgebench.aggregate([it], [Outcome([0.5, 0.5])])["aggregate"] == 0.0


def test_rmbench_matrix_hard_normal_easy() -> None:
    # chosen styles score 1, 2, 3; rejected 1.5, 2.5, 3.5: chosen i beats rejected j iff i > j
    o = Outcome([1, 2, 3, 1.5, 2.5, 3.5])
    items, _, _ = read_benchmark("rmbench", SOURCES["rmbench"])
    agg = rmbench.aggregate([items[0]], [o])
    m = agg["subsets"]["math"]
    assert m["matrix"] == [[0, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert (m["hard"], m["normal"], m["easy"]) == (0, 0, 1)
    assert agg["aggregate"] == pytest.approx(1 / 3)


def test_rmb_bon_needs_every_loser_beaten() -> None:
    items, _, _ = read_benchmark("rmb", SOURCES["rmb"])
    bon = next(it for it in items if it.extra["set"] == "bon")
    assert rmb.example_result(bon, Outcome([2.0, 1.0, 1.5])) == 1
    assert rmb.example_result(bon, Outcome([2.0, 1.0, 2.0])) == 0       # a tie with one loser
    assert rmb.example_result(bon, Outcome(orders={(0, 0): ("A", "B"), (0, 1): ("B", "A")})) == 0
    pair = next(it for it in items if it.extra["set"] == "pairwise" and "Helpfulness" in it.subset)
    agg = rmb.aggregate([pair, bon], [Outcome([1.0, 0.0]), Outcome([0.0, 1.0, 0.5])])
    assert agg["scores"] == {"bon/helpfulness": 0.0, "pairwise/helpfulness": 1.0} and agg["aggregate"] == 0.5


def test_rewardbench2_best_of_4_shares_ties() -> None:
    assert rewardbench2.example_result([3, 1, 2, 0]) == 1
    assert rewardbench2.example_result([3, 3, 2, 0]) == 0.5
    assert rewardbench2.example_result([1, 3, 2, 0]) == 0
    assert rewardbench2.example_result([None, 1, 2, 0]) == 0


def test_rewardbench2_ties_rule_by_hand() -> None:
    items, _, _ = read_benchmark("rewardbench2", SOURCES["rewardbench2"])
    ref, tied = (next(it for it in items if it.id == k) for k in ("ref:0", "tied:0"))
    # ref: correct 5 vs wrong (1, 2, 3) → accurate, margin 2; tied: correct (4, 5, 6) vs wrong (1, 3) →
    # accurate, spread 2, margin 1; min margin 1 → preferred: 1 > 2 no; hard: 1 > 2 no; tanh(1/2 - 1)
    score = rewardbench2.ties_score([ref, tied], [Outcome([5, 1, 2, 3]), Outcome([4, 5, 6, 1, 3])])
    assert score == pytest.approx(0.3 + 0.3 + 0.01 * math.tanh(-0.5))


# ----------------------------------------------------------------------------- the official rewardbench package


def _official_rewardbench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installed ``rewardbench`` package's folder, or one pip-installed (--no-deps) into a temp folder."""
    try:
        import rewardbench  # type: ignore[import-not-found]  # noqa: PLC0415 - optional, for the cross-check

        return Path(rewardbench.__file__).parent
    except ImportError:
        pass
    target = tmp_path_factory.mktemp("rewardbench-pkg")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                        "rewardbench"], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        pytest.skip(f"pip could not install rewardbench (no registry?): {p.stderr.strip().splitlines()[-1:]}")
    return target / "rewardbench"


def _load_functions(path: Path, names: set[str]) -> dict:
    """Only the named top-level functions and assignments of an official module (its imports need torch etc.)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    keep = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in names)
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names for t in n.targets))]
    ns: dict = {}
    exec(compile(ast.Module(keep, []), str(path), "exec"), ns)  # noqa: S102 - the official scoring code, read-only
    return ns


def test_rewardbench_sections_equal_the_official_package(tmp_path_factory: pytest.TempPathFactory) -> None:
    pkg = _official_rewardbench(tmp_path_factory)
    official = _load_functions(pkg / "utils.py", {"calculate_scores_per_section"})["calculate_scores_per_section"]
    consts = _load_functions(pkg / "constants.py", {"EXAMPLE_COUNTS", "SUBSET_MAPPING"})
    assert consts["EXAMPLE_COUNTS"] == rewardbench.EXAMPLE_COUNTS
    assert consts["SUBSET_MAPPING"] == rewardbench.SECTIONS
    # per-example results over every subset (a deterministic mix of wins and losses), as btpo scores them
    subsets = list(rewardbench.EXAMPLE_COUNTS)
    from btpo_cli.judging.benchmarks import BenchItem

    items, outcomes = [], []
    for k, s in enumerate(subsets):
        for j in range(3 + k % 4):
            items.append(BenchItem(f"{s}-{j}", [{"role": "user", "content": "q"}], ["a"], ["b"], s))
            outcomes.append(Outcome([float((j * 7 + k) % 3 != 0), 0.5]))
    mine = rewardbench.aggregate(items, outcomes)
    per_subset = {s: v["accuracy"] for s, v in mine["subsets"].items()}
    theirs = official(consts["EXAMPLE_COUNTS"], consts["SUBSET_MAPPING"], per_subset)
    assert mine["scores"] == pytest.approx(theirs)
    assert mine["aggregate"] == pytest.approx(sum(theirs.values()) / 4)
    # a tie is not a win, as in run_rm.py's ``1 if chosen > rejected else 0``
    assert rewardbench.example_results([Outcome([1.0, 1.0])]) == [0]


# ----------------------------------------------------------------------------- the real data sets, when present


def _real(env: str, default: str) -> Path:
    p = Path(os.environ.get(env, default))
    if not p.exists():
        pytest.skip(f"{p} absent: set {env} to a checkout's folder to parse the full benchmark (docs/benchmarks.md)")
    return p


def test_full_judgebench_parses_whole() -> None:
    d = _real("BTPO_JUDGEBENCH", str(REPO / "external" / "JudgeBench" / "data"))
    items, skips, records = read_benchmark("judgebench", d)
    assert (len(items), skips.total, records) == (620, 0, 620)
    gpt = read_benchmark("judgebench", next(d.glob("*gpt-4o*.jsonl")))[0]
    assert len(gpt) == 350
    assert {it.subset for it in gpt} == {"knowledge", "reasoning", "math", "coding"}


def test_full_rmb_parses_whole() -> None:
    d = _real("BTPO_RMB", str(REPO / "external" / "RMB-Reward-Model-Benchmark" / "RMB_dataset"))
    for part in ("Pairwise_set", "BoN_set"):
        items, skips, records = read_benchmark("rmb", d / part)
        assert records > 0 and len(items) + skips.total == records
        assert set(skips.counts) <= {"reject.answer: missing, empty or not a string",
                                     "chosen.answer: missing, empty or not a string"}


# ----------------------------------------------------------------------------- position bias


def test_order_bias_counts_disagreements_and_first_slot_wins() -> None:
    b = order_bias([("A", "B"), ("A", "A"), ("B", "B"), ("tie", "A"), (None, "B")])
    assert b["pairs"] == 5 and b["both_orders"] == 4
    assert b["order_disagreement"] == 0.75
    assert b["first_slot_wins"] == 4 / 8


# ----------------------------------------------------------------------------- btpo eval --benchmark


@pytest.mark.slow
def test_eval_benchmark_on_a_trained_bt_judge_and_compare(trained_judge, tmp_path: Path) -> None:
    run = trained_judge("bt")
    for name in ("judgebench", "rmbench"):
        p = run_btpo("eval", "--checkpoint", str(run), "--benchmark", name, "--data", str(SOURCES[name]),
                     "--device", "cpu", env=ONE_THREAD)
        assert p.stdout.splitlines()[0] == str(run / "eval" / f"{name}.json")
    s = json.loads((run / "eval" / "judgebench.json").read_text())
    assert s["n"] == 6 and s["data_skips"]["records"] == 8 and s["data_skips"]["total"] == 2
    assert s["benchmark"]["name"] == "judgebench" and s["accuracy"] == s["benchmark"]["aggregate"]
    assert set(s["benchmark"]["subsets"]) == {"knowledge", "math", "reasoning", "coding"}
    assert s["position_bias"] is None            # a pointwise judge has no order
    preds = (run / "eval" / "judgebench.predictions.jsonl").read_text().splitlines()
    assert len(preds) == 6
    c = json.loads(run_btpo("compare", str(run), "--format", "json").stdout)
    assert {"judgebench", "rmbench"} <= set(c["datasets"])
    cell = c["rows"][0]["cells"]["judgebench"]
    assert cell["accuracy"] == pytest.approx(round(100 * s["accuracy"], 2))


def test_benchmark_eval_records_provenance(trained_judge) -> None:
    run = trained_judge("bt")
    run_btpo("eval", "--checkpoint", str(run), "--benchmark", "judgebench", "--data", str(SOURCES["judgebench"]),
             "--device", "cpu", "--limit", "3", env=ONE_THREAD)
    s = json.loads((run / "eval" / "judgebench.json").read_text())
    prov = s["provenance"]
    weights = json.loads((run / "final" / "weights.sha256.json").read_text())
    assert prov["model"] == {"dir": str((run / "final").resolve()), "which": "final", "step": weights["step"],
                             "weights_sha256": weights["sha256"]}
    assert prov["data"]["path"] == str(SOURCES["judgebench"]) and len(prov["data"]["sha256"]) == 64
    assert prov["data"]["file"] == str(SOURCES["judgebench"].resolve())         # the folder as a whole
    assert prov["eval"]["batch_size"] == s["eval_config"]["batch_size"]
    st = json.loads(run_btpo("status", str(run), "--format", "json").stdout)["evals"]["judgebench"]
    assert st["stale"] is None and st["provenance"] == "recorded"


@pytest.mark.slow
def test_eval_benchmark_pairwise_judge_as_is_has_position_bias(tmp_path: Path) -> None:
    out = tmp_path / "gram-base"
    run_btpo("eval", "--model", "tiny-qwen2", "--method", "gram", "--benchmark", "rmb", "--data", str(SOURCES["rmb"]),
             "--out", str(out), "--device", "cpu", "--set", "data.max_length=256", env=ONE_THREAD)
    s = json.loads((out / "eval" / "rmb.json").read_text())
    assert s["n"] == 4 and s["data_skips"]["total"] == 1 and s["as_is"] is True
    pb = s["position_bias"]
    assert pb["pairs"] == 5            # 3 pairwise items + one BoN item with 2 losers
    assert 0 <= pb["first_slot_wins"] <= 1 and 0 <= pb["order_disagreement"] <= 1
    cell = json.loads(run_btpo("compare", str(out), "--format", "json").stdout)["rows"][0]["cells"]["rmb"]
    assert cell["first_slot_wins"] == pytest.approx(round(pb["first_slot_wins"], 4))
    assert cell["order_disagreement"] == pytest.approx(round(pb["order_disagreement"], 4))


def test_eval_benchmark_unknown_name_is_one_line() -> None:
    p = run_btpo("eval", "--model", "tiny-qwen2", "--method", "bt", "--benchmark", "nope", "--data", "x",
                 check=False)
    assert p.returncode != 0 and "unknown benchmark 'nope'" in p.stderr and "Traceback" not in p.stderr


def test_every_protocol_eval_reports_position_bias() -> None:
    from btpo_cli.judging.protocol import pairwise_result, pointwise_result, summarize, with_unjudged

    res = [pairwise_result("a", "A", "B"), pairwise_result("b", "A", "A"), pairwise_result("c", "B", None)]
    res = with_unjudged(res, [type("R", (), {"id": i}) for i in "abcd"], {0, 1, 2}, "pairwise")
    pb = summarize(res)["position_bias"]
    assert pb == {"pairs": 3, "both_orders": 2, "order_disagreement": 0.5, "first_slot_wins": 3 / 5}
    assert summarize([pointwise_result("a", 1.0, 0.0)])["position_bias"] is None
