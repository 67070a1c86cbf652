r"""Final-answer extraction and answer equivalence for the Math builder.

Extraction (:func:`extract_answer`) takes, of the explicit markers below, the one that occurs
*last* in the text, and falls back to the last number:

1. ``The answer is: X`` (MetaMath) — X is the rest of that line;
2. ``\boxed{X}`` / ``\fbox{X}`` with nested braces (also ``\boxed X``);
3. ``#### X`` (GSM8K) — X is the rest of that line;
4. otherwise the last number (``-3``, ``1,000``, ``2.5``, ``3/4``).

Equivalence (:func:`answers_match`): ``math_verify`` (the optional extra ``math``), when it is
installed and allowed, is tried when the built-in comparison says "no". The built-in comparison
normalizes both answers and then compares them structurally:

* **Wrappers** are removed: ``$``, ``\(`` ``\)`` ``\[`` ``\]``, ``\boxed{}``, ``\text{}`` /
  ``\textbf{}`` / ``\mathrm{}`` / ``\mbox{}`` (their content is kept), ``\left`` / ``\right``,
  ``\displaystyle``, spacing commands (``\,`` ``\;`` ``\!`` ``~``), the dollar sign ``\$``.
* **Unicode**: ``−`` is ``-``, ``∞`` is ``\infty``, ``π`` is ``\pi``, ``°`` is a degree sign.
* **Assignment**: a leading ``x =`` or ``x \in`` (one variable name) is dropped.
* **Units** after a number are dropped: currency (dollars, cents), length, area (``square``,
  ``^2``), volume, mass, time, speed, ``degrees`` / ``^\circ``, and percent (``%``, ``\%``,
  ``percent``): ``50\%`` equals ``50``, not ``0.5``.
* **Trailing period** and surrounding whitespace are dropped.
* **Thousands separators**: a whole answer of the form ``1,000`` or ``12,345.5`` is a number;
  commas anywhere else separate elements, so ``(1,2)`` stays a pair.
* **Structure**: ``A \cup B`` compares piece by piece; ``(a,b)`` / ``[a,b)`` (tuples and
  intervals) compare element by element *in order* and the brackets must agree; ``\{a,b\}``
  and a bare ``a, b`` are *unordered* collections; ``(x)`` is ``x``.
* **Numbers** compare exactly as rationals: integers, decimals, ``a/b``, ``\frac{a}{b}``
  (also ``\dfrac``, ``\tfrac``, ``\frac12``), signs, integer powers ``a^b``: ``0.5 = 1/2 =
  \frac12``, but ``0.33 ≠ 1/3``. Mixed numbers (``2\frac12``) are not read.
* **Anything else** compares as a canonical string: lower-case, no whitespace, ``\frac12`` →
  ``\frac{1}{2}``, ``\sqrt2`` → ``\sqrt{2}``, ``x^{2}`` → ``x^2``. So text answers compare
  case-insensitively, and ``2\sqrt{2}`` ≠ ``\sqrt{8}`` unless math_verify is installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

try:  # optional extra "math"
    from math_verify import parse as _mv_parse
    from math_verify import verify as _mv_verify

    HAS_MATH_VERIFY = True
except ImportError:  # pragma: no cover - depends on the environment
    _mv_parse = _mv_verify = None
    HAS_MATH_VERIFY = False

# ----------------------------------------------------------------------------- extraction

_ANSWER_IS_RE = re.compile(r"The answer is:[ \t]*(?P<ans>[^\n]*)", re.IGNORECASE)
_GSM8K_RE = re.compile(r"####[ \t]*(?P<ans>[^\n]*)")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE_RE = re.compile(r"\\boxed[ \t]+(?P<ans>[^\s$]+)")
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _matching_brace(s: str, open_at: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_at`` (``\\{`` and ``\\}`` count too), or -1."""
    depth = 0
    for i in range(open_at, len(s)):
        c = s[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _clean_tail(ans: str) -> str:
    ans = ans.strip().rstrip(".").strip()
    return ans.strip("$").strip()


def extract_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (or ``\fbox{...}``, ``\boxed X``), or ``None``."""
    found = _last_boxed(text)
    return found[1] if found else None


def _last_boxed(text: str) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for m in _BOXED_RE.finditer(text):
        end = _matching_brace(text, m.end() - 1)
        if end != -1:
            best = (m.start(), text[m.end():end].strip())
    for m in _BOXED_BARE_RE.finditer(text):
        if best is None or m.start() > best[0]:
            best = (m.start(), m.group("ans"))
    return best if best and best[1] else None


def extract_metamath_answer(text: str) -> str | None:
    """The X of the last ``The answer is: X`` line, or ``None``."""
    matches = [m for m in _ANSWER_IS_RE.finditer(text) if _clean_tail(m.group("ans"))]
    return _clean_tail(matches[-1].group("ans")) if matches else None


def extract_gsm8k_answer(text: str) -> str | None:
    """The X of the last ``#### X`` line (GSM8K's gold format), or ``None``."""
    matches = [m for m in _GSM8K_RE.finditer(text) if _clean_tail(m.group("ans"))]
    return _clean_tail(matches[-1].group("ans")) if matches else None


def extract_last_number(text: str) -> str | None:
    """The last number in the text (``-3``, ``1,000``, ``2.5``, ``3/4``), or ``None``."""
    matches = _NUMBER_RE.findall(text)
    return matches[-1] if matches else None


def extract_answer(text: str | None, marked_only: bool = False) -> str | None:
    """The final answer of a solution: the last explicit marker (``The answer is:``, ``####``,
    ``\\boxed{}``), else the last number — or, with ``marked_only``, ``None``."""
    if not text:
        return None
    candidates: list[tuple[int, str]] = []
    for rx in (_ANSWER_IS_RE, _GSM8K_RE):
        for m in rx.finditer(text):
            if _clean_tail(m.group("ans")):
                candidates.append((m.start(), _clean_tail(m.group("ans"))))
    boxed = _last_boxed(text)
    if boxed:
        candidates.append(boxed)
    if candidates:
        return max(candidates, key=lambda c: c[0])[1]
    return None if marked_only else extract_last_number(text)


# ----------------------------------------------------------------------------- normalization

_UNICODE = {"−": "-", "–": "-", "∞": "\\infty", "π": "\\pi", "°": "^\\circ", "²": "^2", "³": "^3",
            "\u00a0": " ", "\u2009": " ", "×": "\\times", "·": "\\cdot"}
_WRAPPERS_RE = re.compile(r"\\(?:boxed|fbox|text|textbf|textit|textrm|textsf|texttt|textnormal|mathrm|mathbf"
                          r"|mathit|mathsf|mbox|hbox|operatorname)\s*\{")
_DROP = ("\\displaystyle", "\\left", "\\right", "\\$", "$", "\\(", "\\)", "\\[", "\\]", "\\!", "{,}")
_SPACES = ("\\qquad", "\\quad", "\\,", "\\;", "\\:", "\\ ", "~")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree")
_ASSIGN_RE = re.compile(r"^\s*(?:[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+)\s*(?:=|\\in(?![A-Za-z]))\s*(?=\S)")
_LONG_UNITS = (
    "dollars", "dollar", "cents", "cent", "euros", "euro", "pounds", "pound", "usd",
    "millimeters", "millimetres", "centimeters", "centimetres", "kilometers", "kilometres", "meters", "metres",
    "meter", "metre", "inches", "inch", "feet", "foot", "yards", "yard", "miles", "mile",
    "mm", "cm", "km", "ft", "yd", "mi",
    "kilograms", "kilogram", "grams", "gram", "kg", "mg", "lbs", "lb", "ounces", "ounce", "oz", "tons", "ton",
    "milliliters", "millilitres", "liters", "litres", "liter", "litre", "ml", "gallons", "gallon", "cups", "cup",
    "hours", "hour", "hrs", "hr", "minutes", "minute", "mins", "min", "seconds", "second", "sec", "secs",
    "days", "day", "weeks", "week", "months", "month", "years", "year",
    "mph", "km/h", "kmh", "m/s", "degrees", "degree", "percent", "units", "unit",
)
_SHORT_UNITS = ("m", "g")
_UNIT_RE = re.compile(
    r"^(?P<val>.*?[\d}).])\s*(?:(?:(?:square|sq\.?|cubic)\s+)?(?:" + "|".join(re.escape(u) for u in _LONG_UNITS)
    + r")|\s(?:" + "|".join(_SHORT_UNITS) + r"))(?:\s*\^\s*\{?[23]\}?)?\.?$", re.IGNORECASE)
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?$")
_OPEN, _CLOSE = "([{", ")]}"


def _unwrap_commands(s: str) -> str:
    r"""Replace ``\text{X}``, ``\boxed{X}``, ... by ``X`` (innermost first is not needed)."""
    while True:
        m = _WRAPPERS_RE.search(s)
        if not m:
            return s
        end = _matching_brace(s, m.end() - 1)
        if end == -1:  # unbalanced: drop the command name, keep the rest
            return s[:m.start()] + s[m.end():]
        s = s[:m.start()] + s[m.end():end] + s[end + 1:]


def _preprocess(s: str) -> str:
    """Wrappers, unicode, spacing, degrees and percent (whole-answer, once)."""
    for a, b in _UNICODE.items():
        s = s.replace(a, b)
    s = _unwrap_commands(s)
    s = s.replace("\\right.", "")
    for tok in _DROP:
        s = s.replace(tok, "")
    for tok in _SPACES:
        s = s.replace(tok, " ")
    s = _DEGREE_RE.sub(" ", s)
    s = s.replace("\\%", "%").replace("%", " ")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    return re.sub(r"\s+", " ", s).strip()


def _strip_scalar(s: str) -> str:
    """Assignment, units, trailing period, thousands separators (whole answer or one element)."""
    s = s.strip().rstrip(".").strip()
    if s.count("=") <= 1:
        s = _ASSIGN_RE.sub("", s, count=1)
    for _ in range(2):  # "5 square feet", then a unit left behind by a trailing period
        m = _UNIT_RE.match(s)
        if m and m.group("val").strip():
            s = m.group("val").strip()
    s = s.rstrip(".").strip()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


def _depths(s: str) -> list[int]:
    """Bracket depth *after* each character, counting ( [ { against ) ] } alike."""
    out, d = [], 0
    for c in s:
        if c in _OPEN:
            d += 1
        elif c in _CLOSE:
            d -= 1
        out.append(d)
    return out


def _split_top(s: str, sep: str) -> list[str]:
    """Split at ``sep`` where no bracket is open."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _spans(s: str, head: int) -> bool:
    """Whether the bracket opened at ``s[:head]`` closes only at the last character."""
    d = _depths(s)
    return len(s) > head and all(x > 0 for x in d[head - 1:-1]) and d[-1] == 0


@dataclass(frozen=True)
class _Shape:
    kind: str  # "scalar" | "union" | "ordered" | "unordered"
    items: tuple[str, ...]
    brackets: str = ""


def _shape(s: str) -> _Shape:
    s = s.strip()
    pieces = _split_top(s, "\\cup")
    if len(pieces) > 1:
        return _Shape("union", tuple(pieces))
    if s.startswith("\\{") and s.endswith("\\}") and _spans(s, 2):
        return _Shape("unordered", tuple(p for p in _split_top(s[2:-2], ",") if p))
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _spans(s, 1):
        elems = _split_top(s[1:-1], ",")
        if len(elems) > 1:
            return _Shape("ordered", tuple(elems), s[0] + s[-1])
        if s[0] == "(" and s[-1] == ")":
            return _shape(_strip_scalar(s[1:-1]))
        return _Shape("scalar", (s,))
    elems = _split_top(s, ",")
    if len(elems) > 1:
        return _Shape("unordered", tuple(elems))
    return _Shape("scalar", (s,))


def _canon(s: str) -> str:
    """The canonical string of a scalar answer."""
    s = re.sub(r"\s+", "", s.lower())
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"(\\frac\{[^{}]*\})(\d)", r"\1{\2}", s)
    s = re.sub(r"\\sqrt(\d+|[a-z](?![a-z]))", r"\\sqrt{\1}", s)
    s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)
    s = re.sub(r"\\(?:cdot|times)", "*", s)
    s = re.sub(r"^(?:inf|infinity|\\infinity)$", r"\\infty", s)
    s = re.sub(r"^-(?:inf|infinity)$", r"-\\infty", s)
    return s.rstrip(".")


def _frac_parts(s: str) -> tuple[str, str] | None:
    if not s.startswith("\\frac{"):
        return None
    a_end = _matching_brace(s, 5)
    if a_end == -1 or a_end + 1 >= len(s) or s[a_end + 1] != "{":
        return None
    b_end = _matching_brace(s, a_end + 1)
    if b_end != len(s) - 1:
        return None
    return s[6:a_end], s[a_end + 2:b_end]


def _to_number(s: str, depth: int = 0) -> Fraction | None:
    """The exact rational value of a numeric answer, or ``None`` when it is not one."""
    if depth > 8:
        return None
    s = _canon(s)
    if not s:
        return None
    if _DECIMAL_RE.match(s):
        return Fraction(s)
    if s[0] in "+-":
        v = _to_number(s[1:], depth + 1)
        return None if v is None else (v if s[0] == "+" else -v)
    if s[0] in "({" and s[-1] in ")}" and _spans(s, 1):
        return _to_number(s[1:-1], depth + 1)
    frac = _frac_parts(s)
    parts = list(frac) if frac else _split_top(s, "/")
    if len(parts) == 2:
        a, b = _to_number(parts[0], depth + 1), _to_number(parts[1], depth + 1)
        return a / b if a is not None and b not in (None, 0) else None
    power = _split_top(s, "^")
    if len(power) == 2:
        base, exp = _to_number(power[0], depth + 1), _to_number(power[1], depth + 1)
        if base is not None and exp is not None and exp.denominator == 1 and abs(exp) <= 64 and base != 0:
            return base ** int(exp)
    return None


def _scalar_equal(a: str, b: str) -> bool:
    na, nb = _to_number(a), _to_number(b)
    if na is not None and nb is not None:
        return na == nb
    return _canon(a) == _canon(b)


def _equal(a: str, b: str, depth: int = 0) -> bool:
    if depth > 8:
        return False
    a, b = _strip_scalar(a), _strip_scalar(b)
    sa, sb = _shape(a), _shape(b)
    if sa.kind != sb.kind or len(sa.items) != len(sb.items) or sa.brackets != sb.brackets:
        return False
    if sa.kind == "scalar":
        return _scalar_equal(sa.items[0], sb.items[0])
    if sa.kind in ("union", "ordered"):
        return all(_equal(x, y, depth + 1) for x, y in zip(sa.items, sb.items, strict=True))
    rest = list(sb.items)  # unordered: match each element of a with a distinct one of b
    for x in sa.items:
        for j, y in enumerate(rest):
            if _equal(x, y, depth + 1):
                del rest[j]
                break
        else:
            return False
    return True


def normalize_answer(ans: str) -> str:
    """The built-in normal form of an answer (for display and hashing; compare with :func:`answers_match`)."""
    s = _strip_scalar(_preprocess(ans))
    shape = _shape(s)
    if shape.kind == "scalar":
        n = _to_number(shape.items[0])
        if n is not None:
            return str(n)
        return _canon(shape.items[0])
    return _canon(s)


def builtin_match(pred: str, gold: str) -> bool:
    """The built-in equivalence (the rules in this module's docstring)."""
    a, b = _preprocess(pred), _preprocess(gold)
    if not a or not b:
        return False
    return _equal(a, b)


def math_verify_match(pred: str, gold: str) -> bool:
    """``math_verify.verify(parse(gold), parse(pred))``; ``False`` if it is missing or fails."""
    if not HAS_MATH_VERIFY:
        return False
    try:
        g = _mv_parse(f"${gold}$") or _mv_parse(gold)
        p = _mv_parse(f"${pred}$") or _mv_parse(pred)
        return bool(g and p and _mv_verify(g, p))
    except Exception:  # math_verify raises on odd input or times out
        return False


def answers_match(pred: str | None, gold: str | None, *, use_math_verify: bool | None = None) -> bool:
    """Whether a predicted final answer equals the gold one.

    The built-in comparison is tried first; if it says no and ``math_verify`` is installed (and
    ``use_math_verify`` is not ``False``), math_verify decides. An empty or missing answer never
    matches.
    """
    if pred is None or gold is None or not str(pred).strip() or not str(gold).strip():
        return False
    pred, gold = str(pred), str(gold)
    if builtin_match(pred, gold):
        return True
    if use_math_verify is False or not HAS_MATH_VERIFY:
        return False
    return math_verify_match(pred, gold)
