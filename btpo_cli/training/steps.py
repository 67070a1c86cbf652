"""Step mechanics both loops share: data order, micro-batches, optimizer and schedule, one accumulated
step, resume, metrics and phase timing.

The loops themselves are :mod:`btpo_cli.training.supervised` and :mod:`btpo_cli.training.rollouts`;
this module holds what they would otherwise each repeat.

Data order. Each optimizer step consumes one *global batch* of ``train.batch_size`` pairs drawn
from a seeded permutation of the training set (a new permutation per epoch). Process ``r`` of
``W`` takes the ``r``-th contiguous slice of that global batch and splits it into micro-batches
for gradient accumulation. The sequence of global batches therefore depends only on the seed
and the step, not on the number of processes, and resuming at step ``s`` needs nothing but
``s``. (We slice ourselves rather than ``accelerator.prepare(dataloader)`` for exactly these
two properties.) Each process's loss is ``sum over its pairs / (pairs per process)``; DDP's
gradient averaging over processes then gives the global mean.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from btpo_cli.config import Config
from btpo_cli.errors import BtpoError, ConfigError
from btpo_cli.runs.folder import Run
from btpo_cli.training.sharding import set_sync, strategy_of


@dataclass
class BatchPlan:
    """Deterministic global batches: step → pair indices (see the module docstring)."""

    n: int
    batch_size: int
    seed: int
    total_steps: int

    @classmethod
    def from_config(cls, n: int, cfg: Config, num_processes: int) -> BatchPlan:
        b = cfg.train.batch_size
        if b % num_processes:
            raise ConfigError(f"train.batch_size={b} is not divisible by the {num_processes} processes")
        if n < b:
            raise BtpoError(f"the training set has {n} usable pairs, fewer than train.batch_size={b}")
        per_epoch = n // b
        total = cfg.train.max_steps or max(1, math.floor(cfg.train.epochs * per_epoch))
        return cls(n=n, batch_size=b, seed=cfg.train.seed, total_steps=total)

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def epoch_of(self, step: int) -> float:
        """Fractional epoch reached after optimizer step ``step`` (1-based)."""
        return step / self.steps_per_epoch

    def global_batch(self, step: int) -> list[int]:
        """Pair indices of optimizer step ``step`` (1-based)."""
        epoch, pos = divmod(step - 1, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        return perm[pos * self.batch_size:(pos + 1) * self.batch_size].tolist()

    def local_batch(self, step: int, rank: int, world: int) -> list[int]:
        idx = self.global_batch(step)
        per = len(idx) // world
        return idx[rank * per:(rank + 1) * per]


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def micro_batches(ids: list[int], cfg: Config, sizes: Any = None, packed: bool = False) -> list[list[int]]:
    """Split one process's share of a global batch into micro-batches (forward/backward passes).

    ``train.micro_batch_size`` units each, or with ``train.micro_batch_tokens`` set, consecutive
    units while (rows × longest row) — the padded tokens of the forward — stays within the
    budget; a unit alone over the budget forms its own micro-batch. ``sizes(unit) → its rows'
    token lengths``. :func:`accumulate` weights each micro-batch by its units, so every split
    gives the same gradient.

    ``packed`` (the supervised loop under ``train.packing`` on / auto, ``sizes`` known): the units
    are first sorted by length (stable: the same units per step, length-grouped micro-batches), and
    a micro-batch's tokens are its rows' sum (no padding) instead of rows × longest."""
    budget = cfg.train.micro_batch_tokens
    packing = packed and sizes is not None
    if packing:
        ids = sorted(ids, key=lambda i: sum(sizes(i)))
    if budget is None:
        return list(chunks(ids, cfg.train.micro_batch_size))
    if sizes is None:
        raise ConfigError(f"train.micro_batch_tokens: method '{cfg.method}' does not report its units' token "
                          "lengths; use train.micro_batch_size")
    out: list[list[int]] = []
    cur: list[int] = []
    rows = longest = 0
    for i in ids:
        lens = list(sizes(i))
        if packing:                       # packed: rows counts tokens, longest stays 1
            r, m = rows + sum(lens), 1
        else:
            r, m = rows + len(lens), max(longest, max(lens, default=0))
        if cur and r * m > budget:
            out.append(cur)
            cur, r, m = [], *((sum(lens), 1) if packing else (len(lens), max(lens, default=0)))
        cur.append(i)
        rows, longest = r, m
    if cur:
        out.append(cur)
    return out


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # under ZeRO-3 the model may be loaded already partitioned (transformers' zero.Init):
        # p is then an empty 1-D placeholder and ds_shape holds the real shape
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                             eps=cfg.optim.eps)


def make_scheduler(opt: torch.optim.Optimizer, cfg: Config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(cfg.optim.warmup_ratio * total_steps)
    kind, floor = cfg.optim.scheduler, cfg.optim.min_lr_ratio

    def factor(i: int) -> float:  # i = optimizer steps taken so far
        if i < warmup:
            return (i + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (i - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(floor, 1.0 - progress * (1 - floor))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def resume_step(acc: Any, run: Run, resume: bool) -> int:
    """Load the latest complete checkpoint when resuming; return the step it ended at (0 if none)."""
    if not resume:
        return 0
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        if acc.is_main_process:
            print(f"[btpo] {run.root}: no complete checkpoint; starting from step 0")
        run.truncate_metrics(0)
        return 0
    acc.load_state(str(ckpt))
    step = int(run.read_state(ckpt)["step"])
    run.truncate_metrics(step)
    acc.wait_for_everyone()
    return step


def reduce_stats(acc: Any, sums: dict[str, float], device: Any) -> dict[str, float]:
    """Sum per-process sums of statistics across processes (same keys on every process)."""
    if acc.num_processes == 1:
        return dict(sums)
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    t = acc.reduce(t, reduction="sum")
    return dict(zip(keys, t.tolist(), strict=True))


class StepTimer:
    """Accumulates wall time per named phase (``perf/<phase>_s``)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.times = {f"perf/{k}_s": round(v, 4) for k, v in self.times.items()}, {}
        return out


