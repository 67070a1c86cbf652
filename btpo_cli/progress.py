"""Progress of long phases: a rich bar on a terminal, plain ``[btpo] …`` lines in a log (``--log-every``).

Torch-free, so that the CLI can check the flag before anything heavy is imported."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

from btpo_cli.console import console, register_live, unregister_live


@dataclass
class ProgressEvery:
    """How often :class:`TrainProgress` prints a plain line when stderr is not a terminal (``--log-every``)."""

    steps: int | None = None
    seconds: float = 30.0

    @classmethod
    def parse(cls, text: str | None) -> ProgressEvery:
        """``"50"`` → every 50 steps; ``"30s"`` → every 30 seconds; ``None`` → every 30 seconds."""
        if text is None or not str(text).strip():
            return cls()
        t = str(text).strip().lower()
        try:
            if t.endswith("s"):
                sec = float(t[:-1])
                if sec > 0:
                    return cls(steps=None, seconds=sec)
            elif int(t) > 0:
                return cls(steps=int(t))
        except ValueError:
            pass
        raise ValueError(f"--log-every {text!r}: expected a number of steps (50) or of seconds (30s)")


def _env_every() -> ProgressEvery:
    try:
        return ProgressEvery.parse(os.environ.get("BTPO_LOG_EVERY"))
    except ValueError:
        return ProgressEvery()


EVERY = _env_every()
"""How often plain progress lines are written: ``BTPO_LOG_EVERY`` (``50`` or ``30s``; default 30 s), set by
:func:`btpo_cli.training.launch.launch` from ``--log-every`` (and exported, so that every phase of the run and
the processes it spawns keep the cadence)."""


class PhaseProgress:
    """Progress of one long phase (training, pre-training the tiny thinker, converting a base model,
    sampling / judging a dataset, eval, score) on the main process; silent elsewhere.

    On a terminal: a rich bar with ETA and an info column. Otherwise (a log file, nohup, Slurm, ``| tee``):
    one plain line every :data:`btpo_cli.progress.EVERY` units or seconds, plus the first and the last —
    ``[btpo] bt run: step 40/200 (20%) loss 0.6931 acc 0.50 | 1.25 steps/s | elapsed 0:00:32 | eta 0:02:08``
    — written and flushed at once (rich holds a non-terminal bar back until it stops). ``total=None``:
    a count with no percentage or ETA (``btpo score`` on stdin)."""

    def __init__(self, total: int | None, description: str, *, start: int = 0, unit: str = "step",
                 enabled: bool = True):
        self.enabled, self.total, self.start, self.description, self.unit = enabled, total, start, description, unit
        self.plain = not console.is_terminal
        self.t0 = self.last_t = time.perf_counter()
        self.last_step = self.done = start
        self.printed = start
        self.first = True
        self.last_info = ""
        if not enabled or self.plain:
            return
        from rich.progress import (  # heavy: rich.progress (50 ms), only for a terminal
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )  # heavy: imported on use

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=console, transient=False)
        self.task = self.progress.add_task(description, total=total, completed=start, info="")
        self.progress.start()
        register_live(self.progress)

    def __enter__(self) -> PhaseProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self, step: int, info: str) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        if self.total is None:
            where, eta = f"{self.unit} {step}", ""
        else:
            left = (self.total - step) / rate if rate > 0 else float("nan")
            where = f"{self.unit} {step}/{self.total} ({100 * step / max(1, self.total):.0f}%)"
            eta = f" | eta {'?' if math.isnan(left) else hms(left)}"
        return (f"[btpo] {self.description}: {where}{' ' + info if info else ''} | {rate:.3g} {self.unit}s/s | "
                f"elapsed {hms(elapsed)}{eta}")

    def update(self, step: int, info: str = "", total: int | None = None) -> None:
        if not self.enabled:
            return
        if total is not None:
            self.total = total
        self.last_step = self.done = step
        self.last_info = info
        if not self.plain:
            self.progress.update(self.task, completed=step, info=info, total=self.total)
            return
        now = time.perf_counter()
        every = EVERY
        due = (step - self.printed >= every.steps) if every.steps else (now - self.last_t >= every.seconds)
        if due or self.first or (self.total is not None and step >= self.total and step > self.printed):
            sys.stderr.write(self.line(step, info) + "\n")
            sys.stderr.flush()
            self.printed, self.last_t, self.first = step, now, False

    def advance(self, n: int = 1, info: str = "") -> None:
        self.update(self.done + n, info)

    def close(self) -> None:
        if not self.enabled:
            return
        self.enabled = False
        if not self.plain:
            self.progress.stop()
            unregister_live(self.progress)
        elif self.last_step > self.printed:
            sys.stderr.write(self.line(self.last_step, self.last_info) + "\n")
            sys.stderr.flush()


class TrainProgress(PhaseProgress):
    """A training loop's :class:`PhaseProgress` (optimizer steps from ``start`` to ``total``)."""

    def __init__(self, total: int, start: int, description: str, enabled: bool):
        super().__init__(total, description, start=start, unit="step", enabled=enabled)


def hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def check_log_every(text: str | None) -> None:
    """Raise ``typer.BadParameter`` (exit 2) for a malformed ``--log-every``."""
    import typer  # heavy: imported on use

    try:
        ProgressEvery.parse(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
