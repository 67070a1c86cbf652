"""Reading data files whatever their bytes: a one-line error naming the file (and the line), or lines
the caller skips and counts — never a traceback.

What is handled here, once, for every reader (``data/pairs.py``, ``data_builders/sources.py``):

* the content decides, not the name: gzip bytes are decompressed whatever the suffix, a plain
  file named ``.gz`` is read as it is;
* a truncated or corrupt gzip stream is a :class:`DataError` naming the first line not read;
* a Git-LFS pointer file (what a clone without git-lfs leaves in place of the data) is named;
* symbolic-link loops, dangling links and unreadable paths are named (``Path.exists()`` says
  ``False`` for all of them, which made them look like missing files);
* invalid UTF-8 is reported per line (:func:`decode_line`) or, for readers that decode whole
  streams (CSV, JSON lists), located by :func:`utf8_error` to its line and column;
* a local-looking path that does not exist is not mistaken for a Hub id (:func:`looks_like_hub_id`).

Writing lives in :mod:`btpo_cli.fsio` (atomic files, published folders, locks); ``atomic_open`` /
``atomic_write`` / ``atomic_json`` are re-exported here for the callers that import them from here.
"""

from __future__ import annotations

import codecs
import errno
import gzip
import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from btpo_cli.errors import BtpoError, DataError
from btpo_cli.fsio import atomic_json, atomic_open, atomic_write  # noqa: F401 - re-exported: moved to btpo_cli.fsio

GZIP_MAGIC = b"\x1f\x8b"
LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
BOM = b"\xef\xbb\xbf"
LFS_REASON = ("a Git LFS pointer file, not the data (the repository was cloned without git-lfs: run "
              "`git lfs install && git lfs pull` in it, or download the file itself)")
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".parquet")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?$")
_STREAM_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)
_JSON_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- hashing

def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- paths

def probe(path: Path) -> os.stat_result | None:
    """``stat(path)``, or ``None`` when nothing is there. A symbolic-link loop, a link to nothing and
    an unreadable path raise :class:`BtpoError` naming the path (rather than looking absent)."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise BtpoError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist") from None
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BtpoError(f"{path}: a symbolic link loop (too many levels of symbolic links)") from None
        raise BtpoError(f"{path}: cannot be read ({e.strerror or e})") from None


def looks_like_hub_id(value: str) -> bool:
    """``owner/name[:config]`` that cannot be a local path: not ``./``, ``/`` or ``~``-rooted, no
    data-file suffix, and ``owner`` is not a local folder (``data/hh`` with a ``data/`` folder here
    is a missing local path, not a Hub dataset; write ``hub:data/hh`` to mean the Hub)."""
    if not _HUB_ID_RE.match(value) or value.startswith((".", "/", "~")):
        return False
    if value.split(":")[0].endswith(DATA_SUFFIXES):
        return False
    return probe(Path(value.split("/", 1)[0])) is None


# ----------------------------------------------------------------------------- opening

def head(path: Path, n: int = 64) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def check_not_lfs_pointer(path: Path) -> None:
    """:class:`DataError` when ``path`` is a Git-LFS pointer file."""
    if head(path).lstrip(BOM).startswith(LFS_MAGIC):
        raise DataError(str(path), None, None, LFS_REASON)


def open_binary(path: Path) -> IO[bytes]:
    """Open a data file for reading bytes, decompressing gzip content whatever the file's name."""
    if probe(path) is None:
        raise BtpoError(f"{path}: no such file or folder")
    first = head(path)
    if first.lstrip(BOM).startswith(LFS_MAGIC):
        raise DataError(str(path), None, None, LFS_REASON)
    if first.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def open_text(path: Path, newline: str | None = None) -> IO[str]:
    """A UTF-8 text stream (a leading BOM dropped) over :func:`open_binary`. Readers that use it
    wrap their iteration in :func:`guard` so that decoding and gzip errors name the file."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline=newline)


def stream_error(path: Path, e: BaseException, line: int | None) -> DataError:
    """A one-line :class:`DataError` for a gzip stream that cannot be read to its end."""
    if isinstance(e, EOFError):
        what = "truncated gzip file (the compressed data ends early; re-download the file)"
    else:
        what = f"corrupt gzip data ({str(e).splitlines()[0] if str(e) else type(e).__name__}; re-download the file)"
    if line and line > 1:
        what += f"; lines 1-{line - 1} could be read"
    return DataError(str(path), line, None, what)


# ----------------------------------------------------------------------------- lines

def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line_number, raw_bytes)`` without the line ending; a broken gzip stream is a
    :class:`DataError` naming the first line that could not be read."""
    with open_binary(path) as f:
        it = iter(f)
        lineno = 0
        while True:
            try:
                raw = next(it)
            except StopIteration:
                return
            except _STREAM_ERRORS as e:
                raise stream_error(path, e, lineno + 1) from None
            lineno += 1
            yield lineno, raw.rstrip(b"\r\n")


