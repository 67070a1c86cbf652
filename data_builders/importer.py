"""Import any preference data (a file, a folder, a Hub id) into the canonical pair format.

``--map prompt=COL,chosen=COL,rejected=COL[,id=COL,aspect=COL,source=COL]`` names the columns
(default: the columns called ``prompt``, ``chosen``, ``rejected``, ``id``, ``aspect``,
``source`` when present). Column values may be

* plain strings (the prompt is one user turn, a response one assistant turn),
* lists of ``{"role", "content"}`` messages (ShareGPT ``{"from", "value"}`` is converted), or
  such lists JSON-encoded in a string (CSV files),
* whole conversations without a prompt column (TRL's "implicit prompt"): the prompt is the
  turns that chosen and rejected share before their final assistant turns,
* HH transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (``fmt="hh-transcript"``, or detected
  by ``fmt="auto"`` when no prompt column is mapped), parsed by :mod:`data_builders.hh`; with a
  prompt column, the transcript is ``prompt + response``.

Splits: when the source has a ``train`` split (and ``test`` / ``validation``), they are used
(``split_map`` renames them, e.g. ``{"test": "validation"}``); otherwise the rows are split by
``test_fraction`` with the seed, *by prompt*, so that no prompt is in both splits. Records keep
the source's order. Ids come from the ``id`` column, else ``<name>-<split>-<row>`` (or
``<name>-<row>`` when the test split is held out); the mapped columns are checked against the
first row.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from btpo_cli.data.pairs import (
    DEFAULT_ASPECT,
    PairRecord,
    RecordSkip,
    SkipLog,
    add_unique,
    normalize_record,
    write_dataset,
)
from btpo_cli.errors import BtpoError, UsageError, check_choice, did_you_mean
from data_builders.hh import hh_record
from data_builders.sources import SourceSpec, available_splits, load_rows, spec_from_value

MAP_FIELDS = ("prompt", "chosen", "rejected", "id", "aspect", "source")
"""Fields ``--map`` can name (``chosen`` and ``rejected`` are required)."""
FORMATS = ("auto", "columns", "hh-transcript")
"""``columns``: strings or messages per column; ``hh-transcript``: HH transcripts; ``auto``: detect."""
TEST_SPLIT_NAMES = ("test", "validation", "valid", "dev", "eval")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "model": "assistant", "bot": "assistant"}

R_PROMPTS_DIFFER = "chosen and rejected differ before the final assistant turn"
R_NO_PROMPT = "no prompt column and the responses carry no prompt turns"

Progress = Callable[[str, int], None]


def parse_column_map(text: str | None) -> dict[str, str]:
    """Parse ``"prompt=COL,chosen=COL,rejected=COL[,id=COL,aspect=COL,source=COL]"``.

    Raises :class:`BtpoError` for bad syntax, an unknown field or a field given twice.
    """
    out: dict[str, str] = {}
    if not text or not text.strip():
        return out
    for part in text.split(","):
        key, sep, col = part.partition("=")
        key, col = key.strip(), col.strip()
        if not sep or not key or not col:
            raise UsageError(f"--map {text!r}: expected FIELD=COLUMN pairs separated by commas, "
                            "e.g. prompt=question,chosen=good,rejected=bad")
        if key not in MAP_FIELDS:
            raise UsageError(f"--map: unknown field '{key}' (valid: {', '.join(MAP_FIELDS)}){did_you_mean(key, MAP_FIELDS)}")
        if key in out:
            raise UsageError(f"--map: field '{key}' given twice")
        out[key] = col
    return out


def parse_split_map(text: str | None) -> dict[str, str]:
    """Parse ``"train=SPLIT,test=SPLIT"`` (the source's split used for each output split)."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, val = (x.strip() for x in part.partition("="))
        if not sep or key not in ("train", "test") or not val:
            raise UsageError(f"--split-map {text!r}: expected train=SPLIT[,test=SPLIT]")
        out[key] = val
    return out


# ----------------------------------------------------------------------------- one row

def _coerce(value: Any) -> Any:
    """JSON-decode message lists stored as strings; convert ShareGPT messages."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, dict):
            decoded = [decoded]
        if isinstance(decoded, list) and decoded and all(isinstance(m, dict) for m in decoded) and all(
                "role" in m or "from" in m for m in decoded):
            value = decoded
        else:
            return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "from" in m and "role" not in m
                                                 for m in value):
        return [{"role": _SHAREGPT_ROLES.get(str(m["from"]).lower(), str(m["from"])),
                 "content": m.get("value")} for m in value]
    return value


def _is_transcript(value: Any) -> bool:
    return isinstance(value, str) and ("\n\nAssistant:" in value or value.lstrip().startswith("Human:"))


def _implicit_prompt(chosen: list[Any], rejected: list[Any]) -> list[Any]:
    if len(chosen) < 2 or len(rejected) < 2:
        raise RecordSkip("prompt", R_NO_PROMPT)
    if chosen[:-1] != rejected[:-1]:
        raise RecordSkip("prompt", R_PROMPTS_DIFFER)
    return chosen[:-1]


def convert_row(row: Mapping[str, Any], cmap: Mapping[str, str], rid: str, *, fmt: str = "auto",
                aspect: str = DEFAULT_ASPECT, source: str = "") -> PairRecord:
    """One source row → a validated :class:`PairRecord` (or :class:`RecordSkip` naming the field)."""
    chosen, rejected = _coerce(row.get(cmap["chosen"])), _coerce(row.get(cmap["rejected"]))
    prompt = _coerce(row.get(cmap["prompt"])) if "prompt" in cmap else None
    raw_id = row.get(cmap["id"]) if "id" in cmap else None
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise RecordSkip("id", f"expected a string or an integer, got {type(raw_id).__name__}")
    rec_id = str(raw_id) if raw_id not in (None, "") else rid
    rec_aspect = row.get(cmap["aspect"]) if "aspect" in cmap else None
    if rec_aspect is not None and not isinstance(rec_aspect, str):
        raise RecordSkip("aspect", "not a string")
    rec_aspect = rec_aspect if isinstance(rec_aspect, str) and rec_aspect.strip() else aspect
    rec_source = row.get(cmap["source"]) if "source" in cmap else None
    rec_source = str(rec_source) if rec_source not in (None, "") else source
    hh = fmt == "hh-transcript" or (fmt == "auto" and prompt is None and _is_transcript(chosen))
    if hh:
        if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
            chosen, rejected = prompt + chosen, prompt + rejected
        return hh_record({"chosen": chosen, "rejected": rejected}, rec_id, rec_source, rec_aspect)
    if prompt is None:
        if not isinstance(chosen, list) or not isinstance(rejected, list):
            raise RecordSkip("prompt", R_NO_PROMPT)
        prompt = _implicit_prompt(chosen, rejected)
    return normalize_record({"id": rec_id, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                             "aspect": rec_aspect, "source": rec_source}, 0)


# ----------------------------------------------------------------------------- whole source

def _check_columns(cmap: dict[str, str], row: Mapping[str, Any], label: str) -> dict[str, str]:
    cols = list(row.keys())
    if not cmap:  # default: same-named columns
        cmap = {f: f for f in MAP_FIELDS if f in row}
    required = ["chosen", "rejected"]
    missing = [f"{f}={cmap[f]}" for f in cmap if cmap[f] not in row]
    missing += [f"{f} (not mapped)" for f in required if f not in cmap]
    if missing:
        raise BtpoError(f"{label}: column(s) {', '.join(missing)} not found; available columns: "
                        f"{', '.join(map(str, cols))}; map them with --map prompt=COL,chosen=COL,rejected=COL")
    return cmap


def _plan_splits(spec: SourceSpec, split_map: Mapping[str, str]) -> tuple[dict[str, str | None], bool]:
    """``({"train": src_split, "test": src_split_or_None}, held_out)``: which source split feeds each."""
    have = available_splits(spec)
    if split_map:
        for key, name in split_map.items():
            if have and name not in have:
                raise BtpoError(f"{spec.describe()}: no split '{name}' for {key} (has: {', '.join(have)})")
            if not have:
                raise BtpoError(f"{spec.describe()}: has no named splits; drop --splits (the test split is "
                                "held out by --test-fraction)")
    if not have:
        return {"train": None, "test": None}, True
    train = split_map.get("train") or ("train" if "train" in have else None)
    if train is None:
        if len(have) == 1:
            train = have[0]
        else:
            raise BtpoError(f"{spec.describe()}: no 'train' split (has: {', '.join(have)}); "
                            "choose with --splits train=NAME[,test=NAME]")
    test = split_map.get("test") or next((s for s in TEST_SPLIT_NAMES if s in have and s != train), None)
    return {"train": train, "test": test}, test is None


def _read_split(spec: SourceSpec, split: str | None, cmap: dict[str, str], *, name: str, id_prefix: str,
                fmt: str, aspect: str, skips: SkipLog, limit: int | None, seen: set[str],
                progress: Progress | None) -> tuple[list[PairRecord], dict[str, str]]:
    """Convert one source split; ids default to ``<id_prefix><row:07d>`` (0-based row)."""
    records: list[PairRecord] = []
    source_label = f"import/{name}"
    rows: Iterator[tuple[str, int, dict[str, Any]]] = load_rows(spec, split, skips=skips, limit=limit)
    for i, (file, num, row) in enumerate(rows):
        if i == 0:
            cmap = _check_columns(cmap, row, file)
        if not add_unique(records, seen, skips, file, num,
                          partial(convert_row, row, cmap, f"{id_prefix}{i:07d}", fmt=fmt, aspect=aspect,
                                  source=source_label)):
            continue
        if progress is not None and (i + 1) % 1000 == 0:
            progress(f"{name}/{split or 'all'}", i + 1)
    if progress is not None:
        progress(f"{name}/{split or 'all'}", len(records))
    return records, cmap


def hold_out(records: list[PairRecord], fraction: float, seed: int) -> tuple[list[PairRecord], list[PairRecord]]:
    """Split ``records`` into (train, test) by prompt groups; the test share is ``fraction``.

    Prompt groups are shuffled with ``random.Random(seed)`` and taken into test until it holds
    at least ``round(fraction * len(records))`` records; both parts keep the input order.
    """
    if not 0 <= fraction < 1:
        raise UsageError(f"--test-fraction must be in [0, 1), got {fraction}")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(json.dumps(r.prompt, ensure_ascii=False), []).append(i)
    keys = list(groups)
    random.Random(f"import:{seed}").shuffle(keys)
    want = round(fraction * len(records))
    test_idx: set[int] = set()
    for k in keys:
        if len(test_idx) >= want:
            break
        test_idx.update(groups[k])
    return ([r for i, r in enumerate(records) if i not in test_idx],
            [r for i, r in enumerate(records) if i in test_idx])


def _default_name(source: str) -> str:
    base = source.rstrip("/").split(":")[0]
    stem = Path(base).name
    for suffix in (".gz", ".jsonl", ".json", ".csv", ".parquet"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^\w.-]+", "_", stem) or "imported"


def import_pairs(source: str, out: Path | None, *, column_map: Mapping[str, str] | str | None = None,
                 split_map: Mapping[str, str] | str | None = None, aspect: str = DEFAULT_ASPECT, seed: int = 0,
                 test_fraction: float = 0.05, fmt: str = "auto", name: str | None = None, strict: bool = False,
                 limit: int | None = None, dry_run: bool = False,
                 progress: Progress | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Import preference pairs from ``source`` into ``out`` (canonical format); return the manifest.

    Args:
        source: a JSONL/JSON/CSV/parquet file, a folder (split files or ``datasets.save_to_disk``)
            or a Hub id ``owner/name[:config]`` (e.g. the authors' ``shengyuf/BTPO_data``).
        out: the dataset folder to write.
        column_map: ``--map`` (string or parsed dict); default: same-named columns.
        split_map: ``--splits train=NAME,test=NAME`` (string or dict) for sources with splits.
        aspect: the aspect of records without an aspect column.
        seed, test_fraction: the held-out split, used when the source has no test split.
        fmt: one of :data:`FORMATS`.
        name: the dataset name (default: from the source).
        strict: the first unusable row is an error naming file, line and field.
        limit: read at most this many rows per source split.
        dry_run: build in memory, write nothing; the manifest gets ``dry_run: true`` and ``examples``.
        progress: ``progress(label, rows_read)``.
    """
    check_choice("--format", fmt, FORMATS)
    cmap = parse_column_map(column_map) if isinstance(column_map, str) or column_map is None else dict(column_map)
    for key in cmap:
        if key not in MAP_FIELDS:
            raise UsageError(f"--map: unknown field '{key}' (valid: {', '.join(MAP_FIELDS)}){did_you_mean(key, MAP_FIELDS)}")
    smap = parse_split_map(split_map) if isinstance(split_map, str) or split_map is None else dict(split_map)
    spec = spec_from_value("import", source, flag=False, default=SourceSpec(
        "import", layout="a JSONL/CSV/parquet file or a folder",
        local_hint="download it (e.g. huggingface-cli download --repo-type dataset ...) and pass the local path"))
    name = name or _default_name(source)
    plan, held_out = _plan_splits(spec, smap)
    skips = SkipLog(strict=strict)
    seen: set[str] = set()
    train, cmap = _read_split(spec, plan["train"], cmap, name=name, id_prefix=f"{name}-" if held_out else f"{name}-train-",
                              fmt=fmt, aspect=aspect, skips=skips, limit=limit, seen=seen, progress=progress)
    if held_out:
        train, test = hold_out(train, test_fraction, seed)
    else:
        test, cmap = _read_split(spec, plan["test"], cmap, name=name, id_prefix=f"{name}-test-", fmt=fmt,
                                 aspect=aspect, skips=skips, limit=limit, seen=seen, progress=progress)
    sources = {"train": spec.describe(plan["train"])}
    sources["test"] = spec.describe(plan["test"]) if not held_out else f"held out of train ({test_fraction:g})"
    manifest: dict[str, Any] = {
        "builder": "import", "name": name, "seed": seed, "aspect": aspect, "format": fmt,
        "source": source, "sources": sources, "splits": {k: v for k, v in plan.items()},
        "column_map": cmap, "test_fraction": test_fraction if held_out else None, "limit": limit,
        "skipped": skips.as_dict(),
    }
    splits = {"train": train, "test": test}
    if not train and not test:
        reasons = f"skipped {skips.total}: {skips.summary(3)}" if skips.total else "the source is empty"
        raise BtpoError(f"{source}: no usable pairs ({reasons})")
    if dry_run:
        return {**manifest, "dry_run": True, "counts": {k: len(v) for k, v in splits.items()},
                "examples": [r.to_json() for r in train[:3]]}
    if out is None:
        raise BtpoError("import_pairs: an output folder is required unless dry_run is set")
    return write_dataset(out, splits, manifest, overwrite)
