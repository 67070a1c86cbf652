"""Where a builder's inputs come from: a Hub dataset by default, or a local copy.

Every builder names its inputs (``hh``, ``metamathqa``, ``gsm8k``, ``math500``, ``advancedif``)
and gives each a default Hub location (:data:`BUILDER_SOURCES`). ``--source NAME=VALUE``
(repeatable) replaces one of them; VALUE is

* a local path (checked first): a file (``.jsonl``, ``.jsonl.gz``, ``.json`` holding a list or
  JSON lines, ``.csv``, ``.csv.gz``, ``.parquet``) or a folder: a ``datasets.save_to_disk``
  folder, or a folder laid out like the Hub repository (``<split>.jsonl``,
  ``<data_dir>/<split>.jsonl.gz``, ``<config>/<split>-00000-of-00001.parquet``, ``data/...``),
  or a folder holding a single data file;
* a Hub dataset id ``owner/name``, optionally ``owner/name:config`` (``hub:`` prefix allowed).

:func:`load_rows` then yields ``(file_label, record_number, row)`` for one split. The record
number is the line number for JSONL, the line on which the record starts for CSV, and the
1-based position for JSON lists, parquet and ``datasets`` tables. Rows that cannot be read
(invalid JSON, a non-object) are counted in the :class:`~btpo_cli.data.pairs.SkipLog` (or raise in
strict mode). When a Hub load fails (no network, no such split) the error names the source and
says how to point at a local copy.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from btpo_cli.data.files import DATA_SUFFIXES, guard, looks_like_hub_id, open_text, probe
from btpo_cli.data.pairs import SkipLog, iter_file, iter_saved
from btpo_cli.errors import BtpoError, UsageError, did_you_mean
from btpo_cli.hub import hub_down

STANDARD_SPLITS = ("train", "test", "validation", "valid", "dev", "eval")
"""Split names recognised in file names (``test.jsonl``, ``train-00000-of-00002.parquet``)."""

_SPLIT_FILE_RE = re.compile(
    r"^(?P<split>[A-Za-z0-9_]+?)(?:[-_]\d{5}-of-\d{5})?(?P<ext>\.jsonl|\.jsonl\.gz|\.json|\.json\.gz"
    r"|\.csv|\.csv\.gz|\.parquet)$")


@dataclass(frozen=True)
class SourceSpec:
    """One input of a builder: a Hub dataset (id, config, data_dir) or a local ``path``."""

    name: str
    hub_id: str | None = None
    config: str | None = None
    data_dir: str | None = None
    path: Path | None = None
    split: str | None = None
    """The split this input is read from by default (``None``: the caller chooses)."""
    layout: str = ""
    """One line: what a local copy looks like (shown in errors)."""
    local_hint: str = ""
    """How to use a local copy instead of the Hub (default: ``--source NAME=./path``)."""

    @property
    def is_local(self) -> bool:
        """Whether this input is a local path (else a Hub dataset)."""
        return self.path is not None

    def with_data_dir(self, data_dir: str | None) -> SourceSpec:
        """The same source, one subfolder down (``data_dir`` on the Hub, a subfolder locally)."""
        return replace(self, data_dir=data_dir)

    def describe(self, split: str | None = None) -> str:
        """A one-line label: the local file(s) read, or ``hub:owner/name[...] split=...``."""
        split = split or self.split
        if self.path is not None:
            try:
                files = resolve_files(self, split)
            except BtpoError:
                files = [self.path / self.data_dir if self.data_dir else self.path]
            return ", ".join(str(f) for f in files)
        extra = [f"config={self.config}"] if self.config else []
        extra += [f"data_dir={self.data_dir}"] if self.data_dir else []
        inner = f"[{', '.join(extra)}]" if extra else ""
        return f"hub:{self.hub_id}{inner}" + (f" split={split}" if split else "")


BUILDER_SOURCES: dict[str, dict[str, SourceSpec]] = {
    "hh": {
        "hh": SourceSpec("hh", hub_id="Anthropic/hh-rlhf",
                         layout="a folder with <subset>/train.jsonl.gz and <subset>/test.jsonl.gz"),
    },
    "math": {
        "metamathqa": SourceSpec("metamathqa", hub_id="meta-math/MetaMathQA", split="train",
                                 layout="MetaMathQA-395K.json (a JSON list) or a JSONL file"),
        "gsm8k": SourceSpec("gsm8k", hub_id="openai/gsm8k", config="main", split="test",
                            layout="the test file (JSONL or parquet) or a folder with main/test-*.parquet"),
        "math500": SourceSpec("math500", hub_id="HuggingFaceH4/MATH-500", split="test",
                              layout="test.jsonl or a folder holding it"),
    },
    "if": {
        "advancedif": SourceSpec("advancedif", hub_id="facebook/AdvancedIF", split="train",
                                 layout="if_oss_full_data.csv or a folder holding it"),
    },
}
"""Each builder's named inputs and their default Hub locations."""


# ----------------------------------------------------------------------------- parsing --source

