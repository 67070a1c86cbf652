"""The synthetic reasoning-judge task: the built-in default dataset (no Hub needed).

Each prompt asks for the value of a multi-step integer expression evaluated left to right
("What is 37 + 48 - 19?"). The chosen response states the right value, the rejected one a near
miss (off by 1, 2 or 10, or one digit changed). Judging a pair *without* thinking means doing the
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from btpo_cli.data import PairRecord, write_dataset

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
    terms = tuple(rng.randint(lo, hi) for _ in range(spec.ops + 1))
    ops = tuple(rng.choice("+-") for _ in range(spec.ops))
    return Expression(terms, ops)


def near_miss(rng: random.Random, value: int) -> int:
    """A plausible wrong result: off by 1, 2 or 10, or one digit changed."""
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
    value, wrong = expr.value, near_miss(rng, expr.value)
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


def build_synthetic(out: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                    digits: int = 1, ops: int = 3, label_noise: float = 0.0) -> dict[str, Any]:
    """Write ``train.jsonl``, ``test.jsonl`` and ``manifest.json``; return the manifest."""
    spec = TaskSpec(digits=digits, ops=ops, label_noise=label_noise)
    rng = random.Random(f"synthetic:{seed}")
    splits = {
        "train": [make_pair(rng, i, "train", spec) for i in range(n_train)],
        "test": [make_pair(rng, i, "test", spec) for i in range(n_test)],
    }
    flipped = sum(r.meta["label_flipped"] for r in splits["train"])
    manifest = {"name": "synthetic", "builder": "synthetic", "seed": seed, "settings": asdict(spec),
                "sources": ["generated (data_builders/synthetic.py)"], "aspect": ASPECT,
                "label_flipped": {"train": flipped, "test": 0}, "skipped": {"total": 0, "by_reason": {}}}
    return write_dataset(out, splits, manifest)


# ----------------------------------------------------------------------------- thoughts

LAZY = [
    "The response looks reasonable.",
    "The response gives a number, so it seems fine.",
    "I will trust the response.",
    "This looks about right.",
    "The answer seems plausible at a glance.",
]


def careful_thought(expr: Expression, claimed: int) -> str:
    """Every step written out, then the claimed value quoted: judging is now a comparison."""
    steps = " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in expr.steps())
    return f"{steps} The result is {expr.value}. The response says {claimed}."


def wrong_thought(rng: random.Random, expr: Expression, claimed: int) -> str:
    """A careful-looking thought with one arithmetic slip that propagates."""
    steps, acc = [], expr.terms[0]
    slip = rng.randrange(len(expr.ops))
    for i, (op, t) in enumerate(zip(expr.ops, expr.terms[1:], strict=True)):
        res = acc + t if op == "+" else acc - t
        if i == slip:
            res += rng.choice([-10, -2, -1, 1, 2, 10])
        steps.append(f"{acc} {op} {t} = {res}.")
        acc = res
    return f"{' '.join(steps)} The result is {acc}. The response says {claimed}."


def lazy_thought(rng: random.Random) -> str:
    return rng.choice(LAZY)
