"""Pieces every training loop shares: accelerator, data order, optimizer, checkpoints, progress.

The loops themselves live in ``btpo_cli/methods/<method>.py`` and read top to bottom; this module
only holds what they would otherwise each repeat.

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

from btpo_cli import progress as progress_settings
from btpo_cli.config import Config
from btpo_cli.errors import BtpoError, ConfigError
from btpo_cli.progress import hms
from btpo_cli.runs import Run


def use_cpu() -> bool:
    """Train on CPU when no GPU is present. Under torchrun / ``accelerate launch --multi_gpu`` on a
    CPU-only machine this makes accelerate form a gloo process group (MULTI_CPU) instead of
    silently running each process alone."""
    import os

    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def make_accelerator(cfg: Config, run: Run) -> Any:
    """The accelerator of a training run, for whatever strategy ``accelerate launch`` was given.

    bf16 (``train.precision``) means bf16 compute over fp32 master weights and fp32 optimizer
    state in every strategy (docs/plan.md). FSDP on a CPU-only machine runs accelerate's FSDP2
    path over gloo (:func:`~btpo_cli.sharding.make_fsdp_on_cpu`); under DeepSpeed the config gets
    its micro-batch size, clipping and precision, and the loop marks accumulation boundaries."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from btpo_cli.sharding import fill_deepspeed_config, fsdp_plugin_from_env, make_fsdp_on_cpu

    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())
    log_with = None if cfg.train.report_to == "none" else cfg.train.report_to
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = fsdp_plugin_from_env()
    if fsdp is not None and use_bf16 and fsdp.fsdp_version == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # bf16 unsharded compute params, fp32 gradient reduction, fp32 sharded master weights
        fsdp.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    acc = Accelerator(
        cpu=use_cpu() and not deepspeed,      # DeepSpeed picks its own (CPU) accelerator when there is no GPU
        mixed_precision="bf16" if use_bf16 else "no",
        log_with=log_with,
        fsdp_plugin=fsdp,
        project_config=ProjectConfiguration(project_dir=str(run.root), logging_dir=str(run.root / "logs")),
        step_scheduler_with_optimizer=False,  # we step the scheduler once per optimizer step ourselves
    )
    make_fsdp_on_cpu(acc, fsdp)
    fill_deepspeed_config(acc, cfg.train.micro_batch_size, cfg.optim.max_grad_norm, use_bf16)
    run.is_main = acc.is_main_process
    return acc


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


def micro_batches(ids: list[int], cfg: Config, sizes: Any = None) -> list[list[int]]:
    """Split one process's share of a global batch into micro-batches (forward/backward passes).

    ``train.micro_batch_size`` units each, or with ``train.micro_batch_tokens`` set, consecutive
    units while (rows × longest row) — the padded tokens of the forward — stays within the
    budget; a unit alone over the budget forms its own micro-batch. ``sizes(unit) → its rows'
    token lengths``. :func:`accumulate` weights each micro-batch by its units, so every split
    gives the same gradient."""
    budget = cfg.train.micro_batch_tokens
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
        r, m = rows + len(lens), max(longest, max(lens, default=0))
        if cur and r * m > budget:
            out.append(cur)
            cur, r, m = [], len(lens), max(lens, default=0)
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


class TrainProgress:
    """Progress of a training loop on the main process; silent elsewhere.

    On a terminal: a rich bar with loss and ETA. Otherwise (a log file, nohup, Slurm, ``| tee``):
    one plain line every :data:`btpo_cli.progress.EVERY` steps or seconds, plus the first and the last step —
    ``[btpo] bt run: step 40/200 (20%) loss 0.6931 acc 0.50 | 1.25 steps/s | elapsed 0:00:32 | eta 0:02:08``
    — written and flushed at once (rich holds a non-terminal bar back until it stops)."""

    def __init__(self, total: int, start: int, description: str, enabled: bool):
        from btpo_cli.console import console

        self.enabled, self.total, self.start, self.description = enabled, total, start, description
        self.plain = not console.is_terminal
        self.t0 = self.last_t = time.perf_counter()
        self.last_step = start
        self.printed = start
        if not enabled or self.plain:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from btpo_cli.console import register_live

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=console, transient=False)
        self.task = self.progress.add_task(description, total=total, completed=start, info="")
        self.progress.start()
        register_live(self.progress)

    def line(self, step: int, info: str) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        pct = 100 * step / max(1, self.total)
        return (f"[btpo] {self.description}: step {step}/{self.total} ({pct:.0f}%) {info} | {rate:.3g} steps/s | "
                f"elapsed {hms(elapsed)} | eta {'?' if math.isnan(eta) else hms(eta)}")

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        self.last_step, self.last_info = step, info
        if not self.plain:
            self.progress.update(self.task, completed=step, info=info)
            return
        now = time.perf_counter()
        every = progress_settings.EVERY
        due = (step - self.printed >= every.steps) if every.steps else (now - self.last_t >= every.seconds)
        if due or self.printed == self.start or step >= self.total:
            import sys

            sys.stderr.write(self.line(step, info) + "\n")
            sys.stderr.flush()
            self.printed, self.last_t = step, now

    def close(self) -> None:
        if not self.enabled:
            return
        if not self.plain:
            from btpo_cli.console import unregister_live

            self.progress.stop()
            unregister_live(self.progress)
        elif self.last_step > self.printed:
            import sys

            sys.stderr.write(self.line(self.last_step, getattr(self, "last_info", "")) + "\n")
            sys.stderr.flush()


