"""SIGTERM / SIGUSR1 on every rank: stop at the next step boundary together, checkpoint, exit 75.

:func:`install` (each training process, at start-up) sets the handlers; the loops call
:func:`agreed` at each step boundary — an all-reduce (max) of the flag, so a signal seen by any
rank stops them all at the same step — write their checkpoint, then :func:`stop` raises
:class:`Preempted`. A repeated signal changes nothing; Ctrl-C still stops at once. docs/launching.md.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from btpo_cli.console import console

EXIT_PREEMPTED = 75
"""Exit code of a run stopped by SIGTERM / SIGUSR1 with its checkpoint written (EX_TEMPFAIL: try again)."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STATUS_ENV = "BTPO_LAUNCH_STATUS"
"""Set by the launcher: a file where the workers note a preemption (they exit 0), and beside it
``.pids``, where each worker writes its pid (torchrun starts each worker in its own session)."""
_got: list[int] = []


class Preempted(Exception):  # noqa: N818 - a stop, not an error
    """Raised by the training loop after the checkpoint of ``step`` is written."""

    def __init__(self, signum: int, step: int):
        name = signal.Signals(signum).name
        forwarded = Path(os.environ.get(STATUS_ENV, "") + ".sig")
        if os.environ.get(STATUS_ENV) and forwarded.exists():      # what the launcher received
            name = forwarded.read_text(encoding="utf-8").strip() or name
        super().__init__(f"stopped by {name} at step {step}")
        self.signum, self.step = signum, step


def _handler(signum: int, frame: Any) -> None:
    if not _got:        # a repeat (Slurm may signal every process as well as the launcher) changes nothing
        _got.append(signum)


def install() -> dict[int, Any]:
    """Handle SIGTERM and SIGUSR1 in this process (main thread only; elsewhere a no-op). Returns the
    handlers it replaced, for :func:`restore`."""
    _got.clear()
    old: dict[int, Any] = {}
    try:
        for s in SIGNALS:
            old[s] = signal.signal(s, _handler)
    except ValueError:      # not the main thread (an in-process caller): leave the defaults
        return old
    if os.environ.get(STATUS_ENV):      # under the launcher: tell it where to send the signal
        with open(os.environ[STATUS_ENV] + ".pids", "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
        if Path(os.environ[STATUS_ENV] + ".sig").exists():     # signalled while this process was starting
            _got.append(signal.SIGUSR1)
    return old


def restore(old: dict[int, Any]) -> None:
    """Put back the handlers :func:`install` replaced (an in-process caller keeps its own)."""
    for s, h in old.items():
        signal.signal(s, h)


def requested() -> int:
    """The signal this process received (0: none)."""
    return _got[0] if _got else 0


def agreed(acc: Any, step: int) -> int:
    """The signal any rank received (0: none), the same on every rank. Every rank must call this
    at the same boundaries (one tiny all-reduce)."""
    _signal_hook(step)
    flag = requested()
    if acc.num_processes > 1:
        import torch  # heavy: imported on use

        t = torch.tensor([flag], dtype=torch.int64, device=acc.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        flag = int(t.item())
    return flag


def stop(signum: int, step: int) -> None:
    raise Preempted(signum, step)


def _signal_hook(step: int) -> None:
    """Test hook ``BTPO_SIGNAL_AT_STEP=N[:TERM|USR1]``: at the boundary after step N the main
    process sends the signal to the launcher (``BTPO_LAUNCHER_PID``), or to itself without one — as
    Slurm or a user would, from outside; the other ranks learn of it as they would in production."""
    at, _, name = os.environ.get("BTPO_SIGNAL_AT_STEP", "").partition(":")
    if at != str(step) or os.environ.get("RANK", "0") != "0":
        return
    os.kill(int(os.environ.get("BTPO_LAUNCHER_PID") or os.getpid()), getattr(signal, f"SIG{name or 'TERM'}"))
    time.sleep(0.5)         # let it arrive (and, under the launcher, be forwarded) before the all-reduce


def report(p: Preempted, root: Any, is_main: bool) -> None:
    """The stop's lines (main process), and the note for the launcher."""
    if os.environ.get(STATUS_ENV):      # every rank: each node's launcher reads its own file
        with open(os.environ[STATUS_ENV], "w", encoding="utf-8") as f:
            f.write(f"{signal.Signals(p.signum).name} {p.step}\n")
    if not is_main:
        return
    console.print(f"[yellow]{escape(str(p))}[/]: checkpoint written; continue with: btpo train --out "
                  f"{escape(str(root))} --resume", highlight=False, soft_wrap=True)


def exit_code() -> int:
    """75 (:data:`EXIT_PREEMPTED`); 0 under the launcher, which exits 75 itself (torchrun would call 75 a crash)."""
    return 0 if os.environ.get(STATUS_ENV) else EXIT_PREEMPTED
