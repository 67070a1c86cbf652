"""The canonical preference-pair format (METHOD.md §8): validation, reading, writing.

A record, one JSON object per line of ``train.jsonl`` / ``test.jsonl``::

    {"id": "hh-00017",
     "prompt":   [{"role": "system"|"user"|"assistant", "content": str}, ...],  # ends with a user turn
     "chosen":   [{"role": "assistant", "content": str}],
     "rejected": [{"role": "assistant", "content": str}],
     "aspect": "helpful and harmless", "source": "hh-rlhf/helpful-base"}

On import, a plain string is accepted for ``prompt`` (one user turn) and for ``chosen`` /
``rejected`` (one assistant turn). A record that cannot be used is *skipped and counted*
with its reason; ``strict=True`` turns the first skip into a :class:`DataError` that names
the file, the line and the field.

A dataset folder holds ``train.jsonl``, ``test.jsonl`` and ``manifest.json`` (counts,
seed, sources, skip reasons, sha256 of every file).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from btpo_cli import __version__
from btpo_cli.console import console
from btpo_cli.data.files import (
    BOM,
    atomic_json,
    atomic_open,
    check_not_lfs_pointer,
    decode_line,
    first_char,
    iter_json_array,
    iter_lines,
    looks_like_hub_id,
    open_text,  # noqa: F401 - re-exported for readers of text formats (data_builders.sources)
    probe,
    utf8_detail,
)
from btpo_cli.data.replace import check_replace, jsonl_digest
from btpo_cli.errors import BtpoError, DataError
from btpo_cli.hub import hub_down

if TYPE_CHECKING:
    from btpo_cli.config import Config

ROLES = ("system", "user", "assistant")
DEFAULT_ASPECT = "helpful and harmless"
SPLITS = ("train", "test")


@dataclass
class PairRecord:
    """One preference pair in the canonical conversational format."""

    id: str
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    aspect: str = DEFAULT_ASPECT
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def chosen_text(self) -> str:
        return self.chosen[-1]["content"]

    @property
    def rejected_text(self) -> str:
        return self.rejected[-1]["content"]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["meta"]:
            d.pop("meta")
        return d


class RecordSkip(Exception):
    """Raised by :func:`normalize_record` for a record that cannot be used."""

    def __init__(self, field: str | None, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}" if field else reason)


MAX_WHERE = 5
"""Locations (``file:line``) kept per skip reason."""


@dataclass
class SkipLog:
    """Counts skipped records by reason, with the ``file:line`` of the first few of each; in strict
    mode the first skip is an error."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    """Reason → the first location."""
    where: dict[str, list[str]] = field(default_factory=dict)
    """Reason → the first :data:`MAX_WHERE` locations."""

    def skip(self, file: str, record: int | str | None, field: str | None, reason: str,
             detail: str | None = None) -> None:
        """Count one skipped record. ``detail`` (e.g. the byte and column) goes into the strict-mode
        error only, so that the reason stays one counting key."""
        if self.strict:
            raise DataError(file, record, field, (f"{reason} ({detail})" if detail else reason) + " (--strict)")
        key = f"{field}: {reason}" if field else reason
        self.counts[key] += 1
        where = f"{file}:{record}" if record is not None else file
        self.examples.setdefault(key, where)
        locs = self.where.setdefault(key, [])
        if len(locs) < MAX_WHERE:
            locs.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())),
                "first_seen": dict(sorted(self.examples.items())),
                "where": {k: list(v) for k, v in sorted(self.where.items())}}

    def merge(self, other: SkipLog) -> None:
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)
        for k, locs in other.where.items():
            mine = self.where.setdefault(k, [])
            mine.extend(locs[:MAX_WHERE - len(mine)])

    def summary(self, n: int = 5) -> str:
        """``reason ×count (first at file:line); ...`` for the ``n`` most common reasons."""
        return "; ".join(f"{k} ×{v} (first at {self.examples[k]})" for k, v in self.counts.most_common(n))


def to_messages(value: Any, field_name: str, default_role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        _check_text(value, field_name)
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict) and "role" in value:
        value = [value]
    if not isinstance(value, list):
        raise RecordSkip(field_name, f"expected a string or a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordSkip(f"{field_name}[{i}]", f"expected a message object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RecordSkip(f"{field_name}[{i}].role", f"unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise RecordSkip(f"{field_name}[{i}].content", "missing or not a string")
        _check_text(content, f"{field_name}[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _check_text(text: str, field_name: str) -> None:
    """Skip text that cannot be written back as UTF-8 (a lone surrogate from a ``\\ud800`` escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordSkip(field_name, f"contains an unpaired UTF-16 surrogate (\\u{ord(text[e.start]):04x})") from None


def _response(value: Any, field_name: str) -> list[dict[str, str]]:
    msgs = to_messages(value, field_name, "assistant")
    if not msgs:
        raise RecordSkip(field_name, "empty")
    if msgs[-1]["role"] != "assistant":
        raise RecordSkip(field_name, "the last message is not an assistant turn")
    # Only the final assistant turn is the response being judged.
    msgs = msgs[-1:]
    if not msgs[0]["content"].strip():
        raise RecordSkip(field_name, "empty response")
    return msgs


def normalize_record(raw: Any, index: int, default_aspect: str = DEFAULT_ASPECT,
                     default_source: str = "") -> PairRecord:
    """Validate one raw record and return it in canonical form, or raise :class:`RecordSkip`."""
    if not isinstance(raw, dict):
        raise RecordSkip(None, f"expected a JSON object, got {type(raw).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in raw or raw[key] is None:
            raise RecordSkip(key, "missing")
    prompt = to_messages(raw["prompt"], "prompt", "user")
    if not prompt:
        raise RecordSkip("prompt", "empty")
    if prompt[-1]["role"] != "user":
        raise RecordSkip("prompt", "must end with a user turn")
    if not any(m["content"].strip() for m in prompt if m["role"] == "user"):
        raise RecordSkip("prompt", "no non-empty user turn")
    chosen = _response(raw["chosen"], "chosen")
    rejected = _response(raw["rejected"], "rejected")
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise RecordSkip("rejected", "identical to chosen")
    aspect = raw.get("aspect") or default_aspect
    if not isinstance(aspect, str):
        raise RecordSkip("aspect", "not a string")
    _check_text(aspect, "aspect")
    rid = raw.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise RecordSkip("id", f"expected a string or an integer, got {type(rid).__name__}")
    rid = str(rid) if rid is not None else f"{default_source or 'pair'}-{index:07d}"
    source = raw.get("source") or default_source
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    return PairRecord(id=rid, prompt=prompt, chosen=chosen, rejected=rejected,
                      aspect=aspect, source=str(source), meta=meta)


# ----------------------------------------------------------------------------- reading

R_DUPLICATE_ID = "duplicate of an earlier record's id"


def iter_jsonl(path: Path, skips: SkipLog) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)``. A line that is not UTF-8 or not JSON is skipped and counted
    (an error in strict mode); a broken gzip stream is a :class:`DataError` naming the line."""
    for lineno, raw in iter_lines(path):
        try:
            text = decode_line(raw)
        except UnicodeDecodeError as e:
            skips.skip(str(path), lineno, None, "invalid UTF-8", detail=utf8_detail(e, 3 if raw.startswith(BOM) else 0))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            skips.skip(str(path), lineno, None, f"invalid JSON ({e.msg})")
            continue
        except RecursionError:
            skips.skip(str(path), lineno, None, "invalid JSON (nested too deeply)")
            continue
        yield lineno, obj


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa  # heavy: imported on use
    import pyarrow.parquet as pq  # heavy: imported on use

    check_not_lfs_pointer(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(str(path), None, None, f"not a readable parquet file ({str(e).splitlines()[0]})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def iter_saved(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
    import datasets  # heavy: imported on use

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; name the folder
        raise DataError(str(path), None, None, f"not a readable datasets folder ({type(e).__name__}: "
                                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise BtpoError(f"{path}: no split '{split}' (has {list(ds)})")
        ds = ds[split]
    yield from enumerate(ds, start=1)


def iter_file(path: Path, skips: SkipLog) -> Iterator[tuple[int, Any]]:
    """Records of one data file: JSON lines, a JSON list (``.json``) or parquet."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return iter_jsonl(path, skips)
    if name.endswith((".json", ".json.gz")):
        return iter_json_array(path) if first_char(path) == "[" else iter_jsonl(path, skips)
    if name.endswith(".parquet"):
        return _iter_parquet(path)
    raise BtpoError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz, .json or .parquet)")


