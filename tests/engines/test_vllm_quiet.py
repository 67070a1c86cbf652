"""A vLLM run's output is btpo's own: no third-party WARNING lines and no traceback text unless --verbose."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ONE_THREAD, run_btpo

pytestmark = pytest.mark.vllm

ONE_STEP = ["--method", "btpo", "--model", "tiny-qwen2", "--max-steps", "1", "--engine", "vllm",
            "--set", "rollout.batch_size=2", "--set", "train.batch_size=2", "--set", "train.micro_batch_size=1",
            "--set", "rollout.n=2", "--set", "rollout.max_new_tokens=8", "--set", "data.max_length=128"]
EVAL = ["--engine", "vllm", "--max-new-tokens", "8", "--eval-samples", "0", "--limit", "4"]
NOISE = re.compile(r"Traceback|\bWARNING\b|Warning:|Loading safetensors checkpoint shards")


def test_vllm_train_and_eval_are_quiet_unless_verbose(synthetic_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "quiet"
    train = run_btpo("train", *ONE_STEP, "--data", str(synthetic_data), "--out", str(run), env=ONE_THREAD)
    ev = run_btpo("eval", "--checkpoint", str(run), *EVAL, env=ONE_THREAD)
    for p in (train, ev):
        assert not NOISE.search(p.stderr), p.stderr
    loud = run_btpo("--verbose", "train", *ONE_STEP, "--data", str(synthetic_data), "--out", str(tmp_path / "loud"),
                    env=ONE_THREAD)
    assert NOISE.search(loud.stderr), loud.stderr       # there is noise to hide: the test is not vacuous
