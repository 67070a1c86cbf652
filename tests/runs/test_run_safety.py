"""Runs a researcher can trust, end to end through the CLI on tiny-qwen2: a copied run, concurrent runs,
a full disk, Ctrl-C, a failed launch, a resume before the first checkpoint, progress in log files, paths
on stdout, env.json starts, TensorBoard read back."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_BT, run_btpo

pytestmark = pytest.mark.slow


def _args(data: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--method", "bt", "--model", "tiny-qwen2", "--data", str(data), "--max-steps", str(steps),
            "--set", "train.save_every=1", *TINY_BT, *extra]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in _rows(run)]


def _losses(run: Path) -> list[float]:
    return [r["train/loss"] for r in _rows(run) if "train/loss" in r]


def _weights(run: Path) -> bytes:
    return (run / "final" / "model.safetensors").read_bytes()


def _tmp_left(run: Path) -> list[str]:
    found = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] \
        if (run / "checkpoints").exists() else []
    return found + [p.name for p in run.glob(".*.tmp")]


def _popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    e = dict(os.environ, **(env or {}))
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "btpo_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e, cwd=REPO)


def _wait(pred: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


def _trained(run: Path, at_least: int) -> Callable[[], bool]:
    def pred() -> bool:
        try:
            return any(r.get("step", 0) >= at_least for r in _rows(run))
        except (OSError, json.JSONDecodeError):
            return False
    return pred


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> Path:
    """An uninterrupted 3-step run: every interrupted-and-resumed run below must end identical to it."""
    run = tmp_path_factory.mktemp("ref") / "run"
    run_btpo(*_args(synthetic_data, 3), "--out", str(run))
    return run


# ----------------------------------------------------------------------------- finding 1: a copied run


def test_copied_run_resumes_in_the_copy(tmp_path: Path, synthetic_data: Path, reference: Path) -> None:
    a = tmp_path / "a"
    p = run_btpo(*_args(synthetic_data, 3), "--out", str(a), env={"BTPO_FAULT_AT_STEP": "2"}, check=False)
    assert p.returncode == 17
    before = {str(f.relative_to(a)): f.read_bytes() for f in a.rglob("*") if f.is_file()}
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    p = run_btpo("train", "--out", str(copy), "--resume")
    assert f"names out={a}; continuing in {copy}" in p.stderr.replace("\n", " ")
    after = {str(f.relative_to(a)): f.read_bytes() for f in a.rglob("*") if f.is_file()}
    assert after == before                                  # the original is untouched
    assert _steps(copy) == [0, 1, 2, 3] and _weights(copy) == _weights(reference)
    assert f"out: {copy}" in (copy / "config.yaml").read_text()


# ----------------------------------------------------------------------------- finding 2: concurrent runs


def test_a_busy_run_folder_is_refused_and_a_killed_holder_is_taken_over(tmp_path: Path,
                                                                         synthetic_data: Path) -> None:
    run = tmp_path / "run"
    holder = _popen(*_args(synthetic_data, 100000), "--out", str(run))
    try:
        _wait(_trained(run, 2), holder)
        for extra in (["--resume"], ["--overwrite"]):
            p = run_btpo(*_args(synthetic_data, 5), "--out", str(run), *extra, check=False)
            assert p.returncode == 1 and "Traceback" not in p.stderr
            (line,) = _error_lines(p.stderr)
            assert f"in use by another training run: pid {holder.pid} on {socket.gethostname()}" in line
            assert holder.poll() is None and (run / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    last = max(int(c.name.split("-")[1]) for c in (run / "checkpoints").glob("step-*"))
    p = run_btpo("train", "--out", str(run), "--resume", "--max-steps", str(last + 1))
    assert f"took over the lock of pid {holder.pid}" in p.stderr.replace("\n", " ")
    steps = _steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == last + 1       # no step logged twice
    assert not (run / ".lock").exists()


def test_two_resumes_at_once_one_is_refused(tmp_path: Path, synthetic_data: Path) -> None:
    run = tmp_path / "run"
    run_btpo(*_args(synthetic_data, 1), "--out", str(run))
    procs = [_popen("train", "--out", str(run), "--resume", "--max-steps", "100000") for _ in range(2)]
    try:
        _wait(lambda: any(p.poll() is not None for p in procs))
        done = next(p for p in procs if p.poll() is not None)
        other = next(p for p in procs if p is not done)
        err = done.communicate()[1]
        assert done.returncode == 1 and f"pid {other.pid}" in err and "Traceback" not in err
        _wait(_trained(run, 3), other)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    steps = [s for s in _steps(run)]
    assert steps == sorted(set(steps))


# ----------------------------------------------------------------------------- findings 4 and 9: full disk, Ctrl-C


def test_full_disk_in_a_checkpoint_by_fault_injection(tmp_path: Path, synthetic_data: Path,
                                                      reference: Path) -> None:
    run = tmp_path / "run"
    p = run_btpo(*_args(synthetic_data, 3), "--out", str(run), env={"BTPO_FAULT_IN_SAVE": "2:enospc"}, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    (line,) = _error_lines(p.stderr)
    assert f"{run / 'checkpoints'}: no space left on device while writing checkpoint step 2" in line
    assert _tmp_left(run) == [] and [c.name for c in (run / "checkpoints").iterdir()] == ["step-00000001"]
    run_btpo("train", "--out", str(run), "--resume")
    assert _weights(run) == _weights(reference)


def _unshare_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    p = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                        "mount -t tmpfs -o size=1m tmpfs \"$0\"", str(REPO)], capture_output=True)
    return p.returncode == 0


@pytest.mark.skipif(not _unshare_ok(), reason="needs a private mount namespace (unshare -rm) to mount a small tmpfs")
def test_full_disk_on_a_real_small_filesystem(tmp_path: Path, synthetic_data: Path) -> None:
    """A 1.5 MiB tmpfs: config, metrics and the lock fit, the first checkpoint (2 MB) does not."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = mnt / "run"
    btpo = " ".join([sys.executable, "-m", "btpo_cli", *_args(synthetic_data, 3), "--out", str(run)])
    script = (f"mount -t tmpfs -o size=1536k tmpfs {mnt} && cd {REPO} && {btpo}; echo RC=$?; "
              f"ls -A {run}/checkpoints; echo END")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert "RC=1" in p.stdout, p.stdout + p.stderr
    assert p.stdout.split("RC=1", 1)[1].split() == ["END"]                  # nothing left in checkpoints/
    (line,) = _error_lines(p.stderr)
    assert line.startswith(f"error: {run}") and "no space left on device" in line and "Traceback" not in p.stderr


