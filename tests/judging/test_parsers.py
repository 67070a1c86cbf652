"""Verdict and score parsers of the GRPO judges on adversarial outputs: never raise, name every failure."""

from __future__ import annotations

import pytest

from btpo_cli.judging.parsers import (
    SCORE_ERRORS,
    VERDICT_ERRORS,
    ParseStats,
    ScoreParse,
    VerdictParse,
    parse_score,
    parse_verdict,
)

# ----------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("text, verdict, error", [
    ("Response A is better.\n[[A]]", "A", None),
    ("[[B]]", "B", None),
    ("Reasoning…\n\n**Final verdict: [[B]]**", "B", None),
    ("[[ a ]]", "A", None),                                  # whitespace and case inside the tag
    ("[[A]] ... as I said, [[A]]", "A", None),               # the same verdict repeated
    ("[[[A]]]", "A", None),                                  # extra brackets
    ("［［Ａ］］", "A", None),                                # full-width forms (NFKC)
    ("", None, "no_tag"),
    ("A is better", None, "no_tag"),
    ("[A]", None, "no_tag"),
    ("[[A] and [B]]", None, "no_tag"),                       # garbled
    ("[[1, 2], [3, 4]]", None, "no_tag"),                    # nested list, not a tag
    ("I think [[A]] but actually [[B]]", None, "multiple_verdicts"),
    ("The format is [[A]] or [[B]]. My verdict: [[A]]", None, "multiple_verdicts"),
    ("[[C]]", None, "invalid_label"),
    ("[[Response A]]", None, "invalid_label"),
    ("[[]]", None, "invalid_label"),
    ("[[A]] [[C]]", None, "multiple_verdicts"),
    ("My verdict is [[A", None, "truncated"),                # cut mid-tag
    ("My verdict is [[", None, "truncated"),
    ("My verdict is [[B]", None, "truncated"),
    ("[[A]] then [[", None, "truncated"),
])
def test_parse_verdict(text: str, verdict: str | None, error: str | None) -> None:
    assert parse_verdict(text) == VerdictParse(verdict, error)


def test_unfinished_generation_is_truncated_even_with_a_tag() -> None:
    assert parse_verdict("[[A]] and more", finished=False) == VerdictParse(None, "truncated")
    assert parse_score("<score>7</score> more", finished=False) == ScoreParse(None, "truncated")


@pytest.mark.parametrize("value", [None, b"[[B]]", bytearray(b"\xff\xfe[[A]]"), 42, 3.5, ["[[A]]"], object()])
def test_parsers_never_raise(value: object) -> None:
    v, s = parse_verdict(value), parse_score(value)
    assert (v.verdict is None) == (v.error is not None)
    assert (s.score is None) == (s.error is not None)
    assert parse_verdict(None) == VerdictParse(None, "no_tag")
    assert parse_verdict(b"[[B]]") == VerdictParse("B", None)


def test_hostile_str_does_not_raise() -> None:
    class Bad:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert parse_verdict(Bad()).error == "no_tag"
    assert parse_score(Bad()).error == "no_tag"


def test_very_long_text_is_fast_and_correct() -> None:
    import time

    # many openings that never close within a tag's width: worst case for the regexes
    junk = "[[" * 100_000 + "y" * 40 + "]]" * 100_000 + "<score>" * 50_000 + "x" * 1_000_000
    t0 = time.perf_counter()
    assert parse_verdict(junk + "\n[[A]]") == VerdictParse("A", None)
    assert parse_score(junk + "\n<score>8</score>") == ScoreParse(8.0, None)
    assert parse_verdict(junk).error is not None and parse_score(junk).error is not None
    assert time.perf_counter() - t0 < 5.0


# ----------------------------------------------------------------------------- scores


@pytest.mark.parametrize("text, score, error", [
    ("Good.\n<score>7</score>", 7.0, None),
    ("<score> 10 </score>", 10.0, None),
    ("<SCORE>1</Score>", 1.0, None),
    ("< score >3< / score >", 3.0, None),
    ("<score>7.5</score>", 7.5, None),
    ("<score>07</score>", 7.0, None),
    ("<score>+4</score>", 4.0, None),
    ("<score>6</score> … <score>6.0</score>", 6.0, None),        # the same value repeated
    ("＜ｓｃｏｒｅ＞７＜／ｓｃｏｒｅ＞", 7.0, None),               # full-width (NFKC)
    ("<score>٧</score>", 7.0, None),                              # Arabic-Indic digit seven
    ("<score>٩.٥</score>", 9.5, None),
    ("", None, "no_tag"),
    ("Score: 7", None, "no_tag"),
    ("<score>7", None, "truncated"),
    ("blah <score>7</sco", None, "truncated"),
    ("blah <sco", None, "truncated"),
    ("blah <", None, "truncated"),
    ("<score>11</score>", None, "out_of_range"),
    ("<score>0</score>", None, "out_of_range"),
    ("<score>-3</score>", None, "out_of_range"),
    ("<score>10.01</score>", None, "out_of_range"),
    ("<score>seven</score>", None, "not_a_number"),
    ("<score>7/10</score>", None, "not_a_number"),
    ("<score>1e1</score>", None, "not_a_number"),
    ("<score></score>", None, "not_a_number"),
    ("<score>nan</score>", None, "not_a_number"),
    ("<score>N</score> is the format; <score>7</score>", None, "multiple_scores"),
    ("<score>3</score><score>8</score>", None, "multiple_scores"),
    ("<score><score>7</score></score>", 7.0, None),               # nested: the inner tag reads
    ("<score>7 is my score, not closed, followed by a long explanation", None, "no_tag"),
])
def test_parse_score(text: str, score: float | None, error: str | None) -> None:
    assert parse_score(text) == ScoreParse(score, error)


def test_score_range_is_configurable() -> None:
    assert parse_score("<score>0</score>", lo=0, hi=5) == ScoreParse(0.0, None)
    assert parse_score("<score>6</score>", lo=0, hi=5) == ScoreParse(None, "out_of_range")


# ----------------------------------------------------------------------------- stats


def test_parse_stats_counts_every_kind() -> None:
    st = ParseStats.verdicts()
    for t in ("[[A]]", "[[B]]", "", "[[C]]", "[[A]][[B]]", "[[A"):
        st.add(parse_verdict(t))
    assert st.as_dict() == {"ok": 2, "no_tag": 1, "multiple_verdicts": 1, "invalid_label": 1, "truncated": 1}
    assert st.total == 6 and st.errors == 4 and st.error_rate() == pytest.approx(4 / 6)
    sc = ParseStats.scores()
    assert set(sc.as_dict()) == {"ok", *SCORE_ERRORS} and sc.error_rate() == 0.0
    assert set(ParseStats.verdicts().as_dict()) == {"ok", *VERDICT_ERRORS}
