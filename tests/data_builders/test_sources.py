"""Source resolution and row loading (data_builders/sources.py) on local fixture files."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from btpo_cli.data.pairs import SkipLog
from btpo_cli.errors import BtpoError, DataError
from data_builders.sources import (
    BUILDER_SOURCES,
    SourceSpec,
    available_splits,
    load_rows,
    parse_source_args,
    resolve_files,
    resolve_sources,
    spec_from_value,
)

ROWS = [{"question": f"q{i}", "answer": f"a{i} #### {i}"} for i in range(5)]


def _jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _local(path: Path, **kw: Any) -> SourceSpec:
    return SourceSpec("x", path=path, **kw)


def _read(spec: SourceSpec, split: str | None = None, **kw: Any) -> list[tuple[str, int, dict]]:
    return list(load_rows(spec, split, **kw))


# ----------------------------------------------------------------------------- --source parsing

def test_parse_source_args_ok() -> None:
    assert parse_source_args(["hh=./data/hh", "x = y/z "], ["hh", "x"]) == {"hh": "./data/hh", "x": "y/z"}
    assert parse_source_args(None, ["hh"]) == {}


@pytest.mark.parametrize("item", ["hh", "=./x", "hh=", "hh:./x"])
def test_parse_source_args_bad_syntax(item: str) -> None:
    with pytest.raises(BtpoError, match="NAME=PATH_OR_HUB_ID"):
        parse_source_args([item], ["hh"])


def test_parse_source_args_unknown_name_lists_valid() -> None:
    with pytest.raises(BtpoError, match=r"unknown source name 'gsm'.*valid names: gsm8k, math500, metamathqa"):
        parse_source_args(["gsm=./x"], BUILDER_SOURCES["math"])


def test_parse_source_args_duplicate() -> None:
    with pytest.raises(BtpoError, match="twice"):
        parse_source_args(["hh=a/b", "hh=c/d"], ["hh"])


def test_resolve_sources_defaults_and_overrides(tmp_path: Path) -> None:
    specs = resolve_sources("math", {"gsm8k": str(tmp_path), "math500": "me/my-math:cfg"})
    assert specs["metamathqa"].hub_id == "meta-math/MetaMathQA" and not specs["metamathqa"].is_local
    assert specs["gsm8k"].path == tmp_path and specs["gsm8k"].split == "test"
    assert (specs["math500"].hub_id, specs["math500"].config) == ("me/my-math", "cfg")
    assert resolve_sources("hh")["hh"].hub_id == "Anthropic/hh-rlhf"
    with pytest.raises(BtpoError, match="valid names: advancedif"):
        resolve_sources("if", {"hh": "x/y"})
    with pytest.raises(BtpoError, match="unknown builder"):
        resolve_sources("nope")


def test_spec_from_value_missing_path() -> None:
    with pytest.raises(BtpoError, match="no such file or folder"):
        spec_from_value("hh", "./does/not/exist")
    assert spec_from_value("hh", "hub:org/name").hub_id == "org/name"


# ----------------------------------------------------------------------------- file formats

def test_jsonl_and_gz(tmp_path: Path) -> None:
    plain = _jsonl(tmp_path / "a.jsonl", ROWS)
    gz = _jsonl(tmp_path / "b.jsonl.gz", ROWS, gz=True)
    for p in (plain, gz):
        rows = _read(_local(p))
        assert [r[2] for r in rows] == ROWS
        assert [r[1] for r in rows] == [1, 2, 3, 4, 5] and rows[0][0] == str(p)


def test_json_list_and_json_lines(tmp_path: Path) -> None:
    (tmp_path / "MetaMathQA-395K.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    rows = _read(_local(tmp_path / "MetaMathQA-395K.json"))
    assert [r[2] for r in rows] == ROWS and [r[1] for r in rows] == [1, 2, 3, 4, 5]
    _jsonl(tmp_path / "lines.json", ROWS)
    assert [r[2] for r in _read(_local(tmp_path / "lines.json"))] == ROWS
    # a folder holding a single data file (no split-named files) resolves to it, for any split
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "MetaMathQA-395K.json").write_text(json.dumps(ROWS), encoding="utf-8")
    assert [r[2] for r in _read(_local(tmp_path / "mm"), "train")] == ROWS


def test_json_list_streams_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import btpo_cli.data.files as files

    monkeypatch.setattr(files, "_JSON_CHUNK", 7)
    data = [{"query": "x" * i, "n": 10_000 + i} for i in range(30)] + [123456]
    (tmp_path / "d.json").write_text(json.dumps(data), encoding="utf-8")
    skips = SkipLog()
    rows = _read(_local(tmp_path / "d.json"), skips=skips)
    assert [r[2] for r in rows] == data[:-1]
    assert skips.counts == {"expected a JSON object, got int": 1}


def test_json_list_broken_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text('[{"a": 1}, {"a": }]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json:2: invalid JSON"):
        _read(_local(tmp_path / "d.json"))


def test_csv_multiline_records_report_start_lines(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    with open(p, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b"])
        w.writerow(["one\ntwo\nthree", "x"])
        w.writerow(["y", "z"])
    rows = _read(_local(p))
    assert [r[1] for r in rows] == [2, 5]
    assert rows[0][2] == {"a": "one\ntwo\nthree", "b": "x"}


def test_parquet_and_sharded_hub_layout(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "gsm8k" / "main"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), folder / "test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[3:]), folder / "test-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[:1]), folder / "train-00000-of-00001.parquet")
    spec = spec_from_value("gsm8k", str(tmp_path / "gsm8k"), BUILDER_SOURCES["math"]["gsm8k"])
    assert [r[2] for r in _read(spec)] == ROWS  # default split "test", config folder "main"
    assert len(_read(spec, "train")) == 1
    assert available_splits(spec) == ["train", "test"]
    assert len(_read(spec, limit=2)) == 2


def test_datasets_folders(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                               "test": datasets.Dataset.from_list(ROWS[4:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    spec = _local(tmp_path / "dd")
    assert [r[2] for r in _read(spec, "train")] == ROWS[:4]
    assert [r[2] for r in _read(spec, "test")] == ROWS[4:]
    assert sorted(available_splits(spec)) == ["test", "train"]
    with pytest.raises(BtpoError, match="no split 'validation'"):
        _read(spec, "validation")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert [r[2] for r in _read(_local(tmp_path / "one"), "train")] == ROWS
    assert available_splits(_local(tmp_path / "one")) == []


def test_split_files_and_data_dir(tmp_path: Path) -> None:
    _jsonl(tmp_path / "hh" / "helpful-base" / "train.jsonl.gz", ROWS[:2], gz=True)
    _jsonl(tmp_path / "hh" / "helpful-base" / "test.jsonl.gz", ROWS[2:], gz=True)
    spec = _local(tmp_path / "hh", layout="<subset>/<split>.jsonl.gz").with_data_dir("helpful-base")
    assert [r[2] for r in _read(spec, "test")] == ROWS[2:]
    assert resolve_files(spec, "train") == [tmp_path / "hh" / "helpful-base" / "train.jsonl.gz"]
    with pytest.raises(BtpoError, match=r"no folder 'harmless-base' \(has: helpful-base"):
        _read(spec.with_data_dir("harmless-base"), "train")
    with pytest.raises(BtpoError, match="no file for split 'validation'.*found: helpful-base/t"):
        _read(spec, "validation")


def test_single_split_file_is_not_used_for_another_split(tmp_path: Path) -> None:
    _jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(BtpoError, match="no file for split 'test'"):
        _read(_local(tmp_path), "test")


# ----------------------------------------------------------------------------- bad rows, limit

def test_invalid_lines_are_counted(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": \n\n[1, 2]\n{"a": 2}\n', encoding="utf-8")
    skips = SkipLog()
    rows = _read(_local(p), skips=skips)
    assert [r[1] for r in rows] == [1, 5]
    assert skips.counts == {"invalid JSON (Expecting value)": 1, "expected a JSON object, got list": 1}
    assert skips.examples["invalid JSON (Expecting value)"] == f"{p}:2"


def test_invalid_line_strict_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        _read(_local(p), skips=SkipLog(strict=True))
    with pytest.raises(DataError):  # no skip log: the first bad record raises
        _read(_local(p))


def test_limit_counts_records(tmp_path: Path) -> None:
    p = _jsonl(tmp_path / "x.jsonl", ROWS)
    assert len(_read(_local(p), limit=3)) == 3
    assert _read(_local(p), limit=0) == []


# ----------------------------------------------------------------------------- the Hub path

def test_hub_failure_says_which_source_and_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    spec = resolve_sources("hh")["hh"].with_data_dir("helpful-base")
    with pytest.raises(BtpoError) as e:
        _read(spec, "train")
    msg = str(e.value)
    assert "source 'hh'" in msg and "hub:Anthropic/hh-rlhf[data_dir=helpful-base] split=train" in msg
    assert "--source hh=./path" in msg and "ConnectionError" in msg and "\n" not in msg


def test_hub_call_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake(path: str, name: str | None = None, **kwargs: Any) -> list[dict[str, str]]:
        calls.append((path, name, kwargs))
        return ROWS

    monkeypatch.setattr(datasets, "load_dataset", fake)
    gsm = resolve_sources("math")["gsm8k"]
    rows = _read(gsm)
    assert [r[2] for r in rows] == ROWS and rows[0][0] == "hub:openai/gsm8k[config=main] split=test"
    _read(resolve_sources("hh")["hh"].with_data_dir("harmless-base"), "test", limit=2)
    assert calls == [("openai/gsm8k", "main", {"split": "test"}),
                     ("Anthropic/hh-rlhf", None, {"split": "test", "data_dir": "harmless-base"})]