def test_ctrl_c_exits_130_with_a_line_and_resumes_exactly(tmp_path: Path, synthetic_data: Path,
                                                         reference: Path) -> None:
    run = tmp_path / "run"
    proc = _popen(*_args(synthetic_data, 100000), "--out", str(run))
    _wait(_trained(run, 2), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err.splitlines()[-1] and "Traceback" not in err
    assert f"continue with: btpo train --out {run} --resume" in err.replace("\n", " ")
    assert _tmp_left(run) == [] and not (run / ".lock").exists()

    # Ctrl-C while the step-2 checkpoint is being written: no half-written checkpoint, and the resume is exact
    mid = tmp_path / "mid"
    p = run_btpo(*_args(synthetic_data, 3), "--out", str(mid), env={"BTPO_FAULT_IN_SAVE": "2:sigint"}, check=False)
    assert p.returncode == 130 and "Traceback" not in p.stderr
    assert _tmp_left(mid) == [] and [c.name for c in (mid / "checkpoints").iterdir()] == ["step-00000001"]
    run_btpo("train", "--out", str(mid), "--resume")
    assert _losses(mid) == _losses(reference) and _weights(mid) == _weights(reference)


# ----------------------------------------------------------------------------- findings 10 and 12


def test_resume_before_the_first_checkpoint_logs_step0_once(tmp_path: Path, synthetic_data: Path,
                                                            reference: Path) -> None:
    run = tmp_path / "run"
    p = run_btpo(*_args(synthetic_data, 3, "--set", "train.save_every=10"), "--out", str(run),
                 env={"BTPO_FAULT_AT_STEP": "2"}, check=False)
    assert p.returncode == 17 and not (run / "checkpoints").exists()
    run_btpo("train", "--out", str(run), "--resume")
    assert _steps(run) == [0, 1, 2, 3]
    assert _losses(run) == _losses(reference)


def test_resume_of_a_run_that_never_started(tmp_path: Path, synthetic_data: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 999999, "host": socket.gethostname()}))   # killed at once
    p = run_btpo("train", "--out", str(run), "--resume", check=False)
    assert p.returncode == 1 and "nothing to resume" in p.stderr and "Traceback" not in p.stderr
    p = run_btpo(*_args(synthetic_data, 1), "--out", str(run), "--resume")
    assert "starting it from step 0" in p.stderr.replace("\n", " ") and _steps(run) == [0, 1]


