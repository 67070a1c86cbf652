"""Evaluation during training (``train.eval_every``): which pairs, the ``eval/`` rows, ``best/``, early stopping.

Which pairs (``data.valid_split``, recorded in ``RUN/eval_pairs.json``):

* ``auto`` (default): the dataset's ``validation`` split when its folder has one, else ``heldout``;
* ``heldout``: ``train.eval_limit`` training pairs drawn by ``train.seed`` (after ``data.limit``) and
  removed from training — the same pairs on every process, on resume, and in any run with the same
  data, seed and limit;
* a split name: its first ``train.eval_limit`` pairs (0 = all). The test split is used only when
  named here, and then with a note on the console.

How: every ``eval_every`` optimizer steps and at the last, the method's own judge
(``MethodSpec.judge`` with ``module=`` the trainer's policy — no reload from disk) runs the METHOD §7
protocol (:meth:`~btpo_cli.judge.Judge.evaluate_pairs`, what ``btpo eval`` runs) on the ``hf``
engine, in eval mode, under the loop's autocast. Every process takes part: each judges one block of
whole ``eval.batch_size`` batches (the pairs one process would batch together), the results are
gathered to every process, so all of them take the same ``best/`` and early-stopping decisions
(``best/`` is written by all of them: under FSDP2 / ZeRO-3 its weights are gathered). Sharded
parameters are made whole for the evaluation (:func:`~btpo_cli.sharding.gathered`). The random
state of torch, Python and NumPy is restored afterwards, so evaluating does not change training.

``best/`` holds the model of the best evaluation so far (by raw accuracy, strictly better), written
by the same writer as ``final/`` with ``selected`` in its ``btpo.json``. With
``train.early_stop_patience = P`` the run stops after P evaluations in a row without a better one:
a checkpoint at that step, then ``final/`` (the last weights; ``best/`` the best). The best score,
its step, the count since and whether the run stopped live in every checkpoint's
``trainer_state.json``, so a resumed run continues exactly.
"""

from __future__ import annotations

import inspect
import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from btpo_cli.config import Config
from btpo_cli.errors import BtpoError, ConfigError
from btpo_cli.runs import EVAL_PAIRS_FILE

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
    from btpo_cli.files import probe

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
    from btpo_cli.methods import get_method

    judge = get_method(method).judge
    if judge is None or "module" not in inspect.signature(judge).parameters:
        raise ConfigError(f"train.eval_every: method '{method}' has no judge that can judge the model in memory "
                          "(MethodSpec.judge taking module=); set train.eval_every=0 and run btpo eval on final/")


def split_eval_pairs(cfg: Config, records: list[Any], acc: Any, run: Any, resume: bool) -> tuple[list[Any], EvalPairs]:
    """The training records without the eval pairs, and the eval pairs (``data.valid_split``).
    Writes ``RUN/eval_pairs.json`` (main process); on resume, checks the pairs did not change."""
    from btpo_cli.console import console
    from btpo_cli.trainer import load_split

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
        pairs = EvalPairs(load_split(cfg, choice, acc, limit=cfg.train.eval_limit or None), "split", choice)
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
        from btpo_cli.runs import atomic_write

        atomic_write(path, json.dumps(desc, indent=1, ensure_ascii=False) + "\n")
        if choice == cfg.data.eval_split:
            console.print(f"[yellow]note[/]: evaluating during training on the test split '{choice}' "
                          "(data.valid_split); best/ and early stopping then select on it", highlight=False)
        console.print(f"[btpo] eval every {cfg.train.eval_every} steps on {len(pairs.records)} pairs of "
                      f"{pairs.label}", highlight=False, markup=False)
    return records, pairs


