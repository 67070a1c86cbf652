"""Third-party noise stays out of a run's output unless --verbose: a tied-embedding save (tiny-qwen2
ties lm_head to the embeddings) prints no accelerate "Removed shared tensor" line."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import ONE_THREAD, run_btpo

GRAM_1 = ["--method", "gram", "--model", "tiny-qwen2", "--max-steps", "1", "--set", "train.batch_size=4",
          "--set", "train.micro_batch_size=2", "--set", "data.max_length=256"]


def test_tied_save_is_quiet_unless_verbose(synthetic_data: Path, tmp_path: Path) -> None:
    p = run_btpo("train", *GRAM_1, "--data", str(synthetic_data), "--out", str(tmp_path / "quiet"), env=ONE_THREAD)
    assert "Removed shared tensor" not in p.stderr and "Traceback" not in p.stderr
    assert "Warning" not in p.stderr, p.stderr
    loud = run_btpo("--verbose", "train", *GRAM_1, "--data", str(synthetic_data), "--out", str(tmp_path / "loud"),
                    env=ONE_THREAD)
    assert "Removed shared tensor" in loud.stderr           # the message is there to hide: the test is not vacuous
