"""``btpo score``: exactly one output line per input line, in input order, in every mode.

A bad line (invalid JSON, blank, a missing / mistyped / empty field, too many candidates, a
response for a pairwise judge) gives ``{"line": N, "id"?, "error": "field: reason"}`` at its place,
between the results of the good lines around it; the bad lines are counted on stderr in one line;
``--strict`` stops at the first one (exit 1, file, line and field named).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from tests.conftest import ONE_THREAD, run_btpo

Q = "What is 2 + 3?"
LINES = [
    json.dumps({"id": "r1", "prompt": Q, "response": "5"}),                                      # 1
    "{not json",                                                                               # 2
    json.dumps({"id": "c3", "prompt": [{"role": "user", "content": Q}], "candidates": ["6", "5", "4"]}),
    "",                                                                                        # 4
    json.dumps({"id": "q5", "prompt": Q, "candidates": []}),                                   # 5
    json.dumps({"prompt": Q, "response": 5}),                                                  # 6
    json.dumps({"id": "p7", "prompt": Q, "chosen": "5", "rejected": "6", "aspect": "correct"}),
    json.dumps(["a list"]),                                                                    # 8
    json.dumps({"prompt": "What is 1 + 1?", "candidates": ["2", "3"]}),                        # 9
    json.dumps({"id": "p10", "prompt": Q, "chosen": "5"}),                                     # 10
    json.dumps({"prompt": Q, "candidates": ["5"] * 1025}),                                     # 11
    json.dumps({"candidates": ["a"]}),                                                         # 12
    json.dumps({"prompt": "What is 4 + 4?", "response": "8"}),                                 # 13
    json.dumps({"prompt": Q, "chosen": "5", "rejected": "4"}),                                 # 14
    json.dumps({"prompt": Q, "candidates": [1, "x"]}),                                         # 15
]
BAD = {2: "invalid JSON", 4: "blank line", 5: "candidates: expected a non-empty list of strings",
       6: "response: expected a string, got int", 8: "expected a JSON object, got list", 10: "rejected",
       11: "candidates: 1025 candidates, more than 1024", 12: "prompt: missing",
       15: "candidates[0]: expected a string, got int"}
KIND = {1: "response", 3: "candidates", 7: "pair", 9: "candidates", 13: "response", 14: "pair"}
KEYS = {"response": {"score"}, "candidates": {"best", "scores"}, "pair": {"credit"}}


def _input(tmp_path: Path) -> Path:
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return inp


def _rows(stdout: str) -> list[dict]:
    return [json.loads(x) for x in stdout.splitlines()]


def check_aligned(rows: list[dict], n: int, bad: dict[int, str]) -> None:
    """Row i answers line i + 1: an error row at each bad line, the kind's keys at each good one."""
    assert [r["line"] for r in rows] == list(range(1, n + 1))
    for r in rows:
        if r["line"] in bad:
            assert set(r) <= {"line", "id", "error"} and bad[r["line"]] in r["error"], r
        else:
            assert KEYS[KIND[r["line"]]] <= set(r), r
    assert rows[4]["id"] == "q5"                       # a bad line's id, when it has one, is copied