def parse_source_args(items: Sequence[str] | None, valid: Iterable[str]) -> dict[str, str]:
    """Parse repeated ``--source NAME=VALUE`` strings into ``{NAME: VALUE}``.

    Raises :class:`BtpoError` for a string without ``=``, an empty name or value, a NAME not in
    ``valid`` (the message lists the valid names) or a NAME given twice.
    """
    valid_names = sorted(valid)
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise UsageError(f"--source {item!r}: expected NAME=PATH_OR_HUB_ID, e.g. --source hh=./hh-rlhf "
                            f"(valid names: {', '.join(valid_names)})")
        if name not in valid_names:
            raise UsageError(f"--source {item!r}: unknown source name '{name}' "
                            f"(valid names: {', '.join(valid_names)}){did_you_mean(name, valid_names)}")
        if name in out:
            raise UsageError(f"--source {name}=... given twice")
        out[name] = value
    return out


def spec_from_value(name: str, value: str, default: SourceSpec | None = None, flag: bool = True) -> SourceSpec:
    """Turn a ``--source`` VALUE into a :class:`SourceSpec` (local path first, then Hub id).

    ``default`` supplies the split, layout hint and (for a Hub id without ``:config``) nothing
    else: a new Hub id does not inherit the default's config or data_dir. ``flag``: errors name the
    value as ``--source NAME=VALUE`` (else as the value alone).
    """
    base = default or SourceSpec(name)
    raw = value.strip()
    forced_hub = raw.startswith(("hub:", "hf:"))
    if forced_hub:
        raw = raw.split(":", 1)[1]
    path = Path(raw).expanduser()
    if not forced_hub and probe(path) is not None:
        return replace(base, name=name, path=path, hub_id=None)
    if forced_hub or looks_like_hub_id(raw):
        hub_id, _, config = raw.partition(":")
        return replace(base, name=name, hub_id=hub_id, config=config or None, path=None)
    label = f"--source {name}={value}" if flag else value
    raise BtpoError(f"{label}: no such file or folder, and not a Hub id (owner/name; write hub:{raw} to mean the Hub)")


def resolve_sources(builder: str, overrides: Mapping[str, str] | None = None) -> dict[str, SourceSpec]:
    """The builder's inputs with ``--source`` overrides applied (``{NAME: SourceSpec}``)."""
    if builder not in BUILDER_SOURCES:
        raise BtpoError(f"unknown builder '{builder}' (known: {', '.join(sorted(BUILDER_SOURCES))})")
    defaults = BUILDER_SOURCES[builder]
    out = dict(defaults)
    for name, value in (overrides or {}).items():
        if name not in defaults:
            raise UsageError(f"--source {name}=...: the {builder} builder has no input '{name}' "
                            f"(valid names: {', '.join(sorted(defaults))}){did_you_mean(name, defaults)}")
        out[name] = spec_from_value(name, value, defaults[name])
    return out


# ----------------------------------------------------------------------------- local layout

def _is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _has_suffix(p: Path) -> bool:
    """A data file by its name (a symlink loop or a dangling link with such a name is an error)."""
    if not p.name.endswith(DATA_SUFFIXES) or p.name.startswith("."):
        return False
    probe(p)
    return p.is_file()


