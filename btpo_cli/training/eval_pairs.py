"""Which pairs ``train.eval_every`` evaluates on, split off the training data before encoding.

Which pairs (``data.valid_split``, recorded in ``RUN/eval_pairs.json``):

* ``auto`` (default): the dataset's ``validation`` split when its folder has one, else ``heldout``;
* ``heldout``: ``train.eval_limit`` training pairs drawn by ``train.seed`` (after ``data.limit``) and
  removed from training — the same pairs on every process, on resume, and in any run with the same
  data, seed and limit;
* a split name: its first ``train.eval_limit`` pairs (0 = all). The test split is used only when
  named here, and then with a note on the console.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from btpo_cli.config import Config
from btpo_cli.console import console
from btpo_cli.data.files import atomic_write, probe
from btpo_cli.data.pairs import load_split
from btpo_cli.errors import BtpoError, ConfigError
from btpo_cli.methods.spec import get_method
from btpo_cli.runs.folder import EVAL_PAIRS_FILE

HELDOUT = "heldout"


@dataclass
class EvalPairs:
    """The pairs evaluated during training."""

    records: list[Any]
    source: str
    """``heldout`` or ``split``."""
    split: str
    """The split they come from (the training split for ``heldout``)."""

    @property
    def label(self) -> str:
        return f"{self.split} (held out)" if self.source == HELDOUT else self.split

    def describe(self, cfg: Config) -> dict[str, Any]:
        return {"valid_split": cfg.data.valid_split, "source": self.source, "split": self.split,
                "data": str(cfg.data.path), "seed": cfg.train.seed, "n": len(self.records),
                "ids": [r.id for r in self.records]}


def has_split(source: str, split: str) -> bool:
    """Whether a local dataset folder has ``split`` (a ``<split>.jsonl[.gz]`` / ``.parquet`` file, or a
    split of a ``datasets`` folder). Files and Hub ids have no splits to find: False."""
    path = Path(str(source)).expanduser()
    if not path.is_dir():
        return False
    if any(probe(path / f"{split}{ext}") is not None for ext in (".jsonl", ".jsonl.gz", ".parquet")):
        return True
    try:
        return split in json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
    except (OSError, ValueError, AttributeError):
        return False


def check_judge(method: str) -> None:
    """Evaluating in memory needs a judge that accepts ``module=`` (every built-in one does)."""
    judge = get_method(method).judge
    if judge is None or "module" not in inspect.signature(judge).parameters:
        raise ConfigError(f"train.eval_every: method '{method}' has no judge that can judge the model in memory "
                          "(MethodSpec.judge taking module=); set train.eval_every=0 and run btpo eval on final/")


def split_eval_pairs(cfg: Config, records: list[Any], acc: Any, run: Any, resume: bool) -> tuple[list[Any], EvalPairs]:
    """The training records without the eval pairs, and the eval pairs (``data.valid_split``).
    Writes ``RUN/eval_pairs.json`` (main process); on resume, checks the pairs did not change."""
    check_judge(cfg.method)
    choice = cfg.data.valid_split
    if choice == "auto":
        choice = "validation" if has_split(cfg.data.path, "validation") else HELDOUT
    if choice == HELDOUT:
        n = cfg.train.eval_limit
        if not 0 < n < len(records):
            raise BtpoError(f"train.eval_limit={n}: cannot hold out that many of the {len(records)} training pairs "
                            f"of {cfg.data.path} [{cfg.data.train_split}] (data.valid_split=heldout)")
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 4_099)
        chosen = set(torch.randperm(len(records), generator=g)[:n].tolist())
        pairs = EvalPairs([r for k, r in enumerate(records) if k in chosen], HELDOUT, cfg.data.train_split)
        records = [r for k, r in enumerate(records) if k not in chosen]
    else:
        if choice == cfg.data.train_split:
            raise ConfigError(f"data.valid_split: {choice!r} is the training split; use heldout")
        if not has_split(cfg.data.path, choice) and Path(str(cfg.data.path)).is_dir():
            raise BtpoError(f"{cfg.data.path}: no {choice!r} split for data.valid_split (use heldout, or name a split "
                            "the folder has)")
        pairs = EvalPairs(load_split(cfg, choice, acc, limit=cfg.train.eval_limit or None,
                                      record_skips=run.record_skips), "split", choice)
    main = acc.is_main_process
    path = run.root / EVAL_PAIRS_FILE
    desc = pairs.describe(cfg)
    if resume and path.exists():
        try:
            before = json.loads(path.read_text(encoding="utf-8")).get("ids")
        except (OSError, ValueError, AttributeError):
            before = None
        if before is not None and before != desc["ids"]:
            raise BtpoError(f"{path}: the run evaluated other pairs than it would now (did {cfg.data.path} or "
                            "data.limit change?); resume with the data it started with")
    if main:
        atomic_write(path, json.dumps(desc, indent=1, ensure_ascii=False) + "\n")
        if choice == cfg.data.eval_split:
            console.print(f"[yellow]note[/]: evaluating during training on the test split '{choice}' "
                          "(data.valid_split); best/ and early stopping then select on it", highlight=False)
        console.print(f"[btpo] eval every {cfg.train.eval_every} steps on {len(pairs.records)} pairs of "
                      f"{pairs.label}", highlight=False, markup=False)
    return records, pairs
