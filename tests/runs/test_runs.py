"""Run folders in-process: the lock, leftovers of a failed launch, idempotent step-0 rows, env.json
starts, and checkpoint writes that fail (full disk, Ctrl-C) without leaving a partial folder."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from btpo_cli.config import build_config
from btpo_cli.errors import BtpoError
from btpo_cli.runs.folder import Run
from btpo_cli.runs.lock import LOCK_FILE, RunLock, RunLocked

# ----------------------------------------------------------------------------- the lock


def test_lock_excludes_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    a = RunLock(tmp_path / "run")
    assert a.acquire() is None
    with pytest.raises(RunLocked) as e:
        RunLock(tmp_path / "run").acquire()
    msg = str(e.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in msg and "\n" not in msg
    a.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    b = RunLock(tmp_path / "run")
    assert b.acquire() is None
    b.release()


def _holder_process(root: Path) -> subprocess.Popen:
    code = ("import sys, time; from btpo_cli.runs.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_lock_of_a_killed_process_is_taken_over_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "run"
    p = _holder_process(root)
    with pytest.raises(RunLocked, match=f"pid {p.pid} on {socket.gethostname()}"):
        RunLock(root).acquire()
    p.send_signal(signal.SIGKILL)
    p.wait()
    lock = RunLock(root)
    previous = lock.acquire()
    assert previous is not None and previous["pid"] == p.pid and previous["host"] == socket.gethostname()
    assert json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


@pytest.fixture()
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without flock (Lustre without -o flock, some FUSE mounts)."""
    import fcntl

    def flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)


def test_lock_fallback_without_flock(tmp_path: Path, no_flock: None) -> None:
    root = tmp_path / "run"
    a = RunLock(root)
    assert a.acquire() is None and a.mode == "file"
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        RunLock(root).acquire()
    a.release()
    # a dead pid on this host: stale, taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (root / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "argv": "x"}))
    b = RunLock(root)
    assert b.acquire()["pid"] == int(dead)
    b.release()
    # another host: cannot be checked from here; refused, naming the host and the file to delete
    (root / LOCK_FILE).write_text(json.dumps({"pid": 4242, "host": "gpu-node-17", "argv": "btpo train"}))
    with pytest.raises(RunLocked) as e:
        RunLock(root).acquire()
    assert "pid 4242 on gpu-node-17" in str(e.value) and f"delete {root / LOCK_FILE}" in str(e.value)


# ----------------------------------------------------------------------------- starting a run


class _State:
    is_main_process = True
    num_processes = 1


def _cfg(out: Path) -> Any:
    cfg = build_config(None, [], {"method": "bt", "data.path": "x"})
    cfg.out = str(out)
    return cfg


def test_leftovers_of_a_failed_launch_do_not_need_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "run"
    run = Run(root)
    run.begin(_cfg(root), _State(), resume=False, overwrite=False).release()
    run.log({"step": 0, "data/train_pairs": 3})
    (root / "data_skips.json").write_text("{}")
    (root / "checkpoints" / ".step-00000002.tmp").mkdir(parents=True)
    assert run.progress() is None
    lock = Run(root).begin(_cfg(root), _State(), resume=False, overwrite=False)   # no --overwrite needed
    assert sorted(p.name for p in root.iterdir()) == [LOCK_FILE, "config.yaml", "env.json"]
    lock.release()


