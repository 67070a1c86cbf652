"""btpo_cli.fsio: atomic files and published folders under simulated crashes at every step, locks
between processes, checkpoint listing on old-layout run folders, and that no other module writes
around it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from btpo_cli import fsio
from btpo_cli.errors import BtpoError
from btpo_cli.runs.final import model_dir_of
from btpo_cli.runs.folder import Run
from btpo_cli.runs.status import run_status

ROOT = Path(__file__).resolve().parents[2]


class Crash(BaseException):
    """A kill: nothing after it runs (BaseException: no ``except Exception`` handler sees it)."""


# ----------------------------------------------------------------------------- atomic files


def test_atomic_write_killed_before_the_rename_keeps_the_old_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "eval.json"
    fsio.atomic_json(path, {"v": "old"})

    def crash(*a: Any) -> None:
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(Crash):
            fsio.atomic_json(path, {"v": "new"})
    assert json.loads(path.read_text()) == {"v": "old"}
    fsio.atomic_bytes(path, b'{"v": "new"}\n')          # the next write goes through (a leftover is overwritten)
    assert json.loads(path.read_text()) == {"v": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_atomic_open_error_mid_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "x.predictions.jsonl"
    fsio.atomic_write(path, "old\n")
    with pytest.raises(ValueError), fsio.atomic_open(path) as f:
        f.write("half a li")
        raise ValueError("disk says no")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.predictions.jsonl"]


# ----------------------------------------------------------------------------- published folders


def _folder(path: Path, tag: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_text(tag * 100)
    (path / "btpo.json").write_text(json.dumps({"tag": tag}))
    return path


def _seen(path: Path) -> str | None:
    """What a reader finds at ``path``: a complete version's tag, ``None`` when nothing is there;
    a half folder fails the test."""
    if not os.path.lexists(path):
        return None
    tag = json.loads((path / "btpo.json").read_text())["tag"]
    assert (path / "model.safetensors").read_text() == tag * 100, f"{path}: half of {tag}"
    return tag


def _crash_at(monkeypatch: pytest.MonkeyPatch, k: int, exchange: bool) -> list[str]:
    """Kill ``publish_dir`` at its ``k``-th file-system step (renames, exchange, folder deletions: a
    deletion is killed after removing one file)."""
    steps: list[str] = []
    real_rename, real_rmtree, real_exchange = os.rename, shutil.rmtree, fsio._exchange

    def step(name: str) -> None:
        steps.append(name)
        if len(steps) == k:
            raise Crash

    def rename(a: Any, b: Any) -> None:
        step("rename")
        real_rename(a, b)

    def rmtree(p: Any, ignore_errors: bool = False) -> None:
        files = sorted(Path(p).rglob("*"))
        if len(steps) + 1 == k and files:
            files[0].unlink()                     # half deleted, then the kill
        step("rmtree")
        real_rmtree(p, ignore_errors=ignore_errors)

    def exch(a: Path, b: Path) -> bool:
        if not exchange:
            return False
        step("exchange")
        return real_exchange(a, b)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(fsio, "_exchange", exch)
    return steps


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_publish_dir_killed_at_every_step_leaves_old_or_new_and_the_next_publish_recovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if exchange:
        a, b = _folder(tmp_path / "probe-a", "a"), _folder(tmp_path / "probe-b", "b")
        if not fsio._exchange(a, b):
            pytest.skip("this file system cannot exchange two paths")
    k = 0
    while True:
        k += 1
        target = _folder(tmp_path / f"k{k}" / "final", "old")
        staged = fsio.staging_dir(target)
        _folder(staged, "new")
        with monkeypatch.context() as m:
            steps = _crash_at(m, k, exchange)
            try:
                fsio.publish_dir(staged, target)
                finished = True
            except Crash:
                finished = False
        seen = _seen(target)
        if exchange or seen is not None:
            assert seen in ("old", "new"), (k, steps, seen)        # no moment without a model at the target
        else:   # killed between the two renames: the old folder is whole under its backup name
            assert _seen(fsio.backup_path(target)) == "old", (k, steps)
        fsio.recover_dir(target)                                   # what the next publish and Run.begin do
        assert _seen(target) in ("old", "new") and (seen is None or _seen(target) == seen), (k, steps)
        published = fsio.publish_folder(target, lambda tmp: _folder(tmp, "newer"))
        assert _seen(published) == "newer"
        assert sorted(p.name for p in target.parent.iterdir()) == ["final"], (k, steps)
        if finished:
            assert seen == "new" and k > 2
            break


def test_publish_folder_failing_build_keeps_the_target(tmp_path: Path) -> None:
    target = _folder(tmp_path / "tiny-qwen2-v2", "old")

    def build(tmp: Path) -> None:
        _folder(tmp, "new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        fsio.publish_folder(target, build)
    assert _seen(target) == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-qwen2-v2"]
    assert _seen(fsio.publish_folder(tmp_path / "first", lambda tmp: _folder(tmp, "new"))) == "new"


def test_remove_dir_interrupted_half_way_finishes_and_reraises(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while an old checkpoint is being deleted (rotation after a save): the deletion finishes,
    the interrupt goes on, and no ``.*.del`` folder is left in the run (it once was: test_run_safety)."""
    old = _folder(tmp_path / "step-00000001", "old")
    real, calls = shutil.rmtree, []

    def interrupted(path: Any, *a: Any, **kw: Any) -> None:
        calls.append(Path(path).name)
        if len(calls) == 1:
            os.remove(next(p for p in Path(path).rglob("*") if p.is_file()))      # half-way
            raise KeyboardInterrupt
        real(path, *a, **kw)

    monkeypatch.setattr(fsio.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fsio.remove_dir(old)
    assert calls == [".step-00000001.del"] * 2 and list(tmp_path.iterdir()) == []


def test_a_run_start_recovers_an_interrupted_publish_of_final_and_of_a_checkpoint(tmp_path: Path) -> None:
    run = Run(tmp_path / "run")
    _folder(fsio.backup_path(run.final_dir), "old")                # killed between the two renames
    ckpt = run.ckpt_root / "step-00000004"
    _folder(fsio.backup_path(ckpt), "old")
    (fsio.backup_path(ckpt) / fsio.STATE_FILE).write_text('{"step": 4}')
    _folder(fsio.staging_path(run.ckpt_root / "step-00000006"), "partial")
    run.recover()
    assert _seen(run.final_dir) == "old" and run.checkpoints() == [ckpt]
    assert sorted(p.name for p in run.ckpt_root.iterdir()) == ["step-00000004"]


# ----------------------------------------------------------------------------- locks


def test_locks_exclude_a_second_process_and_free_when_it_dies(tmp_path: Path) -> None:
    lock_path, cache_lock = tmp_path / ".lock", tmp_path / ".cache.lock"
    code = ("import sys, time; from pathlib import Path; from btpo_cli import fsio; "
            "fsio.LockFile(Path(sys.argv[1])).acquire({'pid': 1, 'who': 'child'}, lambda h: False); "
            "c = fsio.file_lock(Path(sys.argv[2])); c.__enter__(); print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(lock_path), str(cache_lock)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(fsio.LockHeld) as e:
            fsio.LockFile(lock_path).acquire({"who": "parent"}, lambda h: True)
        assert e.value.holder == {"pid": 1, "who": "child"}
        assert fsio.lock_state(lock_path) == "held" and fsio.lock_state(cache_lock) == "held"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert fsio.lock_state(cache_lock) == "free" and fsio.lock_state(tmp_path / "none") == "missing"
    mine = fsio.LockFile(lock_path)
    assert mine.acquire({"who": "parent"}, lambda h: False) == {"pid": 1, "who": "child"}   # the dead holder
    assert mine.mode == "flock" and fsio.read_lock_record(lock_path) == {"who": "parent"}
    mine.release()
    assert not lock_path.exists()


# ----------------------------------------------------------------------------- checkpoint listing


def test_checkpoint_listing_on_an_old_layout_run_folder(tmp_path: Path) -> None:
    root = tmp_path / "old-run"
    (root / "config.yaml").parent.mkdir(parents=True)
    (root / "config.yaml").write_text("method: bt\nmodel:\n  name: tiny-qwen2\n")
    for name, state in [("step-40", True), ("step-00000080", True), ("step-00000100", False),
                        ("step-final", True), (".step-00000120.tmp", True), (".step-00000020.del", True)]:
        (root / "checkpoints" / name).mkdir(parents=True)
        if state:
            (root / "checkpoints" / name / fsio.STATE_FILE).write_text(json.dumps({"step": 1}))
    (root / "checkpoints" / "step-00000060").write_text("a file, not a folder")
    (root / "final").mkdir()
    (root / "final" / "config.json").write_text("{}")             # a final/ from before btpo.json
    expect = [(40, root / "checkpoints" / "step-40"), (80, root / "checkpoints" / "step-00000080")]
    assert fsio.list_checkpoints(root) == expect
    assert Run(root).checkpoints() == [p for _, p in expect] and Run(root).latest_checkpoint() == expect[-1][1]
    st = run_status(root)
    assert (st.step, st.checkpoint, st.state) == (80, str(expect[-1][1]), "stopped")   # no btpo.json: not finished
    assert model_dir_of(root) == root / "final" == fsio.model_folder(root) == fsio.run_model(root)
    assert model_dir_of(root / "final") == root / "final"
    assert fsio.model_folder(root, "best") is None and fsio.list_checkpoints(tmp_path / "nothing") == []
    with pytest.raises(BtpoError, match="no best/ model"):
        model_dir_of(root, "best")


# ----------------------------------------------------------------------------- one module

_BY_HAND = {
    "os.replace / os.rename / Path.rename / shutil.move": re.compile(r"\bos\.(replace|rename)\(|\.rename\(|shutil\.move\("),
    "fcntl.flock": re.compile(r"\bfcntl\.flock\("),
    "a temporary folder (mkdtemp)": re.compile(r"\bmkdtemp\("),
    "a hand-made temporary name": re.compile(r"""\.tmp["']\)|\+ ["']\.tmp["']|f["']\.\{[^}]*\}\.tmp["']"""),
}


def test_no_module_outside_fsio_renames_replaces_or_locks_by_hand() -> None:
    found = []
    for path in sorted([*(ROOT / "btpo_cli").rglob("*.py"), *(ROOT / "data_builders").rglob("*.py")]):
        if path == ROOT / "btpo_cli" / "fsio.py":
            continue
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{no}: {what}" for what, rx in _BY_HAND.items() if rx.search(line)]
    assert not found, "use btpo_cli.fsio (atomic_write, publish_dir, file_lock, LockFile):\n" + "\n".join(found)


@pytest.mark.parametrize("line", ['    os.replace(tmp, dest)', 'tmp = p.with_name(p.name + ".tmp")',
                                  'fcntl.flock(fd, fcntl.LOCK_EX)', 'tmp = d / f".{d.name}.tmp"'])
def test_the_by_hand_check_catches_each_pattern(line: str) -> None:
    assert any(rx.search(line) for rx in _BY_HAND.values())


