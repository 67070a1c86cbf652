"""``btpo status``: finished / stopped / running / broken, as JSON and as exit codes 0 / 3 / 4 / 5."""

from __future__ import annotations

import json
from pathlib import Path

from btpo_cli.runs.lock import RunLock
from tests.conftest import ONE_THREAD, TINY_BT, run_btpo


def status(run: Path) -> tuple[int, dict]:
    p = run_btpo("status", str(run), "--format", "json", check=False)
    return p.returncode, json.loads(p.stdout)


def test_status_states_and_exit_codes(trained_judge, synthetic_data: Path, tmp_path: Path) -> None:
    done = trained_judge("bt")
    run_btpo("eval", "--checkpoint", str(done), "--limit", "4", env=ONE_THREAD)
    rc, js = status(done)
    assert rc == 0 and js["state"] == "finished" and js["method"] == "bt" and js["exit_code"] == 0
    assert js["evals"]["synthetic"]["n"] == 4 and 0 <= js["evals"]["synthetic"]["accuracy"] <= 1
    assert status(done / "final")[1]["state"] == "finished"

    stopped = tmp_path / "stopped"
    p = run_btpo("train", "--method", "bt", "--model", "tiny-qwen2", "--data", str(synthetic_data), "--out",
                 str(stopped), "--max-steps", "3", "--set", "train.save_every=1", *TINY_BT,
                 env={**ONE_THREAD, "BTPO_FAULT_AT_STEP": "2"}, check=False)
    assert p.returncode == 17
    rc, js = status(stopped)
    assert rc == 3 and js["state"] == "stopped" and js["step"] == 2 and js["checkpoint"].endswith("step-00000002")
    lock = RunLock(stopped)
    lock.acquire()
    try:
        rc, js = status(stopped)
        assert rc == 4 and js["state"] == "running" and js["holder"]["pid"] > 0
    finally:
        lock.release()
    assert status(stopped)[0] == 3

    broken = tmp_path / "broken"
    broken.mkdir()
    assert status(broken) == (5, status(broken)[1]) and status(broken)[1]["state"] == "broken"
    (broken / "config.yaml").write_text("- [unclosed\n")
    rc, js = status(broken)
    assert rc == 5 and "unreadable" in js["reason"]
    p = run_btpo("status", str(tmp_path / "missing"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert run_btpo("status", str(done), "--format", "yaml", check=False).returncode == 2
    row = run_btpo("status", str(done), "--format", "tsv", env={"COLUMNS": ""}).stdout.splitlines()
    assert row[0].split("\t")[:2] == ["run", "state"] and row[1].split("\t")[1] == "finished"


def test_help_documents_exit_codes_and_checkpoint_flag() -> None:
    h = run_btpo("--help").stdout
    for text in ("Exit codes", "0 done", "2 bad usage", "130 interrupted", "3 stopped", "--verbose"):
        assert text in h, text
    for cmd in ("score", "serve"):
        assert "--checkpoint" in run_btpo(cmd, "--help").stdout
