"""Every table-printing command, with stdout a pipe (no terminal, no COLUMNS): the whole output, parsed."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, run_btpo
from tests.test_compare import fake_run

PIPE = {"COLUMNS": ""}      # no width given: a plain pipe


def tsv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


def test_models_in_a_pipe() -> None:
    table = run_btpo("models", env=PIPE).stdout
    row = [ln for ln in table.splitlines() if "smollm2-135m " in ln]
    assert row and "HuggingFaceTB/SmolLM2-135M-Instruct" in row[0]     # the whole row, on one line
    js = json.loads(run_btpo("models", "--format", "json", env=PIPE).stdout)
    assert {"alias", "hub_id", "source", "offline", "family", "note"} == set(js[0])
    assert any(r["alias"] == "smollm2-135m" for r in js)
    rows = tsv(run_btpo("models", "-f", "tsv", env=PIPE).stdout)
    assert [r["alias"] for r in rows] == [r["alias"] for r in js]
    # the shell's own pipe, as a user types it
    p = subprocess.run(f"{sys.executable} -m btpo_cli models | grep smollm2-135m", shell=True, cwd=REPO,
                       capture_output=True, text=True, env={**_env(), "COLUMNS": ""})
    assert p.returncode == 0 and "SmolLM2-135M-Instruct" in p.stdout


def _env() -> dict[str, str]:
    import os

    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def test_recipes_list_in_a_pipe() -> None:
    table = run_btpo("recipes", "list", env=PIPE).stdout
    assert any("btpo/qwen2.5-7b-hh " in ln and "Qwen2.5-7B" in ln for ln in table.splitlines())
    js = json.loads(run_btpo("recipes", "list", "--format", "json", env=PIPE).stdout)
    assert any(r["name"] == "btpo/qwen2.5-7b-hh" and r["path"].endswith(".yaml") for r in js)
    rows = tsv(run_btpo("recipes", "list", "--method", "bt", "--format", "tsv", env=PIPE).stdout)
    assert rows and all(r["name"].startswith("bt/") for r in rows)
    assert run_btpo("recipes", "list", "--format", "xml", check=False).returncode == 2


def test_plan_in_a_pipe() -> None:
    args = ["plan", "--recipe", "btpo/qwen2.5-7b-hh", "--gpus", "1", "--gpu-memory", "80"]
    js = json.loads(run_btpo(*args, "--format", "json", env=PIPE).stdout)
    rows = {r["component"]: r for r in tsv(run_btpo(*args, "--format", "tsv", env=PIPE).stdout)}
    for strategy, e in js["strategies"].items():
        assert float(rows["peak"][strategy]) == e["peak"]
        assert rows["fits"][strategy] == e["verdict"]
    table = run_btpo(*args, env=PIPE).stdout
    assert max(len(ln) for ln in table.splitlines()) > 80       # whole, not cut to 80 columns
    assert any(ln.startswith("│ peak") or "peak" in ln for ln in table.splitlines())


def test_compare_in_a_pipe(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    fake_run(root, "a-bt", "model-a-with-a-rather-long-backbone-name", "bt", {"hh": 0.6, "math": 0.7})
    fake_run(root, "a-btpo", "model-a-with-a-rather-long-backbone-name", "btpo", {"hh": 0.7, "math": 0.8})
    js = json.loads(run_btpo("compare", str(root), "--format", "json", env=PIPE).stdout)
    rows = tsv(run_btpo("compare", str(root), "--format", "tsv", env=PIPE).stdout)
    assert [(r["model"], r["method"]) for r in rows] == [(r["model"], r["method"]) for r in js["rows"]]
    table = run_btpo("compare", str(root), env=PIPE).stdout
    assert sum("model-a-with-a-rather-long-backbone-name" in ln for ln in table.splitlines()) >= 1


def test_eval_formats_in_a_pipe(trained_judge, synthetic_data: Path) -> None:
    run = trained_judge("bt")
    base = ["eval", "--checkpoint", str(run), "--limit", "4"]
    p = run_btpo(*base, "--format", "json", env={**PIPE, "BTPO_LOG_EVERY": "1"})
    js = json.loads(p.stdout)
    assert re.search(r"^\[btpo\] eval bt on synthetic/test: pair 4/4 \(100%\)", p.stderr, re.M), p.stderr
    assert json.loads(run_btpo(*base, "--json", env=PIPE).stdout)["accuracy"] == js["accuracy"]   # the alias
    (row,) = tsv(run_btpo(*base, "--format", "tsv", env=PIPE).stdout)
    assert row["method"] == "bt" and float(row["accuracy"]) == js["accuracy"] and int(row["n"]) == js["n"]
    assert run_btpo(*base, "--format", "yaml", check=False).returncode == 2
