"""Run folders: resolved config, environment, metrics, atomic checkpoints.

Layout of ``runs/NAME/``::

    .lock              held by the training process (btpo_cli/runs/lock.py)
    config.yaml        the resolved config (every key; rewritten on each resume)
    env.json           btpo version, git commit, library versions, devices, command line, ``data``:
                       the sha256 of every split file the run reads (btpo_cli/runs/provenance.py), and
                       ``starts``: one entry per (re)start (time, host, world size, from step, data sha256)
    metrics.jsonl      one JSON object per logged step, keys prefixed (docs/metrics.md)
    data_skips.json    records skipped per split: counts by reason, file:line of the first few
    checkpoints/step-00000040/   accelerate state (model, optimizer, scheduler, RNG per process)
                                 + trainer_state.json (step, data position), written last
    final/             loads with plain transformers (AutoModelFor... .from_pretrained)
    eval/<dataset>.json   kept by ``--overwrite`` (they become stale: btpo_cli/runs/provenance.py)

A checkpoint is written into a hidden temporary folder and published when complete
(:func:`btpo_cli.fsio.publish_dir`), so a kill at any moment leaves either the previous checkpoint or
the new one, never half of one; when the write fails (a full disk, Ctrl-C) the temporary folder is
removed before the error goes on. config.yaml, env.json and data_skips.json are replaced atomically too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape

from btpo_cli import __version__
from btpo_cli.config import Config, config_from_dict, dump_yaml
from btpo_cli.console import console, print_error
from btpo_cli.errors import BtpoError, FollowerError
from btpo_cli.fsio import (
    CKPT_PREFIX,
    STATE_FILE,
    atomic_json,
    atomic_write,
    list_checkpoints,
    publish_dir,
    recover_all,
    recover_dir,
    remove_dir,
    staging_path,
)
from btpo_cli.runs.lock import LOCK_FILE, RunLock, describe
from btpo_cli.runs.provenance import training_data

SKIPS_FILE = "data_skips.json"
EVAL_PAIRS_FILE = "eval_pairs.json"
LEFTOVERS = {"config.yaml", "env.json", "metrics.jsonl", SKIPS_FILE, "logs", "tracking.json", LOCK_FILE,
             "checkpoints", ".final.tmp", EVAL_PAIRS_FILE}
"""What a launch writes before its first optimizer step: a folder holding only these (and no
checkpoint, no metrics row past step 0) never trained, and a new run may take it over."""
LOW_DISK_BYTES = 64 << 20
"""Below this much free space a failed write is reported as a full disk (torch's zip writer loses
the errno: ``RuntimeError: unexpected pos ...``)."""


def free_bytes(path: Path) -> int | None:
    """Free bytes (for unprivileged users) on the filesystem holding ``path`` or its nearest parent."""
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def disk_full(e: BaseException, free: int | None) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT anywhere in the exception chain,
    or (for errors that lost their errno) less than :data:`LOW_DISK_BYTES` left."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return free is not None and free < LOW_DISK_BYTES


def _size(n: int | None) -> str:
    if n is None:
        return "unknown space"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def disk_full_error(path: Path, what: str, e: BaseException, free: int | None) -> BtpoError:
    cause = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
    return BtpoError(f"{path}: no space left on device while {what} ({_size(free)} free; "
                     f"{type(e).__name__}: {cause}); free some space, or copy the run folder to a larger disk "
                     "and continue it there with `btpo train --out COPY --resume`")


def git_commit() -> str | None:
    here = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(world_size: int = 1) -> dict[str, Any]:
    import torch  # heavy: imported on use

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
        self.metrics_path = self.root / "metrics.jsonl"
        self.ckpt_root = self.root / "checkpoints"
        self.final_dir = self.root / "final"
        self.best_dir = self.root / "best"          # the model of the best eval during training (train.eval_every)

    # -- lifecycle ------------------------------------------------------------------------------

    def progress(self) -> str | None:
        """What shows that this folder's run trained (``None``: nothing, e.g. a launch that failed
        before its first step): checkpoints, ``final/``, metrics past step 0, or other files."""
        if not self.root.is_dir():
            return None
        if self.checkpoints():
            return "it has checkpoints"
        if self.final_dir.exists():
            return "it has a final/ model"
        if any(isinstance(r.get("step"), int) and r["step"] > 0 for r in self.read_metrics()):
            return "it logged training steps"
        others = sorted(p.name for p in self.root.iterdir() if p.name not in LEFTOVERS)
        if self.ckpt_root.is_dir():
            others += [f"checkpoints/{p.name}" for p in self.ckpt_root.iterdir() if not p.name.startswith(".")]
        return f"it holds {', '.join(others[:5])}" if others else None

    def clear(self) -> int:
        """Delete the folder's contents except the lock and ``eval/`` (``--overwrite``, or a launch that never
        trained): the old evals stay and show as stale (``btpo status``, ``btpo compare``) until re-evaluated.
        Returns how many eval results were kept."""
        kept = len(list((self.root / "eval").rglob("*.json"))) if (self.root / "eval").is_dir() else 0
        for p in self.root.iterdir():
            if p.name in (LOCK_FILE, "eval"):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        return kept

    def check_new(self, resume: bool, overwrite: bool) -> str | None:
        """Refuse to clobber a run that trained unless ``--resume`` or ``--overwrite``; a folder left
        by a launch that never reached step 1 is taken over. Returns a note to print, if any."""
        if resume:
            if not (self.root / "config.yaml").exists():
                raise BtpoError(f"{self.root}: nothing to resume (no config.yaml)")
            return None
        if not self.root.is_dir() or not any(p.name != LOCK_FILE for p in self.root.iterdir()):
            return None
        what = self.progress()
        if what is not None and not overwrite:
            raise BtpoError(f"{self.root} already exists ({what}); pass --resume to continue it or --overwrite "
                            "to start over")
        kept = self.clear() if self.is_main else 0
        note = None if what is not None else f"{self.root}: replacing what a launch that never reached step 1 left behind"
        if kept:
            note = (f"{note}; " if note else "") + (f"{self.root}: kept eval/ ({kept} result(s) of the replaced "
                                                    "model; status and compare mark them stale)")
        return note

    def begin(self, cfg: Config, state: Any, resume: bool, overwrite: bool) -> RunLock:
        """Lock the folder, check it, write config.yaml and env.json — on the main process; the other
        processes wait for its verdict and raise :class:`FollowerError` when it failed (they never
        touch the folder). With several processes a failure is printed by rank 0 and every process
        raises :class:`FollowerError` (exit 1, nothing more printed). Returns the lock (held on the
        main process only)."""
        lock = RunLock(self.root)
        failure: BaseException | None = None
        message = ""
        if state.is_main_process:
            try:
                previous = lock.acquire()
                if previous:
                    _note(f"{self.root}: took over the lock of {describe(previous)}, which is no longer running")
                note = self.check_new(resume, overwrite)
                if note:
                    _note(note)
                self.recover()
                self.write_start(cfg, state.num_processes, resume)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
                lock.release()
                failure, message = e, str(e) or type(e).__name__
        if state.num_processes == 1:
            if failure is not None:
                raise failure
            return lock
        message = _from_main(state, message)
        if message:
            # Several processes: rank 0 prints the one error line before anyone exits (a launcher
            # such as torchrun stops the other ranks as soon as one of them exits), then all stop.
            if state.is_main_process:
                print_error(message)
            state.wait_for_everyone()
            raise FollowerError(message) from failure
        return lock

    def write_start(self, cfg: Config, world_size: int, resume: bool = False) -> None:
        """Write config.yaml (each start: a resume may change the step budget or the folder) and
        env.json, appending this start (time, host, world size, step it starts from) to ``starts``."""
        if not self.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / "config.yaml", dump_yaml(cfg))
        env = environment_info(world_size)
        starts: list[dict[str, Any]] = []
        old_path = self.root / "env.json"
        if resume and old_path.exists():
            try:
                old = json.loads(old_path.read_text(encoding="utf-8"))
                starts = list(old.get("starts") or [{"world_size": old.get("world_size"), "argv": old.get("argv")}])
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                starts = []
        ckpt = self.latest_checkpoint() if resume else None
        starts.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                       "pid": os.getpid(), "world_size": world_size, "resume": resume,
                       "from_step": int(self.read_state(ckpt)["step"]) if ckpt else 0,
                       "btpo_version": env["btpo_version"], "git_commit": env["git_commit"], "argv": env["argv"]})
        env["data"] = training_data(cfg)      # the sha256 of every split file the run reads, at this start
        starts[-1]["data_sha256"] = {k: v.get("sha256") or v.get("revision") for k, v in env["data"].items()}
        env["starts"] = starts
        atomic_write(old_path, json.dumps(env, indent=2) + "\n")

    def load_config(self) -> Config:
        p = self.root / "config.yaml"
        if not p.exists():
            raise BtpoError(f"{self.root}: not a run folder (no config.yaml)")
        return config_from_dict(yaml.safe_load(p.read_text(encoding="utf-8")) or {}, str(p))

    # -- metrics --------------------------------------------------------------------------------

    def log(self, metrics: dict[str, Any]) -> None:
        """Append one row. A step-0 row (the run's set-up: data counts, ...) replaces an earlier step-0
        row with the same keys, so that a run resumed before its first checkpoint logs it once."""
        if not self.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps(metrics)
        if metrics.get("step") == 0 and self.metrics_path.exists():
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
            for i, old in enumerate(lines):
                try:
                    row = json.loads(old)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("step") == 0 and set(row) == set(metrics):
                    lines[i] = line
                    atomic_write(self.metrics_path, "".join(x + "\n" for x in lines))
                    return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

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
            if isinstance(row, dict) and row.get("step", 0) <= after_step:
                keep.append(line)
        atomic_write(self.metrics_path, "".join(k + "\n" for k in keep))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                out.append(row)
        return out

    def record_skips(self, split: str, data: str, records: int, skips: dict[str, Any]) -> None:
        """Merge one split's skip report into ``data_skips.json`` (main process)."""
        if not self.is_main:
            return
        path = self.root / SKIPS_FILE
        try:
            report = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            report = {}
        report[split] = {"data": data, "records": records, "skipped": skips}
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_json(path, report)

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return [p for _, p in list_checkpoints(self.root)]

    def recover(self) -> None:
        """Undo what a killed predecessor left half-done: a publish of ``final/``, ``best/`` or a
        checkpoint interrupted between its renames (:func:`btpo_cli.fsio.recover_dir`), then the
        checkpoints it was writing or deleting (``checkpoints/.*.tmp``, ``.*.del``)."""
        for d in (self.final_dir, self.best_dir):
            recover_dir(d)
        recover_all(self.ckpt_root)

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save_checkpoint(self, accelerator: Any, step: int, state: dict[str, Any], keep: int) -> Path:
        """Atomically save accelerate state + ``trainer_state.json``. Called on every process.

        When the write fails (full disk, Ctrl-C, any error) the temporary folder is removed and the
        error goes on; a full disk becomes a one-line error naming the folder."""
        final = self.ckpt_root / f"{CKPT_PREFIX}{step:08d}"
        tmp = staging_path(final)
        try:
            if accelerator.is_main_process:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)   # not staging_dir(): every process writes into it, not only this one
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp), safe_serialization=True)
            _fault_in_save(step, tmp)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")   # last: marks it complete
                publish_dir(tmp, final)
        except BaseException as e:
            free = free_bytes(self.ckpt_root)
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception) and not isinstance(e, BtpoError) and disk_full(e, free):
                raise disk_full_error(self.ckpt_root, f"writing checkpoint step {step}", e, free) from e
            raise
        if accelerator.is_main_process:
            for old in self.checkpoints()[:-keep] if keep > 0 else []:
                remove_dir(old)
            recover_all(self.ckpt_root)       # leftovers of a killed predecessor
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def read_state(ckpt: Path) -> dict[str, Any]:
        return json.loads((ckpt / STATE_FILE).read_text())


