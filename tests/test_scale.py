"""Sharded training and evaluation on CPU (gloo): 2 processes under FSDP2 equal 1 process.

Launched exactly as a user would, with the shipped ``recipes/accelerate/fsdp2.yaml`` and
``--num_processes 2`` (accelerate runs FSDP only on accelerators; btpo takes its FSDP2 path over
gloo on a CPU-only machine: ``sharding.make_fsdp_on_cpu``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_BT, run_btpo

BTPO_SMALL = ["--set", "rollout.batch_size=4", "--set", "train.batch_size=2", "--set", "train.micro_batch_size=1",
              "--set", "rollout.n=2", "--set", "rollout.max_new_tokens=8", "--set", "data.max_length=128",
              "--set", "optim.lr=1e-3", "--set", "optim.warmup_ratio=0", "--set", "btpo.beta=0.05"]


def launch(*args: str, config: str | None = "fsdp2", env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch [--config_file recipes/accelerate/<config>.yaml] --num_processes 2 -m btpo_cli …``."""
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", COLUMNS="200", **(env or {}))
    cfg = ["--config_file", str(REPO / "recipes" / "accelerate" / f"{config}.yaml")] if config else ["--multi_gpu"]
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *cfg, "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "btpo_cli", *args], capture_output=True, text=True, env=e, cwd=REPO, timeout=900)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def rows(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x]


def weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "final" / "model.safetensors"))


def assert_same_run(one: Path, two: Path, steps: int, keys: tuple[str, ...]) -> None:
    r1, r2 = rows(one), rows(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == list(range(1, steps + 1))
    for a, b in zip(r1, r2, strict=True):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5, (a["step"], a["train/loss"], b["train/loss"])
        for key in keys:
            assert (key in a) == (key in b), (key, a["step"])
            if key not in a:
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (key, a["step"])
    w1, w2 = weights(one), weights(two)
    assert sorted(w1) == sorted(w2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_fsdp2_bt_two_processes_equal_one_and_resume(tmp_path: Path, synthetic_data: Path) -> None:
    """bt: 1 process vs 2 FSDP2 processes killed after step 3 and resumed from the sharded checkpoint."""
    common = ["train", "--method", "bt", "--data", str(synthetic_data), "--max-steps", "4",
              "--set", "train.save_every=2", *TINY_BT]
    one, two = tmp_path / "one", tmp_path / "two"
    run_btpo(*common, "--out", str(one))
    p = launch(*common, "--out", str(two), env={"BTPO_FAULT_AT_STEP": "3"}, check=False)
    assert p.returncode != 0 and not (two / "final").exists()
    launch(*common, "--out", str(two), "--resume")
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    assert (two / "checkpoints").exists() and any((two / "checkpoints").glob("*/pytorch_model_fsdp_0"))
    assert_same_run(one, two, 4, ("train/accuracy", "train/reward_margin", "train/grad_norm"))
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(str(two / "final"))   # plain transformers
    assert m.score.weight.shape[0] == 1


@pytest.mark.slow
def test_fsdp2_btpo_two_processes_equal_one(tmp_path: Path, synthetic_data: Path) -> None:
    """btpo (β > 0: reference model, KL): rollouts through the gathered FSDP2 module, 2 rollouts × 2 steps."""
    common = ["train", "--method", "btpo", "--data", str(synthetic_data), "--max-steps", "4", *BTPO_SMALL]
    one, two = tmp_path / "one", tmp_path / "two"
    run_btpo(*common, "--out", str(one))
    launch(*common, "--out", str(two))
    assert_same_run(one, two, 4, ("btpo/kl", "btpo/omega_mean", "btpo/thought_len", "train/grad_norm"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(two / "final"))


@pytest.mark.slow
def test_two_process_eval_equals_one(tmp_path: Path, synthetic_data: Path) -> None:
    """`accelerate launch … -m btpo_cli eval` writes the same JSON and predictions as one process,
    for a pointwise (bt) and a pairwise (gram) method."""
    for method in ("bt", "gram"):
        run = tmp_path / method
        run_btpo("train", "--method", method, "--data", str(synthetic_data), "--max-steps", "2", *TINY_BT,
                 "--set", "eval.batch_size=5", "--out", str(run))
        run_btpo("eval", "--checkpoint", str(run), "--limit", "23")
        ev = run / "eval"
        one = {f.name: f.read_text() for f in ev.iterdir()}
        for f in ev.iterdir():
            f.unlink()
        launch("eval", "--checkpoint", str(run), "--limit", "23", config=None)
        two = {f.name: f.read_text() for f in ev.iterdir()}
        assert sorted(one) == sorted(two)
        assert json.loads(one["synthetic.json"])["n"] == 23
        for name in one:
            assert one[name] == two[name], (method, name)
