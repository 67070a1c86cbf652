"""Shared fixtures: one tiny-model cache and one small synthetic dataset per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _btpo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build tiny models once per session into a private cache (never ~/.cache)."""
    root = Path(os.environ.get("BTPO_TEST_CACHE") or tmp_path_factory.mktemp("btpo_cache"))
    os.environ["BTPO_CACHE"] = str(root)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return root


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_builders.synthetic import build_synthetic

    d = tmp_path_factory.mktemp("data") / "synthetic"
    build_synthetic(d, n_train=96, n_test=24, seed=0)
    return d


def run_btpo(*args: str, env: dict[str, str] | None = None, check: bool = True,
             cwd: Path | None = None, timeout: float | None = 600) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter, as a user would (``timeout=None``: CI's own limit applies)."""
    e = dict(os.environ)
    e.update(env or {})
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["COLUMNS"] = "200"
    p = subprocess.run([sys.executable, "-m", "btpo_cli", *args], capture_output=True, text=True, env=e,
                       cwd=cwd or REPO, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"btpo {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


TINY_BT = ["--set", "train.batch_size=8", "--set", "train.micro_batch_size=4", "--set", "optim.lr=1e-3",
           "--set", "optim.warmup_ratio=0"]
