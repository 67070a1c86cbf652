"""A small arithmetic preference set that needs no Hub: the built-in default dataset.

Each prompt asks for the value of an integer expression; the chosen response states the right
value, the rejected one a near miss (off by a small amount, or a swapped/dropped digit). Aspect:
"correct". Deterministic for a given seed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from btpo_cli.data import PairRecord, write_dataset

ASPECT = "correct"


def _near_miss(rng: random.Random, value: int) -> int:
    kind = rng.choice(["off", "off", "digit", "swap"])
    s = str(abs(value))
    if kind == "digit" and len(s) > 1:
        i = rng.randrange(len(s))
        d = str((int(s[i]) + rng.choice([1, 9])) % 10)
        s = s[:i] + d + s[i + 1:]
    elif kind == "swap" and len(s) > 1 and len(set(s)) > 1:
        i = rng.randrange(len(s) - 1)
        while s[i] == s[i + 1]:
            i = (i + 1) % (len(s) - 1)
        s = s[:i] + s[i + 1] + s[i] + s[i + 2:]
    else:
        s = str(abs(value) + rng.choice([-10, -2, -1, 1, 2, 10]))
    wrong = int(s) * (1 if value >= 0 else -1)
    return wrong if wrong != value else value + 1


def make_pair(rng: random.Random, index: int, split: str, digits: int) -> PairRecord:
    hi = 10 ** digits - 1
    lo = 10 ** (digits - 1)
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    op = rng.choice(["+", "-", "*"]) if digits <= 2 else rng.choice(["+", "-"])
    value = a + b if op == "+" else a - b if op == "-" else a * b
    wrong = _near_miss(rng, value)
    prompt = [{"role": "user", "content": f"What is {a} {op} {b}?"}]
    return PairRecord(
        id=f"synthetic-{split}-{index:06d}",
        prompt=prompt,
        chosen=[{"role": "assistant", "content": f"{a} {op} {b} = {value}."}],
        rejected=[{"role": "assistant", "content": f"{a} {op} {b} = {wrong}."}],
        aspect=ASPECT,
        source="synthetic/arithmetic",
    )


def build_synthetic(out: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                    digits: int = 2) -> dict[str, Any]:
    """Write ``train.jsonl``, ``test.jsonl`` and ``manifest.json``; return the manifest."""
    rng = random.Random(seed)
    splits = {
        "train": [make_pair(rng, i, "train", digits) for i in range(n_train)],
        "test": [make_pair(rng, i, "test", digits) for i in range(n_test)],
    }
    manifest = {"name": "synthetic", "builder": "synthetic", "seed": seed,
                "settings": {"digits": digits}, "sources": ["generated (data_builders/synthetic.py)"],
                "aspect": ASPECT, "skipped": {"total": 0, "by_reason": {}}}
    return write_dataset(out, splits, manifest)
