"""train.packing under FSDP2 on 2 CPU processes equals the padded path on 1 process (BT), and the
judge evaluated from the packed run records and uses its packing (helpers of test_scale.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_BT, run_btpo
from tests.invariants.test_scale import assert_same_run, launch


@pytest.mark.slow
def test_fsdp2_packed_two_processes_equal_padded_one(tmp_path: Path, synthetic_data: Path) -> None:
    common = ["train", "--method", "bt", "--data", str(synthetic_data), "--max-steps", "2", *TINY_BT,
              "--set", "data.max_length=256"]
    one, two = tmp_path / "padded", tmp_path / "packed"
    run_btpo(*common, "--out", str(one))
    launch(*common, "--set", "train.packing=on", "--out", str(two))
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    assert_same_run(one, two, 2, ("train/accuracy", "train/reward_margin", "train/grad_norm"), 8 * 2 * 256)
    run_btpo("eval", "--checkpoint", str(two), "--limit", "8", "--batch-size", "4")
    packed = json.loads((two / "eval" / "synthetic.json").read_text())
    assert packed["eval_settings"]["packing"] == "on"
    run_btpo("eval", "--checkpoint", str(two), "--limit", "8", "--batch-size", "4", "--packing", "off")
    padded = json.loads((two / "eval" / "synthetic.json").read_text())
    assert "packing" not in padded["eval_settings"]
    assert padded["accuracy"] == packed["accuracy"]
