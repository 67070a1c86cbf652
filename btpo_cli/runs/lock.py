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

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from btpo_cli.errors import BtpoError

LOCK_FILE = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


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
    replaced (``None`` when the folder was free); ``release`` removes the file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.fd: int | None = None
        self.mode = ""

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> dict[str, Any] | None:
        self.root.mkdir(parents=True, exist_ok=True)

        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd(fd)
                os.close(fd)
                raise RunLocked(self._busy(holder or {})) from None
            except OSError as e:
                os.close(fd)
                if e.errno in _NO_FLOCK:
                    if created:
                        os.unlink(self.path)
                    return self._acquire_exclusive()
                raise
            try:  # the holder may have removed the file between our open() and flock()
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_fd(fd)
        _write_fd(fd, holder_record())
        self.fd, self.mode = fd, "flock"
        return previous

    def _acquire_exclusive(self) -> dict[str, Any] | None:
        previous = None
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_path(self.path)
                here = holder is not None and holder.get("host") == socket.gethostname()
                if not here or pid_alive(_int(holder.get("pid")), holder.get("proc_start")):
                    # another host's pid cannot be checked from here: say which file to delete
                    raise RunLocked(self._busy(holder or {}, hint=not here)) from None
                stale = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, stale)
                except FileNotFoundError:
                    continue
                taken = _read_path(stale)
                os.unlink(stale)
                if taken != holder:   # someone took it between our read and our rename: theirs now
                    raise RunLocked(self._busy(taken or {})) from None
                previous = holder
                continue
            _write_fd(fd, holder_record())
            self.fd, self.mode = fd, "file"
            return previous
        raise RunLocked(f"{self.path}: could not take the lock (contended)")

    def _busy(self, holder: dict[str, Any], hint: bool = False) -> str:
        msg = f"{self.root} is in use by another training run: {describe(holder)}"
        if hint:
            msg += f"; if that run is no longer alive, delete {self.path}"
        return msg + " (two runs in one folder would write the same steps twice)"

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1


def _read_fd(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return _parse(data)


def _read_path(path: Path) -> dict[str, Any] | None:
    try:
        return _parse(path.read_bytes())
    except FileNotFoundError:
        return None


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(data.decode("utf-8")) if data.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"pid": "?", "host": "?", "argv": "(unreadable lock file)"}
    return obj if isinstance(obj, dict) else None


def _write_fd(fd: int, record: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
    os.fsync(fd)
