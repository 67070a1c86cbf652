"""Final-answer extraction/equivalence (data_builders/grading.py) and the Math question readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from btpo_cli.data.pairs import SkipLog
from btpo_cli.errors import DataError
from data_builders.grading import (
    HAS_MATH_VERIFY,
    answers_match,
    builtin_match,
    extract_answer,
    extract_boxed,
    extract_gsm8k_answer,
    extract_metamath_answer,
    normalize_answer,
)
from data_builders.math_questions import (
    MathQuestion,
    alpaca_prompt,
    read_gsm8k,
    read_math500,
    read_metamathqa,
    read_questions,
)
from data_builders.sources import resolve_sources, spec_from_value

# (pred, gold, expected) — the built-in rules decide all of these, with or without math_verify.
CASES = [
    # fractions and decimals: exact rational comparison
    ("0.5", r"\frac{1}{2}", True),
    ("1/2", r"\dfrac12", True),
    (r"\tfrac{3}{4}", "0.75", True),
    (r"\frac{6}{8}", "3/4", True),
    ("0.50", "1/2", True),
    ("0.33", r"\frac13", False),
    ("1/2", "2", False),
    ("0.5", "5", False),
    (r"\frac{-1}{2}", r"-\frac12", True),
    ("-0.5", r"-\frac{1}{2}", True),
    (r"\frac{1}{2}", r"\frac{1}{3}", False),
    ("18.00", "18", True),
    ("+5", "5", True),
    ("1e3", "1000", True),
    ("10^6", "1,000,000", True),
    ("2^{10}", "1024", True),
    # negatives
    ("-5", "5", False),
    ("−5", "-5", True),
    ("- 7", "-7", True),
    # thousands separators vs tuples / lists
    ("1,000", "1000", True),
    ("1,000", "1", False),
    ("12", "1,2", False),
    (r"1{,}000", "1000", True),
    (r"\$1,000.50", "1000.5", True),
    ("1,234,567", "1234567", True),
    # units, currency, degrees, percent
    ("5 cm", "5", True),
    (r"5\text{ cm}^2", "5", True),
    ("18 dollars", r"\$18", True),
    (r"30^\circ", "30", True),
    ("30 degrees", r"30^{\circ}", True),
    ("30°", "30", True),
    (r"50\%", "50", True),
    ("50%", "0.5", False),
    ("5 cm", "6", False),
    ("12 inches", "1", False),
    (r"3 \text{ square units}", "3", True),
    ("6 hours", "6", True),
    # wrappers, assignment, trailing period
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    ("$5$", "5", True),
    ("x = 5", "5", True),
    ("x=5", "x=6", False),
    ("y = 2x + 3", "2x+3", True),
    ("5.", "5", True),
    (r"\left( 3, 4 \right)", "(3,4)", True),
    # text answers: case-insensitive
    ("Monday", r"\text{monday}", True),
    ("Monday", "Tuesday", False),
    (r"\text{(C)}", "C", True),
    ("(C)", "(D)", False),
    ("yes", "Yes.", True),
    # tuples (ordered), intervals (ordered, bracket types matter), sets (unordered)
    ("(1,2)", "(1, 2)", True),
    ("(1,2)", "(2,1)", False),
    ("[1,2)", "[1,2]", False),
    ("[1, 2)", r"\left[1,2\right)", True),
    (r"(-\infty, 3]", "(-∞,3]", True),
    (r"x \in (0,1)", "(0,1)", True),
    (r"(-\infty,1)\cup(2,\infty)", r"(-\infty, 1) \cup (2, \infty)", True),
    (r"(-\infty,1)\cup(2,\infty)", r"(-\infty, 1] \cup (2, \infty)", False),
    (r"\{1,2\}", r"\{2, 1\}", True),
    (r"\{1,2\}", r"\{1, 3\}", False),
    ("1, 2", "2, 1", True),
    ("1, 2", "1, 2, 3", False),
    ("(1, 2)", "1, 2", False),
    ("(1/2, 0.25)", r"(\frac12, \frac{1}{4})", True),
    # symbolic strings compare canonically
    (r"2\sqrt{2}", r"2 \sqrt 2", True),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}", True),
    ("x^{2}", "x^2", True),
    (r"\pi", "π", True),
    ("x^2", "x^3", False),
    # empty answers never match
    ("", "5", False),
    ("   ", "", False),
]

# Equivalences only math_verify knows (the built-in rules say False for each).
MATH_VERIFY_CASES = [
    (r"\sqrt{8}", r"2\sqrt{2}", True),
    ("(x+1)^2", "x^2+2x+1", True),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}", True),
    (r"\frac{\pi}{2}", r"\pi/2", True),
]


@pytest.mark.parametrize("pred, gold, expected", CASES)
def test_builtin_cases(pred: str, gold: str, expected: bool) -> None:
    assert answers_match(pred, gold, use_math_verify=False) is expected
    assert answers_match(gold, pred, use_math_verify=False) is expected  # symmetric


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math_verify not installed (pip install 'btpo[math]')")
def test_matches_hold_with_math_verify_too() -> None:
    # math_verify is only asked when the built-in rules say no, so every built-in match stands.
    for pred, gold, expected in CASES:
        if expected:
            assert answers_match(pred, gold) is True, (pred, gold)


@pytest.mark.parametrize("pred, gold, expected", MATH_VERIFY_CASES)
def test_math_verify_cases(pred: str, gold: str, expected: bool) -> None:
    assert builtin_match(pred, gold) is False  # documented limit of the built-in rules
    if not HAS_MATH_VERIFY:
        pytest.skip("math_verify not installed (pip install 'btpo[math]')")
    assert answers_match(pred, gold) is expected


def test_case_count() -> None:
    assert len(CASES) >= 50


def test_none_never_matches() -> None:
    assert answers_match(None, "5") is False and answers_match("5", None) is False


def test_normalize_answer() -> None:
    assert normalize_answer(r"\dfrac{2}{4}") == "1/2"
    assert normalize_answer(r"\$1,000") == "1000"
    assert normalize_answer(r"\text{Monday}.") == "monday"


# ----------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, expected", [
    ("2 + 3 = 5.\nThe answer is: 5", "5"),
    ("The answer is: $\\frac{1}{2}$.", r"\frac{1}{2}"),
    ("so we get \\boxed{\\frac{1}{\\sqrt{2}}} and stop", r"\frac{1}{\sqrt{2}}"),
    ("first \\boxed{1}, then \\boxed{\\{1, \\{2\\}\\}}", r"\{1, \{2\}\}"),
    ("Natalia sold 48/2 = 24 clips.\n#### 1,234", "1,234"),
    ("The answer is: \\boxed{7}.", "7"),
    ("\\boxed{3} was wrong. The answer is: 4", "4"),
    ("x is 3, y is -4.5 here", "-4.5"),
    ("about 3/4 of them", "3/4"),
    ("no numbers at all", None),
    ("", None),
])
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_specific_markers() -> None:
    assert extract_metamath_answer("The answer is: 18\n") == "18"
    assert extract_metamath_answer("The answer is 18") is None  # MetaMath always writes the colon
    assert extract_gsm8k_answer("work\n#### 72") == "72"
    assert extract_gsm8k_answer("no marker") is None
    assert extract_boxed(r"\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed(r"\boxed{unclosed") is None
    assert extract_boxed(r"so \boxed 5 it is") == "5"


# ----------------------------------------------------------------------------- question readers

def test_alpaca_prompt() -> None:
    assert alpaca_prompt(" What is 1+1? ") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is 1+1?\n\n### Response: Let's think step by step.")


def test_metamathqa_json_list(tmp_path: Path) -> None:
    rows = [
        {"query": "What is 2+3?", "response": "2+3=5.\nThe answer is: 5", "type": "GSM_Rephrased",
         "original_question": "2+3?"},
        {"query": "Compute $\\frac{1}{2}+\\frac14$.", "response": "We add.\nThe answer is: \\frac{3}{4}",
         "type": "MATH_AnsAug", "original_question": "x"},
        {"query": "No answer line", "response": "I think 7.", "type": "GSM_SV", "original_question": "y"},
        {"query": "", "response": "The answer is: 1", "type": "GSM_FOBAR", "original_question": "z"},
    ]
    p = tmp_path / "MetaMathQA-395K.json"
    p.write_text(json.dumps(rows, indent=4), encoding="utf-8")
    spec = spec_from_value("metamathqa", str(p), resolve_sources("math")["metamathqa"])
    skips = SkipLog()
    qs = list(read_questions("metamathqa", spec, skips=skips))
    assert qs == [MathQuestion("metamathqa-0", "What is 2+3?", "5", "metamathqa/GSM_Rephrased"),
                  MathQuestion("metamathqa-1", "Compute $\\frac{1}{2}+\\frac14$.", r"\frac{3}{4}",
                               "metamathqa/MATH_AnsAug")]
    assert skips.counts == {"response: no final 'The answer is: X' line": 1, "query: missing or empty": 1}
    with pytest.raises(DataError, match=r"MetaMathQA-395K\.json:3 field 'response'"):
        list(read_metamathqa(spec, skips=SkipLog(strict=True)))


def test_gsm8k_jsonl(tmp_path: Path) -> None:
    rows = [
        {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                     "in May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72"},
        {"question": "How much?", "answer": "It costs 1,000 dollars.\n#### 1,000"},
        {"question": "Broken", "answer": "no final line"},
    ]
    (tmp_path / "main").mkdir()
    (tmp_path / "main" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = spec_from_value("gsm8k", str(tmp_path), resolve_sources("math")["gsm8k"])
    skips = SkipLog()
    qs = list(read_gsm8k(spec, skips=skips))
    assert [(q.qid, q.gold_answer, q.source) for q in qs] == [("gsm8k-test-0", "72", "gsm8k"),
                                                              ("gsm8k-test-1", "1,000", "gsm8k")]
    assert answers_match("1000", qs[1].gold_answer)
    assert skips.counts == {"answer: no final '#### X' line": 1}
    assert skips.examples["answer: no final '#### X' line"] == f"{tmp_path / 'main' / 'test.jsonl'}:3"


def test_math500_jsonl(tmp_path: Path) -> None:
    rows = [
        {"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
         "solution": "... so the answer is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
         "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
         "unique_id": "test/precalculus/807.json"},
        {"problem": "Gold only in the solution", "solution": "Thus $\\boxed{42}$.", "answer": "",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "No gold", "solution": "none", "answer": "", "subject": "Algebra", "level": 1,
         "unique_id": "test/algebra/2.json"},
    ]
    p = tmp_path / "test.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    skips = SkipLog()
    qs = list(read_math500(spec_from_value("math500", str(tmp_path), resolve_sources("math")["math500"]),
                           skips=skips))
    assert [q.qid for q in qs] == ["math500-test-precalculus-807", "math500-test-algebra-1"]
    assert qs[0].meta == {"subject": "Precalculus", "level": 2, "unique_id": "test/precalculus/807.json"}
    assert qs[1].gold_answer == "42"
    assert answers_match(r"(3, \frac{\pi}{2})", qs[0].gold_answer)
    assert skips.counts == {"answer: empty, and no \\boxed{} answer in the solution": 1}


def test_limit(tmp_path: Path) -> None:
    p = tmp_path / "q.jsonl"
    p.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(9)))
    assert len(list(read_gsm8k(spec_from_value("gsm8k", str(p)), limit=4))) == 4


def test_extract_answer_marked_only() -> None:
    assert extract_answer("3 + 4 = 7, so 12") == "12"
    assert extract_answer("3 + 4 = 7, so 12", marked_only=True) is None
    assert extract_answer("so 12. The answer is: 7", marked_only=True) == "7"
    assert extract_answer("x \\boxed{5} and 9", marked_only=True) == "5"
