"""The start-up check: what a run was launched under against its recipe and the planner, before the
run folder is touched; and the ``launch`` record (env.json, final/btpo.json). docs/launching.md."""

from __future__ import annotations

import contextlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from btpo_cli.config import Config
from btpo_cli.console import console, print_error
from btpo_cli.data.files import atomic_write
from btpo_cli.errors import BtpoError, FollowerError
from btpo_cli.plan.estimate import GiB, estimate, inputs_from_config
from btpo_cli.training.accelerator import mixed_precision

MEMORY_ENV = "BTPO_MEMORY_GIB"
"""Per-process memory budget in GiB for the check, instead of the device's (host RAM on CPU)."""
_PLANNED = {"single": "ddp", "fsdp1": "fsdp2"}       # launched strategies the planner estimates as another
LAST: dict[str, Any] | None = None
"""The record of this process's launch (:func:`check`), for final/btpo.json."""


def _env(name: str) -> str:
    return os.environ.get(name, "").lower()


def launched(state: Any) -> dict[str, Any]:
    """What this process was launched under: strategy, world size, nodes, distributed type, FSDP / ZeRO."""
    world = int(state.num_processes)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    fsdp_version = zero_stage = None
    if _env("ACCELERATE_USE_FSDP") == "true":
        fsdp_version = int(os.environ.get("FSDP_VERSION") or 1)
        offload = _env("FSDP_OFFLOAD_PARAMS") == "true"
        strategy = ("fsdp2-offload" if offload else "fsdp2") if fsdp_version == 2 else "fsdp1"
    elif _env("ACCELERATE_USE_DEEPSPEED") == "true":
        zero_stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or 2)
        strategy = "zero3" if zero_stage == 3 else "zero2"
    else:
        strategy = "ddp" if world > 1 else "single"
    dt = getattr(state.distributed_type, "value", str(state.distributed_type))
    return {"strategy": strategy, "world_size": world, "nodes": max(1, world // max(per_node, 1)),
            "processes_per_node": per_node, "distributed_type": dt, "fsdp_version": fsdp_version,
            "zero_stage": zero_stage, "versions": versions()}


def versions() -> dict[str, str]:
    out = {}
    for lib in ("torch", "accelerate", "transformers", "deepspeed"):
        with contextlib.suppress(PackageNotFoundError):
            out[lib] = version(lib)
    return out


def memory_budget(per_node: int) -> tuple[float | None, str]:
    """(GiB per process, where it comes from): ``BTPO_MEMORY_GIB``, the GPU's memory, or host RAM / processes."""
    import torch  # heavy: imported on use

    if os.environ.get(MEMORY_ENV):
        try:
            return float(os.environ[MEMORY_ENV]), MEMORY_ENV
        except ValueError:
            raise BtpoError(f"{MEMORY_ENV}={os.environ[MEMORY_ENV]!r}: expected a number of GiB") from None
    if torch.cuda.is_available():
        idx = int(os.environ.get("LOCAL_RANK") or 0) % torch.cuda.device_count()
        return torch.cuda.get_device_properties(idx).total_memory / 2**30, "GPU memory"
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None, "unknown"
    return pages * size / 2**30 / max(per_node, 1), f"host RAM / {per_node} process(es)"


def _peak(cfg: Config, strategy: str, per_node: int, nodes: int, budget: float | None) -> tuple[float, str] | None:
    """(peak GiB per process, verdict) of ``strategy`` at this size, or None when the planner cannot tell."""
    import torch  # heavy: imported on use

    try:
        inp = inputs_from_config(cfg, gpus=per_node, nodes=nodes, gpu_memory_gb=budget,
                                 device="cuda" if torch.cuda.is_available() else "cpu")
        est = estimate(inp, _PLANNED.get(strategy, strategy))
    except Exception:  # noqa: BLE001 - an unknown model shape: no estimate, no refusal
        return None
    return est.peak / GiB, est.verdict(budget)


def check(cfg: Config, state: Any, force: bool = False) -> dict[str, Any]:
    """Compare the launch with ``cfg.hardware`` and the plan; refuse (every process, rank 0 prints)
    a mismatch that does not fit unless ``force``; warn on one that fits. Returns the launch record."""
    global LAST
    info = launched(state)
    hw = cfg.hardware
    want, want_world = hw.strategy, hw.gpus * hw.nodes
    got, world, per_node, nodes = info["strategy"], info["world_size"], info["processes_per_node"], info["nodes"]
    info.update(mixed_precision=mixed_precision(cfg), recipe_strategy=want, recipe_world_size=want_world,
                forced=force, verdict="match")
    same = _PLANNED.get(got, got) == want and world == want_world
    message = ""
    if not same:
        budget, source = memory_budget(per_node)
        peak = _peak(cfg, got, per_node, nodes, budget)
        info.update(budget_gib=None if budget is None else round(budget, 3), budget_source=source,
                    peak_gib=None if peak is None else round(peak[0], 3),
                    verdict=peak[1] if peak else "?")
        what = (f"launched as {got} on {world} process(es), but the recipe says {want} on {want_world} "
                f"(hardware.strategy, hardware.gpus × nodes)")
        if peak and budget is not None:
            what += f"; btpo plan: {got} needs {peak[0]:.3g} GiB per process, {budget:.3g} GiB available ({source})"
        if info["verdict"] == "no" and not force:
            fits = _peak(cfg, want, per_node, nodes, budget)
            fix = (f"launch the recipe's strategy with `btpo train --gpus {hw.gpus} ...` "
                   f"(recipes/accelerate/{want}.yaml{', fits' if fits and fits[1] != 'no' else ''})")
            message = (f"{what} — {fix}, or --set hardware.strategy=<one that fits: `btpo plan`>, "
                       "or --force to go on")
        elif state.is_main_process:
            note = "going on (--force)" if info["verdict"] == "no" else "going on"
            console.print(f"[yellow]warning[/]: {what}; {note}", highlight=False, soft_wrap=True)
    if state.num_processes > 1:
        # The main process's verdict for everyone: a rank whose planner could not read the model (a tiny
        # model another rank is still building) must not go on alone while the others stop.
        from accelerate.utils import broadcast_object_list  # heavy: imported on use

        box = [message]
        broadcast_object_list(box, from_process=0)
        message = str(box[0])
    if message:
        info["verdict"] = "refused"
        if state.num_processes == 1:
            raise BtpoError(message)
        if state.is_main_process:
            print_error(message)
        state.wait_for_everyone()
        raise FollowerError(message)
    LAST = info
    return info


def record(run: Any, info: dict[str, Any]) -> None:
    """Add ``launch`` to env.json (top level and this start's entry); main process only."""
    path = run.root / "env.json"
    if not run.is_main or not path.exists():
        return
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return
    env["launch"] = info
    if isinstance(env.get("starts"), list) and env["starts"] and isinstance(env["starts"][-1], dict):
        env["starts"][-1]["launch"] = info
    atomic_write(path, json.dumps(env, indent=2) + "\n")

