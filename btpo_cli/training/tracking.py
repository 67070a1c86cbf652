"""Live tracking through accelerate's trackers (TensorBoard, W&B), and GPU memory metrics.

* :func:`check_tracker` — asking for a tracker whose package is not installed is a one-line error
  before anything starts (accelerate would only log a warning and track nothing).
* :func:`init_tracking` — what the training loops call instead of ``acc.init_trackers``: the
  config goes to the trackers as *flat* hyperparameters (``optim/lr``: scalars only), which is
  what TensorBoard's ``add_hparams`` accepts (the nested config dict made it raise before step 1).
  TensorBoard writes under ``RUN/logs/<run name>/``; W&B uses the project ``$WANDB_PROJECT``
  (default ``btpo``), the run's name, ``RUN/`` as its folder, and one run id kept in
  ``RUN/tracking.json`` so that a resumed run continues the same W&B run.
* :func:`memory_metrics` — ``perf/mem_allocated_gb`` and ``perf/mem_peak_gb`` on a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import uuid
from pathlib import Path
from typing import Any

from btpo_cli.errors import ConfigError
from btpo_cli.fsio import atomic_write

TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
_ACTIVE: list[Any] = []


def check_tracker(name: str) -> None:
    """Raise :class:`ConfigError` when ``--report-to NAME`` cannot work here."""
    if name in ("none", "", None):
        return
    if name not in TRACKER_PACKAGES:
        raise ConfigError(f"--report-to {name}: unknown tracker (expected none, {', '.join(TRACKER_PACKAGES)})")
    if not any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[name]):
        raise ConfigError(f"--report-to {name}: the {name} package is not installed (pip install 'btpo[{name}]')")


def flat_hparams(d: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """``{"optim": {"lr": 1e-6}}`` → ``{"optim/lr": 1e-6}``; ``None`` → ``"none"``; lists and other
    values → their JSON text. Every value is a scalar TensorBoard's ``add_hparams`` accepts."""
    out: dict[str, int | float | str | bool] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "/"))
        elif v is None:
            out[key] = "none"
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


def _wandb_id(root: Path) -> str:
    path = root / "tracking.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(saved, dict) and isinstance(saved.get("wandb_id"), str):
            return saved["wandb_id"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        pass
    run_id = uuid.uuid4().hex[:12]
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"wandb_id": run_id}) + "\n")
    return run_id


def init_tracking(acc: Any, cfg: Any, run: Any) -> None:
    """Start the trackers named by ``train.report_to`` (a no-op for ``none``)."""
    name = cfg.train.report_to
    if name in ("none", "", None):
        return
    check_tracker(name)
    run_name = cfg.name or run.root.name
    hparams = flat_hparams(cfg.to_dict())
    if name == "wandb":
        kwargs = {"wandb": {"name": run_name, "dir": str(run.root), "id": _wandb_id(run.root) if acc.is_main_process
                            else None, "resume": "allow"}}
        acc.init_trackers(os.environ.get("WANDB_PROJECT", "btpo"), config=hparams, init_kwargs=kwargs)
    else:
        acc.init_trackers(run_name, config=hparams)
    _ACTIVE.append(acc)


def finish_tracking(ended: bool = False) -> None:
    """End the trackers a loop started but did not end (an error or Ctrl-C left its loop: this
    flushes their events); ``ended=True`` only forgets them (the loop called ``end_training``)."""
    while _ACTIVE:
        acc = _ACTIVE.pop()
        if not ended:
            with contextlib.suppress(Exception):
                acc.end_training()


def memory_metrics(device: Any = None, reset_peak: bool = True) -> dict[str, float]:
    """``perf/mem_allocated_gb`` (now) and ``perf/mem_peak_gb`` (the peak since the previous call,
    when ``reset_peak``) of a CUDA device, in GiB; ``{}`` on CPU."""
    import torch  # heavy: imported on use

    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return {}
    gib = float(1 << 30)
    out = {"perf/mem_allocated_gb": round(torch.cuda.memory_allocated(device) / gib, 3),
           "perf/mem_peak_gb": round(torch.cuda.max_memory_allocated(device) / gib, 3)}
    if reset_peak:
        torch.cuda.reset_peak_memory_stats(device)
    return out
