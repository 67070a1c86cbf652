"""Shared rich consoles: progress and messages go to stderr, results (tables) to stdout."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
"""Progress bars, status lines and errors."""

out = Console()
"""Results: tables, paths a script may want to capture."""
