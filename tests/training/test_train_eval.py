"""Evaluation during training (``train.eval_every``): ``eval/`` rows, which pairs, ``best/``, early stopping,
resume, two processes — end to end through the CLI on tiny-qwen2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ONE_THREAD, REPO, TINY_BT, run_btpo

EVAL_KEYS = ("accuracy", "raw_accuracy", "tie_rate", "format_error_rate", "n")
BTPO_SMALL = ["--set", "rollout.batch_size=4", "--set", "train.batch_size=2", "--set", "train.micro_batch_size=1",
              "--set", "rollout.n=2", "--set", "rollout.max_new_tokens=8", "--set", "data.max_length=128",
              "--set", "eval.max_new_tokens=8", "--set", "optim.lr=1e-3", "--set", "optim.warmup_ratio=0"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _evals(run: Path) -> list[dict]:
    return [r for r in _rows(run) if "eval/accuracy" in r]


def _train_rows(run: Path) -> list[dict]:
    return [r for r in _rows(run) if "train/loss" in r]


def _bytes(d: Path) -> bytes:
    return (d / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def valid_data(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> Path:
    """The synthetic set plus a ``validation`` split (its test pairs)."""
    d = tmp_path_factory.mktemp("valid") / "synthetic"
    shutil.copytree(synthetic_data, d)
    shutil.copy(d / "test.jsonl", d / "validation.jsonl")
    return d


def _bt(data: Path, out: Path, steps: int, *extra: str, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_btpo("train", "--method", "bt", "--model", "tiny-qwen2", "--data", str(data), "--out", str(out),
                    "--max-steps", str(steps), *TINY_BT, *extra, env={**ONE_THREAD, **(env or {})}, check=check)


EVAL_ON = ["--set", "train.eval_every=2", "--set", "train.eval_limit=0", "--set", "eval.batch_size=5"]


@pytest.fixture(scope="module")
def bt_run(tmp_path_factory: pytest.TempPathFactory, valid_data: Path) -> Path:
    run = tmp_path_factory.mktemp("bt") / "run"
    _bt(valid_data, run, 5, *EVAL_ON)
    return run


@pytest.mark.slow
def test_eval_rows_at_every_n_steps_and_the_last_equal_btpo_eval(bt_run: Path, valid_data: Path) -> None:
    evals = _evals(bt_run)
    assert [r["step"] for r in evals] == [2, 4, 5]                       # every 2 steps and the last
    assert all(r["eval/n"] == 24 for r in evals)                         # the whole validation split
    assert all("perf/mem_allocated_gb" not in r for r in _rows(bt_run))  # CPU: no GPU memory metrics
    pairs = json.loads((bt_run / "eval_pairs.json").read_text())
    assert pairs["source"] == "split" and pairs["split"] == "validation" and pairs["n"] == 24
    # the in-memory evaluation at the last step = `btpo eval` on final/ (same pairs, same protocol)
    p = run_btpo("eval", "--checkpoint", str(bt_run), "--split", "validation", "--batch-size", "5", "--json")
    summary = json.loads(p.stdout)
    for k in EVAL_KEYS:
        assert evals[-1][f"eval/{k}"] == summary[k], k


@pytest.mark.slow
def test_best_is_kept_by_eval_accuracy_and_loads_everywhere(bt_run: Path) -> None:
    evals = _evals(bt_run)
    best = max(evals, key=lambda r: r["eval/raw_accuracy"])             # the first of the best (strictly better)
    assert all(r["eval/best_step"] == max((e for e in evals if e["step"] <= r["step"]),
                                          key=lambda e: e["eval/raw_accuracy"])["step"] for r in evals)
    meta = json.loads((bt_run / "best" / "btpo.json").read_text())
    assert meta["selected"]["step"] == best["step"] == evals[-1]["eval/best_step"]
    assert meta["method"] == "bt" and meta["template"] and "selected: the weights of step" in \
        (bt_run / "best" / "README.md").read_text()
    # plain transformers loads it
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(str(bt_run / "best"))
    # and `btpo eval --which best` gives what the in-memory evaluation gave at that step
    p = run_btpo("eval", "--checkpoint", str(bt_run), "--which", "best", "--split", "validation", "--batch-size", "5",
                 "--json")
    summary = json.loads(p.stdout)
    assert summary["checkpoint"].endswith("best") and (bt_run / "eval" / "best" / "synthetic.json").exists()
    for k in EVAL_KEYS:
        assert best[f"eval/{k}"] == summary[k], k
    if best["step"] != evals[-1]["step"]:
        assert _bytes(bt_run / "best") != _bytes(bt_run / "final")


@pytest.mark.slow
def test_evaluating_does_not_change_training(tmp_path: Path, bt_run: Path, valid_data: Path) -> None:
    """Same data (a validation split holds nothing out): the losses and final weights equal a run without eval."""
    plain = tmp_path / "plain"
    _bt(valid_data, plain, 5)
    assert not (plain / "best").exists() and not _evals(plain)
    a, b = _train_rows(bt_run), _train_rows(plain)
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]
    assert _bytes(bt_run / "final") == _bytes(plain / "final")


@pytest.mark.slow
def test_resume_with_eval_every_is_exact(tmp_path: Path, synthetic_data: Path) -> None:
    """Killed after step 3 (checkpoint at 2), resumed: every row, best/ and final/ equal an uninterrupted run."""
    args = ["--set", "train.eval_every=2", "--set", "train.eval_limit=16", "--set", "train.save_every=2"]
    ref = tmp_path / "ref"
    _bt(synthetic_data, ref, 6, *args)
    run = tmp_path / "run"
    p = _bt(synthetic_data, run, 6, *args, env={"BTPO_FAULT_AT_STEP": "3"}, check=False)
    assert p.returncode == 17
    state = json.loads((run / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert set(state["eval"]) == {"best_raw_accuracy", "best_step", "evals_since_best", "stopped"}
    assert state["eval"]["best_step"] == 2
    run_btpo("train", "--out", str(run), "--resume", env=ONE_THREAD)
    def no_times(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]

    assert no_times(_rows(run)) == no_times(_rows(ref))
    assert [r["step"] for r in _evals(run)] == [2, 4, 6]
    assert _bytes(run / "final") == _bytes(ref / "final") and _bytes(run / "best") == _bytes(ref / "best")
    assert json.loads((run / "eval_pairs.json").read_text()) == json.loads((ref / "eval_pairs.json").read_text())


@pytest.mark.slow
def test_heldout_pairs_leave_training(tmp_path: Path, synthetic_data: Path) -> None:
    run = tmp_path / "run"
    _bt(synthetic_data, run, 2, "--set", "train.eval_every=2", "--set", "train.eval_limit=16")
    pairs = json.loads((run / "eval_pairs.json").read_text())
    assert pairs["source"] == "heldout" and pairs["valid_split"] == "auto" and len(pairs["ids"]) == 16
    assert _rows(run)[0]["data/train_pairs"] == 96 - 16
    assert _evals(run)[-1]["eval/n"] == 16


def _fake(root: Path) -> tuple[SimpleNamespace, SimpleNamespace]:
    return SimpleNamespace(is_main_process=True), SimpleNamespace(root=root, record_skips=lambda *a, **k: None)


def test_eval_pair_choice(tmp_path: Path, synthetic_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto → validation when the folder has it, else a seeded held-out slice: disjoint, stable, seed-dependent;
    a resume whose data would give other pairs is refused."""
    monkeypatch.setenv("BTPO_CACHE", str(tmp_path / "cache"))
    from btpo_cli.config import Config
    from btpo_cli.data.pairs import read_pairs
    from btpo_cli.errors import BtpoError
    from btpo_cli.training.eval_pairs import split_eval_pairs

    records, _ = read_pairs(synthetic_data, "train")
    cfg = Config()
    cfg.method, cfg.data.path, cfg.out = "bt", str(synthetic_data), str(tmp_path / "r")
    cfg.train.eval_every, cfg.train.eval_limit = 5, 10
    acc, run = _fake(tmp_path / "r")
    (tmp_path / "r").mkdir()
    train, pairs = split_eval_pairs(cfg, records, acc, run, resume=False)
    ids = [r.id for r in pairs.records]
    assert pairs.source == "heldout" and len(ids) == 10 and len(train) == len(records) - 10
    assert not set(ids) & {r.id for r in train}
    assert [r.id for r in split_eval_pairs(cfg, records, acc, run, resume=True)[1].records] == ids
    cfg.train.seed = 1
    with pytest.raises(BtpoError, match="evaluated other pairs"):
        split_eval_pairs(cfg, records, acc, run, resume=True)
    other = [r.id for r in split_eval_pairs(cfg, records, acc, run, resume=False)[1].records]
    assert other != ids
    cfg.train.eval_limit = len(records)
    with pytest.raises(BtpoError, match="cannot hold out"):
        split_eval_pairs(cfg, records, acc, run, resume=False)
    valid = tmp_path / "v"
    shutil.copytree(synthetic_data, valid)
    shutil.copy(valid / "test.jsonl", valid / "validation.jsonl")
    cfg.data.path, cfg.train.eval_limit = str(valid), 7
    train, pairs = split_eval_pairs(cfg, records, acc, run, resume=False)
    assert pairs.source == "split" and pairs.split == "validation" and len(pairs.records) == 7 and train == records
    cfg.data.valid_split = "nosuch"
    with pytest.raises(BtpoError, match="no 'nosuch' split"):
        split_eval_pairs(cfg, records, acc, run, resume=False)


