"""``btpo score``'s engine: JSONL in, one JSONL result per input line out, batched through a judge.

Input lines (one JSON object each; blank lines are ignored)::

    {"prompt": P, "response": "..."}                   one response  → {"score", "error"?, "thought"?}
    {"prompt": P, "candidates": ["...", "..."]}        best-of-N     → {"best", "scores", "errors"?, "thoughts"?}
    {"prompt": P, "chosen": ..., "rejected": ...}      a canonical pair (METHOD §8) → the same row as
                                                       ``btpo eval``'s predictions: {"id", "credit", …}

``P`` is a string (one user turn) or a list of chat messages ending with a user turn; ``aspect``
and ``id`` are optional on every kind (``id`` is copied to the output). Every output row has
``line`` (the input line number). Pairs go through :meth:`Judge.judge_pairs`, the code path of
``btpo eval``, in the same batches when the file holds only pairs, so the decisions are the same.

A bad line is skipped and counted with a one-line message naming the line and the field
(``strict`` makes the first one an error).
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
    """Results written."""
    skipped: int = 0
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
    """Judge every line of ``lines`` and write one JSON line per result to ``out`` (flushed per group)."""
    summary = ScoreSummary()
    group_pairs = judge.batch_size * math.ceil(GROUP_TARGET / judge.batch_size)
    buf: list[Unit] = []

    def flush() -> None:
        if not buf:
            return
        if buf[0].kind == "pair":
            rows = _pairs(judge, buf, thoughts, summary)
        elif buf[0].kind == "candidates":
            rows = _candidates(judge, buf, thoughts, detail)
        else:
            scores = judge.score_items([u.items[0] for u in buf])
            rows = [_head(u) | s.to_json(thoughts, detail) for u, s in zip(buf, scores, strict=True)]
        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        out.flush()
        for u in buf:
            summary.by_kind[u.kind] = summary.by_kind.get(u.kind, 0) + 1
        summary.lines += len(rows)
        progress(len(buf))
        buf.clear()

    taken = 0
    for lineno, text in enumerate(lines, start=1):
        if limit is not None and taken >= limit:
            break
        if not text.strip():
            continue
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise LineError(None, f"invalid JSON ({e.msg})") from None
            unit = parse_unit(judge, obj, lineno)
        except LineError as e:
            if strict:
                raise DataError(source, lineno, e.field, e.reason) from None
            summary.skipped += 1
            warn(str(DataError(source, lineno, e.field, e.reason)))
            continue
        taken += 1
        if buf and (buf[0].kind != unit.kind or sum(u.size for u in buf) >= 2 * group_pairs):
            flush()
        buf.append(unit)
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