@pytest.mark.parametrize("made", ["checkpoint", "metrics", "thoughts"])
def test_a_run_that_trained_needs_resume_or_overwrite(tmp_path: Path, made: str) -> None:
    root = tmp_path / "run"
    run = Run(root)
    run.begin(_cfg(root), _State(), resume=False, overwrite=False).release()
    if made == "checkpoint":
        (root / "checkpoints" / "step-00000002").mkdir(parents=True)
        (root / "checkpoints" / "step-00000002" / "trainer_state.json").write_text('{"step": 2}')
    elif made == "metrics":
        run.log({"step": 1, "train/loss": 0.5})
    else:
        (root / "prefilled_thoughts.train.jsonl").write_text("{}\n")   # hours of generation: never dropped
    with pytest.raises(BtpoError, match="already exists.*--resume.*--overwrite"):
        Run(root).begin(_cfg(root), _State(), resume=False, overwrite=False)
    assert (root / "config.yaml").exists() and not (root / LOCK_FILE).exists()
    lock = Run(root).begin(_cfg(root), _State(), resume=False, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == [LOCK_FILE, "config.yaml", "env.json"]
    lock.release()


def test_overwrite_keeps_the_old_evals_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "run"
    run = Run(root)
    run.begin(_cfg(root), _State(), resume=False, overwrite=False).release()
    run.log({"step": 1, "train/loss": 0.5})
    (root / "eval" / "best").mkdir(parents=True)
    (root / "eval" / "hh.json").write_text("{}")
    (root / "eval" / "best" / "hh.json").write_text("{}")
    lock = Run(root).begin(_cfg(root), _State(), resume=False, overwrite=True)
    lock.release()
    assert sorted(p.name for p in root.iterdir()) == ["config.yaml", "env.json", "eval"]
    assert (root / "eval" / "hh.json").exists() and (root / "eval" / "best" / "hh.json").exists()
    assert "kept eval/ (2 result(s)" in capsys.readouterr().err.replace("\n", " ")


def test_begin_refuses_while_another_process_holds_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "run"
    p = _holder_process(root)
    try:
        with pytest.raises(RunLocked, match=f"pid {p.pid}"):
            Run(root).begin(_cfg(root), _State(), resume=False, overwrite=True)
        assert not (root / "config.yaml").exists()          # nothing written, nothing deleted
    finally:
        p.kill()
        p.wait()


def test_env_json_records_every_start(tmp_path: Path) -> None:
    root = tmp_path / "run"
    run = Run(root)
    run.write_start(_cfg(root), 1, resume=False)
    (root / "checkpoints" / "step-00000004").mkdir(parents=True)
    (root / "checkpoints" / "step-00000004" / "trainer_state.json").write_text('{"step": 4}')
    run.write_start(_cfg(root), 2, resume=True)
    env = json.loads((root / "env.json").read_text())
    assert env["world_size"] == 2
    assert [(s["world_size"], s["resume"], s["from_step"]) for s in env["starts"]] == [(1, False, 0), (2, True, 4)]
    assert env["starts"][0]["host"] == socket.gethostname()


def test_step0_row_is_logged_once(tmp_path: Path) -> None:
    run = Run(tmp_path / "run")
    run.log({"step": 0, "data/train_pairs": 3})
    run.log({"step": 0, "prefilled/generated": 5})
    run.log({"step": 0, "data/train_pairs": 4})            # the same set-up row again (a resume): replaced
    run.log({"step": 1, "train/loss": 1.0})
    assert run.read_metrics() == [{"step": 0, "data/train_pairs": 4}, {"step": 0, "prefilled/generated": 5},
                                  {"step": 1, "train/loss": 1.0}]


# ----------------------------------------------------------------------------- failing checkpoint writes


class _Acc:
    """The slice of accelerate's Accelerator that save_checkpoint uses; save_state writes one file and fails."""

    is_main_process = True

    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str, safe_serialization: bool = True) -> None:
        Path(path, "model.safetensors").write_bytes(b"x" * 1000)
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError(" . unexpected pos 6400 vs 6292")])
def test_full_disk_during_a_checkpoint(tmp_path: Path, error: BaseException,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import btpo_cli.runs.folder as runs

    if isinstance(error, RuntimeError):   # torch's zip writer loses the errno: judged by the space left
        monkeypatch.setattr(runs, "free_bytes", lambda path: 4096)
    run = Run(tmp_path / "run")
    run.save_checkpoint(_Acc(None), 2, {"step": 2}, keep=2)
    with pytest.raises(BtpoError) as e:
        run.save_checkpoint(_Acc(error), 4, {"step": 4}, keep=2)
    msg = str(e.value)
    assert msg.startswith(f"{run.ckpt_root}: no space left on device while writing checkpoint step 4") and "\n" not in msg
    assert [p.name for p in run.ckpt_root.iterdir()] == ["step-00000002"]      # no .step-00000004.tmp


def test_other_errors_and_ctrl_c_leave_no_partial_checkpoint(tmp_path: Path) -> None:
    run = Run(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(_Acc(KeyboardInterrupt()), 2, {"step": 2}, keep=2)
    with pytest.raises(ValueError, match="boom"):
        run.save_checkpoint(_Acc(ValueError("boom")), 2, {"step": 2}, keep=2)
    assert list(run.ckpt_root.iterdir()) == []


def test_pruned_checkpoints_never_look_complete(tmp_path: Path) -> None:
    run = Run(tmp_path / "run")
    for step in (1, 2, 3):
        run.save_checkpoint(_Acc(None), step, {"step": step}, keep=2)
    assert sorted(p.name for p in run.ckpt_root.iterdir()) == ["step-00000002", "step-00000003"]
    assert run.latest_checkpoint().name == "step-00000003"


def test_lock_holder_in_another_process_sees_its_own_release(tmp_path: Path) -> None:
    """release() removes the file; a process that opened the old file before that does not get a
    lock on a deleted file (the inode check), it takes the new one."""
    root = tmp_path / "run"
    a = RunLock(root)
    a.acquire()
    fd = os.open(root / LOCK_FILE, os.O_RDWR)   # a racer that opened before the release
    a.release()
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # it can lock the deleted inode ...
    b = RunLock(root)
    assert b.acquire() is None                          # ... which does not block a real acquire
    os.close(fd)
    b.release()


# ----------------------------------------------------------------------------- the CLI's error boundary


@pytest.mark.parametrize("raise_,code,says", [
    (EOFError("Compressed file ended before the end-of-stream marker was reached"), 1, "unexpected end of input"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl"), 1,
     "/data/run/metrics.jsonl: No space left on device"),
    (BtpoError("data/x [train]: no usable records"), 1, "data/x [train]: no usable records"),
])
def test_errors_are_one_line_never_interrupted(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                               raise_: BaseException, code: int, says: str) -> None:
    """typer turns an EOFError inside a command into Abort, which read as Ctrl-C (exit 130)."""
    import typer

    import btpo_cli.cli as cli

    app = typer.Typer()

    @app.command()
    def boom() -> None:
        raise raise_

    @app.command()
    def other() -> None:
        pass

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as e:
        cli.main(["boom"])
    assert e.value.code == code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and says in lines[0] and "interrupted" not in err, err