def test_eval_settings_are_checked() -> None:
    from btpo_cli.config import Config, validate
    from btpo_cli.errors import ConfigError

    for sets, msg in [({"early_stop_patience": 2}, "needs train.eval_every"),
                      ({"eval_every": -1}, "must be 0 or more"),
                      ({"eval_every": 5, "eval_limit": 0}, None)]:
        cfg = Config()
        for k, v in sets.items():
            setattr(cfg.train, k, v)
        if msg is None:
            validate(cfg)       # eval_limit 0 = all of a validation split (auto may still find one)
            continue
        with pytest.raises(ConfigError, match=msg):
            validate(cfg)
    cfg = Config()
    cfg.train.eval_every, cfg.data.valid_split = 5, "train"
    with pytest.raises(ConfigError, match="is the training split"):
        validate(cfg)


@pytest.mark.slow
def test_early_stop_in_the_rollout_loop_and_a_resume_after_it(tmp_path: Path, synthetic_data: Path) -> None:
    run = tmp_path / "run"
    p = run_btpo("train", "--method", "btpo", "--model", "tiny-qwen2", "--data", str(synthetic_data), "--out",
                 str(run), "--max-steps", "40", *BTPO_SMALL, "--set", "train.eval_every=1", "--set",
                 "train.eval_limit=6", "--set", "train.early_stop_patience=2", "--set", "eval.batch_size=4",
                 env=ONE_THREAD)
    evals = _evals(run)
    last = evals[-1]
    assert "early stop at step" in p.stderr
    assert last["step"] < 40 and last["step"] - last["eval/best_step"] == 2        # 2 evals without a better one
    assert [r["step"] for r in _train_rows(run)][-1] == last["step"]
    (ckpt,) = (run / "checkpoints").glob("step-*")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == last["step"] and state["eval"]["stopped"] is True
    assert json.loads((run / "best" / "btpo.json").read_text())["selected"]["step"] == last["eval/best_step"]
    stop = json.loads((run / "final" / "btpo.json").read_text())["training"]["early_stop"]
    assert stop["best_step"] == last["eval/best_step"] and stop["patience"] == 2
    before = (run / "metrics.jsonl").read_text(), _bytes(run / "final")
    run_btpo("train", "--out", str(run), "--resume", env=ONE_THREAD)           # a stopped run stays stopped
    assert ((run / "metrics.jsonl").read_text(), _bytes(run / "final")) == before


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_evaluate_as_one(tmp_path: Path, bt_run: Path, valid_data: Path, strategy: str) -> None:
    """2 CPU processes (DDP, FSDP2 over gloo): each judges a block of whole batches (under FSDP2 with the
    parameters gathered), every process gets every result, all write best/; the numbers equal one process's."""
    two = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    how = ["--multi_gpu"] if strategy == "ddp" else \
        ["--config_file", str(REPO / "recipes" / "accelerate" / f"{strategy}.yaml")]
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "btpo_cli", "train", "--method", "bt", "--model", "tiny-qwen2", "--data",
                        str(valid_data), "--max-steps", "5", *TINY_BT, *EVAL_ON, "--out", str(two)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    one_e, two_e = _evals(bt_run), _evals(two)
    assert [r["step"] for r in two_e] == [r["step"] for r in one_e]
    for a, b in zip(one_e, two_e, strict=True):
        for k in EVAL_KEYS:
            assert a[f"eval/{k}"] == pytest.approx(b[f"eval/{k}"]), (k, a["step"])
        assert a["eval/best_step"] == b["eval/best_step"]
    assert json.loads((two / "best" / "btpo.json").read_text())["selected"]["step"] == one_e[-1]["eval/best_step"]
    from safetensors.torch import load_file

    w1, w2 = load_file(str(bt_run / "best" / "model.safetensors")), load_file(str(two / "best" / "model.safetensors"))
    assert sorted(w1) == sorted(w2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["btpo", "gram", "grpo-pair", "grpo-point", "bt-prefilled"])
