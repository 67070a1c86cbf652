"""The file system, in one place: atomic files, published folders, file locks, run checkpoints.

Every writer of btpo goes through this module (``tests/runs/test_fsio.py`` checks that no other
module renames, replaces or ``flock``\\ s by hand). Torch-free; it imports nothing of btpo.

* **Atomic files** — :func:`atomic_open` / :func:`atomic_write` / :func:`atomic_bytes` /
  :func:`atomic_json`: written to ``.<name>.tmp`` beside the file, ``fsync``\\ ed, renamed over it,
  then the folder is ``fsync``\\ ed. A crash leaves the old file or the new one, never half of one;
  an error removes the temporary file.
* **Published folders** — :func:`staging_dir` gives ``.<name>.tmp`` beside the target (a leftover is
  removed); the caller builds the folder there; :func:`publish_dir` puts it in place. With Linux's
  ``renameat2(RENAME_EXCHANGE)`` the two folders swap in one atomic step: at every moment the target
  holds the complete old folder or the complete new one. Where the file system cannot exchange
  (another OS, NFS), the old folder is renamed to ``.<name>.old``, the new one to the target, then the
  backup is deleted; a crash between the two renames leaves the old folder complete under
  ``.<name>.old``, and :func:`recover_dir` (run by the next publish, and by a run's start) puts it
  back. :func:`remove_dir` deletes a folder by renaming it out of the way first (``.<name>.del``),
  so a kill half-way leaves nothing that looks complete. docs/design.md "Publishing" has the cases.
* **File locks** — :func:`file_lock` (blocking, for caches built once), :func:`lock_state` (is a
  lock file held? a probe that takes nothing) and :class:`LockFile` (held for a process's life, with
  a record of its holder; ``O_EXCL`` where the file system has no ``flock``): ``RUN/.lock``
  (:mod:`btpo_cli.runs.lock`) is one.
* **Run checkpoints** — :func:`list_checkpoints` (``checkpoints/step-N`` with their
  ``trainer_state.json``), :func:`run_model` (a run folder's ``final/`` or ``best/``) and
  :func:`model_folder` (what a path names: a model folder itself or a run's model).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# ----------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file to write (``"w"``: UTF-8 text, ``"wb"``: bytes) that replaces ``path`` when the block ends
    without an exception; an exception or a kill leaves the old ``path`` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    binary = "b" in mode
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a kill leaves the old file or the new one)."""
    with atomic_open(path) as f:
        f.write(text)


def atomic_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as indented JSON (non-ASCII kept) with a final newline, atomically."""
    atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems cannot open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- published folders


def staging_path(target: Path) -> Path:
    """Where :func:`staging_dir` builds ``target``'s next version: ``.<name>.tmp`` beside it."""
    return target.with_name(f".{target.name}.tmp")


def backup_path(target: Path) -> Path:
    """Where the fallback of :func:`publish_dir` keeps the old folder between its two renames."""
    return target.with_name(f".{target.name}.old")


