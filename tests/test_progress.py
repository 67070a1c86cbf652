"""PhaseProgress: one plain ``[btpo] …`` line format for every long phase when stderr is not a terminal."""

from __future__ import annotations

import re

import pytest

from btpo_cli import progress
from btpo_cli.progress import PhaseProgress, ProgressEvery


def test_plain_lines_at_the_log_every_cadence(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "EVERY", ProgressEvery(steps=2))
    with PhaseProgress(5, "pre-training tiny-thinker") as bar:
        assert bar.plain                                    # captured stderr is no terminal
        for s in range(1, 6):
            bar.update(s, f"loss {1 / s:.3f}")
    lines = capsys.readouterr().err.splitlines()
    assert [int(re.search(r"step (\d)/5", ln).group(1)) for ln in lines] == [1, 3, 5]
    assert all(re.fullmatch(r"\[btpo\] pre-training tiny-thinker: step \d/5 \(\d+%\) loss [\d.]+ \| [\d.e+-]+ steps/s "
                            r"\| elapsed \d:\d\d:\d\d \| eta .+", ln) for ln in lines), lines

    with PhaseProgress(None, "score x.jsonl with bt", unit="line") as bar:   # no total: a count, no eta
        for _ in range(3):
            bar.advance(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[btpo] score x.jsonl with bt: line 1 |") and "eta" not in lines[-1]
    assert lines[-1].startswith("[btpo] score x.jsonl with bt: line 3 |")


def test_disabled_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    with PhaseProgress(3, "eval", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
