"""The synthetic reasoning-judge task: the built-in default dataset (no Hub needed).

The task lives here, below both of its users: ``btpo build-data synthetic``
(:mod:`data_builders.synthetic`, which writes the data set) and the tiny-thinker base model
(:mod:`btpo_cli.models.thinker`, which pre-trains on its dialogs).

Each prompt asks for the value of a multi-step integer expression evaluated left to right
("What is 7 + 2 - 5 + 3?"). The chosen response states the right value, the rejected one a near
miss (off by 1 or 2; unbounded tasks also use off-by-10 and one changed digit). By default every
running total stays within the operands' range (``bounded``), so each step is a small table lookup. Judging a pair *without* thinking means doing the
arithmetic silently; *with* the right thought — the steps written out — it reduces to comparing
two numbers. Aspect: "correct".

Options: ``digits`` per operand, ``ops`` operations per expression (difficulty), and
``label_noise``: the fraction of TRAINING pairs whose chosen/rejected are swapped (the test set
is never noisy), so that the Bradley–Terry likelihood, not a 0/1 rule, is what fits the data.

The thought formats a base model is pre-trained on (``btpo base-model``) live here too, beside the
task they describe: a careful step-by-step thought, a lazy one that computes nothing, and a
wrong one with an arithmetic slip (:func:`careful_thought`, :func:`lazy_thought`,
:func:`wrong_thought`).

Deterministic for a given seed and settings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from btpo_cli.data.pairs import PairRecord

ASPECT = "correct"
SYSTEM = "You check arithmetic."
"""A short system turn (chat templates otherwise add a long default one), keeping sequences short on CPU."""


@dataclass(frozen=True)
class TaskSpec:
    digits: int = 1
    """Digits per operand."""
    ops: int = 3
    """Operations per expression (+ and -, evaluated left to right)."""
    label_noise: float = 0.0
    """Fraction of training pairs with chosen and rejected swapped."""
    bounded: bool = True
    """Keep every running total (and the near miss) within ``[0, 10**digits - 1]``: each written step
    is then a lookup in a small table and each number one token per digit, so a careful thought is
    reliable, while the whole expression still takes several steps to evaluate."""


@dataclass(frozen=True)
class Expression:
    terms: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def text(self) -> str:
        out = str(self.terms[0])
        for op, t in zip(self.ops, self.terms[1:], strict=True):
            out += f" {op} {t}"
        return out

    def steps(self) -> list[tuple[int, str, int, int]]:
        """Left-to-right steps ``(lhs, op, rhs, result)``."""
        acc, out = self.terms[0], []
        for op, t in zip(self.ops, self.terms[1:], strict=True):
            res = acc + t if op == "+" else acc - t
            out.append((acc, op, t, res))
            acc = res
        return out

    @property
    def value(self) -> int:
        return self.steps()[-1][3]


def make_expression(rng: random.Random, spec: TaskSpec) -> Expression:
    lo, hi = 10 ** (spec.digits - 1) if spec.digits > 1 else 0, 10 ** spec.digits - 1
    while True:
        terms = tuple(rng.randint(lo, hi) for _ in range(spec.ops + 1))
        ops = tuple(rng.choice("+-") for _ in range(spec.ops))
        e = Expression(terms, ops)
        if not spec.bounded or all(0 <= r <= hi for *_, r in e.steps()):
            return e


def near_miss(rng: random.Random, value: int, bound: int | None = None) -> int:
    """A plausible wrong result: off by 1, 2 or 10, or one digit changed (within ``[0, bound]`` if given)."""
    if bound is not None:
        options = [value + d for d in (-2, -1, 1, 2) if 0 <= value + d <= bound]
        return rng.choice(options)
    kind = rng.choice(["off", "off", "digit"]) if abs(value) >= 10 else "off"
    s = str(abs(value))
    if kind == "digit" and len(s) > 1:
        i = rng.randrange(len(s))
        d = str((int(s[i]) + rng.choice([1, 9])) % 10)
        s = s[:i] + d + s[i + 1:]
        wrong = int(s) * (1 if value >= 0 else -1)
    else:
        wrong = value + rng.choice([-10, -2, -1, 1, 2, 10] if abs(value) >= 10 else [-2, -1, 1, 2])
    return wrong if wrong != value else value + 1


def prompt_messages(expr: Expression) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {expr.text}?"}]


def response_text(expr: Expression, value: int) -> str:
    return f"{expr.text} = {value}."


def make_pair(rng: random.Random, index: int, split: str, spec: TaskSpec | int = 2) -> PairRecord:
    if isinstance(spec, int):
        spec = TaskSpec(digits=spec, ops=1)
    expr = make_expression(rng, spec)
    value = expr.value
    wrong = near_miss(rng, value, 10 ** spec.digits - 1 if spec.bounded else None)
    noisy = split == "train" and spec.label_noise > 0 and rng.random() < spec.label_noise
    good, bad = (wrong, value) if noisy else (value, wrong)
    return PairRecord(
        id=f"synthetic-{split}-{index:06d}",
        prompt=prompt_messages(expr),
        chosen=[{"role": "assistant", "content": response_text(expr, good)}],
        rejected=[{"role": "assistant", "content": response_text(expr, bad)}],
        aspect=ASPECT,
        source="synthetic/arithmetic",
        meta={"expression": expr.text, "value": value, "near_miss": wrong, "label_flipped": noisy},
    )


# ----------------------------------------------------------------------------- thoughts

LAZY = [
    "Looks reasonable.",
    "Looks fine to me.",
    "Looks about right.",
    "Looks plausible at a glance.",
    "Looks like a sensible answer.",
]
"""Lazy thoughts all open with the same word, so that a base model trained on more lazy than careful
thoughts decodes a lazy one greedily (its first token is the single most likely one)."""


def _verdict(computed: int, claimed: int) -> str:
    # The comparison is written as one more subtraction step: a tiny model learns "is this digit 0"
    # right after a subtraction it can do, but barely learns to compare two numbers a few tokens
    # apart (docs/experiments.md, 2026-11-26).
    return (f"The response says {claimed}. {claimed} - {computed} = {claimed - computed}, "
            f"so it is {'right' if computed == claimed else 'wrong'}.")


def careful_thought(expr: Expression, claimed: int) -> str:
    """Every step written out, then the claim compared with the result: judging is now reading one word."""
    steps = " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in expr.steps())
    return f"Let me check. {steps} The result is {expr.value}. {_verdict(expr.value, claimed)}"


def wrong_thought(rng: random.Random, expr: Expression, claimed: int) -> str:
    """A careful-looking thought with one arithmetic slip that propagates."""
    steps, acc = [], expr.terms[0]
    slip = rng.randrange(len(expr.ops))
    for i, (op, t) in enumerate(zip(expr.ops, expr.terms[1:], strict=True)):
        res = acc + t if op == "+" else acc - t
        if i == slip:
            res += rng.choice([-2, -1, 1, 2])
        steps.append(f"{acc} {op} {t} = {res}.")
        acc = res
    return f"Let me check. {' '.join(steps)} The result is {acc}. {_verdict(acc, claimed)}"


def lazy_thought(rng: random.Random) -> str:
    return rng.choice(LAZY)
