"""One training process per run folder: ``RUN/.lock``.

The lock is an exclusive ``flock`` on ``RUN/.lock`` held for the life of the run by the main
process (under ``accelerate launch`` only rank 0 takes it; the other ranks wait for its verdict,
see :meth:`btpo_cli.runs.folder.Run.begin`). The file holds the holder's pid, host, start time and
command line, so that a refusal names them. The kernel drops a ``flock`` when its process dies,
however it dies (``kill -9``, OOM killer, a crashed node's NFS lease), so a run that crashed never
blocks the next one: the next ``acquire`` succeeds and reports the dead holder it replaced.

Filesystems without ``flock`` (some Lustre and FUSE mounts answer ENOLCK / EOPNOTSUPP) fall back
to creating the file exclusively (``O_EXCL``). Then a lock is stale when its holder is on this
host and its pid is gone (or was reused by another process: the process start time is compared);
a lock held from another host cannot be checked from here and is refused with the path to
delete once that run is known to be dead.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from btpo_cli.errors import BtpoError
from btpo_cli.fsio import LockFile, LockHeld

LOCK_FILE = ".lock"


class RunLocked(BtpoError):
    """Another live process holds the run folder."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def holder_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": " ".join(sys.argv)}


def pid_alive(pid: int, proc_start: str | None = None) -> bool:
    """Whether ``pid`` runs on this host (and, when known, is the same process: same start time).
    An invalid pid counts as alive: nothing can be concluded from it."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _proc_start(pid)
    return proc_start is None or now is None or now == proc_start


def describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (since {holder.get('started', '?')}: "
            f"{holder.get('argv', '?')})")


class RunLock:
    """Exclusive use of ``root`` by one process. ``acquire`` returns the record of a dead holder it
    replaced (``None`` when the folder was free); ``release`` removes the file. The mechanism (``flock``,
    ``O_EXCL`` without it) is :class:`btpo_cli.fsio.LockFile`; this class names the run and its holder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._file = LockFile(self.path)

    @property
    def held(self) -> bool:
        return self._file.fd is not None

    @property
    def fd(self) -> int | None:
        return self._file.fd

    @property
    def mode(self) -> str:
        return self._file.mode

    def acquire(self) -> dict[str, Any] | None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            return self._file.acquire(holder_record(), _stale)
        except LockHeld as e:
            if e.contended:
                raise RunLocked(f"{self.path}: could not take the lock (contended)") from None
            raise RunLocked(self._busy(e.holder or {}, hint=not e.checked)) from None

    def _busy(self, holder: dict[str, Any], hint: bool = False) -> str:
        msg = f"{self.root} is in use by another training run: {describe(holder)}"
        if hint:
            msg += f"; if that run is no longer alive, delete {self.path}"
        return msg + " (two runs in one folder would write the same steps twice)"

    def release(self) -> None:
        self._file.release()


def _stale(holder: dict[str, Any] | None) -> bool | None:
    """For the ``O_EXCL`` fallback: a holder on this host whose pid is gone is stale; another host's
    cannot be checked from here (``None``)."""
    if holder is None or holder.get("host") != socket.gethostname():
        return None
    return not pid_alive(_int(holder.get("pid")), holder.get("proc_start"))


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1
