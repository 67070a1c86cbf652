"""BT training: the logged loss equals the loss computed by hand; kill + resume equals uninterrupted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_BT, full_and_resumed, run_btpo


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_first_step_loss_by_hand(tmp_path: Path, synthetic_data: Path) -> None:
    """The step-1 loss equals −log σ(r_w − r_l) averaged over the step-1 batch, from the initial weights."""
    from accelerate.utils import set_seed

    from btpo_cli.config import build_config
    from btpo_cli.data.pairs import read_pairs
    from btpo_cli.methods.bt import encode_pairs
    from btpo_cli.models.loading import load_reward_model, load_tokenizer
    from btpo_cli.training.steps import BatchPlan

    run_dir = tmp_path / "r"
    run_btpo("train", "--method", "bt", "--data", str(synthetic_data), "--out", str(run_dir), "--max-steps", "1",
             *TINY_BT)
    cfg = build_config(None, [s for s in TINY_BT if s != "--set"], {"data.path": str(synthetic_data)})
    set_seed(cfg.train.seed)   # the training run seeds before creating the head
    tok = load_tokenizer("tiny-qwen2")
    recs, _ = read_pairs(synthetic_data)
    pairs, _ = encode_pairs(tok, recs, cfg.data.max_length)
    model = load_reward_model(cfg.model, tok.pad_token_id).eval()
    idx = BatchPlan.from_config(len(pairs), cfg, 1).global_batch(1)
    by_hand = []
    with torch.no_grad():
        for i in idx:
            rw = model(input_ids=torch.tensor([pairs[i].chosen])).logits.item()
            rl = model(input_ids=torch.tensor([pairs[i].rejected])).logits.item()
            by_hand.append(math.log1p(math.exp(-(rw - rl))))
    assert _losses(run_dir)[1] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path: Path, synthetic_data: Path) -> None:
    args = ["train", "--method", "bt", "--data", str(synthetic_data), "--max-steps", "7",
            "--set", "train.save_every=2", *TINY_BT]
    # killed right after step 5 (last checkpoint: step 4), then resumed
    full, killed = full_and_resumed(args, tmp_path, 5)
    ref = _losses(full)
    assert len(ref) == 7
    assert _losses(killed) == ref          # exact: same data order, optimizer, scheduler and RNG state

    # killed in the middle of writing the step-4 checkpoint: resume from step 2's
    mid = tmp_path / "mid"
    p = run_btpo(*args, "--out", str(mid), env={"BTPO_FAULT_IN_SAVE": "4"}, check=False)
    assert p.returncode == 17
    assert [c.name for c in (mid / "checkpoints").iterdir() if not c.name.startswith(".")] == ["step-00000002"]
    run_btpo("train", "--out", str(mid), "--resume")
    assert _losses(mid) == ref

    a = (full / "final" / "model.safetensors").read_bytes()
    assert a == (killed / "final" / "model.safetensors").read_bytes()
