"""Run folders: resolved config, environment, metrics, atomic checkpoints.

Layout of ``runs/NAME/``::

    config.yaml        the resolved config (every key)
    env.json           btpo version, git commit, library versions, devices, command line
    metrics.jsonl      one JSON object per logged step, keys prefixed (docs/metrics.md)
    checkpoints/step-00000040/   accelerate state (model, optimizer, scheduler, RNG per process)
                                 + trainer_state.json (step, data position), written last
    final/             loads with plain transformers (AutoModelFor... .from_pretrained)
    eval/<dataset>.json

A checkpoint is written into a hidden temporary folder and renamed when complete, so a kill at
any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from btpo_cli.config import Config, config_from_dict, dump_yaml
from btpo_cli.errors import BtpoError

CKPT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(world_size: int = 1) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from btpo_cli import __version__

    libs = {}
    for lib in ("torch", "transformers", "accelerate", "datasets", "tokenizers", "vllm", "peft"):
        with contextlib.suppress(PackageNotFoundError):
            libs[lib] = version(lib)
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"btpo_version": __version__, "git_commit": git_commit(), "python": sys.version.split()[0],
            "platform": platform.platform(), "libraries": libs, "cuda_devices": devices,
            "world_size": world_size, "argv": sys.argv}


class Run:
    """A run folder. Writes happen on the main process only (``is_main``)."""

    def __init__(self, root: str | Path, is_main: bool = True):
        self.root = Path(root)
        self.is_main = is_main

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def ckpt_root(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.root / "final"

    # -- lifecycle ------------------------------------------------------------------------------

    def check_new(self, resume: bool, overwrite: bool) -> None:
        """Refuse to clobber an existing run unless ``--resume`` or ``--overwrite``."""
        if resume:
            if not (self.root / "config.yaml").exists():
                raise BtpoError(f"{self.root}: nothing to resume (no config.yaml)")
            return
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise BtpoError(f"{self.root} already exists; pass --resume to continue it or --overwrite to start over")
            if self.is_main:
                shutil.rmtree(self.root)

    def write_start(self, cfg: Config, world_size: int) -> None:
        if not self.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        (self.root / "env.json").write_text(json.dumps(environment_info(world_size), indent=2) + "\n")

    def load_config(self) -> Config:
        import yaml

        p = self.root / "config.yaml"
        if not p.exists():
            raise BtpoError(f"{self.root}: not a run folder (no config.yaml)")
        return config_from_dict(yaml.safe_load(p.read_text(encoding="utf-8")) or {}, str(p))

    # -- metrics --------------------------------------------------------------------------------

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """On resume: drop lines logged after the checkpoint (they will be logged again)."""
        if not self.is_main or not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if row.get("step", 0) <= after_step:
                keep.append(line)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.ckpt_root.exists():
            return []
        done = [p for p in self.ckpt_root.iterdir()
                if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / STATE_FILE).exists()]
        return sorted(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]))

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save_checkpoint(self, accelerator: Any, step: int, state: dict[str, Any], keep: int) -> Path:
        """Atomically save accelerate state + ``trainer_state.json``. Called on every process."""
        final = self.ckpt_root / f"{CKPT_PREFIX}{step:08d}"
        tmp = self.ckpt_root / f".{final.name}.tmp"
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        if os.environ.get("BTPO_FAULT_IN_SAVE") == str(step):  # test hook: die mid-checkpoint
            os._exit(17)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.ckpt_root.glob(".*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def read_state(ckpt: Path) -> dict[str, Any]:
        return json.loads((ckpt / STATE_FILE).read_text())


def maybe_fault(step: int) -> None:
    """Test hook: ``BTPO_FAULT_AT_STEP=N`` kills the process right after optimizer step N."""
    if os.environ.get("BTPO_FAULT_AT_STEP") == str(step):
        os._exit(17)
