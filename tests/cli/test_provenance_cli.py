"""Issue 30, findings 2 and 3 from the shell: an eval of a model that was resumed since is stale (status, compare),
an eval after the dataset was replaced says so, and build-data never replaces a different dataset by accident."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ONE_THREAD, REPO, TINY_BT, run_btpo

STALE_SEQUENCE = r"""
btpo() { "$PY" -m btpo_cli "$@"; }
btpo build-data synthetic --out data/syn --n-train 48 --n-test 8 --seed 1
btpo train --method bt --model tiny-qwen2 --data data/syn --out runs/bt --max-steps 5 $TINY
btpo eval --checkpoint runs/bt --limit 4 --json > eval1.json
btpo train --out runs/bt --resume --max-steps 7
btpo status runs/bt --format json > status1.json
btpo compare runs/bt --format json > compare1.json 2> compare1.err
btpo compare runs/bt --format json --include-stale > compare2.json
btpo compare runs/bt --format markdown --include-stale > compare2.md
btpo eval --checkpoint runs/bt --limit 4 --json > eval2.json
btpo status runs/bt --format json > status2.json
btpo compare runs/bt --format json > compare3.json
"""


def _shell(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **ONE_THREAD, "PY": sys.executable, "TINY": " ".join(TINY_BT), "COLUMNS": "200",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_compare_after_resume_marks_the_old_eval_stale(tmp_path: Path) -> None:
    _shell(STALE_SEQUENCE, tmp_path)
    ev = _json(tmp_path / "eval1.json")
    prov = ev["provenance"]
    assert set(prov) >= {"model", "data", "eval"}
    assert prov["model"]["which"] == "final" and prov["model"]["step"] == 5
    assert len(prov["model"]["weights_sha256"]) == 64
    assert prov["data"]["split"] == "test" and prov["data"]["path"] == "data/syn"
    assert prov["data"]["sha256"] == _json(tmp_path / "data/syn/manifest.json")["sha256"]["test.jsonl"]
    assert prov["data"]["changed_since_training"] is False
    assert prov["eval"]["batch_size"] == ev["eval_config"]["batch_size"]
    run = tmp_path / "runs/bt"
    env = _json(run / "env.json")
    assert env["data"]["train"]["sha256"] == _json(tmp_path / "data/syn/manifest.json")["sha256"]["train.jsonl"]
    assert len(env["starts"]) == 2 and all(s["data_sha256"]["test"] == prov["data"]["sha256"] for s in env["starts"])
    assert _json(run / "final/btpo.json")["training"]["data_sha256"]["train"] == env["data"]["train"]
    assert _json(run / "final/weights.sha256.json")["step"] == 7

    st = _json(tmp_path / "status1.json")["evals"]["synthetic"]
    assert st["stale"] == "model changed since eval" and "step 5 → 7" in st["stale_detail"]
    c1 = _json(tmp_path / "compare1.json")
    assert c1["rows"] == [] and [(x["dataset"], x["reason"]) for x in c1["stale"]] == [
        ("synthetic", "model changed since eval")]
    assert "stale (left out)" in (tmp_path / "compare1.err").read_text()
    c2 = _json(tmp_path / "compare2.json")
    cell = c2["rows"][0]["cells"]["synthetic"]
    assert c2["include_stale"] is True and cell["stale"] == "model changed since eval"
    assert cell["accuracy"] == round(100 * ev["accuracy"], 2)
    md = (tmp_path / "compare2.md").read_text()
    assert "‡" in next(ln for ln in md.splitlines() if ln.startswith("| tiny-qwen2"))
    assert "‡ = stale" in md

    assert _json(tmp_path / "eval2.json")["provenance"]["model"]["step"] == 7
    assert _json(tmp_path / "status2.json")["evals"]["synthetic"]["stale"] is None
    c3 = _json(tmp_path / "compare3.json")
    assert c3["stale"] == [] and c3["rows"][0]["cells"]["synthetic"]["stale"] is None


def test_eval_after_the_dataset_was_replaced_says_so(tmp_path: Path) -> None:
    data, run = tmp_path / "syn", tmp_path / "bt"
    run_btpo("build-data", "synthetic", "--out", str(data), "--n-train", "32", "--n-test", "6", "--seed", "1")
    run_btpo("train", "--method", "bt", "--model", "tiny-qwen2", "--data", str(data), "--out", str(run),
             "--max-steps", "2", *TINY_BT, env=ONE_THREAD)
    run_btpo("eval", "--checkpoint", str(run), "--limit", "4", env=ONE_THREAD)
    p = run_btpo("build-data", "synthetic", "--out", str(data), "--n-train", "32", "--n-test", "6", "--seed", "2",
                 check=False)
    assert p.returncode == 1 and f"{data} already holds a different dataset (seed 1 → 2)" in p.stderr
    run_btpo("build-data", "synthetic", "--out", str(data), "--n-train", "32", "--n-test", "6", "--seed", "2",
             "--overwrite")
    st = json.loads(run_btpo("status", str(run), "--format", "json").stdout)["evals"]["synthetic"]
    assert st["stale"] == "data changed since eval" and "test.jsonl" in st["stale_detail"]

    p = run_btpo("eval", "--checkpoint", str(run), "--limit", "4", env=ONE_THREAD)
    lines = [ln for ln in p.stderr.splitlines() if "changed since run bt was trained" in ln]
    assert len(lines) == 1 and str(data / "test.jsonl") in lines[0]
    d = _json(run / "eval/synthetic.json")["provenance"]["data"]
    assert d["changed_since_training"] is True and d["trained_sha256"] != d["sha256"]


def test_build_data_refuses_a_different_dataset_and_the_same_command_is_a_no_op(tmp_path: Path) -> None:
    out = tmp_path / "syn3"
    args = ["build-data", "synthetic", "--out", str(out), "--seed", "1", "--n-train", "20", "--n-test", "4"]
    run_btpo(*args)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    p = run_btpo(*args)
    assert "unchanged" in p.stderr and {q.name: q.read_bytes() for q in out.iterdir()} == before
    p = run_btpo("build-data", "synthetic", "--out", str(out), "--seed", "1", check=False)    # the reported case
    assert p.returncode == 1 and "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and str(out) in err[0] and "requested" in err[0] and "--overwrite" in err[0]
    assert {q.name: q.read_bytes() for q in out.iterdir()} == before
    (out / "manifest.json").unlink()                    # a hand-made folder: the files are compared
    p = run_btpo("build-data", "synthetic", "--out", str(out), "--seed", "2", "--n-train", "20", "--n-test", "4",
                 check=False)
    assert p.returncode == 1 and "train.jsonl" in p.stderr and "no manifest.json" in p.stderr
    run_btpo("build-data", "synthetic", "--out", str(out), "--seed", "2", "--n-train", "20", "--n-test", "4",
             "--overwrite")
    assert _json(out / "manifest.json")["seed"] == 2