@contextmanager
def kept_rng(device: Any) -> Iterator[None]:
    """Within: any random draw; after: torch (CPU and this CUDA device), Python and NumPy as before."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(npy)


class TrainEval:
    """The evaluation state of one run (a no-op when ``train.eval_every`` is 0)."""

    def __init__(self, sess: Any, pairs: EvalPairs | None, state: dict[str, Any] | None = None):
        self.sess = sess
        self.pairs = pairs
        self.every = sess.cfg.train.eval_every if pairs is not None else 0
        self.patience = sess.cfg.train.early_stop_patience
        st = (state or {}).get("eval") or {}
        self.best: float | None = st.get("best_raw_accuracy")
        self.best_step: int | None = st.get("best_step")
        self.since_best: int = int(st.get("evals_since_best", 0))
        self.stopped: bool = bool(st.get("stopped", False))
        self._judge: Any = None

    def state(self) -> dict[str, Any]:
        """What a checkpoint's ``trainer_state.json`` keeps (``{}`` when evaluation is off)."""
        if not self.every:
            return {}
        return {"eval": {"best_raw_accuracy": self.best, "best_step": self.best_step,
                         "evals_since_best": self.since_best, "stopped": self.stopped}}

    def due(self, step: int, total: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == total)

    def judge(self) -> Any:
        """The method's judge on the trainer's policy (built once, kept: it holds no weights of its own)."""
        if self._judge is None:
            import copy

            from btpo_cli.methods import get_method

            sess = self.sess
            cfg = copy.deepcopy(sess.cfg)
            cfg.rollout.engine = "hf"             # generates with the trainer's module, no second copy
            meta = dict(sess.meta or {})
            self._judge = get_method(cfg.method).judge(cfg.model.name, cfg, sess.device, meta, module=sess.policy())
        return self._judge

    def evaluate(self) -> dict[str, Any]:
        """METHOD §7 on the eval pairs with the current weights: the ``summarize`` dict, on every process."""
        from btpo_cli.evaluate_run import batch_block, in_record_order
        from btpo_cli.evaluation import summarize
        from btpo_cli.sharding import gathered

        sess = self.sess
        acc, records = sess.acc, self.pairs.records
        lo, hi = batch_block(len(records), sess.cfg.eval.batch_size, acc.process_index, acc.num_processes)
        training = sess.model.training
        sess.model.eval()
        try:
            with kept_rng(acc.device), gathered(acc, sess.model), torch.no_grad(), acc.autocast():
                results = self.judge().evaluate_pairs(records[lo:hi]) if hi > lo else []
        finally:
            if training:
                sess.model.train()
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            results = in_record_order(gather_object(results), records)
        return summarize(results)

    def after_step(self, step: int, total: int) -> bool:
        """Evaluate when due (log the ``eval/`` row, keep ``best/``); True when the run should stop now."""
        if not self.due(step, total) or self.stopped:
            return self.stopped
        from btpo_cli.console import console

        sess = self.sess
        t0 = time.perf_counter()
        s = self.evaluate()
        dt = time.perf_counter() - t0
        raw = s["raw_accuracy"]
        improved = raw is not None and (self.best is None or raw > self.best)
        if improved:
            self.best, self.best_step, self.since_best = raw, step, 0
            self.save_best(step, s)
        else:
            self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            self.stopped = True
        row = {"step": step, "eval/accuracy": s["accuracy"], "eval/raw_accuracy": raw, "eval/tie_rate": s["tie_rate"],
               "eval/format_error_rate": s["format_error_rate"], "eval/n": s["n"],
               "eval/best_raw_accuracy": self.best, "eval/best_step": self.best_step, "perf/eval_s": round(dt, 4)}
        sess.run.log(row)
        if sess.cfg.train.report_to != "none":
            sess.acc.log({k: v for k, v in row.items() if v is not None}, step=step)
        if sess.is_main:
            best = "" if self.best is None else f" | best {self.best:.4f} at step {self.best_step}"
            console.print(f"[btpo] eval step {step}: accuracy {s['accuracy']:.4f} raw {raw:.4f} on {s['n']} pairs of "
                          f"{self.pairs.label}{best}", highlight=False, markup=False, soft_wrap=True)
            if self.stopped:
                console.print(f"[btpo] early stop at step {step}: no better eval accuracy in {self.patience} "
                              f"evaluation(s)", highlight=False, markup=False)
        return self.stopped

    def save_best(self, step: int, summary: dict[str, Any]) -> None:
        """``best/`` = the current weights, described like ``final/`` plus ``selected``."""
        from btpo_cli.trainer import save_final

        sess = self.sess
        meta = dict(sess.meta or {})
        meta["selected"] = {"by": "eval raw accuracy (train.eval_every)", "step": step, "split": self.pairs.label,
                            **{k: summary[k] for k in ("n", "accuracy", "raw_accuracy", "tie_rate",
                                                       "format_error_rate")}}
        save_final(sess, meta, sess.run.best_dir)

    def close(self) -> None:
        if self._judge is not None:
            self._judge.close()
            self._judge = None
