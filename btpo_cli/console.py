"""Shared rich consoles: progress and messages go to stderr, results (tables, paths) to stdout."""

from __future__ import annotations

import contextlib
from typing import Any

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)
"""Progress bars, status lines and errors."""

out = Console(soft_wrap=True)
"""Results: tables, paths a script may want to capture. Never wrapped at the terminal's (or, piped,
80 columns') width: a wrapped markdown row or path is a broken one in a log or ``$(…)``."""

_LIVE: list[Any] = []


def register_live(display: Any) -> None:
    """Remember a started live display (a progress bar) so that :func:`stop_live` can end it."""
    _LIVE.append(display)


def unregister_live(display: Any) -> None:
    with contextlib.suppress(ValueError):
        _LIVE.remove(display)


def stop_live() -> None:
    """Stop every live display still running (an error or Ctrl-C escaped its loop): until it
    stops, rich holds back what is printed, and the error line would never appear."""
    while _LIVE:
        with contextlib.suppress(Exception):
            _LIVE.pop().stop()


def print_error(text: str) -> None:
    """The one-line ``error: ...`` of a failed command (markup in ``text`` is shown as it is)."""
    console.print(f"[red]error:[/] {escape(' '.join(text.splitlines()))}", highlight=False, soft_wrap=True)


def quiet_transformers() -> None:
    """Keep transformers' load reports and per-file progress bars out of our progress display."""
    import transformers  # heavy: only callers that are about to load a model pay for it

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
