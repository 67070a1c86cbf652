"""``build-data`` never replaces a different dataset by accident (docs/provenance.md).

:func:`check_replace` compares what a builder is about to write (its manifest, with the sha256 of every
split file) with what the output folder holds: the same files are a no-op, a folder without them is
written (or completed), and different files are refused with one line naming the folder and what differs
(the manifest's builder, seed, settings, sources, counts …, else the file digests) unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from btpo_cli.errors import BtpoError

IGNORED = ("format", "btpo_version", "sha256")
"""Manifest keys that do not make a dataset different (the writer's version) or are compared as files."""


def jsonl_digest(rows: Iterable[dict[str, Any]]) -> tuple[str, int]:
    """The sha256 and line count of the JSONL :func:`~btpo_cli.data.pairs.write_jsonl` would write."""
    h, n = hashlib.sha256(), 0
    for row in rows:
        h.update((json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))
        n += 1
    return h.hexdigest(), n


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    present = {name: _sha256(out / name) for name in digests if (out / name).is_file()}
    differ = sorted(name for name, d in present.items() if d != digests[name])
    if not differ:
        return len(present) == len(digests)
    if overwrite:
        return False
    old = _old_manifest(out)
    what = []
    if old is not None:
        for key in sorted(set(old) | set(new)):
            if key not in IGNORED and old.get(key) != new.get(key):
                what.append(f"{key} {_short(old.get(key))} → {_short(new.get(key))}")
    if not what:
        what = [f"{', '.join(differ)} differ" + ("" if old is not None else " (no manifest.json)")]
    raise BtpoError(f"{out} already holds a different dataset ({'; '.join(what[:4])}"
                    f"{f'; +{len(what) - 4} more' if len(what) > 4 else ''}); pass --overwrite to replace it, "
                    "or choose another --out")
