"""``btpo eval --model NAME --method M``: any model evaluated as it is, by the same protocol and judge code."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import ONE_THREAD, run_btpo


def _summary(run_dir: Path, dataset: str = "synthetic") -> dict:
    return json.loads((run_dir / "eval" / f"{dataset}.json").read_text())


def _preds(run_dir: Path, dataset: str = "synthetic") -> list[dict]:
    return [json.loads(x) for x in (run_dir / "eval" / f"{dataset}.predictions.jsonl").read_text().splitlines()]


def test_untrained_base_as_btpo_judge_is_the_base_row_in_compare(tmp_path: Path, synthetic_data: Path) -> None:
    out = tmp_path / "runs" / "btpo-base"
    p = run_btpo("eval", "--model", "tiny-qwen2", "--method", "btpo", "--data", str(synthetic_data), "--out", str(out),
                 "--max-new-tokens", "6", "--limit", "6", env=ONE_THREAD)
    assert p.stdout.split() == [str(out / "eval" / "synthetic.json"), str(out / "eval" / "synthetic.predictions.jsonl")]
    s = _summary(out)
    assert s["as_is"] is True and s["tag"] == "base" and s["method"] == "btpo" and s["model"] == "tiny-qwen2"
    assert s["n"] == 6 and s["protocol"] == "pointwise"
    assert s["eval_settings"] == {"engine": "hf", "thought_budget": 6, "thought_budget_from": "flag", "samples": 0,
                                  "yes_no_normalize": False}
    th = s["thoughts"]
    assert th["responses"] == 12 and 0 < th["thought_tokens_mean"] <= 6 and 0 <= th["thought_cut_fraction"] <= 1
    assert 0 < th["yes_no_mass_mean"] <= 1
    preds = _preds(out)
    assert th["thought_tokens_mean"] == sum(sum(p["thought_tokens"]) for p in preds) / 12
    assert not (out / "final").exists()                   # nothing copied: the JSON names the model judged
    assert Path(s["checkpoint"]).is_dir() and (Path(s["checkpoint"]) / "config.json").exists()
    thoughts = [json.loads(x) for x in (out / "eval" / "synthetic.thoughts.jsonl").read_text().splitlines()]
    assert len(thoughts) == 6 and all(0 < t["tokens_chosen"] <= 6 for t in thoughts)
    c = run_btpo("compare", str(tmp_path / "runs"), "--format", "json")
    rows = json.loads(c.stdout)["rows"]
    assert [(r["model"], r["method"], r["runs"]) for r in rows] == [("tiny-qwen2", "btpo (base)", ["btpo-base"])]


def test_checkpoint_trained_elsewhere_gives_the_same_figures_as_eval_checkpoint(
        tmp_path: Path, synthetic_data: Path, trained_judge) -> None:
    run = trained_judge("bt")
    run_btpo("eval", "--checkpoint", str(run), env=ONE_THREAD)
    moved = tmp_path / "elsewhere"
    import shutil

    shutil.copytree(run / "final", moved)                  # a final/ taken away from its run folder
    before = (moved / "btpo.json").read_text()
    out = tmp_path / "bt-as-is"
    run_btpo("eval", "--model", str(moved), "--data", str(synthetic_data), "--out", str(out), "--tag", "imported",
             env=ONE_THREAD)                                # the method comes from its btpo.json
    a, b = _summary(run), _summary(out)
    assert b["method"] == "bt" and b["tag"] == "imported" and b["as_is"] is True and b["eval_settings"] == {}
    assert (a["n"], a["raw_accuracy"], a["tie_rate"]) == (b["n"], b["raw_accuracy"], b["tie_rate"])
    assert [(r["id"], r["credit"]) for r in _preds(run)] == [(r["id"], r["credit"]) for r in _preds(out)]
    assert (moved / "btpo.json").read_text() == before        # an as-is eval does not write into the model


def test_wrong_head_and_missing_options_are_one_line_errors(tmp_path: Path, synthetic_data: Path,
                                                             trained_judge) -> None:
    p = run_btpo("eval", "--model", "tiny-qwen2", "--method", "bt", "--data", str(synthetic_data),
                 "--out", str(tmp_path / "x"), check=False, env=ONE_THREAD)
    assert p.returncode == 1 and "no reward head" in p.stderr and "Traceback" not in p.stderr
    p = run_btpo("eval", "--model", "tiny-qwen2", "--data", str(synthetic_data), check=False)
    assert p.returncode == 1 and "--method is required" in p.stderr
    p = run_btpo("eval", "--model", str(trained_judge("bt")), "--method", "btpo", "--data", str(synthetic_data),
                 check=False)
    assert p.returncode == 1 and "trained as a bt judge" in p.stderr
    p = run_btpo("eval", "--model", "tiny-qwen2", "--method", "btpo", check=False)
    assert p.returncode == 1 and "--data is required" in p.stderr
    p = run_btpo("eval", "--checkpoint", str(trained_judge("bt")), "--method", "bt", check=False)
    assert p.returncode == 2 and "only with --model" in p.stderr
    p = run_btpo("eval", "--model", "tiny-qwen2", "--method", "btpo", "--data", str(synthetic_data),
                 "--out", str(trained_judge("bt")), check=False)
    assert p.returncode == 1 and "holds a trained run" in p.stderr
