"""The rollout → minibatch-update loop shared by BTPO and the GRPO baselines.

Per rollout batch (``rollout.batch_size`` units; process ``r`` takes its slice):

1. the rollout engine gets the policy's current weights (``sess.engine_weights``: gathered for a
   sharded policy, merged for LoRA, ``update_weights`` for an engine with its own copy); with
   them the method's ``rollout`` samples, and the trainer's own model (eval mode) scores;
2. ``update_epochs`` passes over the rollout in shuffled minibatches of ``train.batch_size``
   units (the first pass's minibatches do not depend on the number of processes:
   :func:`rollout_slice`), each one optimizer step over micro-batches (``accumulate``), the method's ``loss``
   giving a micro-batch's mean loss and stats;
3. an evaluation every ``train.eval_every`` optimizer steps (``sess.evals``: ``eval/`` rows, ``best/``,
   early stopping, which ends the run at that step);
4. a checkpoint at the rollout boundary when ``train.save_every`` is crossed (and at the end, or
   at an early stop).
   Sampling seeds are derived from (run seed, rollout, unit, response), never carried, so a
   resumed run re-samples exactly the next rollout an uninterrupted one samples, on any engine.

What differs between methods — how a rollout is sampled, which statistics it reports, the loss —
comes in as callbacks; everything else is here once, and so is the sampling and scoring both
methods' rollouts start from (:func:`sample_and_score`: the engine samples, the trainer's model
and the reference score every sequence in no-grad chunks, :func:`score_chunked`) and the
:class:`Rollout` they hand to the update passes.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from btpo_cli.config import Config
from btpo_cli.engines.base import RolloutEngine, Sample, SamplingParams
from btpo_cli.errors import BtpoError, ConfigError
from btpo_cli.judging.logprobs import (
    ScorePath,
    SeqBatch,
    ThoughtSeq,
    prefix_groups,
    score_chunked,
    shared_prefix_blocker,
)
from btpo_cli.judging.packed_prefix import packing_blocker
from btpo_cli.progress import TrainProgress
from btpo_cli.runs.folder import maybe_fault
from btpo_cli.training import preempt
from btpo_cli.training.periodic_eval import TrainEval
from btpo_cli.training.session import TrainSession
from btpo_cli.training.steps import (
    BatchPlan,
    StepTimer,
    accumulate,
    chunks,
    log_metrics,
    micro_batches,
    optimizer_step,
    reduce_stats,
)
from btpo_cli.training.tracking import memory_metrics


@dataclass
class RolloutPlan:
    """How many optimizer steps and rollouts a run takes, and which units each rollout draws."""

    steps_per_rollout: int
    rollouts_per_epoch: int
    total_steps: int
    update_epochs: int
    batches: BatchPlan
    """Rollout index (1-based) → unit indices."""

    @classmethod
    def from_config(cls, n_units: int, cfg: Config, world: int) -> RolloutPlan:
        rollout_batch_size, update_epochs = cfg.rollout.batch_size, cfg.rollout.update_epochs
        check_rollout_sizes(cfg, world)
        per_epoch = n_units // rollout_batch_size
        if per_epoch == 0:
            raise BtpoError(f"the training set has {n_units} usable pairs, fewer than rollout.batch_size="
                            f"{rollout_batch_size}")
        spr = update_epochs * (rollout_batch_size // cfg.train.batch_size)
        total = cfg.train.max_steps or max(1, math.floor(cfg.train.epochs * per_epoch) * spr)
        batches = BatchPlan(n=n_units, batch_size=rollout_batch_size, seed=cfg.train.seed,
                            total_steps=math.ceil(total / spr))
        return cls(spr, per_epoch, total, update_epochs, batches)


def rollout_slice(plan: RolloutPlan, r_idx: int, batch_size: int, rank: int, world: int, seed: int) -> list[int]:
    """This process's units of rollout ``r_idx``, in the order its first update pass takes them.

    The rollout's global units are shuffled once (seeded by run seed and rollout); minibatch ``m``
    of the first pass is global positions ``m·B … (m+1)·B`` and process ``r`` holds its ``r``-th
    contiguous share of each. So every optimizer step of the first pass sees the same ``B`` units
    whatever the number of processes (1 process ≡ N processes), and each unit is sampled,
    scored and trained on by the process that holds it."""
    units = plan.batches.global_batch(r_idx)
    perm = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed * 7919 + r_idx)).tolist()
    per = batch_size // world
    return [units[perm[m * batch_size + rank * per + j]] for m in range(len(units) // batch_size) for j in range(per)]


def check_rollout_sizes(cfg: Config, world: int) -> None:
    """Rollout batch, minibatch and process count must divide evenly (before anything is loaded)."""
    r, b = cfg.rollout.batch_size, cfg.train.batch_size
    if r % b:
        raise ConfigError(f"rollout.batch_size={r} must be a multiple of train.batch_size={b}")
    if b % world or r % world:
        raise ConfigError(f"train.batch_size={b} and rollout.batch_size={r} must divide by {world} processes")


def run_rollouts(sess: TrainSession, *, engine: RolloutEngine, plan: RolloutPlan, prefix: str, title: str,
                 rollout: Callable[[list[int], int, StepTimer], tuple[Any, dict[str, float]]],
                 rollout_metrics: Callable[[dict[str, float]], dict[str, float]],
                 loss: Callable[[Any, list[int]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                 bar_info: Callable[[dict[str, Any]], str]) -> None:
    """Train from optimizer step ``sess.start`` to ``plan.total_steps``: per rollout batch, the rollout
    phase (:func:`_rollout_phase`), the update phase (:func:`_update_phase`) and the rollout boundary
    (:func:`_boundary`: checkpoint, preemption).

    Per rollout: the engine wakes and gets the policy's current full weights
    (``engine.update_weights``, ``perf/weight_sync_s``), ``rollout(local_unit_indices, rollout_index,
    timer) -> (rollout, stat sums)`` samples with it (eval mode, under autocast) and scores with the
    trainer's model, the engine sleeps (``rollout.sleep``) while the updates run. The sums (plus
    the engine's generated tokens) are reduced over processes and turned into metrics by
    ``rollout_metrics``. ``loss(rollout, local_positions) -> (mean loss, stats)``; the stats are
    logged as ``<prefix>/<key>`` averaged over the global batch.
    """
    bar = TrainProgress(plan.total_steps, sess.start, title, sess.acc.is_main_process)
    evals = sess.evals = TrainEval.start(sess)
    loop = _Loop(sess, engine, plan, prefix, rollout, rollout_metrics, loss, bar_info, StepTimer(), bar, evals,
                 sess.start)
    stop = bool(evals and evals.stopped)          # resumed after an early stop: nothing left to train
    first = plan.batches.total_steps + 1 if stop else sess.start // plan.steps_per_rollout + 1
    for r_idx in range(first, plan.batches.total_steps + 1):
        local, ro, roll_metrics = _rollout_phase(loop, r_idx)
        stop = _update_phase(loop, r_idx, local, ro, roll_metrics)
        if _boundary(loop, r_idx, stop):
            break
    bar.close()


@dataclass
class _Loop:
    """One :func:`run_rollouts`: the session, the engine, the plan, the method's callbacks and where it is."""

    sess: TrainSession
    engine: RolloutEngine
    plan: RolloutPlan
    prefix: str
    rollout: Callable[[list[int], int, StepTimer], tuple[Any, dict[str, float]]]
    rollout_metrics: Callable[[dict[str, float]], dict[str, float]]
    loss: Callable[[Any, list[int]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    bar_info: Callable[[dict[str, Any]], str]
    timer: StepTimer
    bar: TrainProgress
    evals: TrainEval | None
    step: int
    """The last optimizer step taken."""


def _rollout_phase(loop: _Loop, r_idx: int) -> tuple[list[int], Any, dict[str, Any]]:
    """Rollout ``r_idx`` with the current ("old") weights: this process's units, the method's rollout and
    the rollout metrics (logged with the first step after it)."""
    sess, engine, timer = loop.sess, loop.engine, loop.timer
    cfg, acc = sess.cfg, sess.acc
    t_roll = time.perf_counter()
    local = rollout_slice(loop.plan, r_idx, cfg.train.batch_size, acc.process_index, acc.num_processes,
                          cfg.train.seed)
    sess.model.eval()
    gen_before = engine.stats()["generated_tokens"]
    with ExitStack() as weights:
        with timer.phase("weight_sync"):
            weights.enter_context(sess.engine_weights(engine))
        with acc.autocast():
            ro, sums = loop.rollout(local, r_idx, timer)
    if cfg.rollout.sleep:
        engine.sleep()
    roll_times = timer.pop()
    rs = reduce_stats(acc, {**sums, "gen": float(engine.stats()["generated_tokens"] - gen_before)}, acc.device)
    roll_metrics = {**loop.rollout_metrics(rs), "perf/rollout_s": round(time.perf_counter() - t_roll, 4),
                    "perf/gen_tokens_per_s": round(rs["gen"] / max(roll_times.get("perf/generate_s", 1e-9), 1e-9),
                                                   1),
                    **roll_times}
    if rs.get("lp_n"):
        roll_metrics["rollout/logprob_diff"] = rs["lp_diff"] / rs["lp_n"]
    return local, ro, roll_metrics


def _update_phase(loop: _Loop, r_idx: int, local: list[int], ro: Any, roll_metrics: dict[str, Any]) -> bool:
    """``update_epochs`` passes over rollout ``r_idx`` in minibatches of ``train.batch_size`` units, one
    optimizer step each (logged, evaluated every ``train.eval_every``); True when an early stop ends the run."""
    sess, plan, timer = loop.sess, loop.plan, loop.timer
    cfg, acc, model = sess.cfg, sess.acc, sess.model
    per_proc = cfg.train.batch_size // acc.num_processes
    model.train()
    shared = cfg.train.shared_prefix if shared_prefix_blocker(model) is None else "off"
    if getattr(cfg.train, "packing", "off") != "off" and packing_blocker(model) is None:
        shared = "on"                              # a packed prompt counts once too
    g = torch.Generator().manual_seed(cfg.train.seed * 7919 + r_idx + 1)
    for epoch in range(plan.update_epochs):
        # first pass: minibatch m is the m-th slice of `local` (rollout_slice shuffled it
        # globally); later passes reshuffle this process's units locally
        order = list(range(len(local))) if epoch == 0 else torch.randperm(len(local), generator=g).tolist()
        for mb in chunks(order, per_proc):
            if loop.step >= plan.total_steps:
                break
            loop.step += 1
            step = loop.step
            t0 = time.perf_counter()
            micro = micro_batches(mb, cfg, unit_sizes(ro, len(local), shared))
            lr = sess.sched.get_last_lr()[0]
            with timer.phase("update"):
                sums = accumulate(acc, model, micro, per_proc, lambda ids, ro=ro: loop.loss(ro, ids))
                grad_norm, lr = optimizer_step(acc, model, sess.opt, sess.sched, cfg.optim.max_grad_norm, lr)
            tot = reduce_stats(acc, sums, acc.device)
            n = cfg.train.batch_size
            metrics = {"step": step,
                       "train/epoch": round((r_idx - 1 + (epoch + 1) / plan.update_epochs) / plan.rollouts_per_epoch, 4),
                       "train/loss": tot["loss"] / n, "train/grad_norm": grad_norm, "train/lr": lr,
                       "train/rollout": r_idx,
                       **{f"{loop.prefix}/{key}": v / n for key, v in tot.items() if key != "loss"},
                       "perf/step_s": round(time.perf_counter() - t0, 4), **timer.pop(), **roll_metrics,
                       **memory_metrics(acc.device)}
            roll_metrics = {}   # rollout metrics go with the first step after each rollout
            log_metrics(acc, sess.run, cfg, metrics, step, plan.total_steps)
            loop.bar.update(step, loop.bar_info(metrics))
            if loop.evals and loop.evals.after_step(step, plan.total_steps):
                return True
            maybe_fault(step)
    return False


def _boundary(loop: _Loop, r_idx: int, stop: bool) -> bool:
    """The end of rollout ``r_idx``: a checkpoint when ``train.save_every`` is crossed, at the end, at an early
    stop or on a preemption signal (where a resume is exact); True when the run ends here."""
    sess, plan, step = loop.sess, loop.plan, loop.step
    every = sess.cfg.train.save_every
    halt = preempt.agreed(sess.acc, step)      # SIGTERM / SIGUSR1: at a rollout boundary (where a resume is exact)
    if (every and (step // every) > ((step - plan.steps_per_rollout) // every)) or step >= plan.total_steps \
            or stop or halt:
        sess.run.save_checkpoint(sess.acc, step, sess.checkpoint_state(step=step, rollout=r_idx),
                                 sess.cfg.train.keep_checkpoints)
    if halt and step < plan.total_steps and not stop:
        preempt.stop(halt, step)
    return step >= plan.total_steps or stop


def unit_sizes(ro: Any, n_units: int, shared_prefix: str = "off") -> Callable[[int], list[int]] | None:
    """Token lengths of a local unit's rows, for token-sized micro-batches: a rollout's ``seqs``
    (a :class:`~btpo_cli.judging.logprobs.SeqBatch`) holds each unit's rows contiguously, the same number per unit.

    With ``shared_prefix`` on, a row of a group of ``g`` rows sharing a prefix of ``p`` tokens counts
    its continuation plus ``ceil(p / g)``: the prompt is forwarded once per group, so rows × longest
    stays close to the shared forward's tokens."""
    seqs = getattr(ro, "seqs", None)
    if seqs is None or n_units == 0:
        return None
    per = len(seqs) // n_units
    lengths = seqs.mask.sum(-1).tolist()
    if shared_prefix != "off":
        group = prefix_groups(seqs)
        size = Counter(group)
        clen = (seqs.n_thought + seqs.n_tail).tolist()
        lengths = [c + -(-(ln - c) // size[g]) for ln, c, g in zip(lengths, clen, group, strict=True)]
    return lambda u: lengths[u * per:(u + 1) * per]


@dataclass
class Rollout:
    """One rollout batch on this process, rows in the method's order (BTPO: b pairs × 2 responses ×
    K thoughts; GRPO: b units × q queries × G completions)."""

    seqs: SeqBatch                          # (N) rows: prompt + sampled tokens, left-padded, on the CPU
    old_logp: torch.Tensor                  # (N, Tz) sampled-token log-probs under the rollout weights, right-padded
    ref_logp: torch.Tensor | None           # (N, Tz) under the reference model (β > 0)
    payload: Any = None
    """What the method's loss needs beyond these, in a type the method owns (BTPO: ``BTPOPayload``, the
    rollout-time log p(Yes) of each thought; GRPO: ``GRPOPayload``, the group-normalized advantages)."""


@dataclass
class Scored:
    """Samples of a rollout's prompts and the trainer's no-grad scores of them (:func:`sample_and_score`)."""

    samples: list[list[Sample]]             # (prompts, n)
    seqs: SeqBatch                          # (prompts · n) rows, in that order
    old_logp: torch.Tensor                  # (N, Tz)
    old_logp_yes: torch.Tensor              # (N,) log p(ids[0]) at each row's answer position (what
    ref_logp: torch.Tensor | None           # score_thoughts returns; GRPO passes pad ids and ignores it)

    @property
    def flat(self) -> list[Sample]:
        return [s for group in self.samples for s in group]

    def logprob_diff(self) -> dict[str, float]:
        """:func:`logprob_diff` of the engine's log-probs against the trainer's."""
        return logprob_diff([s.logprobs for s in self.flat], self.old_logp, self.seqs.n_thought.tolist())


@torch.no_grad()
def sample_and_score(model: Any, ref: Any, engine: RolloutEngine, prompts: list[list[int]], cfg: Config,
                     eot_id: int, timer: StepTimer, seeds: list[int] | None,
                     to_seq: Callable[[int, Sample], ThoughtSeq], ids: tuple[int, int, int], normalize: bool,
                     batch: int) -> Scored:
    """Sample ``rollout.n`` continuations of every prompt with ``engine`` (``rollout.temperature`` /
    ``top_p`` / ``max_new_tokens``, stopping at ``eot_id``, seeds ``seeds``); ``to_seq(i, sample)``
    makes the scored sequence of prompt ``i``'s sample; the trainer's ``model`` (and ``ref`` when
    given) score them in chunks of ``batch`` rows with ``ids = (yes, no, pad)``."""
    params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens, [eot_id],
                            logprobs=True)
    with timer.phase("generate"):
        samples = engine.generate(prompts, cfg.rollout.n, params, seeds)                 # (prompts, n)
    seqs = SeqBatch.from_seqs([to_seq(i, s) for i, group in enumerate(samples) for s in group], ids[2])
    with timer.phase("score"):
        path = ScorePath.of(cfg.train)
        old_logp, old_yes = score_chunked(model, seqs, *ids, normalize, cfg.rollout.temperature, batch, path)
        ref_logp = score_chunked(ref, seqs, *ids, normalize, cfg.rollout.temperature, batch, path)[0] if ref else None
    return Scored(samples, seqs, old_logp, old_yes, ref_logp)


def logprob_diff(engine_logps: list[list[float] | None], trainer_logps: torch.Tensor,
                 lengths: list[int]) -> dict[str, float]:
    """Sums for ``rollout/logprob_diff``: Σ |engine − trainer| log-prob over sampled tokens, and their count.

    ``engine_logps[i]`` is what the engine reported for sequence ``i`` (None when it reports
    nothing); ``trainer_logps`` is ``(N, Tz)`` the trainer's recomputed log-probs (right-padded).
    """
    diff, count = 0.0, 0
    for i, lp in enumerate(engine_logps):
        if lp is None or lengths[i] == 0:
            continue
        n = lengths[i]
        e = torch.tensor(lp[:n], dtype=torch.float64)
        diff += float((e - trainer_logps[i, :n].double().cpu()).abs().sum())
        count += n
    return {"lp_diff": diff, "lp_n": float(count)}
