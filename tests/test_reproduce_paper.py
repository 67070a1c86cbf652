"""scripts/reproduce_paper.sh: the dry run lists the whole pipeline; --quick runs it end to end on the CPU,
and a run killed mid-way finishes when started again without redoing finished steps."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
    # --gpus 8: btpo's launcher (the recipe's strategy, 8 processes), not a bare accelerate launch (plain DDP)
    assert "btpo_cli train --method btpo --recipe recipes/btpo/llama3.1-8b-hh.yaml" in gpus.stdout
    assert all(ln.rstrip().endswith("--gpus 8") for ln in gpus.stdout.splitlines() if " train " in ln)
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


def test_dry_run_gpus_8_every_train_line_launches_its_recipes_strategy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """All 18 train lines of the 7B pipeline, each resolved by `btpo train … --dry-run` (the launcher's own
    code path): accelerate launch with recipes/accelerate/<the recipe's hardware.strategy>.yaml, 8 processes."""
    from btpo_cli.cli import main

    p = reproduce("--dry-run", "--backbone", "qwen2.5-7b", "--gpus", "8", "--out", str(tmp_path / "paper"))
    assert p.returncode == 0, p.stderr
    trains = [shlex.split(ln) for ln in p.stdout.splitlines() if " train " in ln]
    assert len(trains) == 18
    seen = set()
    for argv in trains:
        args = argv[argv.index("train"):]
        assert args[-2:] == ["--gpus", "8"]
        recipe = args[args.index("--recipe") + 1]
        strategy = yaml.safe_load((REPO / recipe).read_text())["hardware"]["strategy"]
        monkeypatch.setattr(sys, "argv", ["btpo", *args, "--dry-run"])
        with pytest.raises(SystemExit) as e:
            main(["train", *args[1:], "--dry-run"])
        assert e.value.code == 0
        launch = shlex.split(capsys.readouterr().out.strip())
        assert launch[launch.index("--config_file") + 1] == str(REPO / "recipes" / "accelerate" / f"{strategy}.yaml")
        assert launch[launch.index("--num_processes") + 1] == "8"
        assert launch[launch.index("btpo_cli"):] == ["btpo_cli", *args[:-2]]      # the same line, once per process
        seen.add(strategy)
    assert seen >= {"fsdp2"}, seen          # the 7B recipes do not fit plain DDP (btpo plan)


def test_quick_gpus_2_trains_in_two_processes_with_a_column_per_dataset(tmp_path: Path) -> None:
    out = tmp_path / "paper"
    p = reproduce("--quick", "--gpus", "2", "--methods", "bt", "--datasets", "hh if", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    for ds in ("hh", "if"):
        launch = json.loads((out / "runs" / f"bt-tiny-qwen2-{ds}" / "env.json").read_text())["launch"]
        assert (launch["world_size"], launch["strategy"], launch["recipe_strategy"]) == (2, "ddp", "ddp"), launch
    table = json.loads((out / "results.json").read_text())
    assert table["datasets"] == ["hh", "if"]                          # two columns, not one "synthetic"
    (row,) = table["rows"]
    assert sorted(row["cells"]) == ["hh", "if"] and all(c["n_runs"] == 1 for c in row["cells"].values())
    assert [x["world_size"] for x in row["launch"]] == [2, 2]                # per run of the row