def test_a_failed_launch_leaves_nothing_that_needs_overwrite(tmp_path: Path, synthetic_data: Path) -> None:
    run = tmp_path / "run"
    p = run_btpo("train", "--method", "bt", "--model", str(tmp_path / "no-such-model"), "--data",
                 str(synthetic_data), "--out", str(run), *TINY_BT, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(_error_lines(p.stderr)) == 1
    p = run_btpo(*_args(synthetic_data, 1), "--out", str(run))                    # no --overwrite needed
    assert _steps(run) == [0, 1]
    bad = tmp_path / "bad-data"
    p = run_btpo(*_args(tmp_path / "missing", 1), "--out", str(bad), check=False)
    assert p.returncode == 1 and not bad.exists()                                 # bad data: nothing written


# ----------------------------------------------------------------------------- findings 8, 13, 14


def test_progress_lines_paths_on_stdout_and_starts(tmp_path: Path, synthetic_data: Path) -> None:
    run = tmp_path / "run"
    p = run_btpo(*_args(synthetic_data, 4), "--out", str(run), "--log-every", "2")
    assert p.stdout == f"{run}\n"
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("[btpo] bt run: step")]
    assert [int(re.search(r"step (\d+)/4", ln).group(1)) for ln in lines] == [1, 3, 4]
    assert all(re.search(r"loss [\d.]+ acc [\d.]+ \| [\d.e+-]+ steps/s \| elapsed \d+:\d\d:\d\d \| eta ", ln)
               for ln in lines), lines
    p = run_btpo("train", "--out", str(run), "--resume", "--max-steps", "5", "--log-every", "30s")
    env = json.loads((run / "env.json").read_text())
    assert [(s["resume"], s["from_step"], s["world_size"]) for s in env["starts"]] == [(False, 0, 1), (True, 4, 1)]

    p = run_btpo("eval", "--checkpoint", str(run), "--limit", "4")
    assert p.stdout.splitlines() == [str(run / "eval" / "synthetic.json"),
                                     str(run / "eval" / "synthetic.predictions.jsonl")]
    p = run_btpo("eval", "--checkpoint", str(run), "--limit", "4", "--json")
    s = json.loads(p.stdout)
    assert s == json.loads((run / "eval" / "synthetic.json").read_text())
    assert s["data_skips"]["total"] == 0 and s["data_skips"]["records"] == 4
    assert run_btpo("train", "--out", str(run), "--resume", "--log-every", "0", check=False).returncode == 2


def test_split_name_survives_in_messages(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "train.jsonl").write_text("")
    p = run_btpo("train", "--method", "bt", "--data", str(d), "--out", str(tmp_path / "r"), check=False)
    assert p.returncode == 1
    (line,) = _error_lines(p.stderr)
    assert line == f"error: {d} [train]: no usable records (it holds no records)"


def test_tensorboard_events_read_back(tmp_path: Path, synthetic_data: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run = tmp_path / "run"
    run_btpo(*_args(synthetic_data, 3), "--out", str(run), "--report-to", "tensorboard")
    logdir = run / "logs" / "run"
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(_losses(run), rel=1e-6)
    hparams = {}
    for sub in logdir.iterdir():
        if sub.is_dir():
            a = EventAccumulator(str(sub))
            a.Reload()
            try:
                contents = a.PluginTagToContent("hparams").values()
            except KeyError:          # the folder add_hparams writes hparams.yml into holds no events
                continue
            for content in contents:
                info = HParamsPluginData.FromString(content).session_start_info
                hparams.update(dict(info.hparams.items()))
    assert hparams["method"].string_value == "bt"
    assert hparams["train/batch_size"].number_value == 8 and hparams["optim/lr"].number_value == pytest.approx(1e-3)
    assert hparams["train/max_steps"].number_value == 3


def test_a_tracker_that_is_not_installed_is_an_error_before_anything(tmp_path: Path, synthetic_data: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    p = run_btpo(*_args(synthetic_data, 1), "--out", str(tmp_path / "r"), "--report-to", "wandb", check=False)
    assert p.returncode == 1 and not (tmp_path / "r").exists()
    assert _error_lines(p.stderr) == ["error: --report-to wandb: the wandb package is not installed "
                                      "(pip install 'btpo[wandb]')"]
