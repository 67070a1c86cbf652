"""Two CPU processes under `accelerate launch` equal one process with the same global batch.

accelerate's ``--cpu`` launcher starts a single process unless MPI is set up; its torchrun-based
launcher (``--multi_gpu``) starts two, and btpo forms a gloo group on a machine without a GPU.
Each launched process runs ``OMP_NUM_THREADS`` threads (1 unless set); the runs agree within the
bounds of tests/invariants/tolerances.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_BT, run_btpo
from tests.invariants.tolerances import assert_rows_close

THREADS = os.environ.get("OMP_NUM_THREADS", "1")


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path, synthetic_data: Path) -> None:
    common = ["train", "--method", "bt", "--data", str(synthetic_data), "--max-steps", "4", *TINY_BT]
    one = tmp_path / "one"
    run_btpo(*common, "--out", str(one))
    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=THREADS)
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "btpo_cli", *common, "--out", str(two)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    env_json = json.loads((two / "env.json").read_text())
    assert env_json["world_size"] == 2 and [s["world_size"] for s in env_json["starts"]] == [2]
    assert not (two / ".lock").exists() and p.stdout.count(f"{two}\n") == 1   # rank 0 alone prints the path

    def rows(d: Path) -> list[dict]:
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x]

    r1, r2 = rows(one), rows(two)
    assert len(r1) == len(r2) == 4
    for key in ("train/loss", "train/accuracy", "train/reward_margin", "train/grad_norm"):
        assert all(key in r for r in r1 + r2), key
    # terms summed: 8 pairs × 2 responses × data.max_length tokens; the grad norm sums every parameter
    tokens = 8 * 2 * 1024
    n_params = sum(w.numel() for w in load_file(str(one / "final" / "model.safetensors")).values())
    worst = assert_rows_close(r1, r2, ("train/accuracy", "train/reward_margin", "train/grad_norm"),
                              {"*": tokens, "train/grad_norm": max(tokens, n_params)})
    print(f"\nrows: largest |Δ| {worst}")


@pytest.mark.slow
def test_two_processes_on_a_busy_folder_both_stop_with_one_message(tmp_path: Path, synthetic_data: Path) -> None:
    """Only rank 0 takes the lock; rank 1 waits for its verdict and stops too, silently (no hang, no race)."""
    from btpo_cli.runs.lock import RunLock

    run = tmp_path / "run"
    held = RunLock(run)
    held.acquire()
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=THREADS)
        p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                            "-m", "btpo_cli", "train", "--method", "bt", "--data", str(synthetic_data),
                            "--max-steps", "2", *TINY_BT, "--out", str(run)],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    finally:
        held.release()
    # (torchrun itself prints a ChildFailedError traceback when a rank exits non-zero: not btpo's)
    assert p.returncode != 0 and 'btpo_cli/' not in p.stderr.split("ChildFailedError")[0]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"in use by another training run: pid {os.getpid()}" in errors[0], p.stderr
    assert not (run / "config.yaml").exists()
