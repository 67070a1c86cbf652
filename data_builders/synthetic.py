"""``btpo build-data synthetic``: write the synthetic reasoning-judge set (the task itself:
:mod:`btpo_cli.data.synthetic`)."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from btpo_cli.data.pairs import write_dataset
from btpo_cli.data.synthetic import ASPECT, TaskSpec, make_pair


def build_synthetic(out: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                    digits: int = 1, ops: int = 3, label_noise: float = 0.0,
                    bounded: bool = True, name: str = "synthetic", overwrite: bool = False) -> dict[str, Any]:
    """Write ``train.jsonl``, ``test.jsonl`` and ``manifest.json``; return the manifest. ``name`` is the
    dataset's name in eval JSONs and ``btpo compare`` columns; a folder holding another dataset is refused
    unless ``overwrite`` (:func:`~btpo_cli.data.pairs.write_dataset`)."""
    spec = TaskSpec(digits=digits, ops=ops, label_noise=label_noise, bounded=bounded)
    rng = random.Random(f"synthetic:{seed}")
    splits = {
        "train": [make_pair(rng, i, "train", spec) for i in range(n_train)],
        "test": [make_pair(rng, i, "test", spec) for i in range(n_test)],
    }
    flipped = sum(r.meta["label_flipped"] for r in splits["train"])
    manifest = {"name": name, "builder": "synthetic", "seed": seed, "settings": asdict(spec),
                "sources": ["generated (data_builders/synthetic.py)"], "aspect": ASPECT,
                "requested": {"train": n_train, "test": n_test},
                "label_flipped": {"train": flipped, "test": 0}, "skipped": {"total": 0, "by_reason": {}}}
    return write_dataset(out, splits, manifest, overwrite)
