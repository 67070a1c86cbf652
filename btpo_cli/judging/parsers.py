"""Parse the final answer of a generative judge: a verdict ``[[A]]``/``[[B]]`` or a score ``<score>N</score>``.

Used by the GRPO baselines (METHOD.md §6) for their training rewards and their evaluation. The
parsers never raise: any input (``None``, bytes, huge or garbled text) gives a result whose
``error`` names what went wrong, and a :class:`ParseStats` counts the kinds.

Rules (our choices; METHOD.md leaves the format details open):

* Text is NFKC-normalized first, so full-width forms count: ``［［Ａ］］`` is ``[[A]]`` and
  ``＜score＞７＜/score＞`` is ``<score>7</score>``. Digits of any script (Unicode category Nd,
  e.g. Arabic-Indic ``٧``) are read as their decimal value: a model answering in Arabic is not a
  format error.
* An unfinished generation (``finished=False``: cut at the token budget) is ``truncated`` even
  when it already holds a tag: the model had not committed to its final answer.
* Text that ends inside a tag (``… [[A``, ``… <score>7</sc``) is ``truncated``.
* Verdicts: every ``[[…]]`` (at most 32 characters inside, no brackets) is a tag; its label is the
  stripped, upper-cased content. None → ``no_tag``; two different labels → ``multiple_verdicts``
  (a rationale that quotes "[[A]] or [[B]]" and then decides is ambiguous to a strict parser, as
  intended: the format asks for one verdict); the same label repeated is fine; one label other
  than A/B (``[[C]]``, ``[[Response A]]``) → ``invalid_label``. ``[[[A]]]`` reads as ``[[A]]``.
* Scores: every ``<score>…</score>`` (tags case-insensitive, whitespace inside allowed) is a tag.
  None → ``no_tag``; different contents → ``multiple_scores``; the same value repeated is fine;
  content not a plain decimal number (``7/10``, ``seven``, ``1e1``, empty) → ``not_a_number``;
  a number outside ``[lo, hi]`` (``0``, ``11``, ``-3``) → ``out_of_range``. Decimals (``7.5``) count.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

Verdict = Literal["A", "B"]
VerdictError = Literal["no_tag", "multiple_verdicts", "invalid_label", "truncated"]
ScoreError = Literal["no_tag", "multiple_scores", "out_of_range", "not_a_number", "truncated"]

VERDICT_ERRORS: tuple[str, ...] = ("no_tag", "multiple_verdicts", "invalid_label", "truncated")
SCORE_ERRORS: tuple[str, ...] = ("no_tag", "multiple_scores", "out_of_range", "not_a_number", "truncated")

_VERDICT_TAG = re.compile(r"\[\[([^\[\]]{0,32})\]\]")
_VERDICT_PARTIAL_END = re.compile(r"\[\[[^\[\]]{0,32}\]?\s*$")
_SCORE_TAG = re.compile(r"<\s*score\s*>([^<>]{0,64})<\s*/\s*score\s*>", re.IGNORECASE)
_SCORE_OPEN = re.compile(r"<\s*score\s*>", re.IGNORECASE)
_SCORE_CLOSE = re.compile(r"<\s*/\s*score\s*>", re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")   # \d is any Unicode decimal digit (Nd)
_TAG_PREFIXES = ("<score>", "</score>")


@dataclass(frozen=True)
class VerdictParse:
    verdict: Verdict | None
    """'A' or 'B'; None exactly when ``error`` is set."""
    error: VerdictError | None = None


@dataclass(frozen=True)
class ScoreParse:
    score: float | None
    """The score in ``[lo, hi]``; None exactly when ``error`` is set."""
    error: ScoreError | None = None


def _as_text(text: Any) -> str | None:
    """Whatever came in, as NFKC-normalized text (None for None)."""
    if text is None:
        return None
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        try:
            text = str(text)
        except Exception:  # noqa: BLE001 - a hostile __str__ must not break a reward
            return None
    return unicodedata.normalize("NFKC", text)


def parse_verdict(text: Any, finished: bool = True) -> VerdictParse:
    """The verdict of a pairwise judge's output (``[[A]]`` or ``[[B]]``); never raises.

    Args:
        text: the decoded completion (special tokens removed).
        finished: False when generation stopped at the token budget rather than on end-of-turn.
    """
    s = _as_text(text)
    if s is None:
        return VerdictParse(None, "no_tag")
    if not finished or _VERDICT_PARTIAL_END.search(s[-40:]):
        return VerdictParse(None, "truncated")
    labels = {m.strip().upper() for m in _VERDICT_TAG.findall(s)}
    if not labels:
        return VerdictParse(None, "no_tag")
    if len(labels) > 1:
        return VerdictParse(None, "multiple_verdicts")
    label = labels.pop()
    if label not in ("A", "B"):
        return VerdictParse(None, "invalid_label")
    return VerdictParse(label, None)  # type: ignore[arg-type]


def _ends_inside_score_tag(s: str) -> bool:
    tail = s[-80:]
    last_lt = tail.rfind("<")
    if last_lt >= 0:
        frag = re.sub(r"\s+", "", tail[last_lt:]).lower()
        if frag and any(p.startswith(frag) for p in _TAG_PREFIXES) and frag not in _TAG_PREFIXES:
            return True                                   # "<sco", "</sc", "<"
    opens = list(_SCORE_OPEN.finditer(tail))
    if opens:
        rest = tail[opens[-1].end():]
        if not _SCORE_CLOSE.search(rest) and len(rest) <= 16 and "<" not in rest and "\n" not in rest:
            return True                                   # "<score>7", "<score> 7."
    return False


def parse_score(text: Any, lo: float = 1, hi: float = 10, finished: bool = True) -> ScoreParse:
    """The score of a pointwise judge's output (``<score>N</score>``, ``lo ≤ N ≤ hi``); never raises.

    Args:
        text: the decoded completion (special tokens removed).
        lo: smallest valid score (inclusive).
        hi: largest valid score (inclusive).
        finished: False when generation stopped at the token budget rather than on end-of-turn.
    """
    s = _as_text(text)
    if s is None:
        return ScoreParse(None, "no_tag")
    if not finished or _ends_inside_score_tag(s):
        return ScoreParse(None, "truncated")
    contents = [c.strip() for c in _SCORE_TAG.findall(s)]
    if not contents:
        return ScoreParse(None, "no_tag")
    values: set[float] = set()
    for c in contents:
        if not _NUMBER.fullmatch(c):
            if len(set(contents)) > 1:
                return ScoreParse(None, "multiple_scores")
            return ScoreParse(None, "not_a_number")
        try:
            values.add(float(c))
        except ValueError:  # pragma: no cover - _NUMBER only lets float-parsable text through
            return ScoreParse(None, "not_a_number")
    if len(values) > 1:
        return ScoreParse(None, "multiple_scores")
    v = values.pop()
    if not lo <= v <= hi:
        return ScoreParse(None, "out_of_range")
    return ScoreParse(v, None)


@dataclass
class ParseStats:
    """Counts of parse outcomes: ``ok`` and one counter per failure kind."""

    kinds: tuple[str, ...]
    counts: Counter[str] = field(default_factory=Counter)

    @classmethod
    def verdicts(cls) -> ParseStats:
        return cls(VERDICT_ERRORS)

    @classmethod
    def scores(cls) -> ParseStats:
        return cls(SCORE_ERRORS)

    def add(self, parse: VerdictParse | ScoreParse) -> None:
        self.counts[parse.error or "ok"] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def errors(self) -> int:
        return self.total - self.counts["ok"]

    def error_rate(self) -> float:
        return self.errors / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, int]:
        """``{"ok": n, <kind>: n, ...}`` with every kind present (zeros included)."""
        return {"ok": self.counts["ok"], **{k: self.counts[k] for k in self.kinds}}