def iter_raw_records(source: str | Path, split: str | None, skips: SkipLog) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(file, record_number, raw_object)`` from any supported source.

    ``source`` is a JSONL(.gz) file, a parquet file, a folder holding ``<split>.jsonl``, a folder
    written by ``datasets.save_to_disk``, or a Hub dataset id (``owner/name``, or ``hub:ANY`` to
    force the Hub). A path that does not exist is a Hub id only when it cannot be a local path
    (:func:`~btpo_cli.data.files.looks_like_hub_id`).
    """
    text = str(source)
    if text.startswith(("hub:", "hf:")):
        yield from iter_hub(text.split(":", 1)[1], split or "train")
        return
    path = Path(text).expanduser()
    if probe(path) is None:
        if looks_like_hub_id(text):
            yield from iter_hub(text, split or "train")
            return
        raise BtpoError(f"{source}: no such file or folder")
    if path.is_dir():
        found = next((path / c for c in (f"{split}.jsonl", f"{split}.jsonl.gz", f"{split}.parquet")
                      if split and probe(path / c) is not None), None)
        if found is None:
            if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists() \
                    or (path / "state.json").exists():
                for i, row in iter_saved(path, split):
                    yield str(path), i, row
                return
            raise BtpoError(f"{path}: no {split}.jsonl here and not a saved datasets folder")
        if found.is_dir():
            raise BtpoError(f"{found}: a folder, expected a data file")
        path = found
    for num, obj in iter_file(path, skips):
        yield str(path), num, obj

def iter_hub(repo_id: str, split: str) -> Iterator[tuple[str, int, Any]]:
    import datasets  # heavy: imported on use

    down = hub_down()       # the Hub does not answer: the cached copy, or the error at once (no retries)
    try:
        ds = datasets.load_dataset(repo_id, split=split)
    except Exception as e:  # network, auth, missing split: say which source failed
        why = f"the Hub {down}, and no cached copy was found" if down else \
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        raise BtpoError(
            f"{repo_id}: could not load split '{split}' from the Hugging Face Hub ({why}); "
            "download it and pass a local path instead"
        ) from e
    for i, row in enumerate(ds, start=1):
        yield f"{repo_id}:{split}", i, row


def read_pairs(source: str | Path, split: str = "train", strict: bool = False,
               default_aspect: str = DEFAULT_ASPECT, skips: SkipLog | None = None) -> tuple[list[PairRecord], SkipLog]:
    """Read and validate canonical pair records. Returns the records and the skip log."""
    skips = skips if skips is not None else SkipLog(strict=strict)
    out: list[PairRecord] = []
    seen: set[str] = set()
    for file, num, raw in iter_raw_records(source, split, skips):
        add_unique(out, seen, skips, file, num, partial(normalize_record, raw, num, default_aspect=default_aspect))
    return out, skips


def add_unique(records: list[PairRecord], seen: set[str], skips: SkipLog, file: str, num: int,
               make: Callable[[], PairRecord]) -> bool:
    """Append ``make()``'s record unless making it is skipped (:class:`RecordSkip`) or its id is in
    ``seen``: then log the skip (``file``, ``num``) and return False."""
    try:
        rec = make()
        if rec.id in seen:
            raise RecordSkip("id", R_DUPLICATE_ID)
    except RecordSkip as s:
        skips.skip(file, num, s.field, s.reason)
        return False
    seen.add(rec.id)
    records.append(rec)
    return True


_PRELOADED: dict[tuple[str, str, bool], tuple[list[PairRecord], SkipLog]] = {}


def read_split(source: str | Path, split: str, strict: bool = False,
               limit: int | None = None) -> tuple[list[PairRecord], SkipLog]:
    """:func:`read_pairs` for one split of a run's data, using what :func:`preload_split` read in
    this process if it did; ``limit`` keeps the first records. No usable record is an error that
    names the source and the split."""
    pre = _PRELOADED.pop((str(source), split, strict), None)
    records, skips = pre if pre is not None else read_pairs(source, split, strict=strict)
    if limit is not None:
        records = records[:limit]
    if not records:
        why = f"skipped {skips.total}: {skips.summary(3)}" if skips.total else "it holds no records"
        raise BtpoError(f"{source} [{split}]: no usable records ({why})")
    return records, skips


def preload_split(source: str | Path, split: str, strict: bool = False) -> None:
    """Read and check a split before the heavy set-up (torch, the model), so that bad data fails in
    a second; the training loop's :func:`read_split` then takes the records from here."""
    records, skips = read_split(source, split, strict)
    _PRELOADED[(str(source), split, strict)] = (records, skips)


