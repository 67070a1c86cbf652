"""Question readers for the Math builder: MetaMathQA (train), GSM8K and MATH-500 (test).

Each reader yields :class:`MathQuestion` ``(qid, question, gold_answer, source, meta)``:

* MetaMathQA (``meta-math/MetaMathQA``, ``MetaMathQA-395K.json``, a JSON list; JSONL also
  read): ``query``, ``response`` ending ``The answer is: X``, ``type``. Gold = X.
* GSM8K (``openai/gsm8k``, config ``main``, split ``test``): ``question``, ``answer`` ending
  ``#### X``. Gold = X.
* MATH-500 (``HuggingFaceH4/MATH-500``, split ``test``, ``test.jsonl``): ``problem``,
  ``solution``, ``answer``, ``subject``, ``level``, ``unique_id``. Gold = ``answer`` (or the
  last ``\\boxed{}`` of ``solution`` when ``answer`` is empty).

Rows that cannot be used are counted in the :class:`~btpo_cli.data.pairs.SkipLog` under
``"<field>: <reason>"`` (see :data:`SKIP_REASONS`); strict mode raises on the first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from btpo_cli.data.pairs import SkipLog
from btpo_cli.errors import BtpoError
from data_builders.grading import extract_boxed, extract_gsm8k_answer, extract_metamath_answer
from data_builders.sources import SourceSpec, load_rows

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{question}\n\n### Response: Let's think step by step."
)
"""The MetaMath (Alpaca) prompt the generator was fine-tuned with."""

R_MISSING = "missing or empty"
R_NO_ANSWER_IS = "no final 'The answer is: X' line"
R_NO_HASHES = "no final '#### X' line"
R_NO_GOLD = "empty, and no \\boxed{} answer in the solution"
SKIP_REASONS = (
    f"query: {R_MISSING}", f"response: {R_MISSING}", f"response: {R_NO_ANSWER_IS}",
    f"question: {R_MISSING}", f"answer: {R_MISSING}", f"answer: {R_NO_HASHES}",
    f"problem: {R_MISSING}", f"answer: {R_NO_GOLD}",
)
"""Every key these readers count skips under (plus the reading errors of ``load_rows``)."""


@dataclass(frozen=True)
class MathQuestion:
    """One question with its gold final answer."""

    qid: str
    question: str
    gold_answer: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def alpaca_prompt(question: str) -> str:
    """The MetaMath Alpaca prompt for ``question`` (ends with "Let's think step by step.")."""
    return ALPACA_TEMPLATE.format(question=question.strip())


def _text(row: dict[str, Any], key: str) -> str | None:
    v = row.get(key)
    return v.strip() if isinstance(v, str) and v.strip() else None


def _question_rows(spec: SourceSpec, split: str | None, skips: SkipLog | None, limit: int | None,
                   question: str, answer: str, extract: Callable[[str], str | None],
                   no_gold: str) -> Iterator[tuple[int, dict[str, Any], str, str, str]]:
    """Rows with a question text and an answer text whose gold answer ``extract`` finds:
    ``(row number, row, question, answer text, gold)``; every other row is skipped by field."""
    skips = skips if skips is not None else SkipLog()
    for file, num, row in load_rows(spec, split, skips=skips, limit=limit):
        q, a = _text(row, question), _text(row, answer)
        missing = question if q is None else answer if a is None else None
        if missing is not None:
            skips.skip(file, num, missing, R_MISSING)
            continue
        gold = extract(a)
        if gold is None:
            skips.skip(file, num, answer, no_gold)
            continue
        yield num, row, q, a, gold


def read_metamathqa(spec: SourceSpec, *, split: str | None = "train", skips: SkipLog | None = None,
                    limit: int | None = None) -> Iterator[MathQuestion]:
    """MetaMathQA rows → questions; ``qid`` is ``metamathqa-<row>`` (0-based), source ``metamathqa/<type>``."""
    for num, row, query, _, gold in _question_rows(spec, split, skips, limit, "query", "response",
                                                   extract_metamath_answer, R_NO_ANSWER_IS):
        qtype = str(row.get("type") or "unknown")
        yield MathQuestion(f"metamathqa-{num - 1}", query, gold, f"metamathqa/{qtype}",
                           {"type": qtype, "original_question": row.get("original_question")})


def read_gsm8k(spec: SourceSpec, *, split: str | None = "test", skips: SkipLog | None = None,
               limit: int | None = None) -> Iterator[MathQuestion]:
    """GSM8K rows → questions; ``qid`` is ``gsm8k-<split>-<row>`` (0-based), source ``gsm8k``."""
    split_name = split or spec.split or "test"
    for num, _, question, answer, gold in _question_rows(spec, split, skips, limit, "question", "answer",
                                                         extract_gsm8k_answer, R_NO_HASHES):
        yield MathQuestion(f"gsm8k-{split_name}-{num - 1}", question, gold, "gsm8k", {"solution": answer})


def read_math500(spec: SourceSpec, *, split: str | None = "test", skips: SkipLog | None = None,
                 limit: int | None = None) -> Iterator[MathQuestion]:
    """MATH-500 rows → questions; ``qid`` is ``math500-<unique_id>`` (``/`` → ``-``), source ``math500``."""
    skips = skips if skips is not None else SkipLog()
    for file, num, row in load_rows(spec, split, skips=skips, limit=limit):
        problem = _text(row, "problem")
        if problem is None:
            skips.skip(file, num, "problem", R_MISSING)
            continue
        gold = _text(row, "answer") or extract_boxed(row.get("solution") or "")
        if not gold:
            skips.skip(file, num, "answer", R_NO_GOLD)
            continue
        uid = str(row.get("unique_id") or f"row-{num - 1}")
        qid = "math500-" + re.sub(r"\.json$", "", uid).replace("/", "-")
        meta = {k: row.get(k) for k in ("subject", "level", "unique_id") if row.get(k) is not None}
        yield MathQuestion(qid, problem, gold, "math500", meta)


READERS: dict[str, Callable[..., Iterator[MathQuestion]]] = {
    "metamathqa": read_metamathqa, "gsm8k": read_gsm8k, "math500": read_math500,
}
"""Reader per Math input name (the names of ``BUILDER_SOURCES["math"]``)."""


def read_questions(name: str, spec: SourceSpec, *, skips: SkipLog | None = None,
                   limit: int | None = None) -> Iterator[MathQuestion]:
    """Read the questions of the Math input ``name`` from its source's default split."""
    if name not in READERS:
        raise BtpoError(f"unknown Math source '{name}' (known: {', '.join(READERS)})")
    return READERS[name](spec, split=spec.split, skips=skips, limit=limit)
