"""Evaluation during training (``train.eval_every``): the ``eval/`` rows, ``best/``, early stopping.

Which pairs: :mod:`btpo_cli.training.eval_pairs`.

How: every ``eval_every`` optimizer steps and at the last, the method's own judge
(``MethodSpec.judge`` with ``module=`` the trainer's policy — no reload from disk) runs the METHOD §7
protocol (:meth:`~btpo_cli.judging.judge.Judge.evaluate_pairs`, what ``btpo eval`` runs) on the ``hf``
engine, in eval mode, under the loop's autocast. Every process takes part: each judges one block of
whole ``eval.batch_size`` batches (the pairs one process would batch together), the results are
gathered to every process, so all of them take the same ``best/`` and early-stopping decisions
(``best/`` is written by all of them: under FSDP2 / ZeRO-3 its weights are gathered). Sharded
parameters are made whole for the evaluation (:func:`~btpo_cli.training.sharding.gathered`). The random
state of torch, Python and NumPy is restored afterwards, so evaluating does not change training.

``best/`` holds the model of the best evaluation so far (by raw accuracy, strictly better), written
by the same writer as ``final/`` with ``selected`` in its ``btpo.json``. With
``train.early_stop_patience = P`` the run stops after P evaluations in a row without a better one:
a checkpoint at that step, then ``final/`` (the last weights; ``best/`` the best). The best score,
its step, the count since and whether the run stopped live in every checkpoint's
``trainer_state.json``, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from btpo_cli.console import console
from btpo_cli.judging.protocol import batch_block, in_record_order, summarize
from btpo_cli.methods.spec import get_method
from btpo_cli.training.eval_pairs import EvalPairs
from btpo_cli.training.session import TrainSession
from btpo_cli.training.sharding import gathered


@contextmanager
def kept_rng(device: Any) -> Iterator[None]:
    """Within: any random draw; after: torch (CPU and this CUDA device), Python and NumPy as before."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(npy)


class TrainEval:
    """The evaluation state of one run (a no-op when ``train.eval_every`` is 0)."""

    def __init__(self, sess: TrainSession, pairs: EvalPairs | None, state: dict[str, Any] | None = None):
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

    @classmethod
    def start(cls, sess: TrainSession) -> TrainEval:
        """The run's evaluation state: fresh, or as the resumed checkpoint left it."""
        ckpt = sess.run.latest_checkpoint() if sess.start else None
        return cls(sess, sess.eval_pairs, sess.run.read_state(ckpt) if ckpt else None)

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
            sess = self.sess
            cfg = copy.deepcopy(sess.cfg)
            cfg.rollout.engine = "hf"             # generates with the trainer's module, no second copy
            meta = dict(sess.meta or {})
            self._judge = get_method(cfg.method).judge(cfg.model.name, cfg, sess.device, meta, module=sess.policy())
        return self._judge

    def evaluate(self) -> dict[str, Any]:
        """METHOD §7 on the eval pairs with the current weights: the ``summarize`` dict, on every process."""
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
            from accelerate.utils import gather_object  # heavy: imported on use

            results = in_record_order(gather_object(results), records)
        return summarize(results)

    def after_step(self, step: int, total: int) -> bool:
        """Evaluate when due (log the ``eval/`` row, keep ``best/``); True when the run should stop now."""
        if not self.due(step, total) or self.stopped:
            return self.stopped

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
        sess = self.sess
        meta = dict(sess.meta or {})
        meta["selected"] = {"by": "eval raw accuracy (train.eval_every)", "step": step, "split": self.pairs.label,
                            **{k: summary[k] for k in ("n", "accuracy", "raw_accuracy", "tie_rate",
                                                       "format_error_rate")}}
        sess.save_model(meta, sess.run.best_dir)

    def close(self) -> None:
        if self._judge is not None:
            self._judge.close()
            self._judge = None
