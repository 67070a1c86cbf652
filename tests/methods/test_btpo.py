"""BTPO end to end on CPU: train, eval (thoughts written), and exact resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import full_and_resumed, run_btpo

SMALL = ["--set", "rollout.batch_size=4", "--set", "train.batch_size=2", "--set", "train.micro_batch_size=1",
         "--set", "rollout.n=2", "--set", "rollout.max_new_tokens=8", "--set", "data.max_length=128",
         "--set", "optim.lr=1e-3", "--set", "optim.warmup_ratio=0"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_and_eval(tmp_path: Path, synthetic_data: Path) -> None:
    run_dir = tmp_path / "btpo"
    run_btpo("train", "--method", "btpo", "--model", "tiny-qwen2", "--data", str(synthetic_data), "--out",
             str(run_dir), "--max-steps", "5", *SMALL)
    rows = [r for r in _rows(run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("btpo/omega_mean", "btpo/score_chosen", "btpo/score_rejected", "btpo/ess_mean", "btpo/clip_fraction",
                "btpo/loss_score", "btpo/loss_thought", "btpo/bt_nll_est"):
        assert key in rows[0], key
    assert 0 < rows[0]["btpo/omega_mean"] < 1 and 1 <= rows[0]["btpo/ess_mean"] <= 2
    assert "btpo/thought_len" in rows[0] and "perf/gen_tokens_per_s" in rows[0]
    # rollouts of 4 pairs with minibatches of 2 → a new rollout every 2 steps
    assert [r["train/rollout"] for r in rows] == [1, 1, 2, 2, 3]

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    run_btpo("eval", "--checkpoint", str(run_dir), "--max-new-tokens", "8", "--eval-samples", "2")
    summary = json.loads((run_dir / "eval" / "synthetic.json").read_text())
    assert summary["method"] == "btpo" and summary["n"] == 24 and summary["sampled"]["samples"] == 2
    thoughts = [json.loads(x) for x in (run_dir / "eval" / "synthetic.thoughts.jsonl").read_text().splitlines()]
    assert len(thoughts) == 24 and {"thought_chosen", "p_yes_chosen", "thought_rejected"} <= set(thoughts[0])


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path: Path, synthetic_data: Path) -> None:
    args = ["train", "--method", "btpo", "--data", str(synthetic_data), "--max-steps", "6",
            "--set", "train.save_every=2", *SMALL]
    full, killed = full_and_resumed(args, tmp_path, 3)

    def losses(d: Path) -> list[float]:
        return [r["train/loss"] for r in _rows(d) if "train/loss" in r]

    assert losses(killed) == losses(full)   # same sampled thoughts (RNG restored) and same updates
