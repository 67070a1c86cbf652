"""The AdvancedIF reader (data_builders/advancedif.py) on a CSV in the exact upstream format."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from btpo_cli.data.pairs import RecordSkip, SkipLog
from btpo_cli.errors import BtpoError, DataError
from data_builders.advancedif import SKIP_REASONS, parse_rubrics, read_advancedif
from data_builders.sources import SourceSpec, resolve_sources, spec_from_value

HEADER = ["conversation_history", "benchmark_name", "prompt_metadata"]


def _meta(rubrics: list[str], **extra: Any) -> str:
    """prompt_metadata as upstream: a JSON object whose rubrics value is a JSON-encoded string."""
    return json.dumps({"rubrics": json.dumps(rubrics), **extra})


def _conv(*turns: tuple[str, str]) -> str:
    return json.dumps([{"role": r, "content": c} for r, c in turns])


GOOD = [
    [_conv(("user", "Write a haiku about rain.\nUse no commas.")), "if_complex_single_turn_oss",
     _meta(["Is it a haiku?", 'Does it avoid the "," character?'])],
    [_conv(("system", "Always answer in French."), ("user", "Hello!"), ("assistant", "Bonjour !"),
           ("user", "What time is it?")), "if_system_steerability_oss",
     _meta(["Is the response in French?"], system_prompt="Always answer in French.")],
]
BAD = [
    ['[{"role": "user", "content": "unterminated', "if_carried_context_oss", _meta(["x"])],
    [_conv(("user", "q")), "if_carried_context_oss", '{"rubrics": "[\\"unterminated]"}'],
    [_conv(("user", "q"), ("assistant", "a")), "if_carried_context_oss", _meta(["x"])],
    [_conv(("user", "q")), "if_carried_context_oss", json.dumps({"other": 1})],
    [_conv(("user", "q")), "if_carried_context_oss", _meta([])],
    [_conv(("robot", "q")), "if_carried_context_oss", _meta(["x"])],
]


def _write(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


def _spec(path: Path) -> SourceSpec:
    return spec_from_value("advancedif", str(path), resolve_sources("if")["advancedif"])


def test_reads_upstream_csv(tmp_path: Path) -> None:
    p = _write(tmp_path / "if_oss_full_data.csv", GOOD)
    prompts = read_advancedif(_spec(tmp_path))  # a folder holding the single CSV
    assert [x.id for x in prompts] == ["advancedif-0", "advancedif-1"]
    a, b = prompts
    assert a.messages == [{"role": "user", "content": "Write a haiku about rain.\nUse no commas."}]
    assert a.rubrics == ["Is it a haiku?", 'Does it avoid the "," character?']
    assert a.benchmark == "if_complex_single_turn_oss"
    assert [m["role"] for m in b.messages] == ["system", "user", "assistant", "user"]
    assert b.meta == {"row": 1, "prompt_metadata": {"system_prompt": "Always answer in French."}}
    assert read_advancedif(_spec(p), limit=1)[0].id == "advancedif-0"


def test_bad_rows_are_counted_naming_the_field(tmp_path: Path) -> None:
    p = _write(tmp_path / "if.csv", GOOD[:1] + BAD + GOOD[1:])
    skips = SkipLog()
    prompts = read_advancedif(_spec(p), skips=skips)
    assert [x.id for x in prompts] == ["advancedif-0", "advancedif-7"]
    assert skips.counts == {
        "conversation_history: invalid JSON (Unterminated string starting at)": 1,
        "prompt_metadata.rubrics: invalid JSON (Unterminated string starting at)": 1,
        "conversation_history: must end with a user turn": 1,
        "prompt_metadata: no rubrics key": 1,
        "prompt_metadata.rubrics: empty rubric list": 1,
        "conversation_history[0].role: unknown role 'robot' (expected one of ('system', 'user', 'assistant'))": 1,
    }
    # CSV records are numbered by the line they start on (the header is line 1)
    assert skips.examples["prompt_metadata: no rubrics key"] == f"{p}:6"


def test_strict_names_file_line_and_field(tmp_path: Path) -> None:
    p = _write(tmp_path / "if.csv", GOOD[:1] + BAD[1:2])
    with pytest.raises(DataError) as e:
        read_advancedif(_spec(p), strict=True)
    assert str(e.value) == (f"{p}:3 field 'prompt_metadata.rubrics': invalid JSON "
                            "(Unterminated string starting at) (--strict)")


def test_multiline_cells_keep_line_numbers(tmp_path: Path) -> None:
    pretty = json.dumps([{"role": "user", "content": "q"}], indent=2)  # a cell spanning 6 lines
    p = _write(tmp_path / "if.csv", [[pretty, "b", _meta(["r"])]] + BAD[2:3])
    skips = SkipLog()
    assert len(read_advancedif(_spec(p), skips=skips)) == 1
    assert skips.examples["conversation_history: must end with a user turn"] == f"{p}:8"


@pytest.mark.parametrize("meta, expected", [
    (_meta(["a", " b "]), ["a", "b"]),
    ({"rubrics": ["a"]}, ["a"]),                          # already decoded
    (json.dumps({"rubric_list": json.dumps(["r"])}), ["r"]),  # another key holding "rubric"
    (json.dumps({"rubrics": json.dumps(json.dumps(["t"]))}), ["t"]),  # triply encoded
])
def test_parse_rubrics_variants(meta: Any, expected: list[str]) -> None:
    assert parse_rubrics(meta)[0] == expected


@pytest.mark.parametrize("meta, key", [
    ("not json", "prompt_metadata: invalid JSON (Expecting value)"),
    ("[1]", "prompt_metadata: expected a JSON object"),
    (json.dumps({"rubrics": json.dumps([1, 2])}), "prompt_metadata.rubrics: expected a list of rubric strings"),
])
def test_parse_rubrics_errors(meta: str, key: str) -> None:
    with pytest.raises(RecordSkip) as e:
        parse_rubrics(meta)
    assert f"{e.value.field}: {e.value.reason}" == key


def test_skip_reasons_documented() -> None:
    assert "prompt_metadata.rubrics: empty rubric list" in SKIP_REASONS


def test_hub_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    seen = []

    def fake(path: str, name: str | None = None, **kw: Any) -> list[dict[str, str]]:
        seen.append((path, kw))
        return [dict(zip(HEADER, GOOD[0], strict=True))]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    prompts = read_advancedif(resolve_sources("if")["advancedif"])
    assert seen == [("facebook/AdvancedIF", {"split": "train"})] and len(prompts) == 1

    def offline(*a: Any, **k: Any) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BtpoError, match="--source advancedif=./path"):
        read_advancedif(resolve_sources("if")["advancedif"])
