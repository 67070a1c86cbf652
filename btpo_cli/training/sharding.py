"""How the policy is spread over processes, and how its full weights come back out.

The strategy is whatever ``accelerate launch`` was configured with (``recipes/accelerate/*.yaml``):

| strategy    | accelerate ``distributed_type`` | weights on each process |
|-------------|---------------------------------|-------------------------|
| ``single``  | NO                              | all |
| ``ddp``     | MULTI_GPU / MULTI_CPU           | all (gradients all-reduced) |
| ``fsdp2``   | FSDP (``fsdp_version: 2``)      | a 1/N shard of each parameter (DTensor) |
| ``zero2``   | DEEPSPEED stage ≤ 2             | all; gradients and optimizer state partitioned |
| ``zero3``   | DEEPSPEED stage 3               | a 1/N partition of each parameter |

Everything the loops need to know about it is here: :func:`full_state` (full tensors, one at a
time, for an engine's weight sync and ``final/``), :func:`gathered` (parameters made whole for a
rollout through the trainer's own module), :func:`set_sync` (gradient-accumulation boundaries
that DeepSpeed obeys). accelerate runs FSDP only on accelerators; on a CPU-only machine
:func:`make_fsdp_on_cpu` gives it the same FSDP2 path over gloo, so CI tests the code GPUs run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def strategy_of(acc: Any) -> str:
    """``single``, ``ddp``, ``fsdp2``, ``fsdp1``, ``zero2`` (stages 0-2) or ``zero3``."""
    from accelerate.utils import DistributedType  # heavy: imported on use

    dt = acc.distributed_type
    if dt == DistributedType.FSDP:
        return "fsdp2" if acc.is_fsdp2 else "fsdp1"
    if dt == DistributedType.DEEPSPEED:
        return "zero3" if zero_stage(acc) == 3 else "zero2"
    return "single" if acc.num_processes == 1 and dt == DistributedType.NO else "ddp"


def zero_stage(acc: Any) -> int:
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def fsdp_plugin_from_env() -> Any:
    """The FSDP plugin ``accelerate launch --use_fsdp`` / an FSDP config file asks for, or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate import FullyShardedDataParallelPlugin  # heavy: imported on use

    return FullyShardedDataParallelPlugin()


def make_fsdp_on_cpu(acc: Any, plugin: Any) -> None:
    """Turn accelerate's MULTI_CPU state into FSDP so ``prepare`` shards with FSDP2 over gloo.

    accelerate sets FSDP only on accelerator backends; every FSDP2 call it makes (``fully_shard``,
    DCP checkpoints, DTensor gradient clipping) also works on CPU with gloo, which is how the tests
    and CI exercise this strategy without a GPU. Both copies of the shared state must agree, or
    the next ``AcceleratorState()`` reverts it."""
    from accelerate.state import PartialState  # heavy: imported on use
    from accelerate.utils import DistributedType  # heavy: imported on use

    if acc.distributed_type != DistributedType.MULTI_CPU or plugin is None:
        return
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def fill_deepspeed_config(acc: Any, micro_batch_size: int, max_grad_norm: float, bf16: bool) -> None:
    """Set what ``prepare()`` without a dataloader cannot infer, and take accumulation away from DeepSpeed.

    ``gradient_accumulation_steps: 1`` and explicit boundaries (:func:`set_sync`): the engine then
    neither divides the loss by a step count nor steps on its own count; it steps exactly when the
    loop marks the last micro-batch of a global batch, however many micro-batches that was
    (token-sized micro-batches vary)."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro_batch_size * acc.num_processes
    ds["gradient_clipping"] = float(max_grad_norm or 0.0)
    ds.setdefault("bf16", {})["enabled"] = bool(bf16)
    ds.setdefault("fp16", {})["enabled"] = False
    ds.setdefault("steps_per_print", 10 ** 9)
    plugin.gradient_accumulation_steps = 1


@contextmanager
def unpartitioned_loading() -> Iterator[None]:
    """Within: ``from_pretrained`` loads full tensors even under ZeRO-3.

    accelerate's DeepSpeed plugin registers its config with transformers, which then builds every
    model under ``deepspeed.zero.Init`` (parameters partitioned, placeholders of shape ``[0]``).
    That is right for the policy the engine wraps, wrong for a frozen copy that runs plain
    forwards (the KL reference)."""
    try:
        from transformers.integrations import deepspeed as hf_ds  # heavy: imported on use
    except ImportError:    # pragma: no cover - transformers without the integration
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def set_sync(acc: Any, sync: bool) -> None:
    """Mark whether the next backward ends a global batch (DeepSpeed steps only when it does)."""
    acc.gradient_state._set_sync_gradients(sync)


def base_module(acc: Any, model: Any) -> Any:
    """The module under DDP / DeepSpeed wrappers (FSDP2 shards in place: the same object)."""
    return acc.unwrap_model(model, keep_torch_compile=False)


def full_state_meta(acc: Any, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`full_state`'s names with ``meta`` tensors of the full shapes and dtypes: no gather,
    no communication, no memory (what a :class:`~btpo_cli.engines.base.WeightStream` announces)."""
    module = base_module(acc, model)
    params = dict(module.named_parameters()) if strategy_of(acc) == "zero3" else {}
    for name, t in module.state_dict(keep_vars=True).items():
        shape = getattr(params.get(name), "ds_shape", None) or t.shape      # ZeRO-3: the unpartitioned shape
        yield name, torch.empty(tuple(shape), dtype=t.dtype, device="meta")


def full_state(acc: Any, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict name, full tensor) for every entry of the model's state dict, one at a time.

    Every process must iterate to the end (FSDP2 / ZeRO-3 gather each tensor collectively); every
    process receives every full tensor. Without sharding these are the module's own tensors."""
    module = base_module(acc, model)
    strategy = strategy_of(acc)
    if strategy == "zero3":
        import deepspeed  # optional extra: imported on use

        params = dict(module.named_parameters())
        for name, t in module.state_dict(keep_vars=True).items():
            p = params.get(name)
            if p is not None and hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p]):
                    yield name, p.data.detach().clone()
            else:
                yield name, t.detach()
        return

    for name, t in module.state_dict().items():
        yield name, (t.full_tensor() if isinstance(t, DTensor) else t)


def _fsdp_modules(module: torch.nn.Module) -> list[Any]:
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(acc: Any, model: Any) -> Iterator[None]:
    """Within: the trainer's module holds full parameters and runs forwards without communication.

    FSDP2: one all-gather per FSDP unit, kept unsharded (``reshard_after_forward`` off) until the
    end; the full parameters (in the mixed-precision ``param_dtype``) cost the memory of one model
    copy for as long as the context lasts. ZeRO-3: ``GatheredParameters`` over all parameters.
    Processes may then run different numbers of forwards (a generation loop stops when its own
    rows are done) without deadlocking. Other strategies: nothing to do."""
    strategy = strategy_of(acc)
    module = base_module(acc, model)
    if strategy == "zero3":
        import deepspeed  # optional extra: imported on use

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            yield
        return
    if strategy != "fsdp2":
        yield
        return
    units = _fsdp_modules(module)
    saved = []
    for m in units:
        st = m._get_fsdp_state()   # restore exactly what accelerate chose per unit (root/tail keep theirs)
        saved.append((st, st._auto_reshard_after_forward, [g.post_forward_mesh_info for g in st._fsdp_param_groups]))
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
        for st, auto, infos in saved:
            st._auto_reshard_after_forward = auto
            for g, info in zip(st._fsdp_param_groups, infos, strict=True):
                g.post_forward_mesh_info = info
