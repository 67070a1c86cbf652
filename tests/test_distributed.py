"""Two CPU processes under `accelerate launch` equal one process with the same global batch.

accelerate's ``--cpu`` launcher starts a single process unless MPI is set up; its torchrun-based
launcher (``--multi_gpu``) starts two, and btpo forms a gloo group on a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_BT, run_btpo


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path, synthetic_data: Path) -> None:
    common = ["train", "--method", "bt", "--data", str(synthetic_data), "--max-steps", "4", *TINY_BT]
    one = tmp_path / "one"
    run_btpo(*common, "--out", str(one))
    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "btpo_cli", *common, "--out", str(two)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((two / "env.json").read_text())["world_size"] == 2

    def rows(d: Path) -> list[dict]:
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x]

    r1, r2 = rows(one), rows(two)
    assert len(r1) == len(r2) == 4
    for a, b in zip(r1, r2, strict=True):
        for key in ("train/loss", "train/accuracy", "train/reward_margin", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a["step"])
