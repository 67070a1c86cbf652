"""The HH builder (data_builders/hh.py) on fixture files in the exact Anthropic/hh-rlhf format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from btpo_cli.data.pairs import RecordSkip, read_pairs
from btpo_cli.errors import BtpoError, DataError
from data_builders.hh import (
    HH_SUBSETS,
    SKIP_REASONS,
    build_hh,
    parse_transcript,
    split_pair,
)

# ----------------------------------------------------------------------------- transcript parsing


def test_parse_multi_turn() -> None:
    t = ("\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And 3+3?"
         "\n\nAssistant: 6, because 3+3=6.\nHuman: is not a marker here.")
    assert parse_transcript(t) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, because 3+3=6.\nHuman: is not a marker here."},
    ]


def test_parse_whitespace_and_missing_leading_blank_line() -> None:
    t = "  Human:   hi there  \n\nAssistant:\n  hello \n\n\n\nHuman: x\n\nAssistant:  "
    assert parse_transcript(t) == [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "x"}, {"role": "assistant", "content": ""},
    ]


def test_parse_merges_repeated_speaker_and_keeps_empty_turns() -> None:
    t = "\n\nHuman: a\n\nHuman: b\n\nAssistant:\n\nHuman: c\n\nAssistant: d"
    assert parse_transcript(t) == [
        {"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": ""},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
    ]


def test_split_pair_shared_prefix() -> None:
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke."
    prompt, c, r = split_pair(prefix + "\n\nAssistant: Why did the chicken...", prefix + "\n\nAssistant: No.")
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert (c, r) == ("Why did the chicken...", "No.")
    # trailing whitespace differences in the prefix do not matter; the parsed turns do
    prompt2, _, _ = split_pair(prefix + " \n\nAssistant: a", prefix + "\n\nAssistant: b")
    assert prompt2 == prompt


@pytest.mark.parametrize("chosen, rejected, key", [
    ("\n\nHuman: q\n\nAssistant: a", None, "rejected: missing or not a string"),
    ("\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b", "chosen: does not start with a 'Human:' turn"),
    ("\n\nHuman: q\n\nAssistant: a\n\nHuman: more?", "\n\nHuman: q\n\nAssistant: b",
     "chosen: does not end with an 'Assistant:' turn"),
    ("\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistant:   ", "rejected: empty response"),
    ("\n\nHuman: q\n\nAssistant: a", "\n\nHuman: other\n\nAssistant: b",
     "prompt: chosen and rejected differ before the final Assistant turn"),
    ("\n\nHuman: q\n\nAssistant: same ", "\n\nHuman: q\n\nAssistant: same", "rejected: identical to chosen"),
    ("\n\nHuman:   \n\nAssistant: a", "\n\nHuman:\n\nAssistant: b", "prompt: no non-empty user turn"),
])
def test_split_pair_skips(chosen: Any, rejected: Any, key: str) -> None:
    with pytest.raises(RecordSkip) as e:
        split_pair(chosen, rejected)
    assert f"{e.value.field}: {e.value.reason}" == key
    assert key in SKIP_REASONS


# ----------------------------------------------------------------------------- fixtures

def _pair(i: int, subset: str, split: str) -> dict[str, str]:
    prefix = (f"\n\nHuman: [{subset}/{split}] question {i}?\n\nAssistant: Let me think.\n\n"
              f"Human: Please answer question {i}.")
    return {"chosen": prefix + f"\n\nAssistant: A careful answer {i}.",
            "rejected": prefix + f"\n\nAssistant: A rude answer {i}."}


BAD_ROWS = [
    {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"},
    {"chosen": "\n\nHuman: a\n\nAssistant: same", "rejected": "\n\nHuman: a\n\nAssistant: same"},
    {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: c"},
]


def _write_hh(root: Path, n: int = 12, bad_in: str = "helpful-base") -> Path:
    """The Hub layout: <subset>/{train,test}.jsonl.gz; one subset also gets bad rows and a bad line."""
    for subset in HH_SUBSETS:
        for split in ("train", "test"):
            rows = [_pair(i, subset, split) for i in range(n if split == "train" else n // 3)]
            lines = [json.dumps(r) for r in rows]
            if subset == bad_in and split == "train":
                lines[2:2] = [json.dumps(r) for r in BAD_ROWS] + ['{"chosen": "unterminated']
            (root / subset).mkdir(parents=True, exist_ok=True)
            with gzip.open(root / subset / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
    return root


@pytest.fixture()
def hh_dir(tmp_path: Path) -> Path:
    return _write_hh(tmp_path / "hh-rlhf")


# ----------------------------------------------------------------------------- building

def test_build_counts_skips_and_manifest(hh_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = build_hh(out, {"hh": str(hh_dir)}, list(HH_SUBSETS), n_train=20, n_test=6, seed=3,
                 limit=None, strict=False, dry_run=False, progress=None)
    assert m["counts"] == {"train": 20, "test": 6}
    assert m["builder"] == "hh" and m["name"] == "hh" and m["seed"] == 3
    assert m["subsets"] == list(HH_SUBSETS)
    assert m["sources"]["helpful-base/train"] == str(hh_dir / "helpful-base" / "train.jsonl.gz")
    sc = m["subset_counts"]
    assert sc["train"]["helpful-base"] == {"read": 15, "kept": 12, "selected": sc["train"]["helpful-base"]["selected"]}
    assert sum(v["selected"] for v in sc["train"].values()) == 20
    assert sum(v["kept"] for v in sc["test"].values()) == 16
    assert m["skipped"]["total"] == 4
    assert m["skipped"]["by_reason"] == {
        "chosen: empty response": 1,
        "invalid JSON (Unterminated string starting at)": 1,
        "prompt: chosen and rejected differ before the final Assistant turn": 1,
        "rejected: identical to chosen": 1,
    }
    assert m["skipped"]["first_seen"]["rejected: identical to chosen"] == f"{hh_dir}/helpful-base/train.jsonl.gz:4"
    assert set(m["sha256"]) == {"train.jsonl", "test.jsonl"}
    assert json.loads((out / "manifest.json").read_text()) == m
    # the output reads back as canonical pairs, every one well-formed
    train, skips = read_pairs(out, "train", strict=True)
    assert len(train) == 20 and skips.total == 0
    r = train[0]
    assert r.aspect == "helpful and harmless" and r.source.startswith("hh-rlhf/")
    subset, split = r.source.split("/")[1], "train"
    assert r.id.startswith(f"hh-{subset}-{split}-")
    assert r.prompt[-1]["role"] == "user" and len(r.prompt) == 3
    assert r.chosen_text.startswith("A careful answer") and r.rejected_text.startswith("A rude answer")


def test_ids_are_the_upstream_row(hh_dir: Path, tmp_path: Path) -> None:
    m = build_hh(None, {"hh": str(hh_dir)}, ["helpful-base"], n_train=0, n_test=0, seed=0, limit=None,
                 strict=False, dry_run=True, progress=None)
    assert m["counts"] == {"train": 12, "test": 4}
    out = tmp_path / "o"
    build_hh(out, {"hh": str(hh_dir)}, ["helpful-base"], 0, 0, 0, None, False, False, None)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    # file rows 0, 1 hold pairs 0, 1; rows 2-5 are bad; row 6 holds pair 2
    assert "question 1?" in by_id["hh-helpful-base-train-1"]["prompt"][0]["content"]
    assert "question 2?" in by_id["hh-helpful-base-train-6"]["prompt"][0]["content"]
    assert "hh-helpful-base-train-2" not in by_id


def test_same_seed_same_bytes_other_seed_differs(hh_dir: Path, tmp_path: Path) -> None:
    def build(out: Path, seed: int, subsets: list[str]) -> None:
        build_hh(out, {"hh": str(hh_dir)}, subsets, 15, 5, seed, None, False, False, None)

    build(tmp_path / "a", 7, list(HH_SUBSETS))
    build(tmp_path / "b", 7, list(reversed(HH_SUBSETS)))  # flag order does not matter
    build(tmp_path / "c", 8, list(HH_SUBSETS))
    for name in ("train.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_strict_names_file_line_and_field(hh_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        build_hh(tmp_path / "o", {"hh": str(hh_dir)}, ["helpful-base"], 5, 2, 0, None, True, False, None)
    assert str(e.value) == (f"{hh_dir}/helpful-base/train.jsonl.gz:3 field 'prompt': chosen and rejected "
                            "differ before the final Assistant turn (--strict)")
    assert not (tmp_path / "o").exists()


def test_dry_run_writes_nothing(hh_dir: Path, tmp_path: Path) -> None:
    m = build_hh(tmp_path / "o", {"hh": str(hh_dir)}, ["harmless-base", "helpful-online"], 5, 2, 0, None,
                 False, True, None)
    assert m["dry_run"] is True and m["counts"] == {"train": 5, "test": 2}
    assert len(m["examples"]) == 3 and set(m["examples"][0]) >= {"id", "prompt", "chosen", "rejected"}
    assert not (tmp_path / "o").exists()


def test_limit_and_progress(hh_dir: Path) -> None:
    calls: list[tuple[str, int]] = []
    m = build_hh(None, {"hh": str(hh_dir)}, ["harmless-base"], 0, 0, 0, 5, False, True,
                 lambda label, n: calls.append((label, n)))
    assert m["counts"] == {"train": 5, "test": 4} and m["limit"] == 5
    assert calls == [("hh-rlhf/harmless-base/train", 5), ("hh-rlhf/harmless-base/test", 4)]


def test_errors(hh_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BtpoError, match=r"unknown HH subset\(s\) red-team-attempts \(valid: harmless-base"):
        build_hh(None, {"hh": str(hh_dir)}, ["red-team-attempts"], 1, 1, 0, None, False, True, None)
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    with pytest.raises(BtpoError, match=r"pairs\.jsonl: cannot tell the split from the file name"):
        build_hh(None, {"hh": str(tmp_path / "pairs.jsonl")}, list(HH_SUBSETS), 1, 1, 0, None, False, True, None)
    (tmp_path / "nothing" / "harmless-base").mkdir(parents=True)
    with pytest.raises(BtpoError, match="no train or test file"):
        build_hh(None, {"hh": str(tmp_path / "nothing")}, ["harmless-base"], 1, 1, 0, None, False, True, None)
    with pytest.raises(BtpoError, match="valid names: hh"):
        build_hh(None, {"anthropic": str(hh_dir)}, ["helpful-base"], 1, 1, 0, None, False, True, None)
    (tmp_path / "partial" / "helpful-base").mkdir(parents=True)
    with pytest.raises(BtpoError, match="no folder 'harmless-base'"):
        build_hh(None, {"hh": str(tmp_path / "partial")}, ["harmless-base"], 1, 1, 0, None, False, True, None)


def test_hub_path_is_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake(path: str, name: str | None = None, **kw: Any) -> list[dict[str, str]]:
        calls.append((path, kw["data_dir"], kw["split"]))
        return [_pair(i, kw["data_dir"], kw["split"]) for i in range(3)]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    m = build_hh(None, None, ["helpful-online"], 0, 0, 0, None, False, True, None)
    assert calls == [("Anthropic/hh-rlhf", "helpful-online", "train"), ("Anthropic/hh-rlhf", "helpful-online", "test")]
    assert m["sources"]["helpful-online/test"] == "hub:Anthropic/hh-rlhf[data_dir=helpful-online] split=test"
    assert m["counts"] == {"train": 3, "test": 3}


# ----------------------------------------------------------------------------- partial local copies

def test_single_upstream_file(hh_dir: Path, tmp_path: Path) -> None:
    """``--source hh=harmless-base/test.jsonl.gz``: the subset from the folder, the split from the name."""
    f = hh_dir / "harmless-base" / "test.jsonl.gz"
    m = build_hh(tmp_path / "o", {"hh": str(f)}, list(HH_SUBSETS), n_train=0, n_test=0, seed=0, limit=None,
                 strict=False, dry_run=False, progress=None)
    assert m["counts"] == {"train": 0, "test": 4}
    assert m["subsets"] == ["harmless-base"] and m["sources"] == {"harmless-base/test": str(f)}
    assert m["missing"] == ["harmless-base/train"]
    test, _ = read_pairs(tmp_path / "o", "test", strict=True)
    assert [r.id for r in test if r.id.startswith("hh-harmless-base-test-")] == [r.id for r in test]
    assert (tmp_path / "o" / "train.jsonl").read_text() == ""


def test_folder_with_only_test_files(hh_dir: Path, tmp_path: Path) -> None:
    import shutil

    only = tmp_path / "only-test"
    for subset in ("harmless-base", "helpful-base"):
        (only / subset).mkdir(parents=True)
        shutil.copy(hh_dir / subset / "test.jsonl.gz", only / subset / "test.jsonl.gz")
    m = build_hh(None, {"hh": str(only)}, ["harmless-base", "helpful-base"], 0, 0, 0, None, False, True, None)
    assert m["counts"] == {"train": 0, "test": 8}
    assert m["missing"] == ["harmless-base/train", "helpful-base/train"]
    # a flat folder (one subset's own folder) works too
    m = build_hh(None, {"hh": str(hh_dir / "helpful-base")}, list(HH_SUBSETS), 0, 0, 0, None, False, True, None)
    assert m["subsets"] == ["helpful-base"] and m["counts"] == {"train": 12, "test": 4} and m["missing"] == []
