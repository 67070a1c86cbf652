"""A run folder's ``launch`` record (strategy, world size, nodes, precision, versions: written by
:mod:`btpo_cli.training.preflight`), read without torch for ``btpo compare``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def launch_of(run_dir: str | Path) -> dict[str, Any] | None:
    """The launch record of a run folder (final/btpo.json, else env.json); None (unknown) for runs
    made before it was recorded, or unreadable files."""
    for p in (Path(run_dir) / "final" / "btpo.json", Path(run_dir) / "env.json"):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("launch"), dict):
            return doc["launch"]
    return None
