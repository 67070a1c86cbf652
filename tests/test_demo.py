"""Integration: the built-in benchmark, end to end, on a small budget.

Builds the synthetic reasoning-judge set, pre-trains (or reuses) tiny-thinker, evaluates the
untrained base GPM, trains BTPO from it and evaluates again. Fails if BTPO does not raise test
accuracy clearly above the untrained base model — a sign error, a wrong mask or a broken
weight shows up here as a number that does not move.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_btpo


@pytest.mark.slow
def test_demo_quick_btpo_beats_base(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    p = run_btpo("demo", "--quick", "--methods", "btpo", "--out", str(out), env={"OMP_NUM_THREADS": "2"})
    base = json.loads((out / "runs" / "base-s0" / "eval" / "synthetic.json").read_text())
    btpo = json.loads((out / "runs" / "btpo-s0" / "eval" / "synthetic.json").read_text())
    assert base["n"] == btpo["n"] == 100
    assert btpo["raw_accuracy"] >= base["raw_accuracy"] + 0.10, (base["raw_accuracy"], btpo["raw_accuracy"])
    assert (out / "compare.png").stat().st_size > 10_000
    assert "btpo" in p.stdout and "(base)" in p.stdout