def save_final(sess: Any, meta: dict[str, Any], dest: Any = None) -> None:
    """Write ``final/`` (or ``dest``: ``best/``) atomically: full weights loadable by plain
    transformers, tokenizer, btpo.json, README.md (the model card). Every process calls this.

    The weights come from ``sess.full_weights()`` (gathered shard by shard under FSDP2 / ZeRO-3,
    every process taking part; kept on the main process's CPU); with LoRA they are the merged
    weights under the base model's names, and ``final/adapter/`` holds the adapter alone."""
    import os
    import shutil

    from btpo_cli.lora import is_peft

    acc, run = sess.acc, sess.run
    dest = run.final_dir if dest is None else dest
    acc.wait_for_everyone()
    main = acc.is_main_process
    state: dict[str, torch.Tensor] = {}
    for name, t in sess.full_weights():      # every process takes part in the gathers
        if main:
            state[name] = t.detach().to("cpu", copy=True).contiguous()
    policy = sess.policy()
    adapter_state = None
    if is_peft(policy):
        from btpo_cli.sharding import full_state

        adapter_state = {n: t.detach().to("cpu", copy=True) for n, t in full_state(acc, sess.model)
                         if main and (".lora_" in n or ".modules_to_save." in n)}
    if main:
        tmp = dest.parent / f".{dest.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        base = policy.get_base_model() if is_peft(policy) else policy
        base.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        if adapter_state is not None:
            policy.save_pretrained(str(tmp / "adapter"), state_dict=adapter_state, safe_serialization=True)
        sess.tok.save_pretrained(str(tmp))
        from btpo_cli.checkpoint import write_meta

        write_meta(tmp, meta)       # btpo.json + README.md (the model card)
        if dest.exists():
            old = dest.parent / f".{dest.name}.del"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)          # a kill from here leaves no half-deleted model under dest's name
            shutil.rmtree(old)
        os.replace(tmp, dest)
    acc.wait_for_everyone()


def load_split(cfg: Config, split: str, acc: Any = None, limit: int | None = None) -> list[Any]:
    """Read and validate one split of ``cfg.data.path``. Skipped records are reported on the main
    process: a line on stderr and, when training (``acc`` given), ``RUN/data_skips.json``."""
    from pathlib import Path

    from rich.markup import escape

    from btpo_cli.console import console
    from btpo_cli.data import read_split

    lim = limit if limit is not None else (cfg.data.limit if split == cfg.data.train_split else None)
    records, skips = read_split(cfg.data.path, split, strict=cfg.data.strict, limit=lim)
    main = acc is None or acc.is_main_process
    if skips.total and main:
        console.print(f"[yellow]{escape(f'{cfg.data.path} [{split}]')}: skipped {skips.total} record(s): "
                      f"{escape(skips.summary())}[/]", highlight=False, soft_wrap=True)
    if acc is not None and main:
        Run(Path(cfg.out)).record_skips(split, str(cfg.data.path), len(records), skips.as_dict())
    return records


def launch(cfg: Config, resume: bool = False, overwrite: bool = False, log_every: str | None = None) -> Run:
    """Lock and prepare the run folder, then run the method's training loop (every process calls this).

    The main process takes the folder's lock (refused, naming the holder, while another run uses
    it), checks the folder and writes config.yaml / env.json; the other processes wait for it.
    On the way out — finished, failed or interrupted — the trackers are ended and the lock
    released. Prints the run folder on stdout when done."""
    from pathlib import Path

    from accelerate import PartialState
    from rich.markup import escape

    from btpo_cli.console import console, out
    from btpo_cli.methods import get_method
    from btpo_cli.runs import disk_full, disk_full_error, free_bytes
    from btpo_cli.tracking import check_tracker, finish_tracking

    progress_settings.EVERY = progress_settings.ProgressEvery.parse(log_every)
    cfg.name = cfg.name or Path(cfg.out).name
    impl = get_method(cfg.method)
    check_tracker(cfg.train.report_to)
    state = PartialState(cpu=use_cpu())
    run = Run(cfg.out, is_main=state.is_main_process)
    lock = run.begin(cfg, state, resume, overwrite)
    try:
        if state.is_main_process:
            console.print(f"[bold]btpo train[/] method={cfg.method} model={escape(cfg.model.name)} "
                          f"data={escape(str(cfg.data.path))} → {escape(str(run.root))}  ({state.num_processes} "
                          f"process(es), {state.device})", highlight=False, soft_wrap=True)
        impl.train(cfg, run, resume)
    except KeyboardInterrupt:
        finish_tracking()
        if state.is_main_process:
            console.print(f"continue with: btpo train --out {escape(str(run.root))} --resume", highlight=False,
                          soft_wrap=True)
        raise
    except Exception as e:
        finish_tracking()
        free = free_bytes(run.root)
        if not isinstance(e, BtpoError) and disk_full(e, free):
            raise disk_full_error(run.root, "training", e, free) from e
        raise
    finally:
        lock.release()
    finish_tracking(ended=True)
    if state.is_main_process:
        console.print(f"[green]done[/]: {escape(str(run.final_dir))}", highlight=False, soft_wrap=True)
        out.print(str(run.root), markup=False, highlight=False, soft_wrap=True)
    return run


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
    (:func:`~btpo_cli.sharding.set_sync`): DeepSpeed, told ``gradient_accumulation_steps: 1``,
    steps its optimizer exactly there, once per global batch, and scales no loss itself. Under
    FSDP2 / ZeRO every forward or backward is a collective, so processes with fewer micro-batches than the
    most loaded one run zero-weighted repeats of their last micro-batch to keep in step.
    Returns stat sums weighted by units (the repeats count nothing).
    """
    from btpo_cli.sharding import set_sync, strategy_of

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
