"""Reader for ``facebook/AdvancedIF``: instruction-following prompts with rubrics.

Upstream is one CSV file (``if_oss_full_data.csv``; ``load_dataset("facebook/AdvancedIF",
split="train")``) with the columns

* ``conversation_history``: a JSON list of ``{"role", "content"}`` messages ending with the
  user turn to answer (system turns carry the system-steerability instructions);
* ``benchmark_name``: e.g. ``if_carried_context_oss``, ``if_system_steerability_oss``;
* ``prompt_metadata``: a JSON object whose ``"rubrics"`` value is itself a JSON-encoded
  *string* holding the list of rubric questions (doubly encoded); a plain list is accepted too.
  If ``"rubrics"`` is absent, the first key containing ``rubric`` is used.

A row that cannot be used is counted under ``"<field>: <reason>"`` (see :data:`SKIP_REASONS`).
Prompt ids are ``advancedif-<row>``, ``row`` being the 0-based data row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from btpo_cli.data.pairs import RecordSkip, SkipLog, to_messages
from data_builders.sources import SourceSpec, load_rows

R_INVALID_JSON = "invalid JSON"
R_NOT_LIST = "expected a JSON list of messages"
R_NOT_OBJECT = "expected a JSON object"
R_NO_RUBRICS = "no rubrics key"
R_BAD_RUBRICS = "expected a list of rubric strings"
R_EMPTY_RUBRICS = "empty rubric list"
R_LAST_NOT_USER = "must end with a user turn"
SKIP_REASONS = (
    f"conversation_history: {R_INVALID_JSON} (<decoder message>)", f"conversation_history: {R_NOT_LIST}",
    "conversation_history[i].role / .content: <reason>", f"conversation_history: {R_LAST_NOT_USER}",
    f"prompt_metadata: {R_INVALID_JSON} (<decoder message>)", f"prompt_metadata: {R_NOT_OBJECT}",
    f"prompt_metadata: {R_NO_RUBRICS}", f"prompt_metadata.rubrics: {R_INVALID_JSON} (<decoder message>)",
    f"prompt_metadata.rubrics: {R_BAD_RUBRICS}", f"prompt_metadata.rubrics: {R_EMPTY_RUBRICS}",
)
"""Every key :func:`read_advancedif` counts skips under."""


@dataclass
class IFPrompt:
    """One AdvancedIF prompt: the conversation to continue and the rubrics to judge against."""

    id: str
    messages: list[dict[str, str]]
    rubrics: list[str]
    benchmark: str
    meta: dict[str, Any] = field(default_factory=dict)


def _decode(value: Any, field_name: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RecordSkip(field_name, f"{R_INVALID_JSON} ({e.msg})") from None


def parse_rubrics(metadata: Any) -> tuple[list[str], dict[str, Any]]:
    """``prompt_metadata`` (a JSON string or dict) → ``(rubrics, other_metadata)``.

    Raises :class:`~btpo_cli.data.pairs.RecordSkip` naming ``prompt_metadata`` or
    ``prompt_metadata.<key>``.
    """
    meta = _decode(metadata, "prompt_metadata")
    if not isinstance(meta, dict):
        raise RecordSkip("prompt_metadata", R_NOT_OBJECT)
    key = "rubrics" if "rubrics" in meta else next((k for k in meta if "rubric" in str(k).lower()), None)
    if key is None:
        raise RecordSkip("prompt_metadata", R_NO_RUBRICS)
    rubrics = _decode(meta[key], f"prompt_metadata.{key}")
    if isinstance(rubrics, str):  # tolerate one more level of encoding
        rubrics = _decode(rubrics, f"prompt_metadata.{key}")
    if not isinstance(rubrics, list) or not all(isinstance(r, str) for r in rubrics):
        raise RecordSkip(f"prompt_metadata.{key}", R_BAD_RUBRICS)
    rubrics = [r.strip() for r in rubrics if r.strip()]
    if not rubrics:
        raise RecordSkip(f"prompt_metadata.{key}", R_EMPTY_RUBRICS)
    return rubrics, {k: v for k, v in meta.items() if k != key}


def parse_conversation(value: Any) -> list[dict[str, str]]:
    """``conversation_history`` (a JSON string or list) → validated messages ending with a user turn."""
    msgs = _decode(value, "conversation_history")
    if not isinstance(msgs, list) or not msgs:
        raise RecordSkip("conversation_history", R_NOT_LIST)
    out = to_messages(msgs, "conversation_history", "user")
    if out[-1]["role"] != "user":
        raise RecordSkip("conversation_history", R_LAST_NOT_USER)
    return out


def read_advancedif(spec: SourceSpec, *, split: str | None = None, skips: SkipLog | None = None,
                    strict: bool = False, limit: int | None = None) -> list[IFPrompt]:
    """Read AdvancedIF prompts; unusable rows are counted in ``skips`` (or raise when strict)."""
    skips = skips if skips is not None else SkipLog(strict=strict)
    out: list[IFPrompt] = []
    for row_index, (file, num, row) in enumerate(load_rows(spec, split, skips=skips, limit=limit)):
        try:
            messages = parse_conversation(row.get("conversation_history"))
            rubrics, extra = parse_rubrics(row.get("prompt_metadata"))
        except RecordSkip as s:
            skips.skip(file, num, s.field, s.reason)
            continue
        benchmark = str(row.get("benchmark_name") or "unknown")
        out.append(IFPrompt(f"advancedif-{row_index}", messages, rubrics, benchmark,
                            {"row": row_index, **({"prompt_metadata": extra} if extra else {})}))
    return out
