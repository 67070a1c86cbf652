"""Errors that the CLI turns into one-line messages (exit code 1), never tracebacks."""

from __future__ import annotations


class BtpoError(Exception):
    """A user-facing runtime error: the message is printed as one line."""


class DataError(BtpoError):
    """Bad input data. The message names the file, the record (line) and the field."""

    def __init__(self, file: str, record: int | str | None, field: str | None, reason: str):
        self.file, self.record, self.field, self.reason = str(file), record, field, reason
        where = self.file
        if record is not None:
            where += f":{record}" if isinstance(record, int) else f" [{record}]"
        if field:
            where += f" field '{field}'"
        super().__init__(f"{where}: {reason}")


class ConfigError(BtpoError):
    """A bad configuration key or value."""


class UsageError(BtpoError):
    """A bad command-line value that the option parser could not catch (exit code 2)."""


class FollowerError(BtpoError):
    """A failure of a multi-process run that rank 0 has already printed: every process exits 1
    without printing it again."""
