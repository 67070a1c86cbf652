"""Malformed inputs through the CLI, as a user meets them: ``btpo build-data import`` and ``btpo train``.

Every case ends in one of two ways, with zero tracebacks and never exit 130:

* a one-line error (exit 1 for bad data, 2 for bad usage) that names the file, and the line and the
  field where there is one;
* a counted skip naming ``file:line`` (and the field): in the import manifest, and — in one training
  run over a file that holds every skip case — in ``RUN/data_skips.json``. Each skip case also goes
  through ``btpo train`` with ``data.strict=true``, where it must be a one-line error naming
  ``file:line`` and the field.

Cases: the kinds of issue 13 (truncated / corrupt gzip, invalid UTF-8, gzip bytes in a .jsonl,
Git-LFS pointers, symlink loops, missing local paths) and those of the data layer's own tests
(tests/data/test_data.py, test_importer.py, test_sources.py).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TINY_BT, run_btpo

pytestmark = pytest.mark.slow

LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"cd" * 32 + b"\nsize 52428800\n"


def good(i: int) -> dict:
    return {"id": f"g{i}", "prompt": f"Question {i}?", "chosen": f"A good answer {i}.", "rejected": f"A bad one {i}.",
            "aspect": "helpful"}


def good_lines(n: int, start: int = 0) -> bytes:
    return b"".join(json.dumps(good(i)).encode() + b"\n" for i in range(start, start + n))


# ----------------------------------------------------------------------------- file-level errors


@dataclass
class ErrorCase:
    name: str
    make: Callable[[Path], Path]          # builds the input under a folder, returns the path to pass
    says: str                              # in the error line
    line: int | None = None                # the error names FILE:LINE
    names: Callable[[Path], str] | None = None   # what the line must name (default: the path passed)
    env: dict[str, str] | None = None


def _file(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return make


def _truncated(d: Path) -> Path:
    blob = gzip.compress(good_lines(300))
    (d / "train.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    return d / "train.jsonl.gz"


def _corrupt(d: Path) -> Path:
    blob = bytearray(gzip.compress(good_lines(300)))
    blob[len(blob) // 2] ^= 0xFF
    (d / "train.jsonl.gz").write_bytes(bytes(blob))
    return d / "train.jsonl.gz"


def _symlink_loop(d: Path) -> Path:
    os.symlink(d / "train.jsonl", d / "train.jsonl")
    return d / "train.jsonl"


def _dangling(d: Path) -> Path:
    os.symlink(d / "gone.jsonl", d / "train.jsonl")
    return d / "train.jsonl"


def _folder_with_loop(d: Path) -> Path:
    os.symlink(d / "train.jsonl", d / "train.jsonl")
    return d


def _missing_local(d: Path) -> Path:
    return d / "no-such-data"


def _empty_folder(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


def _split_is_a_folder(d: Path) -> Path:
    (d / "ds" / "train.jsonl").mkdir(parents=True)
    return d / "ds"


def _binary(d: Path) -> Path:
    (d / "train.jsonl").write_bytes(bytes(range(256)) * 64)
    return d / "train.jsonl"


def _all_bad(d: Path) -> Path:
    (d / "train.jsonl").write_bytes(b'{"prompt": "p", "chosen": "same", "rejected": "same"}\n' * 5)
    return d / "train.jsonl"


def _parquet_garbage(d: Path) -> Path:
    (d / "train.parquet").write_bytes(b"PAR1" + b"\x00" * 200 + b"PAR1")
    return d / "train.parquet"


def _json_list_broken(d: Path) -> Path:
    (d / "train.json").write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": }]')
    return d / "train.json"


def _csv_bad_utf8(d: Path) -> Path:
    (d / "train.csv").write_bytes(b"prompt,chosen,rejected\nq,a,b\nq2,\xff\xfe,c\n")
    return d / "train.csv"


def _gzip_trailing_garbage(d: Path) -> Path:
    (d / "train.jsonl.gz").write_bytes(gzip.compress(good_lines(20)) + b"this is not gzip at all" * 10)
    return d / "train.jsonl.gz"


ERRORS = [
    ErrorCase("truncated-gzip", _truncated, "truncated gzip file", line=-1),
    ErrorCase("corrupt-gzip", _corrupt, "corrupt gzip data"),
    ErrorCase("gzip-trailing-garbage", _gzip_trailing_garbage, "gzip"),
    ErrorCase("lfs-pointer-jsonl-gz", _file("train.jsonl.gz", LFS), "a Git LFS pointer file"),
    ErrorCase("lfs-pointer-jsonl", _file("train.jsonl", LFS), "a Git LFS pointer file"),
    ErrorCase("lfs-pointer-parquet", _file("train.parquet", LFS), "a Git LFS pointer file"),
    ErrorCase("symlink-loop", _symlink_loop, "a symbolic link loop"),
    ErrorCase("folder-with-symlink-loop", _folder_with_loop, "a symbolic link loop",
              names=lambda p: str(p / "train.jsonl")),
    ErrorCase("dangling-symlink", _dangling, "which does not exist"),
    ErrorCase("missing-local-path", _missing_local, "no such file or folder"),
    ErrorCase("empty-file", _file("train.jsonl", b""), "no usable"),
    ErrorCase("blank-lines-only", _file("train.jsonl", b"\n  \n\r\n\t\n"), "no usable"),
    ErrorCase("every-record-bad", _all_bad, "identical to chosen ×5 (first at"),
    ErrorCase("binary-file", _binary, "invalid UTF-8"),
    ErrorCase("empty-folder", _empty_folder, "no"),
    ErrorCase("split-file-is-a-folder", _split_is_a_folder, "", names=lambda p: str(p)),
    ErrorCase("unsupported-extension", _file("train.txt", good_lines(3)), "unsupported file type"),
    ErrorCase("not-parquet", _parquet_garbage, "parquet"),
    ErrorCase("json-list-broken", _json_list_broken, "invalid JSON", line=2),
    ErrorCase("csv-invalid-utf8", _csv_bad_utf8, "", names=lambda p: str(p)),
    ErrorCase("hub-id-offline", lambda d: Path("nobody-here/no-such-dataset"), "Hugging Face Hub",
              names=lambda p: "nobody-here/no-such-dataset", env={"HF_HUB_OFFLINE": "1"}),
]


def _check_error(p, case: ErrorCase, src: Path, code: int = 1) -> str:
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr
    line = lines[0]
    named = case.names(src) if case.names else str(src)
    assert named in line and case.says in line, line
    if case.line == -1:
        assert f"{src}:" in line
    elif case.line is not None:
        assert f"{src}:{case.line}" in line
    return line


@pytest.mark.parametrize("case", ERRORS, ids=[c.name for c in ERRORS])
def test_file_level_errors(tmp_path: Path, case: ErrorCase) -> None:
    src = case.make(tmp_path)
    p = run_btpo("build-data", "import", str(src), "--out", str(tmp_path / "imported"), check=False, env=case.env)
    if case.name == "csv-invalid-utf8":
        assert f"{src}:3: invalid UTF-8" in _check_error(p, case, src)
    elif case.name in ("empty-file", "blank-lines-only"):
        _check_error(p, ErrorCase(case.name, case.make, "no usable pairs (the source is empty)"), src)
    else:
        _check_error(p, case, src)
    assert not (tmp_path / "imported").exists()
    run = tmp_path / "run"
    p = run_btpo("train", "--method", "bt", "--data", str(src), "--out", str(run), check=False, env=case.env)
    if case.name == "csv-invalid-utf8":
        _check_error(p, ErrorCase(case.name, case.make, "unsupported file type"), src)
    elif case.name in ("empty-file", "blank-lines-only"):
        _check_error(p, ErrorCase(case.name, case.make, "[train]: no usable records (it holds no records)"), src)
    else:
        _check_error(p, case, src)
    assert not run.exists()            # bad data fails before the run folder is made


# ----------------------------------------------------------------------------- bad usage (exit 2)

USAGE = [
    ("map-unknown-field", ["build-data", "import", "{src}", "--out", "{out}", "--map", "answer=x"], "--map"),
    ("map-syntax", ["build-data", "import", "{src}", "--out", "{out}", "--map", "prompt"], "--map"),
    ("split-map-syntax", ["build-data", "import", "{src}", "--out", "{out}", "--split-map", "dev=x"], "--split-map"),
    ("import-format", ["build-data", "import", "{src}", "--out", "{out}", "--format", "yaml"], "--format"),
    ("hh-source-name", ["build-data", "hh", "--out", "{out}", "--source", "anthropic={src}"], "--source"),
    ("log-every", ["train", "--method", "bt", "--data", "{src}", "--out", "{out}", "--log-every", "often"],
     "--log-every"),
]


@pytest.mark.parametrize("name,args,says", USAGE, ids=[u[0] for u in USAGE])
def test_bad_usage_exits_2(tmp_path: Path, name: str, args: list[str], says: str) -> None:
    (tmp_path / "train.jsonl").write_bytes(good_lines(4))
    argv = [a.format(src=tmp_path / "train.jsonl", out=tmp_path / "out") for a in args]
    p = run_btpo(*argv, check=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and says in p.stderr and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- records that are skipped


@dataclass
class SkipCase:
    name: str
    bad: bytes                              # the bad line(s), inserted as line 3
    field: str | None                       # the skip's field (its reason key starts with "FIELD: ")
    says: str                               # in the reason


def _rec(**kw: object) -> bytes:
    base = {"id": "x", "prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


SKIPS = [
    SkipCase("invalid-json", b'{"prompt": "Q?", "chosen": ', None, "invalid JSON"),
    SkipCase("invalid-utf8", b'{"prompt": "caf\xe9?", "chosen": "a", "rejected": "b"}', None, "invalid UTF-8"),
    SkipCase("gzip-bytes-inside", gzip.compress(b"\x00\xff" * 300 + bytes(range(128, 256))).replace(b"\n", b""),
             None, "invalid"),
    SkipCase("nul-byte", b'{"prompt": "a\x00b", "chosen": "a", "rejected": "b"}', None, "invalid JSON"),
    SkipCase("json-list", b"[1, 2, 3]", None, "expected a JSON object, got list"),
    SkipCase("json-string", b'"just a string"', None, "expected a JSON object, got str"),
    SkipCase("json-null", b"null", None, "expected a JSON object, got NoneType"),
    SkipCase("deep-nesting", b"[" * 50_000 + b"]" * 50_000, None, "nested too deeply"),
    SkipCase("prompt-missing", _rec(id="s1", prompt=...), "prompt", ""),
    SkipCase("prompt-null", _rec(id="s2", prompt=None), "prompt", ""),
    SkipCase("prompt-empty-list", _rec(id="s3", prompt=[]), "prompt", "empty"),
    SkipCase("prompt-blank-user-turn", _rec(id="s4", prompt="   "), "prompt", "no non-empty user turn"),
    SkipCase("prompt-ends-with-assistant", _rec(id="s5", prompt=[{"role": "user", "content": "a"},
                                                                 {"role": "assistant", "content": "b"}]),
             "prompt", "must end with a user turn"),
    SkipCase("message-not-an-object", _rec(id="s6", prompt=["hi"]), "prompt[0]", "expected a message object"),
    SkipCase("unknown-role", _rec(id="s7", prompt=[{"role": "robot", "content": "x"}]), "prompt[0].role",
             "unknown role"),
    SkipCase("content-not-string", _rec(id="s8", prompt=[{"role": "user", "content": 3}]), "prompt[0].content",
             "not a string"),
    SkipCase("chosen-missing", _rec(id="s9", chosen=...), "chosen", "missing"),
    SkipCase("rejected-missing", _rec(id="s10", rejected=...), "rejected", "missing"),
    SkipCase("chosen-number", _rec(id="s11", chosen=7), "chosen", "expected a string or a list"),
    SkipCase("chosen-user-turn", _rec(id="s12", chosen=[{"role": "user", "content": "x"}]), "chosen",
             "not an assistant turn"),
    SkipCase("rejected-empty", _rec(id="s13", rejected="  "), "rejected", "empty response"),
    SkipCase("identical-responses", _rec(id="s14", rejected="Good."), "rejected", "identical to chosen"),
    SkipCase("aspect-not-string", _rec(id="s15", aspect=5), "aspect", "not a string"),
    SkipCase("lone-surrogate", b'{"id": "s16", "prompt": "Q?", "chosen": "bad \\ud800", "rejected": "b"}',
             "chosen", "unpaired UTF-16 surrogate"),
    SkipCase("id-an-object", _rec(id={"a": 1}), "id", "expected a string or an integer"),
    SkipCase("duplicate-id", _rec(id="g0", chosen="Another good answer."), "id",
             "duplicate of an earlier record's id"),
]


def _with_bad_line(path: Path, bad: bytes) -> int:
    """Good lines 1-2, the bad line(s) from line 3, good lines after; returns 3."""
    path.write_bytes(good_lines(2) + bad + b"\n" + good_lines(3, start=2))
    return 3


def _keys(skips: dict, case: SkipCase) -> list[str]:
    """The skip reasons (counting keys) this case may be counted under."""
    keys = [k for k in skips["by_reason"] if (k.startswith(f"{case.field}: ") if case.field else ":" not in
                                               k.split(" (")[0]) and case.says in k]
    assert keys, (case.name, skips["by_reason"])
    return keys


def _counted_at(skips: dict, case: SkipCase, where: str) -> bool:
    return any(where in skips["where"][k] for k in _keys(skips, case))


@pytest.mark.parametrize("case", SKIPS, ids=[c.name for c in SKIPS])
def test_skipped_records(tmp_path: Path, case: SkipCase) -> None:
    src = tmp_path / "pairs.jsonl"
    line = _with_bad_line(src, case.bad)
    out = tmp_path / "imported"
    p = run_btpo("build-data", "import", str(src), "--out", str(out), "--test-fraction", "0")
    assert "Traceback" not in p.stderr
    skips = json.loads((out / "manifest.json").read_text())["skipped"]
    assert _counted_at(skips, case, f"{src}:{line}"), skips
    assert json.loads((out / "manifest.json").read_text())["counts"]["train"] == 5

    # the same file through train --strict: the skip is a one-line error naming file:line and field
    p = run_btpo("train", "--method", "bt", "--data", str(src), "--out", str(tmp_path / "run"),
                 "--set", "data.strict=true", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    (err,) = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert err.startswith(f"error: {src}:{line}") and err.endswith("(--strict)") and case.says in err, err
    if case.field:
        assert f"field '{case.field}'" in err
    assert not (tmp_path / "run").exists()


def test_every_skip_lands_in_the_run_folder(tmp_path: Path) -> None:
    """One training run over a file holding every skip case: data_skips.json counts each, with its line."""
    src = tmp_path / "train.jsonl"
    blob, where = good_lines(16), {}
    for case in SKIPS:
        where[case.name] = blob.count(b"\n") + 1
        blob += case.bad + b"\n"
    src.write_bytes(blob + good_lines(4, start=16))
    run = tmp_path / "run"
    p = run_btpo("train", "--method", "bt", "--model", "tiny-qwen2", "--data", str(src), "--out", str(run),
                 "--max-steps", "1", *TINY_BT)
    assert "Traceback" not in p.stderr
    report = json.loads((run / "data_skips.json").read_text())["train"]
    assert report["records"] == 20 and report["data"] == str(src)
    skips = report["skipped"]
    assert skips["total"] >= len(SKIPS)
    for case in SKIPS:
        assert _counted_at(skips, case, f"{src}:{where[case.name]}"), (case.name, skips)
    assert f"skipped {skips['total']} record(s)" in p.stderr.replace("\n", " ")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["data/train_pairs"] == 20


def test_the_suite_is_big_enough() -> None:
    assert len(ERRORS) + len(USAGE) + len(SKIPS) >= 30
