"""Fault injection: a tiny BTPO run killed with SIGKILL at 10 random (seeded) moments, resumed after each,
ends with weights identical to an uninterrupted run's.

A moment is drawn (seeded) as a step ``k`` between the latest checkpoint and the last step, and a
delay ``d`` uniform in [0, one step's time of the uninterrupted run]: the process is killed ``d``
seconds after it logs step ``k`` (after it takes the folder's lock when ``k`` is the checkpoint it
resumed from). Anchored on progress rather than on wall time alone (this machine's speed varies
with its load), the kills fall anywhere: model loading, rollouts, updates, checkpoint writes (right
after a step is logged), the final save. Each launch resumes from the latest complete checkpoint
(one per optimizer step here).

Bitwise, not within a tolerance: every launch is one process with the same ``OMP_NUM_THREADS``, so
the resumed run takes every float32 sum in the uninterrupted run's order (tests/invariants/tolerances.py:
the reduce-order bound of two identical orders is 0)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SMALL = ["--set", "btpo.rollout_batch_size=2", "--set", "train.batch_size=2", "--set", "train.micro_batch_size=1",
         "--set", "btpo.k=2", "--set", "btpo.max_thought_tokens=6", "--set", "data.max_length=96",
         "--set", "optim.lr=1e-3", "--set", "optim.warmup_ratio=0", "--set", "train.save_every=1"]
STEPS = 6
KILLS = 10


def _launch(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "btpo_cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _locked_by(run: Path, proc: subprocess.Popen) -> bool:
    try:
        return json.loads((run / ".lock").read_text()).get("pid") == proc.pid
    except (OSError, json.JSONDecodeError):
        return False


def _wait_lock(run: Path, proc: subprocess.Popen) -> float:
    while not _locked_by(run, proc):
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before taking the lock: {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    return time.monotonic()


def _logged(run: Path, step: int) -> bool:
    try:
        return any(json.loads(x).get("step") == step for x in (run / "metrics.jsonl").read_text().splitlines()
                   if x.strip().endswith("}"))
    except (OSError, json.JSONDecodeError):
        return False


def _done_steps(run: Path) -> int:
    ckpts = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")] \
        if (run / "checkpoints").exists() else []
    return max(ckpts, default=0)


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path: Path, synthetic_data: Path) -> None:
    args = ["train", "--method", "btpo", "--model", "tiny-qwen2", "--data", str(synthetic_data),
            "--max-steps", str(STEPS), *SMALL]
    full = tmp_path / "full"
    proc = _launch([*args, "--out", str(full)])
    t_lock = _wait_lock(full, proc)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()
    duration = time.monotonic() - t_lock          # lock → exit of an uninterrupted run

    rng = random.Random(20240613)
    step_s = duration / STEPS
    run = tmp_path / "killed"
    moments: list[tuple[int, int, float]] = []     # (resumed from, killed d s after step k: k, d)
    launches = 0
    while len(moments) < KILLS:
        launches += 1
        assert launches <= 3 * KILLS, f"only {len(moments)} kills landed in {launches - 1} launches"
        done = _done_steps(run)
        k, d = rng.randint(done, STEPS), rng.uniform(0, step_s)
        proc = _launch([*args, "--out", str(run), "--resume"])   # --resume starts it when nothing is there yet
        _wait_lock(run, proc)
        while k > done and not _logged(run, k) and proc.poll() is None:
            time.sleep(0.01)
        t0 = time.monotonic()
        while time.monotonic() - t0 < d and proc.poll() is None:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            moments.append((done, k, round(d, 2)))
        else:
            assert proc.returncode == 0, proc.stderr.read()
    proc = _launch([*args, "--out", str(run), "--resume"])
    assert proc.wait(timeout=900) == 0, proc.stderr.read()
    print(f"\nuninterrupted: {duration:.1f}s after the lock; {launches} launches; kills "
          f"(resumed from step, killed after step k, delay s): {moments}")

    assert (run / "final" / "model.safetensors").read_bytes() == (full / "final" / "model.safetensors").read_bytes()
    assert _losses(run) == _losses(full)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
