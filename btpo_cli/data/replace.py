"""``build-data`` never replaces a different dataset by accident (docs/provenance.md).

:func:`check_replace` compares what a builder is about to write (its manifest, with the sha256 of every
split file) with what the output folder holds: the same files are a no-op, a folder without them is
written (or completed), and different files are refused with one line naming the folder and what differs
(the manifest's builder, seed, settings, sources, requested sizes …; the file digests when there is no
manifest) unless ``--overwrite``. Files that differ while every input in the manifest is the same are a
re-run of the same build (a generation builder completing its failed requests) and are written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from btpo_cli.data.files import sha256_file
from btpo_cli.errors import BtpoError

OUTCOMES = ("format", "btpo_version", "sha256", "counts", "skipped", "failed", "judging", "grading", "pairs",
            "no_pair", "ties", "questions", "prompts", "label_flipped", "subset_counts", "missing",
            "splits_without_source", "generation_run")
"""Manifest keys that record what a build produced, not what it was asked for: two builds that differ only
in these are the same dataset, made again (a re-run that completes failed requests, a resumed build)."""


def jsonl_digest(rows: Iterable[dict[str, Any]]) -> tuple[str, int]:
    """The sha256 and line count of the JSONL :func:`~btpo_cli.data.pairs.write_jsonl` would write."""
    h, n = hashlib.sha256(), 0
    for row in rows:
        h.update((json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))
        n += 1
    return h.hexdigest(), n


def _short(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "…"


def _old_manifest(out: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def check_replace(out: Path, new: dict[str, Any], overwrite: bool) -> bool:
    """Whether ``out`` already holds exactly the split files of manifest ``new`` (then nothing needs writing).
    Raises :class:`BtpoError` when it holds different ones and ``overwrite`` is not set."""
    digests: dict[str, str] = new.get("sha256") or {}
    present = {name: sha256_file(out / name) for name in digests if (out / name).is_file()}
    differ = sorted(name for name, d in present.items() if d != digests[name])
    if not differ:
        return len(present) == len(digests)
    if overwrite:
        return False
    old = _old_manifest(out)
    if old is not None:
        what = [f"{key} {_short(old.get(key))} → {_short(new.get(key))}" for key in sorted(set(old) | set(new))
                if key not in OUTCOMES and old.get(key) != new.get(key)]
        if not what:
            return False         # the same builder, inputs and settings: a re-run that completes or refreshes it
    else:
        what = [f"{', '.join(differ)} differ (no manifest.json)"]
    raise BtpoError(f"{out} already holds a different dataset ({'; '.join(what[:4])}"
                    f"{f'; +{len(what) - 4} more' if len(what) > 4 else ''}); pass --overwrite to replace it, "
                    "or choose another --out")
