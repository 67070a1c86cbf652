"""scripts/reproduce_paper.sh: the dry run lists the whole pipeline; --quick runs it end to end on the CPU,
and a run killed mid-way finishes when started again without redoing finished steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import DIST_ENV, REPO

SCRIPT = REPO / "scripts" / "reproduce_paper.sh"
METHODS = ("bt", "bt-prefilled", "gram", "grpo-pair", "grpo-point", "btpo")


def reproduce(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    e.update({"BTPO": f"{sys.executable} -m btpo_cli", "OMP_NUM_THREADS": "1",
              "PYTHONPATH": str(REPO) + os.pathsep + e.get("PYTHONPATH", "")})
    e.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=e, cwd=REPO,
                          timeout=900)


def test_dry_run_lists_every_step_in_order(tmp_path: Path) -> None:
    p = reproduce("--dry-run", "--backbone", "qwen2.5-7b", "--out", str(tmp_path / "paper"))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert not (tmp_path / "paper").exists()                       # a dry run writes nothing
    for ds in ("hh", "if", "math"):
        assert any(f"build-data {ds} --out" in ln for ln in lines), ds
        for m in METHODS:
            assert any(f"--method {m} --recipe recipes/{m}/qwen2.5-7b-{ds}.yaml" in ln for ln in lines), (m, ds)
    assert "compare" in lines[-1]
    first_train = next(i for i, ln in enumerate(lines) if " train " in ln)
    assert all("build-data" in ln for ln in lines[:first_train]) and first_train == 3
    assert sum(" eval --checkpoint " in ln for ln in lines) == 18
    gpus = reproduce("--dry-run", "--backbone", "llama3.1-8b", "--gpus", "8", "--methods", "btpo", "--datasets", "hh")
    assert "accelerate launch --num_processes 8 -m btpo_cli train --method btpo --recipe recipes/btpo/llama3.1-8b-hh.yaml" in gpus.stdout
    assert reproduce("--dry-run", "--backbone", "gpt-2").returncode == 2


def test_quick_killed_then_rerun_finishes_without_redoing(tmp_path: Path) -> None:
    out = tmp_path / "paper"
    killed = reproduce("--quick", "--out", str(out), env={"BTPO_FAULT_AT_STEP": "1"})   # every train dies at step 1
    assert killed.returncode == 17
    log = out / "logs" / "train-bt-hh.log"
    assert f"step train-bt-hh failed (exit 17): see {log}" in killed.stderr and log.exists()

    again = reproduce("--quick", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "build-data-hh: done, skipped" in again.stderr
    assert "train-bt-hh: stopped at step 1, resuming" in again.stderr
    assert (out / "logs" / "train-bt-hh-resume.log").exists() and "[reproduce] train-btpo-hh:" in again.stderr
    table = json.loads((out / "results.json").read_text())
    assert sorted(r["method"] for r in table["rows"]) == ["bt", "btpo"]
    assert "| tiny-qwen2 | bt" in (out / "results.md").read_text()
    assert "tiny-qwen2" in again.stdout                               # the table (or its markdown) on stdout

    done = reproduce("--quick", "--out", str(out))                    # everything finished: nothing redone
    assert done.returncode == 0, done.stderr
    for s in ("build-data-hh", "train-bt-hh", "eval-bt-hh", "train-btpo-hh", "eval-btpo-hh"):
        assert f"{s}: done, skipped" in done.stderr, (s, done.stderr)
    ran = [ln for ln in done.stderr.splitlines()
           if ln.startswith(("[reproduce] train-", "[reproduce] eval-", "[reproduce] build-data-"))
           and not ln.endswith(": done, skipped")]
    assert ran == [], ran