def test_every_method_evaluates_in_memory_as_btpo_eval_does(tmp_path: Path, valid_data: Path, method: str) -> None:
    """Both loops, every judge: the last eval/ row equals `btpo eval` on final/ for the same 4 pairs."""
    from tests.conftest import JUDGE_TRAIN

    run = tmp_path / method
    run_btpo("train", "--method", method, "--model", "tiny-qwen2", "--data", str(valid_data), "--out", str(run),
             *JUDGE_TRAIN[method], "--set", "optim.lr=1e-3", "--set", "optim.warmup_ratio=0",
             "--set", "train.eval_every=1", "--set", "train.eval_limit=4", "--set", "eval.batch_size=2",
             "--set", "eval.max_new_tokens=8", env=ONE_THREAD)
    evals = _evals(run)
    assert [r["step"] for r in evals] == [r["step"] for r in _train_rows(run)]
    assert (run / "best" / "btpo.json").exists()
    p = run_btpo("eval", "--checkpoint", str(run), "--split", "validation", "--limit", "4", "--batch-size", "2",
                 "--max-new-tokens", "8", "--json", env=ONE_THREAD)
    summary = json.loads(p.stdout)
    for k in EVAL_KEYS:
        assert evals[-1][f"eval/{k}"] == summary[k], k
