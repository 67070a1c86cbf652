"""The supervised loop shared by ``bt``, ``bt-prefilled`` and ``gram`` (the mirror of ``rollouts.py``).

Per optimizer step ``s``: the global batch of ``train.batch_size`` units from
:class:`~btpo_cli.training.steps.BatchPlan` (depends only on the seed and ``s``), this process's slice,
micro-batches of ``train.micro_batch_size`` units (or ``train.micro_batch_tokens`` tokens; sorted by length
under ``train.packing``), forward/backward through the method's
``loss`` (:func:`~btpo_cli.training.steps.accumulate`: DDP sync on the last micro-batch only), one
clipped optimizer step, metrics, an evaluation every ``train.eval_every`` steps (``sess.evals``:
``eval/`` rows, ``best/``, early stopping), a checkpoint every ``train.save_every`` steps, at the end
and when the run stops early.

What differs between methods — how a micro-batch's loss is computed and which statistics it
reports — comes in as callbacks; everything else is here once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from btpo_cli.progress import TrainProgress
from btpo_cli.runs.folder import maybe_fault
from btpo_cli.training import preempt
from btpo_cli.training.periodic_eval import TrainEval
from btpo_cli.training.session import TrainSession
from btpo_cli.training.steps import (
    BatchPlan,
    StepTimer,
    accumulate,
    log_metrics,
    micro_batches,
    optimizer_step,
    reduce_stats,
)
from btpo_cli.training.tracking import memory_metrics

LossFn = Callable[[list[int]], tuple[torch.Tensor, dict[str, Any]]]
"""``loss(unit indices) → (mean loss over the micro-batch's units, per-unit mean stats incl. "loss")``."""


def run_supervised(sess: TrainSession, plan: BatchPlan, *, loss: LossFn,
                   metrics: Callable[[dict[str, float], int], dict[str, float]],
                   bar_info: Callable[[dict[str, Any]], str],
                   sizes: Callable[[int], list[int]] | None = None) -> None:
    """Train from ``sess.start`` to ``plan.total_steps``.

    ``metrics(totals, n) → dict``: ``totals`` are the stats summed over the global batch's ``n``
    units (``n = train.batch_size``); the loop adds ``step``, ``train/epoch``, ``train/loss``,
    ``train/grad_norm``, ``train/lr`` and the ``perf/`` timings (``perf/tokens_per_s`` when the
    stats carry ``tokens``, the mean tokens per unit; ``perf/mem_*_gb`` on a GPU). ``sizes(unit) → token lengths of its
    sequences`` lets ``train.micro_batch_tokens`` size micro-batches by tokens.
    """
    cfg, acc, run, model = sess.cfg, sess.acc, sess.run, sess.model
    per_proc = cfg.train.batch_size // acc.num_processes
    timer = StepTimer()
    bar = TrainProgress(plan.total_steps, sess.start, f"{cfg.method} {run.root.name}", acc.is_main_process)
    model.train()
    evals = sess.evals = TrainEval.start(sess)
    first = plan.total_steps + 1 if evals and evals.stopped else sess.start + 1     # stopped early: done
    for step in range(first, plan.total_steps + 1):
        t0 = time.perf_counter()
        local = plan.local_batch(step, acc.process_index, acc.num_processes)
        micro = micro_batches(local, cfg, sizes, packed=cfg.train.packing != "off")
        lr = sess.sched.get_last_lr()[0]
        with timer.phase("update"):
            sums = accumulate(acc, model, micro, per_proc, loss)
            grad_norm, lr = optimizer_step(acc, model, sess.opt, sess.sched, cfg.optim.max_grad_norm, lr)
        tot = reduce_stats(acc, sums, acc.device)
        n = cfg.train.batch_size
        dt = time.perf_counter() - t0
        row = {"step": step, "train/epoch": round(plan.epoch_of(step), 4), "train/loss": tot["loss"] / n,
               **metrics(tot, n), "train/grad_norm": grad_norm, "train/lr": lr, "perf/step_s": round(dt, 4)}
        if "tokens" in tot:
            row["perf/tokens_per_s"] = round(tot["tokens"] / dt, 1)
        row.update(timer.pop())
        row.update(memory_metrics(acc.device))
        log_metrics(acc, run, cfg, row, step, plan.total_steps)
        bar.update(step, bar_info(row))
        stop = evals.after_step(step, plan.total_steps) if evals else False
        halt = preempt.agreed(acc, step)      # SIGTERM / SIGUSR1 on any rank: checkpoint here, then stop
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == plan.total_steps or stop or halt:
            run.save_checkpoint(acc, step, sess.checkpoint_state(step=step, epoch=plan.epoch_of(step)),
                                cfg.train.keep_checkpoints)
        maybe_fault(step)
        if halt and step < plan.total_steps and not stop:
            preempt.stop(halt, step)
        if stop:
            break
    bar.close()
