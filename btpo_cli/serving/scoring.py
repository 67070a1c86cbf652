"""``btpo score``'s engine: JSONL in, exactly one JSONL result per input line out, batched through a judge.

Input lines (one JSON object each)::

    {"prompt": P, "response": "..."}                   one response  → {"score", "error"?, "thought"?}
    {"prompt": P, "candidates": ["...", "..."]}        best-of-N     → {"best", "scores", "errors"?, "thoughts"?}
    {"prompt": P, "chosen": ..., "rejected": ...}      a canonical pair (METHOD §8) → the same row as
                                                       ``btpo eval``'s predictions: {"id", "credit", …}

``P`` is a string (one user turn) or a list of chat messages ending with a user turn; ``aspect``
and ``id`` are optional on every kind (``id`` is copied to the output). Every output row has
``line`` (the input line number). Pairs go through :meth:`Judge.judge_pairs`, the code path of
``btpo eval``, in the same batches when the file holds only pairs, so the decisions are the same.

Output line N answers input line N, so ``paste`` lines them up: a bad line (a blank line included)
gives ``{"line": N, "id"?, "error": "field: reason"}`` at its place, between the results of the
good lines around it, and is counted (``strict`` makes the first one an error naming the file, line
and field, after the results of the lines before it are written).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from btpo_cli.data.pairs import PairRecord, RecordSkip, normalize_record
from btpo_cli.errors import DataError
from btpo_cli.judging.judge import Item, Judge, to_prompt
from btpo_cli.judging.protocol import PairResult, pairwise_result, pointwise_result, summarize

GROUP_TARGET = 256
"""Pairs (or responses / 2) read before a group is judged: large enough to batch, small enough to stream."""
MAX_CANDIDATES = 1024


@dataclass
class Unit:
    """One parsed input line."""

    line: int
    kind: Literal["response", "candidates", "pair"]
    id: Any = None
    items: list[Item] = field(default_factory=list)
    record: PairRecord | None = None

    @property
    def size(self) -> int:
        return 2 if self.kind == "pair" else len(self.items)


class LineError(Exception):
    def __init__(self, field: str | None, reason: str):
        self.field, self.reason = field, reason
        super().__init__(reason)


@dataclass
class ScoreSummary:
    """What ``btpo score`` reports on stderr at the end."""

    lines: int = 0
    """Output lines written: one per input line read."""
    errors: int = 0
    """Bad input lines (written as ``{"line", "error"}``)."""
    first_error: str | None = None
    """``line N: field: reason`` of the first bad line."""
    by_kind: dict[str, int] = field(default_factory=dict)
    pair_results: list[PairResult] = field(default_factory=list)

    def pairs(self) -> dict[str, Any] | None:
        """METHOD §7 accuracy over the pair lines (as ``btpo eval`` reports it), or None."""
        return summarize(self.pair_results) if self.pair_results else None


def parse_unit(judge: Judge, obj: Any, line: int) -> Unit:
    """Validate one decoded line into a :class:`Unit`; :class:`LineError` names the field."""
    if not isinstance(obj, dict):
        raise LineError(None, f"expected a JSON object, got {type(obj).__name__}")
    aspect = obj.get("aspect")
    if aspect is not None and not isinstance(aspect, str):
        raise LineError("aspect", f"expected a string, got {type(aspect).__name__}")
    if "chosen" in obj or "rejected" in obj:
        try:
            rec = normalize_record(obj, line, default_aspect=aspect or judge.aspect)
        except RecordSkip as e:
            raise LineError(e.field, e.reason) from None
        return Unit(line, "pair", obj.get("id", rec.id), record=rec)
    if "prompt" not in obj:
        raise LineError("prompt", "missing")
    try:
        prompt = to_prompt(obj["prompt"])
    except ValueError as e:
        raise LineError("prompt", str(e).removeprefix("prompt: ").removeprefix("prompt")) from None
    if "candidates" in obj:
        cands = obj["candidates"]
        if not isinstance(cands, list) or not cands:
            raise LineError("candidates", "expected a non-empty list of strings")
        if len(cands) > MAX_CANDIDATES:
            raise LineError("candidates", f"{len(cands)} candidates, more than {MAX_CANDIDATES}")
        for i, c in enumerate(cands):
            if not isinstance(c, str):
                raise LineError(f"candidates[{i}]", f"expected a string, got {type(c).__name__}")
        return Unit(line, "candidates", obj.get("id"), [judge.item(prompt, c, aspect) for c in cands])
    if "response" in obj:
        r = obj["response"]
        if not isinstance(r, str):
            raise LineError("response", f"expected a string, got {type(r).__name__}")
        if judge.protocol == "pairwise":
            raise LineError("response", f"{judge.method} is a pairwise judge: give 'candidates' (two or more) "
                                        "or a pair ('chosen', 'rejected')")
        return Unit(line, "response", obj.get("id"), [judge.item(prompt, r, aspect)])
    raise LineError(None, "expected 'response', 'candidates', or 'chosen' and 'rejected'")


def score_lines(judge: Judge, lines: Iterable[str], source: str, out: TextIO, *, thoughts: bool = False,
                detail: bool = False, strict: bool = False, limit: int | None = None,
                warn: Callable[[str], None] = lambda m: None,
                progress: Callable[[int], None] = lambda n: None) -> ScoreSummary:
    """Judge every line of ``lines`` and write one JSON line per input line to ``out``, in input order
    (flushed per group): good lines of one kind are batched together, bad lines wait at their place."""
    summary = ScoreSummary()
    group_pairs = judge.batch_size * math.ceil(GROUP_TARGET / judge.batch_size)
    pending: list[Unit | dict[str, Any]] = []       # units of one kind and error rows, in input order
    units: list[Unit] = []                          # the units of ``pending``

    def flush() -> None:
        if not pending:
            return
        done: dict[int, dict[str, Any]] = {}
        if units:
            if units[0].kind == "pair":
                rows = _pairs(judge, units, thoughts, summary)
            elif units[0].kind == "candidates":
                rows = _candidates(judge, units, thoughts, detail)
            else:
                scores = judge.score_items([u.items[0] for u in units])
                rows = [_head(u) | s.to_json(thoughts, detail) for u, s in zip(units, scores, strict=True)]
            done = {u.line: r for u, r in zip(units, rows, strict=True)}
            for u in units:
                summary.by_kind[u.kind] = summary.by_kind.get(u.kind, 0) + 1
        rows = [done[u.line] if isinstance(u, Unit) else u for u in pending]
        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        out.flush()
        summary.lines += len(rows)
        progress(len(rows))
        pending.clear()
        units.clear()

    taken = size = 0                                # size: responses in ``units``
    for lineno, text in enumerate(lines, start=1):
        if limit is not None and taken >= limit:
            break
        obj: Any = None
        try:
            if not text.strip():
                raise LineError(None, "blank line")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise LineError(None, f"invalid JSON ({e.msg})") from None
            unit = parse_unit(judge, obj, lineno)
        except LineError as e:
            if strict:
                flush()                                  # the lines before it, then the error
                raise DataError(source, lineno, e.field, e.reason) from None
            summary.errors += 1
            reason = f"{e.field}: {e.reason}" if e.field else e.reason
            summary.first_error = summary.first_error or f"line {lineno}: {reason}"
            warn(str(DataError(source, lineno, e.field, e.reason)))
            row: dict[str, Any] = {"line": lineno}
            if isinstance(obj, dict) and obj.get("id") is not None:
                row["id"] = obj["id"]
            pending.append(row | {"error": reason})
            if not units:                                # nothing to judge waits before it
                flush()
            continue
        taken += 1
        if units and (units[0].kind != unit.kind or size >= 2 * group_pairs):
            flush()
        size = unit.size + (size if units else 0)
        pending.append(unit)
        units.append(unit)
    flush()
    return summary


def _head(u: Unit) -> dict[str, Any]:
    return {"line": u.line} | ({"id": u.id} if u.id is not None else {})


def _pairs(judge: Judge, units: list[Unit], thoughts: bool, summary: ScoreSummary) -> list[dict[str, Any]]:
    records = [u.record for u in units]
    ids = [r.id for r in records]                                # type: ignore[union-attr]
    if len(set(ids)) < len(ids):                                 # ids name cached thoughts and seeds: keep them unique
        records = [PairRecord(f"{r.id}#line{u.line}", r.prompt, r.chosen, r.rejected, r.aspect, r.source, r.meta)
                   for u, r in zip(units, records, strict=True)]  # type: ignore[union-attr]
    seen: dict[int, Any] = {}
    got = judge.judge_pairs(records, sink=lambda rec, judged, res: seen.__setitem__(id(rec), judged))
    make = pointwise_result if judge.protocol == "pointwise" else pairwise_result
    rows = []
    for u, rec, res in zip(units, records, got, strict=True):
        if res is None:
            res = make(rec.id, None, None, reason="too_long")    # type: ignore[union-attr]
        summary.pair_results.append(res)
        row = {"line": u.line, "id": u.id, "credit": res.credit, **res.detail}
        judged = seen.get(id(rec))
        if thoughts and judged is not None:
            if judge.protocol == "pointwise":
                row["thought_chosen"], row["thought_rejected"] = judged[0].thought, judged[1].thought
            elif "rationales" in judged.detail:
                row["rationale_chosen_as_a"], row["rationale_chosen_as_b"] = judged.detail["rationales"]
        rows.append(row)
    return rows


def _candidates(judge: Judge, units: list[Unit], thoughts: bool, detail: bool) -> list[dict[str, Any]]:
    if judge.protocol == "pointwise":                            # all candidates of the group in one pass
        flat = judge.score_items([it for u in units for it in u.items])
        ranks, k = [], 0
        for u in units:
            part = flat[k:k + len(u.items)]
            k += len(u.items)
            ranks.append((part, judge.rank_scores(part)))
    else:
        ranks = [(None, judge.rank(u.items)) for u in units]
    rows = []
    for u, (scores, r) in zip(units, ranks, strict=True):
        row = _head(u) | {"best": r.best, "scores": r.scores}
        if any(e is not None for e in r.errors):
            row["errors"] = r.errors
        if thoughts and scores is not None:
            row["thoughts"] = [s.thought for s in scores]
        if detail and scores is not None:
            row["detail"] = [s.to_json(detail=True)["detail"] for s in scores]
        rows.append(row)
    return rows