def load_split(cfg: Config, split: str, acc: Any = None, limit: int | None = None,
               record_skips: Callable[[str, str, int, dict[str, Any]], None] | None = None) -> list[PairRecord]:
    """Read and validate one split of ``cfg.data.path`` (``data.limit`` applies to the training split).
    Skipped records are reported on the main process (``acc``'s, or this one without ``acc``): a line
    on stderr and, when training, ``record_skips(split, data, records, skips)`` (``Run.record_skips``:
    ``RUN/data_skips.json``)."""
    lim = limit if limit is not None else (cfg.data.limit if split == cfg.data.train_split else None)
    records, skips = read_split(cfg.data.path, split, strict=cfg.data.strict, limit=lim)
    main = acc is None or acc.is_main_process
    if skips.total and main:
        console.print(f"[yellow]{escape(f'{cfg.data.path} [{split}]')}: skipped {skips.total} record(s): "
                      f"{escape(skips.summary())}[/]", highlight=False, soft_wrap=True)
    if record_skips is not None and main:
        record_skips(split, str(cfg.data.path), len(records), skips.as_dict())
    return records


def seeded_sample(pool: Sequence[PairRecord], n: int, key: str) -> list[PairRecord]:
    """A sample of ``n`` records seeded by the string ``key`` (all, shuffled, when ``n`` is 0 or at
    least the pool): the builders' down-sampling, the same on every machine and Python."""
    rng = random.Random(key)
    if n <= 0 or n >= len(pool):
        out = list(pool)
        rng.shuffle(out)
        return out
    return rng.sample(list(pool), n)


