"""Empty is an error: a benchmark or split with no usable record exits 1 with one line naming the data and
the reasons, and a previous result (the eval JSON, its predictions, an as-is folder's config.yaml) stays."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ONE_THREAD, REPO, run_btpo

JUDGEBENCH = REPO / "tests" / "data" / "benchmarks" / "judgebench" / \
    "dataset=judgebench,response_model=hand-written.jsonl"


def _previous(out: Path, name: str) -> dict[Path, bytes]:
    """A previous result in ``out`` (as-is folder): its files and their bytes."""
    files = {out / "config.yaml": b"method: btpo\n", out / "eval" / f"{name}.json": b'{"n": 6, "accuracy": 0.75}\n',
             out / "eval" / f"{name}.predictions.jsonl": b'{"id": "jb-0"}\n'}
    for f, data in files.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    return files


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("case", ["empty", "all-skipped"])
def test_benchmark_with_no_usable_record_is_an_error_and_keeps_the_previous_result(case: str, tmp_path: Path) -> None:
    data = tmp_path / f"{case}.jsonl"
    lines = JUDGEBENCH.read_text().splitlines()
    data.write_text("" if case == "empty" else "\n".join(lines[6:8]) + "\n")    # label A=B, an empty response
    out = tmp_path / "btpo-base"
    before = _previous(out, "judgebench")
    p = run_btpo("eval", "--model", "tiny-qwen2", "--method", "btpo", "--benchmark", "judgebench", "--data", str(data),
                 "--out", str(out), "--device", "cpu", check=False, env=ONE_THREAD)
    assert p.returncode == 1
    line = _one_error_line(p.stderr)
    assert line.startswith(f"error: {data}: no usable record")
    if case == "empty":
        assert "0 record(s) read" in line
    else:
        assert "2 skipped" in line and "response_A: empty ×1" in line and "got 'A=B' ×1" in line
    assert {f: f.read_bytes() for f in before} == before
    assert sorted(f.name for f in (out / "eval").iterdir()) == ["judgebench.json", "judgebench.predictions.jsonl"]


@pytest.mark.parametrize("case", ["empty", "all-skipped", "all-too-long"])
def test_split_with_no_usable_record_is_an_error_and_keeps_the_previous_result(case: str, tmp_path: Path,
                                                                              synthetic_data: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((synthetic_data / "train.jsonl").read_text())
    test = {"empty": "", "all-skipped": '{"id": "a", "prompt": "hi", "chosen": "", "rejected": "x"}\n{"x": 1}\n',
            "all-too-long": "\n".join((synthetic_data / "test.jsonl").read_text().splitlines()[:3]) + "\n"}[case]
    (data / "test.jsonl").write_text(test)
    out = tmp_path / "btpo-base"
    before = _previous(out, "data")
    p = run_btpo("eval", "--model", "tiny-qwen2", "--method", "btpo", "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--max-new-tokens", "2", "--set", "data.max_length=8", check=False, env=ONE_THREAD)
    assert p.returncode == 1
    line = _one_error_line(p.stderr)
    assert line.startswith(f"error: {data} [test]: no usable record")
    if case == "all-skipped":
        assert "skipped 2" in line and "chosen: empty response ×1" in line
    if case == "all-too-long":
        assert "too long for data.max_length=8 ×3" in line
    assert {f: f.read_bytes() for f in before} == before


@pytest.mark.slow
def test_benchmark_eval_logs_plain_progress_lines_not_a_bar(tmp_path: Path) -> None:
    out = tmp_path / "btpo-base"
    p = run_btpo("eval", "--model", "tiny-qwen2", "--method", "btpo", "--benchmark", "judgebench",
                 "--data", str(JUDGEBENCH), "--out", str(out), "--device", "cpu", "--max-new-tokens", "2",
                 "--set", "data.max_length=256", env=ONE_THREAD)          # stderr is a pipe, not a terminal
    assert re.search(r"^\[btpo\] eval btpo-base on judgebench: item 6/6 \(100%\)", p.stderr, re.M), p.stderr
    assert not re.search(r"━+\s*\d+/\d+", p.stderr), p.stderr            # no rich bar (bar + M/N)