def staging_dir(target: Path) -> Path:
    """An empty ``.<name>.tmp`` beside ``target`` to build its next version in (a leftover of a killed
    build is removed; an interrupted publish is recovered first). One builder at a time: callers hold
    a lock (:func:`file_lock`, ``RUN/.lock``) or are a run's main process."""
    recover_dir(target)
    tmp = staging_path(target)
    if os.path.lexists(tmp):
        remove_dir(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(staged: Path, target: Path) -> Path:
    """Put the complete folder ``staged`` at ``target``, replacing what is there: never a moment with
    neither (see the module docstring). Nothing here catches an error: an interrupted publish is a
    state :func:`recover_dir` knows."""
    recover_dir(target)
    if not os.path.lexists(target):
        os.rename(staged, target)
    elif _exchange(staged, target):
        shutil.rmtree(staged)                   # now the old folder
    else:
        backup = backup_path(target)
        os.rename(target, backup)               # killed here: recover_dir puts the old one back
        os.rename(staged, target)
        shutil.rmtree(backup)                   # killed here: recover_dir finishes the deletion
    _fsync_dir(target.parent)
    return target


def recover_dir(target: Path) -> None:
    """Finish what a killed :func:`publish_dir` left: the new folder in place → delete the old one's
    backup; the target missing → the backup (the complete old folder) goes back."""
    backup = backup_path(target)
    if not os.path.lexists(backup):
        return
    if os.path.lexists(target):
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(backup, target)


def recover_all(folder: Path) -> None:
    """In a folder of published folders (a run's ``checkpoints/``): :func:`recover_dir` every interrupted
    publish (``.*.old``), then delete what killed builds and deletions left (``.*.tmp``, ``.*.del``)."""
    if not folder.is_dir():
        return
    for backup in folder.glob(".*.old"):
        recover_dir(backup.with_name(backup.name[1:-len(".old")]))
    for stale in [*folder.glob(".*.tmp"), *folder.glob(".*.del")]:
        shutil.rmtree(stale, ignore_errors=True)


def publish_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """``build`` a folder in :func:`staging_dir` and :func:`publish_dir` it; when ``build`` fails the
    staging folder is removed and the error goes on (``target`` untouched)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(target)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_dir(tmp, target)


def remove_dir(path: Path) -> None:
    """Delete a folder: renamed to ``.<name>.del`` first, so a kill half-way leaves no partial folder
    under a name that looks complete (a leftover ``.*.del`` is deleted by the next call)."""
    gone = path.with_name(f".{path.name.lstrip('.')}.del")
    if os.path.lexists(gone):
        shutil.rmtree(gone, ignore_errors=True)
    os.replace(path, gone)
    try:
        shutil.rmtree(gone, ignore_errors=True)
    except BaseException:       # Ctrl-C half-way: the folder is already out of sight; finish, then stop
        shutil.rmtree(gone, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM}


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2`` (glibc ≥ 2.28), ``None`` elsewhere."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(b))


# ----------------------------------------------------------------------------- file locks

NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
"""What a file system without ``flock`` answers (some Lustre and FUSE mounts)."""


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (blocks until it is free)."""
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def lock_state(path: Path) -> str:
    """``held`` (a live process holds ``path``'s ``flock``), ``free``, ``missing`` or ``unknown`` (no
    ``flock`` on this file system). Takes a shared lock and releases it at once."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "missing"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "free"
    except BlockingIOError:
        return "held"
    except OSError:
        return "unknown"
    finally:
        os.close(fd)


class LockHeld(Exception):
    """Another process holds the lock: ``holder`` is its record; ``checked``: ``False`` when its
    liveness could not be checked from here (an ``O_EXCL`` lock of another host); ``contended``: taken
    and released by others faster than it could be read (``O_EXCL``, five tries)."""

    def __init__(self, holder: dict[str, Any] | None, checked: bool = True, contended: bool = False):
        super().__init__(str(holder))
        self.holder, self.checked, self.contended = holder, checked, contended


class LockFile:
    """An exclusive lock on ``path`` held until :meth:`release`, the file holding its holder's record.

    ``flock`` first: the kernel drops it when its process dies, however it dies, so the next
    :meth:`acquire` succeeds and returns the dead holder's record. Where the file system has no
    ``flock``, the file is created exclusively (``O_EXCL``) and an existing one is taken over when
    ``stale(record)`` says ``True`` (``None``: cannot tell from here, refused)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.mode = ""

    def acquire(self, record: dict[str, Any], stale: Callable[[dict[str, Any] | None], bool | None]
                ) -> dict[str, Any] | None:
        """Take the lock and write ``record`` into it; return the record of a dead holder it replaced
        (``None``: the lock was free). :class:`LockHeld` when a live process holds it."""
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
                raise LockHeld(holder) from None
            except OSError as e:
                os.close(fd)
                if e.errno in NO_FLOCK:
                    if created:
                        os.unlink(self.path)
                    return self._acquire_exclusive(record, stale)
                raise
            try:  # the holder may have removed the file between our open() and flock()
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_fd(fd)
        _write_fd(fd, record)
        self.fd, self.mode = fd, "flock"
        return previous

    def _acquire_exclusive(self, record: dict[str, Any], stale: Callable[[dict[str, Any] | None], bool | None]
                           ) -> dict[str, Any] | None:
        previous = None
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_path(self.path)
                verdict = stale(holder)
                if not verdict:
                    raise LockHeld(holder, checked=verdict is not None) from None
                taken_path = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, taken_path)
                except FileNotFoundError:
                    continue
                taken = _read_path(taken_path)
                os.unlink(taken_path)
                if taken != holder:   # someone took it between our read and our rename: theirs now
                    raise LockHeld(taken) from None
                previous = holder
                continue
            _write_fd(fd, record)
            self.fd, self.mode = fd, "file"
            return previous
        raise LockHeld(None, contended=True)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def read_lock_record(path: Path) -> dict[str, Any] | None:
    """The holder record in a lock file (``None``: none or no file)."""
    return _read_path(path)


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


# ----------------------------------------------------------------------------- run checkpoints

CKPT_DIR = "checkpoints"
CKPT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
MODEL_DIRS = ("final", "best")
MODEL_MARKERS = ("btpo.json", "config.json")
"""A folder holding one of these is a model folder itself (a ``final/`` passed as is)."""


def list_checkpoints(run_root: Path) -> list[tuple[int, Path]]:
    """A run's complete checkpoints (``checkpoints/step-N`` with ``trainer_state.json``, written last) as
    ``(step, folder)``, oldest first. Partial writes (``.step-N.tmp``), deletions in progress
    (``.step-N.del``) and other names are not checkpoints; ``step-40`` and ``step-00000040`` both read."""
    d = Path(run_root) / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if p.name.startswith(CKPT_PREFIX) and p.is_dir() and (p / STATE_FILE).exists():
            try:
                out.append((int(p.name[len(CKPT_PREFIX):]), p))
            except ValueError:
                continue
    return sorted(out)


def run_model(run_root: Path, which: str = "final") -> Path | None:
    """A run folder's ``final/`` (or ``best/``) model folder, ``None`` when it has none."""
    p = Path(run_root) / which
    return p if p.is_dir() else None


def model_folder(path: Path, which: str = "final") -> Path | None:
    """The model ``path`` names: itself when it is a model folder (``which="final"``), else the run
    folder's ``final/`` or ``best/``; ``None`` when there is none."""
    p = Path(path)
    if which == "final" and any((p / m).exists() for m in MODEL_MARKERS):
        return p
    return run_model(p, which)