# ----------------------------------------------------------------------------- writing

def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL atomically (temp file + rename). Deterministic bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
            n += 1
    return n


def write_dataset(out_dir: str | Path, splits: dict[str, list[PairRecord]], manifest: dict[str, Any],
                  overwrite: bool = False) -> dict[str, Any]:
    """Write ``<split>.jsonl`` for each split and ``manifest.json``; return the manifest.

    The manifest gets ``counts`` and ``sha256`` filled in; everything else (``builder``, ``seed``,
    ``sources``, ``skipped``, ...) comes from the caller. No timestamps, so the same inputs and
    seed give byte-identical folders. A folder that already holds these files is left as it is; one
    that holds different ones is refused unless ``overwrite`` (:func:`~btpo_cli.data.replace.check_replace`).
    """
    out = Path(out_dir)
    counts, digests = {}, {}
    for name, records in splits.items():
        digests[f"{name}.jsonl"], counts[name] = jsonl_digest(r.to_json() for r in records)
    full = {"format": "btpo-pairs/1", "btpo_version": __version__, **manifest,
            "counts": counts, "sha256": digests}
    if check_replace(out, full, overwrite):
        return {**full, "unchanged": True}     # the same dataset is there already: nothing to write
    out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        write_jsonl(out / f"{name}.jsonl", (r.to_json() for r in records))
    atomic_json(out / "manifest.json", full)
    return full


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    p = Path(data_dir) / "manifest.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(str(p), e.lineno, None, f"invalid JSON ({e.msg})") from e


def dataset_name(data_dir: str | Path) -> str:
    """The dataset's short name: the manifest's ``name`` or the folder name."""
    m = read_manifest(data_dir) if Path(data_dir).is_dir() else {}
    return str(m.get("name") or Path(str(data_dir).rstrip("/")).name or "data")