MODES = [
    ("bt", []),
    ("bt", ["--detail", "--batch-size", "2"]),
    ("gram", ["--thoughts"]),
    ("btpo", ["--thoughts", "--max-new-tokens", "4"]),
    ("btpo", ["--detail", "--samples", "2", "--seed", "1", "--max-new-tokens", "4"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "flags"), MODES, ids=[f"{m}{''.join(f)}" for m, f in MODES])
def test_score_one_output_line_per_input_line_with_bad_lines(method: str, flags: list[str], trained_judge,
                                                              tmp_path: Path) -> None:
    p = run_btpo("score", "--judge", str(trained_judge(method)), str(_input(tmp_path)), *flags, env=ONE_THREAD)
    bad = dict(BAD)
    if method == "gram":                               # a pairwise judge: a lone response is a bad line
        bad |= {1: "response: gram is a pairwise judge", 13: "response: gram is a pairwise judge"}
    rows = _rows(p.stdout)
    check_aligned(rows, len(LINES), bad)
    if method == "btpo" and "--thoughts" in flags:
        assert isinstance(rows[0]["thought"], str) and len(rows[2]["thoughts"]) == 3
    if "--detail" in flags:
        assert "detail" in rows[0] and len(rows[2]["detail"]) == 3
    summary = re.findall(r"^btpo score: (\d+) of (\d+) line\(s\) had errors \(first: line (\d+): (.*)\)$",
                         p.stderr, re.M)
    assert summary == [(str(len(bad)), str(len(LINES)), str(min(bad)), rows[min(bad) - 1]["error"])], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_score_limit_keeps_the_lines_before_it_aligned(trained_judge, tmp_path: Path) -> None:
    p = run_btpo("score", "--judge", str(trained_judge("bt")), str(_input(tmp_path)), "--limit", "3", "--quiet",
                 env=ONE_THREAD)
    check_aligned(_rows(p.stdout), 7, BAD)             # good lines 1, 3, 7: every line up to the third (2, 4, 5, 6 bad)
    assert re.search(r"^btpo score: 4 of 7 line\(s\) had errors", p.stderr, re.M), p.stderr   # even with -q


@pytest.mark.slow
def test_score_batching_interleaves_errors_without_reordering(trained_judge, monkeypatch) -> None:
    """Runs of one kind with bad lines inside: judged in one group, or in groups of one pair (many
    judge calls, errors waiting at their place), the rows are the same, in input order."""
    from btpo_cli import load_judge
    from btpo_cli.serving import scoring

    order = [1, 2, 13, 4, 1, 3, 5, 9, 3, 7, 14, 8, 7]              # LINES numbers: bad at 2, 4, 5, 8
    text = "".join(LINES[i - 1] + "\n" for i in order)

    def run(group: int) -> tuple[list[dict], int]:
        monkeypatch.setattr(scoring, "GROUP_TARGET", group)
        out, flushes = io.StringIO(), []
        out.flush = lambda: flushes.append(1)          # type: ignore[method-assign]
        with load_judge(trained_judge("bt"), device="cpu", batch_size=1) as judge:
            s = scoring.score_lines(judge, io.StringIO(text), "in.jsonl", out)
        assert (s.lines, s.errors, s.first_error) == (13, 4, "line 2: invalid JSON (Expecting property name "
                                                              "enclosed in double quotes)")
        return _rows(out.getvalue()), len(flushes)

    big, n_big = run(scoring.GROUP_TARGET)
    small, n_small = run(1)
    assert [r["line"] for r in small] == list(range(1, 14))
    for r, i in zip(small, order, strict=True):
        assert ("error" in r) == (i in BAD) and (i in BAD or KEYS[KIND[i]] <= set(r)), (r, i)
    assert n_small > n_big
    for a, b in zip(small, big, strict=True):          # the same rows (floats: other batch shapes)
        assert set(a) == set(b) and a.get("error") == b.get("error"), (a, b)
        for k in ("score", "scores", "credit"):
            assert a.get(k) == pytest.approx(b.get(k), abs=1e-5), (a, b)


@pytest.mark.slow
def test_score_strict_stops_at_the_first_bad_line(trained_judge, tmp_path: Path) -> None:
    run = str(trained_judge("bt"))
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([LINES[0], LINES[2], LINES[4], LINES[6]]) + "\n")
    p = run_btpo("score", "--judge", run, str(inp), "--strict", check=False, env=ONE_THREAD)
    assert p.returncode == 1, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {inp}:3 field 'candidates': expected a non-empty list of strings"], p.stderr
    assert "Traceback" not in p.stderr
    assert [r["line"] for r in _rows(p.stdout)] == [1, 2]          # the lines before it, then the error

    inp.write_text(LINES[0] + "\n\n" + LINES[2] + "\n")            # a blank line is a bad line too
    p = run_btpo("score", "--judge", run, str(inp), "--strict", check=False, env=ONE_THREAD)
    assert p.returncode == 1 and f"error: {inp}:2: blank line" in p.stderr, p.stderr

    inp.write_text(LINES[0] + "\n" + LINES[2] + "\n")              # nothing bad: as without --strict
    p = run_btpo("score", "--judge", run, str(inp), "--strict", env=ONE_THREAD)
    assert [r["line"] for r in _rows(p.stdout)] == [1, 2] and "had errors" not in p.stderr
