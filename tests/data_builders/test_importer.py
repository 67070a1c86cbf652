"""Generic import (data_builders/importer.py): files, folders, Hub ids, column maps, formats."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from btpo_cli.data.pairs import read_pairs
from btpo_cli.errors import BtpoError, DataError
from data_builders.importer import hold_out, import_pairs, parse_column_map, parse_split_map


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _plain(n: int, prompts: int | None = None) -> list[dict]:
    prompts = prompts or n
    return [{"prompt": f"Question {i % prompts}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
            for i in range(n)]


def _msgs(i: int) -> dict:
    return {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i}"}],
            "chosen": [{"role": "assistant", "content": f"good {i}"}],
            "rejected": [{"role": "assistant", "content": f"bad {i}"}]}


def _read(out: Path, split: str) -> list:
    return read_pairs(out, split, strict=True)[0]


# ----------------------------------------------------------------------------- --map and --splits

def test_parse_column_map() -> None:
    assert parse_column_map("prompt=question, chosen=good,rejected=bad,id=uid") == {
        "prompt": "question", "chosen": "good", "rejected": "bad", "id": "uid"}
    assert parse_column_map(None) == {} and parse_column_map("  ") == {}
    with pytest.raises(BtpoError, match="FIELD=COLUMN"):
        parse_column_map("prompt:question")
    with pytest.raises(BtpoError, match=r"unknown field 'answer' \(valid: prompt, chosen, rejected, id, aspect"):
        parse_column_map("answer=x")
    with pytest.raises(BtpoError, match="twice"):
        parse_column_map("chosen=a,chosen=b")
    assert parse_split_map("train=train_prefs,test=test_prefs") == {"train": "train_prefs", "test": "test_prefs"}
    with pytest.raises(BtpoError, match="train=SPLIT"):
        parse_split_map("dev=x")


# ----------------------------------------------------------------------------- formats

def test_single_file_held_out_by_prompt_and_deterministic(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "pairs.jsonl", _plain(60, prompts=20))
    m1 = import_pairs(str(src), tmp_path / "a", test_fraction=0.25, seed=1)
    import_pairs(str(src), tmp_path / "b", test_fraction=0.25, seed=1)
    m3 = import_pairs(str(src), tmp_path / "c", test_fraction=0.25, seed=2)
    for name in ("train.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()
    assert m1["counts"] == {"train": 45, "test": 15} and m3["counts"]["test"] == 15
    train, test = _read(tmp_path / "a", "train"), _read(tmp_path / "a", "test")
    assert not {r.prompt[0]["content"] for r in train} & {r.prompt[0]["content"] for r in test}
    assert [r.id for r in train] == sorted(r.id for r in train)  # source order kept
    assert {r.id for r in train + test} == {f"pairs-{i:07d}" for i in range(60)}
    assert train[0].source == "import/pairs"
    assert train[0].prompt == [{"role": "user", "content": f"Question {int(train[0].id[-7:]) % 20}?"}]
    assert m1["builder"] == "import" and m1["name"] == "pairs" and m1["test_fraction"] == 0.25
    assert m1["sources"] == {"train": str(src), "test": "held out of train (0.25)"}
    assert m1["column_map"] == {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


def test_folder_with_splits_and_messages(tmp_path: Path) -> None:
    _jsonl(tmp_path / "src" / "train.jsonl", [_msgs(i) for i in range(4)])
    _jsonl(tmp_path / "src" / "test.jsonl", [_msgs(i) for i in range(10, 12)])
    m = import_pairs(str(tmp_path / "src"), tmp_path / "out", name="mine", aspect="helpfulness")
    assert m["counts"] == {"train": 4, "test": 2} and m["splits"] == {"train": "train", "test": "test"}
    assert m["test_fraction"] is None
    r = _read(tmp_path / "out", "test")[0]
    assert r.id == "mine-test-0000000" and r.aspect == "helpfulness"
    assert [x["role"] for x in r.prompt] == ["system", "user"] and r.chosen_text == "good 10"


def test_mapped_columns_and_missing_column_lists_available(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "good": f"g{i}", "bad": f"b{i}", "uid": f"u{i}", "dim": "honesty"}
            for i in range(5)]
    src = _jsonl(tmp_path / "x.jsonl", rows)
    m = import_pairs(str(src), tmp_path / "o", column_map="prompt=question,chosen=good,rejected=bad,id=uid,aspect=dim",
                     test_fraction=0.2)
    recs = _read(tmp_path / "o", "train") + _read(tmp_path / "o", "test")
    assert sorted(r.id for r in recs) == [f"u{i}" for i in range(5)] and {r.aspect for r in recs} == {"honesty"}
    assert m["column_map"]["aspect"] == "dim"
    with pytest.raises(BtpoError, match=r"column\(s\) chosen=better not found; available columns: question, good, "
                                        r"bad, uid, dim"):
        import_pairs(str(src), tmp_path / "o2", column_map="prompt=question,chosen=better,rejected=bad")
    with pytest.raises(BtpoError, match=r"chosen \(not mapped\), rejected \(not mapped\)"):
        import_pairs(str(src), tmp_path / "o3")


def test_implicit_prompt_conversations(tmp_path: Path) -> None:
    def conv(i: int, answer: str) -> list[dict]:
        return [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "hmm"},
                {"role": "user", "content": "go on"}, {"role": "assistant", "content": answer}]

    rows = [{"chosen": conv(i, "good"), "rejected": conv(i, "bad")} for i in range(4)]
    rows.append({"chosen": conv(9, "good"), "rejected": conv(8, "bad")})
    src = _jsonl(tmp_path / "trl.jsonl", rows)
    m = import_pairs(str(src), tmp_path / "o", test_fraction=0.0)
    assert m["counts"] == {"train": 4, "test": 0}
    assert m["skipped"]["by_reason"] == {"prompt: chosen and rejected differ before the final assistant turn": 1}
    r = _read(tmp_path / "o", "train")[0]
    assert len(r.prompt) == 3 and r.prompt[-1]["content"] == "go on" and r.chosen_text == "good"


HH = ("\n\nHuman: Can you help me?\n\nAssistant: Sure.\n\nHuman: How do I boil an egg?\n\nAssistant:")


def test_hh_transcripts_auto_and_explicit(tmp_path: Path) -> None:
    rows = [{"chosen": HH + f" Boil it {i} minutes.", "rejected": HH + " No."} for i in range(6)]
    src = _jsonl(tmp_path / "hh.jsonl", rows)
    m = import_pairs(str(src), tmp_path / "auto", test_fraction=0.0)
    assert m["counts"]["train"] == 6
    r = _read(tmp_path / "auto", "train")[0]
    assert [x["role"] for x in r.prompt] == ["user", "assistant", "user"]
    assert (r.chosen_text, r.rejected_text) == ("Boil it 0 minutes.", "No.")
    # prompt column + response columns (split-transcript datasets)
    rows2 = [{"prompt": HH, "chosen": f" Boil it {i} minutes.", "rejected": " No."} for i in range(3)]
    src2 = _jsonl(tmp_path / "hh2.jsonl", rows2)
    import_pairs(str(src2), tmp_path / "expl", fmt="hh-transcript", test_fraction=0.0)
    assert _read(tmp_path / "expl", "train")[2].prompt == r.prompt
    with pytest.raises(BtpoError, match="--format 'sharegpt'"):
        import_pairs(str(src), tmp_path / "x", fmt="sharegpt")


def test_csv_with_json_encoded_messages_and_sharegpt(tmp_path: Path) -> None:
    p = tmp_path / "pairs.csv"
    with open(p, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["context", "chosen", "rejected"])
        for i in range(4):
            w.writerow([json.dumps([{"from": "human", "value": f"Q{i}\nsecond line"}]),
                        json.dumps([{"from": "gpt", "value": f"good {i}"}]), f"bad {i}"])
    import_pairs(str(p), tmp_path / "o", column_map="prompt=context,chosen=chosen,rejected=rejected",
                 test_fraction=0.0)
    r = _read(tmp_path / "o", "train")[1]
    assert r.prompt == [{"role": "user", "content": "Q1\nsecond line"}]
    assert (r.chosen_text, r.rejected_text) == ("good 1", "bad 1")


def test_parquet_and_datasets_folder_with_validation(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([_msgs(i) for i in range(5)]), tmp_path / "p.parquet")
    m = import_pairs(str(tmp_path / "p.parquet"), tmp_path / "o1", test_fraction=0.4, seed=0)
    assert m["counts"] == {"train": 3, "test": 2}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([_msgs(i) for i in range(4)]),
                               "validation": datasets.Dataset.from_list([_msgs(i) for i in range(10, 13)])})
    dd.save_to_disk(str(tmp_path / "dd"))
    m = import_pairs(str(tmp_path / "dd"), tmp_path / "o2")
    assert m["counts"] == {"train": 4, "test": 3} and m["splits"] == {"train": "train", "test": "validation"}
    m = import_pairs(str(tmp_path / "dd"), tmp_path / "o3", split_map="train=validation,test=train")
    assert m["counts"] == {"train": 3, "test": 4}
    with pytest.raises(BtpoError, match=r"no split 'dev' for test \(has: train, validation\)"):
        import_pairs(str(tmp_path / "dd"), tmp_path / "o4", split_map={"test": "dev"})


# ----------------------------------------------------------------------------- skips, strict, dry run

def test_skips_counted_and_strict(tmp_path: Path) -> None:
    rows = [{**r, "id": f"id{i}"} for i, r in enumerate(_plain(5))]
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[2]["chosen"] = ""
    rows.append({**rows[0], "id": "id3"})
    src = _jsonl(tmp_path / "s.jsonl", rows)
    src.write_text(src.read_text() + "{broken\n")
    m = import_pairs(str(src), tmp_path / "o", column_map="prompt=prompt,chosen=chosen,rejected=rejected,id=id",
                     test_fraction=0.0)
    assert m["counts"]["train"] == 3
    assert m["skipped"]["by_reason"] == {
        "chosen: empty response": 1, "id: duplicate of an earlier record's id": 1,
        "invalid JSON (Expecting property name enclosed in double quotes)": 1,
        "rejected: identical to chosen": 1}
    with pytest.raises(DataError) as e:
        import_pairs(str(src), tmp_path / "o2", strict=True)
    assert str(e.value) == f"{src}:2 field 'rejected': identical to chosen (--strict)"


def test_dry_run_limit_and_all_bad(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "d.jsonl", _plain(30))
    m = import_pairs(str(src), tmp_path / "o", dry_run=True, limit=10, test_fraction=0.2)
    assert m["dry_run"] is True and m["counts"] == {"train": 8, "test": 2} and len(m["examples"]) == 3
    assert not (tmp_path / "o").exists()
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 3)
    with pytest.raises(BtpoError, match=r"no usable pairs \(skipped 3: rejected: identical to chosen ×3 \(first at "
                                        r".*bad\.jsonl:1\)\)"):
        import_pairs(str(bad), tmp_path / "o")


def test_hold_out_edges() -> None:
    assert hold_out([], 0.1, 0) == ([], [])
    with pytest.raises(BtpoError, match="test-fraction"):
        hold_out([], 1.0, 0)


# ----------------------------------------------------------------------------- the Hub path

def test_hub_release_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``shengyuf/BTPO_data``: its layout is unknown, so any Hub id goes through the same code."""
    import datasets

    calls = []

    def split_names(path: str, config_name: str | None = None, **kw: Any) -> list[str]:
        calls.append(("splits", path, config_name))
        return ["train", "test"]

    def load(path: str, name: str | None = None, **kw: Any) -> list[dict]:
        calls.append(("load", path, name, kw["split"]))
        return [_msgs(i) for i in range(3 if kw["split"] == "train" else 2)]

    monkeypatch.setattr(datasets, "get_dataset_split_names", split_names)
    monkeypatch.setattr(datasets, "load_dataset", load)
    m = import_pairs("shengyuf/BTPO_data:hh", tmp_path / "o")
    assert m["name"] == "BTPO_data" and m["counts"] == {"train": 3, "test": 2}
    assert m["sources"] == {"train": "hub:shengyuf/BTPO_data[config=hh] split=train",
                            "test": "hub:shengyuf/BTPO_data[config=hh] split=test"}
    assert calls == [("splits", "shengyuf/BTPO_data", "hh"), ("load", "shengyuf/BTPO_data", "hh", "train"),
                     ("load", "shengyuf/BTPO_data", "hh", "test")]

    def offline(*a: Any, **k: Any) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "get_dataset_split_names", offline)
    with pytest.raises(BtpoError, match=r"could not load hub:shengyuf/BTPO_data from the Hugging Face Hub "
                                        r"\(ConnectionError: no network\); download it"):
        import_pairs("shengyuf/BTPO_data", tmp_path / "o2")
