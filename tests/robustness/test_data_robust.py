"""The readers under bad bytes: truncated / corrupt gzip, invalid UTF-8, gzip bytes in a .jsonl, Git-LFS
pointers, symlink loops, missing local paths vs Hub ids, duplicate ids, lone surrogates, deep nesting.

Each case: a one-line error naming file (and line) or a counted skip naming file:line."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from btpo_cli.data.pairs import SkipLog, read_pairs
from btpo_cli.errors import BtpoError, DataError
from data_builders.sources import SourceSpec, load_rows, spec_from_value

GOOD = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 123456\n"


def _lines(n: int = 3, start: int = 0) -> list[bytes]:
    return [json.dumps({**GOOD, "id": f"r{i}", "chosen": f"Hello {i}!"}).encode() + b"\n"
            for i in range(start, start + n)]


def _gz(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- gzip

def test_truncated_gzip_is_a_data_error_naming_file_and_line(tmp_path: Path) -> None:
    data = b"".join(_lines(200))
    blob = gzip.compress(data)
    p = tmp_path / "train.jsonl.gz"
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as e:
        read_pairs(p)
    msg = _one_line(e.value)
    assert msg.startswith(f"{p}:") and "truncated" in msg and "gzip" in msg
    assert isinstance(e.value.record, int) and e.value.record > 1


def test_corrupt_gzip_stream_is_a_data_error(tmp_path: Path) -> None:
    blob = bytearray(gzip.compress(b"".join(_lines(50))))
    blob[len(blob) // 2] ^= 0xFF
    p = tmp_path / "train.jsonl.gz"
    p.write_bytes(bytes(blob))
    with pytest.raises(DataError) as e:
        read_pairs(p)
    assert str(p) in _one_line(e.value) and "gzip" in str(e.value)


def test_gzip_bytes_in_a_jsonl_are_read(tmp_path: Path) -> None:
    """A gzip-compressed file named .jsonl (or a plain file named .jsonl.gz) is read by its content."""
    p = _gz(tmp_path / "train.jsonl", b"".join(_lines(3)))
    recs, skips = read_pairs(p)
    assert [r.id for r in recs] == ["r0", "r1", "r2"] and skips.total == 0
    q = tmp_path / "plain.jsonl.gz"
    q.write_bytes(b"".join(_lines(2)))
    assert [r.id for r in read_pairs(q)[0]] == ["r0", "r1"]


def test_gzip_garbage_inside_a_jsonl_skips_those_lines(tmp_path: Path) -> None:
    garbage = gzip.compress(b"x" * 2000 + bytes(range(256)) * 4)
    p = tmp_path / "train.jsonl"
    p.write_bytes(b"".join(_lines(2)) + garbage + b"\n" + b"".join(_lines(2, start=2)))
    recs, skips = read_pairs(p)
    assert [r.id for r in recs] == ["r0", "r1", "r2", "r3"]
    assert skips.total >= 1
    assert all(w.startswith(f"{p}:") for w in skips.examples.values())


# ----------------------------------------------------------------------------- encodings

def test_invalid_utf8_line_is_a_counted_skip_with_its_line(tmp_path: Path) -> None:
    lines = _lines(3)
    lines[1] = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    p = tmp_path / "train.jsonl"
    p.write_bytes(b"".join(lines))
    recs, skips = read_pairs(p)
    assert [r.id for r in recs] == ["r0", "r2"]
    (key,) = skips.counts
    assert key.startswith("invalid UTF-8") and skips.examples[key] == f"{p}:2"


def test_invalid_utf8_strict_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "train.jsonl"
    p.write_bytes(_lines(1)[0] + b"\xff\xfe{}\n")
    with pytest.raises(DataError) as e:
        read_pairs(p, strict=True)
    assert _one_line(e.value).startswith(f"{p}:2: invalid UTF-8")


def test_bom_on_any_line_and_crlf(tmp_path: Path) -> None:
    p = tmp_path / "train.jsonl"
    a, b = _lines(2)
    p.write_bytes(b"\xef\xbb\xbf" + a.replace(b"\n", b"\r\n") + b"\xef\xbb\xbf" + b)
    recs, skips = read_pairs(p)
    assert [r.id for r in recs] == ["r0", "r1"] and skips.total == 0


def test_lone_surrogate_is_a_counted_skip_naming_the_field(tmp_path: Path) -> None:
    p = tmp_path / "train.jsonl"
    p.write_bytes(_lines(1)[0] + b'{"prompt": "x", "chosen": "bad \\ud800 text", "rejected": "b"}\n')
    recs, skips = read_pairs(p)
    assert len(recs) == 1
    (key,) = skips.counts
    assert key.startswith("chosen") and "surrogate" in key and skips.examples[key] == f"{p}:2"


def test_deeply_nested_json_is_a_counted_skip(tmp_path: Path) -> None:
    p = tmp_path / "train.jsonl"
    p.write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n" + _lines(1)[0])
    recs, skips = read_pairs(p)
    assert len(recs) == 1
    (key,) = skips.counts
    assert "nested too deeply" in key and skips.examples[key] == f"{p}:1"


def test_binary_file_counts_every_line_then_no_records(tmp_path: Path) -> None:
    p = tmp_path / "train.jsonl"
    p.write_bytes(bytes(range(256)) * 40)
    recs, skips = read_pairs(p)
    assert recs == [] and skips.total >= 1


# ----------------------------------------------------------------------------- duplicates

def test_duplicate_ids_later_ones_skipped_and_counted(tmp_path: Path) -> None:
    lines = _lines(3) + [json.dumps({**GOOD, "id": "r1", "chosen": "Other"}).encode() + b"\n"]
    p = tmp_path / "train.jsonl"
    p.write_bytes(b"".join(lines))
    recs, skips = read_pairs(p)
    assert [r.id for r in recs] == ["r0", "r1", "r2"] and recs[1].chosen_text == "Hello 1!"
    assert skips.counts == {"id: duplicate of an earlier record's id": 1}
    assert skips.examples["id: duplicate of an earlier record's id"] == f"{p}:4"


def test_skip_log_keeps_the_first_few_locations_per_reason(tmp_path: Path) -> None:
    p = tmp_path / "train.jsonl"
    p.write_bytes(b"".join(_lines(1)) + b"{bad\n" * 9)
    _, skips = read_pairs(p)
    d = skips.as_dict()
    (key,) = d["by_reason"]
    assert d["by_reason"][key] == 9
    assert d["where"][key] == [f"{p}:{i}" for i in range(2, 7)]     # the first five
    assert d["first_seen"][key] == f"{p}:2"


# ----------------------------------------------------------------------------- Git LFS pointers

@pytest.mark.parametrize("name", ["train.jsonl.gz", "train.jsonl", "train.parquet"])
def test_git_lfs_pointer_is_named(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(LFS)
    with pytest.raises(DataError) as e:
        read_pairs(p)
    msg = _one_line(e.value)
    assert msg.startswith(str(p)) and "Git LFS pointer" in msg and "git lfs pull" in msg
    with pytest.raises(DataError, match="Git LFS pointer"):
        read_pairs(tmp_path)   # the folder form finds the same file


def test_git_lfs_pointer_through_sources(tmp_path: Path) -> None:
    (tmp_path / "harmless-base").mkdir()
    (tmp_path / "harmless-base" / "test.jsonl.gz").write_bytes(LFS)
    spec = SourceSpec("hh", path=tmp_path).with_data_dir("harmless-base")
    with pytest.raises(DataError, match=r"test\.jsonl\.gz: a Git LFS pointer"):
        list(load_rows(spec, "test"))


# ----------------------------------------------------------------------------- paths

def test_symlink_loop_is_named(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.symlink(d / "train.jsonl", d / "train.jsonl")
    with pytest.raises(BtpoError) as e:
        read_pairs(d)
    msg = _one_line(e.value)
    assert str(d / "train.jsonl") in msg and "symbolic link" in msg and "loop" in msg
    with pytest.raises(BtpoError, match="loop"):
        read_pairs(d / "train.jsonl")
    with pytest.raises(BtpoError, match="loop"):
        list(load_rows(SourceSpec("x", path=d / "train.jsonl")))


def test_dangling_symlink_is_named(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "train.jsonl")
    with pytest.raises(BtpoError) as e:
        read_pairs(tmp_path)
    assert "gone.jsonl" in _one_line(e.value) and "does not exist" in str(e.value)


def test_missing_local_path_is_not_looked_up_on_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def no_hub(*a: object, **k: object) -> None:
        raise AssertionError("the Hub must not be asked")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for value in ("data/hh", "data/hh/train.jsonl", "./hh", "hh.jsonl"):
        with pytest.raises(BtpoError) as e:
            read_pairs(value)
        msg = _one_line(e.value)
        assert msg.startswith(value) and "no such file or folder" in msg, msg
    with pytest.raises(BtpoError, match="no such file or folder"):
        spec_from_value("hh", "data/hh-rlhf")
    # an owner/name whose owner is not a local folder still means the Hub
    assert spec_from_value("hh", "Anthropic/hh-rlhf").hub_id == "Anthropic/hh-rlhf"


def test_hub_prefix_forces_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, split=None: calls.append((repo, split)) or [GOOD])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    recs, _ = read_pairs("hub:data/hh", "test")
    assert calls == [("data/hh", "test")] and len(recs) == 1


def test_csv_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "pairs.csv"
    p.write_bytes(b"prompt,chosen,rejected\nq,a,b\nq2,\xff\xfe,c\n")
    skips = SkipLog()
    with pytest.raises(DataError) as e:
        list(load_rows(SourceSpec("x", path=p), skips=skips))
    assert _one_line(e.value).startswith(f"{p}:3: invalid UTF-8")


def test_corrupt_parquet_is_named(tmp_path: Path) -> None:
    p = tmp_path / "train.parquet"
    p.write_bytes(b"PAR1" + b"\x00" * 100)
    with pytest.raises(DataError) as e:
        read_pairs(p)
    assert _one_line(e.value).startswith(str(p)) and "parquet" in str(e.value)
    with pytest.raises(DataError):
        list(load_rows(SourceSpec("x", path=p)))
