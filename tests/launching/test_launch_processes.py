"""Several CPU processes (gloo), launched as a user would: the start-up check refuses a DDP launch of an
fsdp2 recipe that does not fit (and --force goes on); SIGTERM / SIGUSR1 stop every rank at a step
boundary with a checkpoint, and the resumed run ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import DIST_ENV, ONE_THREAD, REPO, TINY_BT, run_btpo

BT = ["train", "--method", "bt", "--model", "tiny-qwen2", *TINY_BT]


def by_hand(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m btpo_cli …``: plain DDP, as typed by hand."""
    e = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    e.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")])), "COLUMNS": "200",
              **ONE_THREAD, **env})
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "btpo_cli", *args], capture_output=True, text=True, env=e, cwd=REPO, timeout=600)


def test_ddp_launch_of_an_fsdp2_recipe_that_does_not_fit_is_refused_before_step_1(
        tmp_path: Path, synthetic_data: Path) -> None:
    out = tmp_path / "run"
    args = [*BT, "--data", str(synthetic_data), "--out", str(out), "--max-steps", "1",
            "--set", "hardware.strategy=fsdp2", "--set", "hardware.gpus=2"]
    p = by_hand(*args, env={"BTPO_MEMORY_GIB": "0.001"})
    assert p.returncode == 1, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if "launched as ddp on 2 process(es)" in ln]
    assert len(errors) == 1, p.stderr[-3000:]                       # one line, from rank 0 only
    for part in ("the recipe says fsdp2", "btpo train --gpus 2", "--set hardware.strategy=", "--force"):
        assert part in errors[0], part
    assert not out.exists()                                         # refused before the run folder

    ok = by_hand(*args, "--force", env={"BTPO_MEMORY_GIB": "0.001"})
    assert ok.returncode == 0, ok.stderr[-3000:]
    launch = json.loads((out / "env.json").read_text())["launch"]
    assert (launch["strategy"], launch["world_size"], launch["recipe_strategy"], launch["forced"]) == \
        ("ddp", 2, "fsdp2", True)
    assert json.loads((out / "final" / "btpo.json").read_text())["launch"]["world_size"] == 2


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_sigterm_to_the_launcher_stops_both_ranks_with_a_checkpoint_and_resume_is_exact(
        tmp_path: Path, synthetic_data: Path) -> None:
    args = [*BT, "--data", str(synthetic_data), "--max-steps", "4", "--gpus", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_btpo(*args, "--out", str(full), env=ONE_THREAD)
    # the main rank signals the launcher after step 2, as Slurm would; the launcher forwards it to both ranks
    p = run_btpo(*args, "--out", str(cut), env={**ONE_THREAD, "BTPO_SIGNAL_AT_STEP": "2:TERM"}, check=False)
    assert p.returncode == 75, p.stderr[-3000:]
    stopped = [ln for ln in p.stderr.splitlines() if "stopped by SIGTERM at step" in ln]
    assert len(stopped) == 1 and f"continue with: btpo train --out {cut} --resume" in stopped[0], p.stderr[-2000:]
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert 2 <= step < 4
    assert (cut / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").exists()
    assert not (cut / "final").exists() and not (cut / ".lock").exists()     # lock released
    env = json.loads((cut / "env.json").read_text())
    assert (env["launch"]["strategy"], env["launch"]["world_size"]) == ("ddp", 2)

    run_btpo("train", "--out", str(cut), "--resume", "--gpus", "2", env=ONE_THREAD)
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"


def test_sigusr1_stops_a_single_process_at_the_next_step_with_a_checkpoint(tmp_path: Path, synthetic_data: Path) -> None:
    out = tmp_path / "run"
    p = run_btpo(*BT, "--data", str(synthetic_data), "--max-steps", "3", "--out", str(out),
                 env={**ONE_THREAD, "BTPO_SIGNAL_AT_STEP": "1:USR1"}, check=False)
    assert p.returncode == 75, p.stderr[-3000:]
    assert "stopped by SIGUSR1 at step 1: checkpoint written; continue with: btpo train --out" in p.stderr
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step-00000001"] and not (out / ".lock").exists()
    run_btpo("train", "--out", str(out), "--resume", env=ONE_THREAD)
    assert json.loads((out / "final" / "btpo.json").read_text())["launch"]["strategy"] == "single"
