"""The accelerator of a training run: device, precision, trackers and the sharding strategy that
``accelerate launch`` was configured with."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from btpo_cli.config import Config
from btpo_cli.runs.folder import Run
from btpo_cli.training.sharding import fill_deepspeed_config, fsdp_plugin_from_env, make_fsdp_on_cpu


def use_cpu() -> bool:
    """Train on CPU when no GPU is present. Under torchrun / ``accelerate launch --multi_gpu`` on a
    CPU-only machine this makes accelerate form a gloo process group (MULTI_CPU) instead of
    silently running each process alone."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def mixed_precision(cfg: Config) -> str:
    """``bf16`` or ``no``: what the accelerator computes in (``train.precision``; ``auto`` is bf16 on a GPU)."""
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())
    return "bf16" if bf16 else "no"


def make_accelerator(cfg: Config, run: Run) -> Any:
    """The accelerator of a training run, for whatever strategy ``accelerate launch`` was given.

    bf16 (``train.precision``) means bf16 compute over fp32 master weights and fp32 optimizer
    state in every strategy (docs/plan.md). FSDP on a CPU-only machine runs accelerate's FSDP2
    path over gloo (:func:`~btpo_cli.training.sharding.make_fsdp_on_cpu`); under DeepSpeed the config gets
    its micro-batch size, clipping and precision, and the loop marks accumulation boundaries."""
    from accelerate import Accelerator  # heavy: imported on use
    from accelerate.utils import ProjectConfiguration  # heavy: imported on use

    use_bf16 = mixed_precision(cfg) == "bf16"
    log_with = None if cfg.train.report_to == "none" else cfg.train.report_to
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = fsdp_plugin_from_env()
    if fsdp is not None and use_bf16 and fsdp.fsdp_version == 2:
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
