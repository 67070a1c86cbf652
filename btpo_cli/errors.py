"""Errors that the CLI turns into one-line messages (exit code 1; :class:`UsageError`: 2), never tracebacks."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


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
    """A bad command-line value that the option parser could not catch (exit code 2): a flag's value
    outside its choices (:func:`check_choice`), an unknown ``--set`` key, a missing flag."""


class ConfigUsageError(ConfigError, UsageError):
    """A bad config key or value given on the command line (a flag, ``--set``): a usage error (exit 2)
    that is still a :class:`ConfigError` to callers of :func:`~btpo_cli.config.build_config`."""


SUGGEST_CUTOFF = 0.7
"""How alike (difflib's ratio, 0..1) a valid value must be to a wrong one to be offered as "did you
mean": one slipped or doubled letter in a word of four or more (``judgbench`` → ``judgebench``, 0.95),
never a word that merely shares a few letters (``bogus`` / ``out``, 0.5)."""


def close_match(given: str, choices: Iterable[str], cutoff: float = SUGGEST_CUTOFF) -> str | None:
    """The valid value most like ``given`` (case and leading dashes ignored), if it is close enough."""
    def key(s: str) -> str:
        return s.lstrip("-").lower()

    by_key = {key(c): c for c in choices}
    found = difflib.get_close_matches(key(given), list(by_key), n=1, cutoff=cutoff)
    return by_key[found[0]] if found else None


def did_you_mean(given: Any, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` when one of ``choices`` is close to ``given``, else ``""``."""
    m = close_match(str(given), choices)
    return f" (did you mean {m!r}?)" if m else ""


def bad_choice(flag: str, given: Any, choices: Sequence[str]) -> UsageError:
    """``flag``'s value ``given`` is none of ``choices``: a usage error listing them, with a suggestion."""
    return UsageError(f"{flag} {given!r}: expected one of {', '.join(map(str, choices))}"
                      f"{did_you_mean(given, map(str, choices))}")


def check_choice(flag: str, value: T, choices: Sequence[Any]) -> T:
    """``value`` when it is one of ``choices`` (or ``None``: the flag was not given), else :func:`bad_choice`."""
    if value is not None and value not in choices:
        raise bad_choice(flag, value, choices)
    return value


class FollowerError(BtpoError):
    """A failure of a multi-process run that rank 0 has already printed: every process exits 1
    without printing it again."""
