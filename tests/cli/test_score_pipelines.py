"""The README's and docs/judge.md's ``btpo score`` pipelines, run from the shell as they are written.

Each test reads the command text from the document (so it fails when the document drifts), runs it
with bash in a folder that holds what the text names (``runs/btpo``: a tiny trained judge, the input
files, with a bad line among them) and a ``btpo`` on PATH (a shim for ``python -m btpo_cli``), and
checks that every input line gives its own output line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DIST_ENV, LOG_ENV, ONE_THREAD, REPO, USER_LOG_ENV

needs_jq = pytest.mark.skipif(shutil.which("jq") is None,
                              reason="jq is not installed (CI installs it in .ci/run; here: apt-get install jq)")


def bash_block(doc: str, heading: str) -> str:
    """The first ```bash block after ``heading`` in ``doc`` (a path under the repository)."""
    text = (REPO / doc).read_text(encoding="utf-8")
    assert heading in text, f"{doc}: no section {heading!r}"
    m = re.search(r"```bash\n(.*?)```", text[text.index(heading):], re.S)
    assert m, f"{doc}: no bash block after {heading!r}"
    return m.group(1)


def workdir(tmp_path: Path, judge: Path) -> Path:
    """A folder with ``runs/btpo`` → ``judge`` and ``bin/btpo`` (this checkout's CLI)."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "btpo").symlink_to(judge, target_is_directory=True)
    shim = tmp_path / "bin" / "btpo"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m btpo_cli "$@"\n')
    shim.chmod(0o755)
    return tmp_path


def bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k not in LOG_ENV}
    e.update(USER_LOG_ENV)
    e.update(ONE_THREAD)
    e["PATH"] = f"{cwd / 'bin'}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, env=e, timeout=600)


@pytest.mark.slow
@needs_jq
def test_readme_best_of_n_pipeline_from_the_shell(trained_judge, tmp_path: Path) -> None:
    block = bash_block("README.md", "## Using a trained judge: best of N in a shell pipeline")
    example = re.search(r"^# cands\.jsonl: (\{.*\})$", block, re.M)
    assert example, block
    q1 = json.loads(example.group(1))
    cands = [q1,
             {"id": "q2", "prompt": "What is 2 + 3?", "candidates": []},          # bad: an empty list
             {"id": "q3", "prompt": "What is 7 + 2?", "candidates": ["8", "9"]},
             {"id": "q4", "prompt": "What is 1 + 1?", "candidates": ["2", "3", "11"]}]
    cwd = workdir(tmp_path, trained_judge("bt"))
    (cwd / "cands.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cands) + '{"id": "q5", "prompt": \n')
    p = bash(block, cwd)
    assert p.returncode == 0, p.stderr
    out = [ln.split("\t") for ln in p.stdout.splitlines()]
    assert [o[0] for o in out] == ["q1", "q2", "q3", "q4", "5"], p.stdout     # one line per input line
    for (_, answer), c in zip(out, cands, strict=False):
        if c["candidates"]:
            assert answer in c["candidates"], (answer, c)
    assert out[1][1] == "error: candidates: expected a non-empty list of strings"
    assert out[4][1].startswith("error: invalid JSON")
    assert "btpo score: 2 of 5 line(s) had errors (first: line 2: candidates:" in p.stderr, p.stderr


@pytest.mark.slow
@needs_jq
def test_judge_md_score_commands_from_the_shell(trained_judge, synthetic_data: Path, tmp_path: Path) -> None:
    block = bash_block("docs/judge.md", "## `btpo score`")
    cwd = workdir(tmp_path, trained_judge("bt"))
    pairs = (synthetic_data / "test.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    (cwd / "data" / "synthetic").mkdir(parents=True)
    (cwd / "data" / "synthetic" / "test.jsonl").write_text("\n".join([*pairs[:2], '{"prompt": "x"}', *pairs[2:]]) + "\n")
    questions = [{"id": "a", "prompt": "What is 2 + 3?", "response": "5"}, {"id": "b", "prompt": "What is 2 + 3?"},
                 {"id": "c", "prompt": "What is 7 + 2?", "response": "9"}]
    (cwd / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    p = bash(block, cwd)
    assert p.returncode == 0, p.stderr

    scored = [json.loads(x) for x in (cwd / "scored.jsonl").read_text().splitlines()]
    assert [r["line"] for r in scored] == [1, 2, 3, 4, 5]
    assert [r.get("id") for r in scored] == [json.loads(pairs[0])["id"], json.loads(pairs[1])["id"], None,
                                             json.loads(pairs[2])["id"], json.loads(pairs[3])["id"]]
    assert "credit" in scored[0] and scored[2]["error"].startswith("expected 'response', 'candidates'")

    dec, text, rows = json.JSONDecoder(), p.stdout.strip(), []      # `jq .`: pretty objects, one after another
    while text:
        obj, end = dec.raw_decode(text)
        rows.append(obj)
        text = text[end:].strip()
    assert [(r["line"], r["id"]) for r in rows] == [(1, "a"), (2, "b"), (3, "c")]
    assert isinstance(rows[0]["score"], float) and rows[1]["error"] == "expected 'response', 'candidates', " \
        "or 'chosen' and 'rejected'" and isinstance(rows[2]["score"], float)