def optimizer_step(acc: Any, model: Any, opt: Any, sched: Any, max_grad_norm: float,
                   lr: float | None = None) -> tuple[float, float]:
    """Clip, step, schedule, zero. Returns (gradient norm before clipping, the lr this step used).

    Under DeepSpeed the engine already clipped and stepped (optimizer and schedule) inside the
    last ``backward``; these calls are no-ops there and the norm is the engine's. Pass ``lr``
    read before the backward passes so it is the step's own under every strategy."""
    grad_norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    lr = sched.get_last_lr()[0] if lr is None else lr
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(grad_norm), lr


def log_metrics(acc: Any, run: Run, cfg: Config, metrics: dict[str, Any], step: int, total_steps: int) -> None:
    """Every ``train.log_every`` steps (and the last): append to metrics.jsonl and send to the trackers."""
    if step % cfg.train.log_every == 0 or step == total_steps:
        run.log(metrics)
        if cfg.train.report_to != "none":
            acc.log(metrics, step=step)


def accumulate(acc: Any, model: Any, micro: list[list[int]], per_proc: int, loss_fn: Any) -> dict[str, float]:
    """Forward/backward over the micro-batches of one optimizer step; gradients = the per-process batch mean.

    ``loss_fn(ids) -> (mean loss over the micro-batch's units, stats)``; each micro-batch's loss is
    scaled by its share of the per-process batch (``len(ids) / per_proc``), so any split of the
    batch into micro-batches — by count or by tokens — gives the same gradient.

    Per strategy: DDP skips the gradient all-reduce on all but the last micro-batch (``no_sync``);
    FSDP2 / ZeRO reduce-scatter every micro-batch (no full-size unsharded gradients held between
    micro-batches). The last micro-batch is marked as the accumulation boundary
    (:func:`~btpo_cli.training.sharding.set_sync`): DeepSpeed, told ``gradient_accumulation_steps: 1``,
    steps its optimizer exactly there, once per global batch, and scales no loss itself. Under
    FSDP2 / ZeRO every forward or backward is a collective, so processes with fewer micro-batches than the
    most loaded one run zero-weighted repeats of their last micro-batch to keep in step.
    Returns stat sums weighted by units (the repeats count nothing).
    """
    strategy = strategy_of(acc)
    plan = [(ids, 1.0) for ids in micro]
    if strategy in ("fsdp2", "fsdp1", "zero2", "zero3") and acc.num_processes > 1:
        n = int(acc.reduce(torch.tensor([len(plan)], device=acc.device), reduction="max").item())
        plan += [(micro[-1], 0.0)] * (n - len(plan))
    skip_sync = strategy == "ddp" and acc.num_processes > 1
    sums: dict[str, float] = {}
    for j, (ids, weight) in enumerate(plan):
        last = j == len(plan) - 1
        set_sync(acc, last)
        with (acc.no_sync(model) if skip_sync and not last else nullcontext()), acc.autocast():
            loss, stats = loss_fn(ids)
            acc.backward(loss * (weight * len(ids) / per_proc))
        if weight:
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + float(v) * len(ids)
    set_sync(acc, True)
    return sums
