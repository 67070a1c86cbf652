"""How often training progress is printed as plain lines when stderr is not a terminal (``--log-every``).

Torch-free, so that the CLI can check the flag before anything heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass


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


EVERY = ProgressEvery()
"""Set by :func:`btpo_cli.trainer.launch` from ``--log-every``."""


def hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def check_log_every(text: str | None) -> None:
    """Raise ``typer.BadParameter`` (exit 2) for a malformed ``--log-every``."""
    import typer

    try:
        ProgressEvery.parse(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
