"""Peak resident memory of one call, for the bench scripts that run each variant in its own process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def rss_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); 0 where absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_growth_mib(fn: Callable[[], Any]) -> float:
    """MiB the process's peak RSS grew above its current RSS while ``fn()`` ran (the high-water mark is
    reset first through ``/proc/self/clear_refs``; Linux only)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_kib("VmRSS")
    fn()
    return (rss_kib("VmHWM") - before) / 1024
