"""``btpo eval``'s thought budget follows training unless set, and the eval says when thoughts were cut
or the judge hardly answered Yes/No (``warnings``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ONE_THREAD, run_btpo


def _summary(run_dir: Path, dataset: str = "synthetic") -> dict:
    return json.loads((run_dir / "eval" / f"{dataset}.json").read_text())


@pytest.mark.slow
def test_eval_budget_follows_training_and_the_flag_overrides(tmp_path: Path, synthetic_data: Path) -> None:
    run = tmp_path / "btpo32"
    run_btpo("train", "--method", "btpo", "--model", "tiny-qwen2", "--data", str(synthetic_data), "--out", str(run),
             "--max-steps", "1", "--set", "rollout.max_new_tokens=32", "--set", "rollout.batch_size=2",
             "--set", "train.batch_size=2", "--set", "train.micro_batch_size=1", "--set", "rollout.n=2",
             "--set", "data.max_length=128", env=ONE_THREAD)
    assert yaml.safe_load((run / "config.yaml").read_text())["eval"]["max_new_tokens"] is None   # "follow training"
    settings = json.loads((run / "final" / "btpo.json").read_text())["settings"]
    assert settings["eval"]["max_new_tokens"] is None and settings["rollout"]["max_new_tokens"] == 32

    run_btpo("eval", "--checkpoint", str(run), "--limit", "2", "--device", "cpu", env=ONE_THREAD)
    s = _summary(run)
    assert s["eval_settings"]["thought_budget"] == 32 and s["eval_settings"]["thought_budget_from"] == "training"
    assert s["eval_config"]["max_new_tokens"] == 32
    assert 0 < s["thoughts"]["thought_tokens_mean"] <= 32

    run_btpo("eval", "--checkpoint", str(run), "--limit", "2", "--device", "cpu", "--max-new-tokens", "8",
             env=ONE_THREAD)
    s = _summary(run)
    assert s["eval_settings"]["thought_budget"] == 8 and s["eval_settings"]["thought_budget_from"] == "flag"
    assert 0 < s["thoughts"]["thought_tokens_mean"] <= 8


def test_an_older_run_keeps_its_explicit_budget() -> None:
    """config.yaml / btpo.json written before the budget followed training hold eval.max_new_tokens: 1000."""
    from btpo_cli.config import config_from_dict, eval_budget, settings_budget
    from btpo_cli.judging.run_eval import _budget_from

    old = config_from_dict({"method": "btpo", "rollout": {"max_new_tokens": 32}, "eval": {"max_new_tokens": 1000}})
    assert eval_budget(old) == 1000 and _budget_from(old, None, trained=True) == "config"
    assert _budget_from(old, 8, trained=True) == "flag"
    new = config_from_dict({"method": "btpo", "rollout": {"max_new_tokens": 32}})
    assert new.eval.max_new_tokens is None and eval_budget(new) == 32
    assert _budget_from(new, None, trained=True) == "training" and _budget_from(new, None, trained=False) == "default"
    assert eval_budget(config_from_dict({"method": "btpo"})) == 1000       # a model as it is: today's budget
    assert settings_budget({"eval": {"batch_size": 16, "max_new_tokens": 1000}}) == 1000      # an old btpo.json
    assert settings_budget({"eval": {"max_new_tokens": None}, "rollout": {"max_new_tokens": 32}}) == 32


def test_eval_warnings_name_the_cut_fraction_and_the_yes_no_mass() -> None:
    from btpo_cli.judging.protocol import CUT_LIMIT, YES_NO_FLOOR, eval_warnings

    fine = {"thoughts": {"thought_cut_fraction": CUT_LIMIT, "yes_no_mass_mean": YES_NO_FLOOR}}
    assert eval_warnings(fine) == []
    bad = {"thoughts": {"thought_cut_fraction": 0.5, "yes_no_mass_mean": 0.0013},
           "eval_settings": {"thought_budget": 32}}
    w = eval_warnings(bad)
    assert len(w) == 2 and w[0].startswith("thought_cut_fraction 0.50") and "32-token budget" in w[0]
    assert w[1].startswith("yes_no_mass 0.0013")
    grpo = {"parse": {"ok": 7, "no_tag": 1, "truncated": 2}}           # GRPO rationales: the parser's count
    assert [x.split()[:2] for x in eval_warnings(grpo)] == [["thought_cut_fraction", "0.20"]]


@pytest.mark.slow
def test_cut_thoughts_and_little_yes_no_mass_are_in_the_table_and_the_json(tmp_path: Path,
                                                                          synthetic_data: Path) -> None:
    out = tmp_path / "btpo-base"
    p = run_btpo("eval", "--model", "tiny-qwen2", "--method", "btpo", "--data", str(synthetic_data), "--out", str(out),
                 "--max-new-tokens", "2", "--limit", "3", "--device", "cpu", env=ONE_THREAD)
    s = _summary(out)
    assert s["thoughts"]["thought_cut_fraction"] > 0.1
    keys = [w.split()[0] for w in s["warnings"]]
    assert "thought_cut_fraction" in keys
    if s["thoughts"]["yes_no_mass_mean"] < 0.5:
        assert "yes_no_mass" in keys
    printed = [ln for ln in p.stderr.splitlines() if ln.startswith("warning: ")]
    assert printed == [f"warning: {w}" for w in s["warnings"]]