def _search_dirs(spec: SourceSpec) -> list[Path]:
    assert spec.path is not None
    base = spec.path / spec.data_dir if spec.data_dir else spec.path
    if spec.data_dir and not base.is_dir():
        have = sorted(p.name for p in spec.path.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise BtpoError(f"source '{spec.name}': {spec.path} has no folder '{spec.data_dir}' "
                        f"(has: {', '.join(have) or 'no folders'}; expected {spec.layout or 'the Hub layout'})")
    dirs = [base]
    if spec.config:
        dirs.append(base / spec.config)
    dirs.append(base / "data")
    return [d for d in dirs if d.is_dir()]


def _split_of(p: Path) -> str | None:
    m = _SPLIT_FILE_RE.match(p.name)
    return m.group("split") if m and m.group("split") in STANDARD_SPLITS else None


def resolve_files(spec: SourceSpec, split: str | None) -> list[Path]:
    """The local files (or one ``datasets`` folder) that hold ``split`` of a local source.

    A file is used as it is, whatever the split. In a folder, files named after the split
    (``test.jsonl``, ``test-00000-of-00001.parquet``) are looked for in the folder (or its
    ``data_dir``), its ``<config>/`` and ``data/`` subfolders; a folder with no split-named
    files and exactly one data file gives that file.
    """
    if spec.path is None:
        raise BtpoError(f"source '{spec.name}' is a Hub dataset, not a local path")
    root = spec.path / spec.data_dir if spec.data_dir and spec.path.is_dir() else spec.path
    if root.is_file():
        return [root]
    if _is_datasets_folder(root):
        return [root]
    dirs = _search_dirs(spec)
    for d in dirs:
        if _is_datasets_folder(d):
            return [d]
    files = sorted({p for d in dirs for p in d.iterdir() if _has_suffix(p)})
    if split:
        named = [p for p in files if _split_of(p) == split]
        if named:
            return named
    if not any(_split_of(p) for p in files) and len(files) == 1:
        return files
    listing = ", ".join(str(p.relative_to(spec.path)) for p in files[:12]) or "no data files"
    want = f"split '{split}'" if split else "a single data file"
    raise BtpoError(f"source '{spec.name}': no file for {want} in {root} (found: {listing}; "
                    f"expected {spec.layout or '<split>.jsonl, <split>.parquet or a datasets folder'})")


def available_splits(spec: SourceSpec) -> list[str]:
    """The splits a source offers; ``[]`` for a single local file (unsplit data).

    For a Hub dataset this asks the Hub (``datasets.get_dataset_split_names``).
    """
    if spec.path is None:
        import datasets  # heavy: imported on use

        kwargs = {"data_dir": spec.data_dir} if spec.data_dir else {}
        hub_down()       # the Hub does not answer: the cached copy, or the error at once (no retries)
        try:
            return list(datasets.get_dataset_split_names(spec.hub_id, spec.config, **kwargs))
        except Exception as e:  # network, auth, unknown dataset
            raise _hub_error(spec, None, e) from e
    root = spec.path / spec.data_dir if spec.data_dir and spec.path.is_dir() else spec.path
    if root.is_file():
        return []
    for d in [root, *_search_dirs(spec)]:
        if (d / "dataset_dict.json").exists():
            return list(json.loads((d / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", []))
        if _is_datasets_folder(d):
            return []
    found = {s for d in _search_dirs(spec) for p in d.iterdir() if _has_suffix(p) and (s := _split_of(p))}
    return [s for s in STANDARD_SPLITS if s in found]


# ----------------------------------------------------------------------------- readers

def _iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    return guard(path, _csv_rows(path))


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    limit = sys.maxsize
    while True:  # the largest field size this platform accepts
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:
            limit //= 10
    with open_text(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:  # reads the header; an empty file has no rows
            return
        start = reader.line_num + 1
        for row in reader:
            if None in row:  # more cells than header columns
                row = {k: v for k, v in row.items() if k is not None}
            yield start, dict(row)
            start = reader.line_num + 1


def _iter_file(path: Path, split: str | None, skips: SkipLog) -> Iterator[tuple[int, Any]]:
    if path.is_dir():
        return iter_saved(path, split)
    if path.name.endswith((".csv", ".csv.gz")):
        return _iter_csv(path)
    if path.name.endswith(DATA_SUFFIXES):
        return iter_file(path, skips)
    raise BtpoError(f"{path}: unsupported file type (expected one of {', '.join(DATA_SUFFIXES)})")


def _hub_error(spec: SourceSpec, split: str | None, e: Exception) -> BtpoError:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    down = hub_down()
    why = f"the Hub {down}, and no cached copy was found" if down else f"{type(e).__name__}: {first}"
    how = spec.local_hint or f"download it and point at the local copy with --source {spec.name}=./path"
    layout = f" ({spec.layout})" if spec.layout else ""
    return BtpoError(f"source '{spec.name}': could not load {spec.describe(split)} from the Hugging Face Hub "
                     f"({why}); {how}{layout}")


def _iter_hub(spec: SourceSpec, split: str | None) -> Iterator[tuple[str, int, Any]]:
    import datasets  # heavy: imported on use

    kwargs: dict[str, Any] = {"split": split}
    hub_down()       # the Hub does not answer: the cached copy, or the error at once (no retries)
    if spec.data_dir:
        kwargs["data_dir"] = spec.data_dir
    try:
        ds = datasets.load_dataset(spec.hub_id, spec.config, **kwargs)
    except Exception as e:  # network, auth, missing split: say which source failed and what to do
        raise _hub_error(spec, split, e) from e
    label = spec.describe(split)
    for i, row in enumerate(ds, start=1):
        yield label, i, row


def load_rows(spec: SourceSpec, split: str | None = None, *, skips: SkipLog | None = None,
              limit: int | None = None) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield ``(file_label, record_number, row)`` for one split of a source.

    ``split`` defaults to ``spec.split``. ``limit`` caps the records read from this input (all
    its files together). Records that are not JSON objects are counted in ``skips`` (or raise
    :class:`DataError` when ``skips`` is strict); without ``skips`` the first one raises.
    """
    skips = skips if skips is not None else SkipLog(strict=True)
    split = split or spec.split
    if limit is not None and limit <= 0:
        return
    if spec.path is None:
        stream: Iterable[tuple[str, int, Any]] = _iter_hub(spec, split)
    else:
        files = resolve_files(spec, split)
        stream = ((str(f), num, obj) for f in files for num, obj in _iter_file(f, split, skips))
    for n, (label, num, obj) in enumerate(stream, start=1):
        if isinstance(obj, dict):
            yield label, num, obj
        else:
            skips.skip(label, num, None, f"expected a JSON object, got {type(obj).__name__}")
        if limit is not None and n >= limit:
            return