def _fault_in_save(step: int, tmp: Path) -> None:
    """Test hook ``BTPO_FAULT_IN_SAVE=N[:how]``: after the accelerate state of step N is written,
    ``exit`` (os._exit(17), the default), ``sigint`` (Ctrl-C) or ``enospc`` (a full disk)."""
    spec = os.environ.get("BTPO_FAULT_IN_SAVE", "")
    at, _, how = spec.partition(":")
    if at != str(step):
        return
    if how == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)   # the KeyboardInterrupt arrives here
    elif how == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.safetensors"))
    else:
        os._exit(17)


def _note(text: str) -> None:
    console.print(f"[yellow]note[/]: {escape(text)}", highlight=False, soft_wrap=True)


def _from_main(state: Any, message: str) -> str:
    """The main process's ``message`` on every process (a broadcast when there are several)."""
    if state.num_processes == 1:
        return message
    from accelerate.utils import broadcast_object_list  # heavy: imported on use

    box = [message]
    broadcast_object_list(box, from_process=0)
    return str(box[0])


def maybe_fault(step: int) -> None:
    """Test hook: ``BTPO_FAULT_AT_STEP=N`` kills the process right after optimizer step N."""
    if os.environ.get("BTPO_FAULT_AT_STEP") == str(step):
        os._exit(17)
