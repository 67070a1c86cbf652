"""Every kind of bad data file gets a one-line error naming file/line/field, or a counted skip."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from btpo_cli.data.pairs import PairRecord, read_pairs, write_dataset
from btpo_cli.errors import BtpoError, DataError

GOOD = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}]}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


BAD_RECORDS = [
    ("{not json", None, "invalid JSON"),
    (json.dumps([1, 2]), None, "expected a JSON object"),
    (json.dumps({**GOOD, "prompt": None}), "prompt", "missing"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "chosen"}), "chosen", "missing"),
    (json.dumps({**GOOD, "rejected": ""}), "rejected", "empty response"),
    (json.dumps({**GOOD, "rejected": GOOD["chosen"]}), "rejected", "identical to chosen"),
    (json.dumps({**GOOD, "prompt": [{"role": "robot", "content": "x"}]}), "prompt[0].role", "unknown role"),
    (json.dumps({**GOOD, "prompt": [{"role": "user", "content": 3}]}), "prompt[0].content", "not a string"),
    (json.dumps({**GOOD, "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     "prompt", "must end with a user turn"),
    (json.dumps({**GOOD, "chosen": [{"role": "user", "content": "x"}]}), "chosen", "not an assistant turn"),
    (json.dumps({**GOOD, "chosen": 7}), "chosen", "expected a string or a list"),
    (json.dumps({**GOOD, "aspect": 5}), "aspect", "not a string"),
]


@pytest.mark.parametrize("line,field,reason", BAD_RECORDS)
def test_bad_record_is_counted_skip(tmp_path: Path, line: str, field: str | None, reason: str) -> None:
    f = _write(tmp_path / "train.jsonl", [json.dumps(GOOD), line, json.dumps(GOOD)])
    records, skips = read_pairs(f)
    assert len(records) == 2
    assert skips.total == 1
    (key,) = skips.counts
    assert reason in key and (field is None or key.startswith(field))
    assert skips.examples[key] == f"{f}:2"


@pytest.mark.parametrize("line,field,reason", BAD_RECORDS)
def test_bad_record_strict_is_one_line_error(tmp_path: Path, line: str, field: str | None, reason: str) -> None:
    f = _write(tmp_path / "train.jsonl", [json.dumps(GOOD), line])
    with pytest.raises(DataError) as e:
        read_pairs(f, strict=True)
    msg = str(e.value)
    assert msg.startswith(f"{f}:2") and reason in msg and "\n" not in msg
    if field:
        assert f"field '{field}'" in msg


def test_plain_strings_and_gzip(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5", "id": 9}) + "\n")
    (r,), skips = read_pairs(p)
    assert r.prompt == [{"role": "user", "content": "2+2?"}]
    assert r.chosen == [{"role": "assistant", "content": "4"}] and r.id == "9" and skips.total == 0


def test_parquet_and_saved_datasets(tmp_path: Path) -> None:
    import datasets

    rows = [dict(GOOD, id=f"r{i}", aspect="correct") for i in range(3)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    recs, _ = read_pairs(tmp_path / "train.parquet")
    assert [r.id for r in recs] == ["r0", "r1", "r2"] and recs[0].aspect == "correct"
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    recs, _ = read_pairs(tmp_path / "dd", split="test")
    assert len(recs) == 1
    with pytest.raises(BtpoError, match="no split 'validation'"):
        read_pairs(tmp_path / "dd", split="validation")


def test_missing_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(BtpoError, match="no such file or folder"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(BtpoError, match="unsupported file type"):
        read_pairs(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BtpoError, match="no train.jsonl here"):
        read_pairs(tmp_path / "empty")


def test_write_dataset_manifest_and_determinism(tmp_path: Path) -> None:
    recs = [PairRecord(id=f"p{i}", prompt=[{"role": "user", "content": f"q{i}"}],
                       chosen=[{"role": "assistant", "content": "a"}],
                       rejected=[{"role": "assistant", "content": "b"}]) for i in range(4)]
    m1 = write_dataset(tmp_path / "a", {"train": recs[:3], "test": recs[3:]}, {"name": "t", "seed": 1})
    m2 = write_dataset(tmp_path / "b", {"train": recs[:3], "test": recs[3:]}, {"name": "t", "seed": 1})
    assert m1["counts"] == {"train": 3, "test": 1}
    assert m1["sha256"] == m2["sha256"]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    back, _ = read_pairs(tmp_path / "a", split="train")
    assert [r.id for r in back] == ["p0", "p1", "p2"]
