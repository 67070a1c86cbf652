"""Shared rich consoles: progress and messages go to stderr, results (tables, paths) to stdout."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from btpo_cli.errors import check_choice

console = Console(stderr=True)
"""Progress bars, status lines and errors."""

out = Console(soft_wrap=True)
"""Results: tables, paths a script may want to capture. Never wrapped at the terminal's (or, piped,
80 columns') width: a wrapped markdown row or path is a broken one in a log or ``$(…)``. When stdout is
not a terminal (a pipe, a file), tables are drawn at their natural width too: whole rows, nothing cut
(``btpo models | grep smollm2-135m`` finds its row)."""
if not out.is_terminal:
    out.width = 1_000_000      # a table is as wide as its content; rich pads nothing at this width

FORMATS = ("table", "json", "tsv")
"""The one ``--format`` spelling of every command that prints a table (``compare`` adds markdown, csv)."""

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


QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",            # transformers' load reports, deprecation notes
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "ACCELERATE_LOG_LEVEL": "ERROR",              # accelerate's "[RANK 0] Removed shared tensor ..." on tied saves
    "VLLM_LOGGING_LEVEL": "ERROR",                # vLLM's INFO/WARNING chatter (RotaryEmbedding weights, ...)
    "VLLM_CONFIGURE_LOGGING": "1",
    "DS_LOG_LEVEL": "error",
    "TORCH_CPP_LOG_LEVEL": "ERROR",               # c10d / NCCL / NUMA notices from torch's C++ side
    "NCCL_DEBUG": "WARN",
    "HF_HUB_VERBOSITY": "error",                  # huggingface_hub sets its logger's level from this on import
    "DATASETS_VERBOSITY": "error",                # (over quiet_third_party's): no "Retrying in 1s" lines
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
}
"""Set (where the user has not) by :func:`quiet_third_party`; inherited by every process the CLI
spawns (``accelerate launch`` ranks, vLLM workers), so one place quiets them all."""

QUIET_LOGGERS = ("transformers", "accelerate", "vllm", "torch.distributed", "torch._dynamo", "torch._inductor",
                 "DeepSpeed", "deepspeed", "peft", "datasets", "huggingface_hub", "urllib3", "filelock")


def quiet_third_party() -> None:
    """Hide third-party warnings and logs that are not actionable (vLLM, transformers, accelerate,
    torch.distributed, DeepSpeed; Python ``FutureWarning`` / ``DeprecationWarning`` / ``UserWarning``
    from them) unless ``--verbose`` / ``BTPO_VERBOSE=1``. Torch-free: only environment variables,
    ``warnings`` filters and ``logging`` levels, set before the libraries are imported. btpo's own
    warnings (``btpo_cli.*``) stay visible."""
    if verbose():
        return
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if not sys.stderr.isatty():        # third-party tqdm bars in a log: one line per refresh, no use
        os.environ.setdefault("TQDM_DISABLE", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("default", category=UserWarning, module=r"btpo_cli(\..*)?$")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_transformers() -> None:
    """Keep transformers' load reports and per-file progress bars out of our progress display."""
    import transformers  # heavy: only callers that are about to load a model pay for it

    quiet_third_party()
    if not verbose():
        transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def check_format(fmt: str, allowed: Sequence[str] = FORMATS) -> str:
    """``--format`` must be one of ``allowed``: a bad value is a usage error (exit 2)."""
    return check_choice("--format", fmt, allowed)


def tsv_cell(value: Any) -> str:
    """One TSV cell: ``None`` → empty, tabs and newlines → spaces, lists joined by ``;``."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = ";".join(str(v) for v in value)
    return " ".join(str(value).replace("\t", " ").splitlines())


def to_tsv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A header line of ``columns``, then one line per row, tab-separated (``cut -f``, ``awk -F'\\t'``)."""
    lines = ["\t".join(columns)] + ["\t".join(tsv_cell(c) for c in row) for row in rows]
    return "\n".join(lines) + "\n"


def write_json(doc: Any) -> None:
    """A JSON document on stdout (indented, UTF-8, one trailing newline), flushed."""
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def write_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def print_records(fmt: str, columns: Sequence[tuple[str, str]], records: Sequence[dict[str, Any]],
                  title: str | None = None) -> None:
    """Records (dicts) on stdout: ``table`` (rich; whole when piped), ``json`` (a list of objects with
    the column keys), ``tsv`` (a header line of the keys, one line per record)."""
    keys = [k for k, _ in columns]
    if fmt == "json":
        write_json([{k: r.get(k) for k in keys} for r in records])
    elif fmt == "tsv":
        write_text(to_tsv(keys, [[r.get(k) for k in keys] for r in records]))
    else:
        t = Table(title=title)
        for _, header in columns:
            t.add_column(header)
        for r in records:
            t.add_row(*(escape(tsv_cell(r.get(k)) or "-") for k in keys))
        out.print(t)


def verbose() -> bool:
    """``--verbose`` (or ``BTPO_VERBOSE=1``): third-party warnings and logs are shown."""
    return os.environ.get("BTPO_VERBOSE", "") not in ("", "0")
