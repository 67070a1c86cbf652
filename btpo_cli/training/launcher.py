"""``btpo train --gpus N [--nodes M ...]``: start ``accelerate launch`` with the config file of the
recipe's ``hardware.strategy`` and re-enter ``btpo train`` in each process; forward SIGTERM /
SIGUSR1 to every rank as SIGUSR1 (docs/launching.md)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from btpo_cli.config import accelerate_configs_dir
from btpo_cli.console import console
from btpo_cli.errors import BtpoError
from btpo_cli.training import preempt

LAUNCHER_FLAGS = {"--gpus": 1, "--nodes": 1, "--node-rank": 1, "--main-address": 1, "--main-port": 1, "--dry-run": 0}
"""Options that only the launcher reads (and their number of values): not passed to the workers."""


def inside_launch() -> bool:
    """Whether this process is already one rank of a launched world (torchrun / accelerate launch)."""
    return "LOCAL_RANK" in os.environ or "BTPO_LAUNCHER_PID" in os.environ


def worker_args(argv: list[str]) -> list[str]:
    """``argv`` (``train ...``) without the launcher's own options."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCHER_FLAGS:
            skip = 0 if "=" in a else LAUNCHER_FLAGS[name]
            continue
        out.append(a)
    return out


def config_file(strategy: str) -> Path:
    """The accelerate launch config of ``hardware.strategy`` (``recipes/accelerate/<strategy>.yaml``)."""
    path = accelerate_configs_dir() / f"{strategy}.yaml"
    if not path.is_file():
        raise BtpoError(f"{path}: no accelerate config for hardware.strategy={strategy}")
    return path


def cpu_only() -> bool:
    import torch  # heavy: imported on use

    return not torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(strategy: str, gpus: int, nodes: int = 1, node_rank: int = 0, main_address: str | None = None,
            main_port: int | None = None, args: list[str] | None = None, cpu: bool = False) -> list[str]:
    """The ``accelerate launch`` line for ``gpus`` processes on each of ``nodes`` machines."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file(strategy)),
           "--num_processes", str(gpus * nodes), "--num_machines", str(nodes), "--machine_rank", str(node_rank),
           "--dynamo_backend", "no"]
    if main_address:
        cmd += ["--main_process_ip", main_address]
    cmd += ["--main_process_port", str(main_port or (_free_port() if nodes == 1 else 29500))]
    if cpu:
        cmd += ["--mixed_precision", "no"]
    return [*cmd, "-m", "btpo_cli", "train", *(args or [])]


def run(strategy: str, gpus: int, nodes: int, node_rank: int, main_address: str | None, main_port: int | None,
        args: list[str]) -> int:
    """Run the workers to the end; the exit code: theirs, or 75 when a signal stopped them with a checkpoint."""
    cmd = command(strategy, gpus, nodes, node_rank, main_address, main_port, args, cpu_only())
    fd, status = tempfile.mkstemp(prefix="btpo-launch-", suffix=".txt")
    os.close(fd)
    env = {**os.environ, "BTPO_LAUNCHER_PID": str(os.getpid()), preempt.STATUS_ENV: status}
    console.print(f"[bold]btpo train[/]: {strategy} on {gpus * nodes} process(es) ({nodes} node(s)): "
                  f"accelerate launch --config_file {config_file(strategy)}", highlight=False, soft_wrap=True)

    def ignore_usr1() -> None:   # in the child before exec: an ignored disposition survives exec
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    child = subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=ignore_usr1)  # noqa: PLW1509
    got: list[int] = []

    def forward(signum: int, frame: object) -> None:
        got.append(signum)
        sig = signal.SIGINT if signum == signal.SIGINT else signal.SIGUSR1
        if sig == signal.SIGUSR1 and len(got) == 1:     # the workers name the signal the launcher received
            Path(status + ".sig").write_text(signal.Signals(signum).name, encoding="utf-8")
        pids = Path(status + ".pids").read_text().split() if Path(status + ".pids").exists() else []
        for pid in [child.pid, *map(int, pids)]:      # the agent ignores SIGUSR1; each worker's handler takes it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        rc = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        note = Path(status).read_text(encoding="utf-8").strip() if Path(status).exists() else ""
        Path(status).unlink(missing_ok=True)
        Path(status + ".pids").unlink(missing_ok=True)
        Path(status + ".sig").unlink(missing_ok=True)
    if note and rc == 0:
        return preempt.EXIT_PREEMPTED
    if signal.SIGINT in got and rc != 0:
        return 130
    return rc