def decode_line(raw: bytes) -> str:
    """UTF-8 text of one line (a BOM at its start dropped: concatenated files carry one per file)."""
    return raw[3:].decode("utf-8") if raw.startswith(BOM) else raw.decode("utf-8")


def utf8_detail(e: UnicodeDecodeError, offset: int = 0) -> str:
    """``byte 0xe9 at column 13`` (1-based; ``offset``: bytes dropped before decoding, e.g. a BOM)."""
    bad = e.object[e.start:e.start + 1]
    return f"byte 0x{bad.hex()} at column {e.start + 1 + offset}"


def utf8_error(path: Path) -> DataError:
    """Locate the first invalid UTF-8 byte of ``path`` (decompressed) and name its line and column."""
    dec = codecs.getincrementaldecoder("utf-8")()
    line, col = 1, 0
    try:
        with open_binary(path) as f:
            while chunk := f.read(1 << 16):
                try:
                    dec.decode(chunk)
                except UnicodeDecodeError as e:
                    before = chunk[:e.start]
                    nl = before.count(b"\n")
                    line += nl
                    col = (len(before) - before.rfind(b"\n") - 1) if nl else col + len(before)
                    return DataError(str(path), line, None,
                                     f"invalid UTF-8 (byte 0x{chunk[e.start:e.start + 1].hex()} at column {col + 1})")
                nl = chunk.count(b"\n")
                line += nl
                col = (len(chunk) - chunk.rfind(b"\n") - 1) if nl else col + len(chunk)
    except _STREAM_ERRORS as e:
        return stream_error(path, e, None)
    return DataError(str(path), None, None, "invalid UTF-8")


def guard(path: Path, rows: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """Re-raise a reader's decoding / gzip errors as a :class:`DataError` naming ``path``."""
    last = 0
    while True:
        try:
            num, row = next(rows)
        except StopIteration:
            return
        except UnicodeDecodeError:
            raise utf8_error(path) from None
        except _STREAM_ERRORS as e:
            raise stream_error(path, e, last + 1 if last else None) from None
        last = num
        yield num, row


# ----------------------------------------------------------------------------- JSON lists

def first_char(path: Path) -> str:
    """The first non-blank character of a text file ('' when blank)."""
    with open_text(path) as f:
        try:
            while chunk := f.read(4096):
                if s := chunk.lstrip():
                    return s[0]
        except UnicodeDecodeError:
            raise utf8_error(path) from None
        except _STREAM_ERRORS as e:
            raise stream_error(path, e, None) from None
    return ""


def iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Stream the elements of a top-level JSON list, 1-based, without loading the whole file."""
    return guard(path, _json_array(path))


def _json_array(path: Path) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    with open_text(path) as f:
        buf, pos, eof, index = "", 0, False, 0

        def more() -> bool:
            nonlocal buf, pos, eof
            chunk = f.read(_JSON_CHUNK)
            buf, pos = buf[pos:] + chunk, 0
            eof = not chunk
            return bool(chunk)

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return

        skip_ws()
        if buf[pos:pos + 1] != "[":
            raise DataError(str(path), None, None, "expected a JSON list")
        pos += 1
        while True:
            skip_ws()
            if buf[pos:pos + 1] == "]":
                return
            if index and buf[pos:pos + 1] == ",":
                pos += 1
                skip_ws()
            elif index:
                raise DataError(str(path), index + 1, None, "invalid JSON (expected ',' or ']' between elements)")
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as e:
                    if eof:
                        raise DataError(str(path), index + 1, None, f"invalid JSON ({e.msg})") from None
                except RecursionError:
                    raise DataError(str(path), index + 1, None, "invalid JSON (nested too deeply)") from None
                more()
            pos = end
            index += 1
            yield index, obj
