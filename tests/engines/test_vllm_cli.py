"""The vLLM engine through the CLI, as a user runs it (each command a fresh process, tiny-qwen2, CPU).

- ``btpo train --method btpo --engine vllm`` then ``btpo eval --engine vllm``: the engine really
  samples the rollouts (``rollout/logprob_diff`` shows it holds the trainer's current weights);
- the same greedy eval predictions with ``--engine vllm`` and ``--engine hf`` (same weights, fp32);
- ``btpo score`` with a BTPO judge on the vLLM engine equals the HF engine's scores;
- killed and resumed with ``--engine vllm``: the same later losses as an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import ONE_THREAD, run_btpo

pytestmark = pytest.mark.vllm

SMALL = ["--set", "rollout.batch_size=4", "--set", "train.batch_size=2", "--set", "train.micro_batch_size=1",
         "--set", "rollout.n=2", "--set", "rollout.max_new_tokens=8", "--set", "data.max_length=128",
         "--set", "optim.lr=1e-3", "--set", "optim.warmup_ratio=0"]
EVAL = ["--max-new-tokens", "8", "--eval-samples", "0", "--limit", "12"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in _rows(run_dir) if "train/loss" in r]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path) -> Path:
    """4 BTPO steps (2 rollouts) sampled by the vLLM engine."""
    run_dir = tmp_path_factory.mktemp("vllm") / "btpo"
    run_btpo("train", "--method", "btpo", "--model", "tiny-qwen2", "--data", str(synthetic_data), "--out",
             str(run_dir), "--max-steps", "4", "--engine", "vllm", *SMALL, env=ONE_THREAD)
    return run_dir


def _eval_outputs(run_dir: Path, engine: str, into: Path) -> tuple[dict, list[dict], list[dict], str]:
    """``btpo eval --engine …`` on ``run_dir``; its summary, predictions, thoughts (copied to ``into``), stdout."""
    p = run_btpo("eval", "--checkpoint", str(run_dir), "--engine", engine, *EVAL, env=ONE_THREAD)
    into.mkdir()
    for f in ("synthetic.json", "synthetic.predictions.jsonl", "synthetic.thoughts.jsonl"):
        shutil.copy(run_dir / "eval" / f, into / f)
    lines = [[json.loads(x) for x in (into / f).read_text().splitlines()]
             for f in ("synthetic.predictions.jsonl", "synthetic.thoughts.jsonl")]
    return json.loads((into / "synthetic.json").read_text()), lines[0], lines[1], p.stdout


@pytest.fixture(scope="module")
def vllm_eval(vllm_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict], list[dict], str]:
    return _eval_outputs(vllm_run, "vllm", tmp_path_factory.mktemp("eval-vllm") / "out")


def test_train_and_eval_with_vllm(vllm_run: Path, vllm_eval: tuple) -> None:
    rows = [r for r in _rows(vllm_run) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["train/rollout"] for r in rows] == [1, 1, 2, 2]
    assert yaml.safe_load((vllm_run / "config.yaml").read_text())["rollout"]["engine"] == "vllm"
    diffs = [r["rollout/logprob_diff"] for r in rows if "rollout/logprob_diff" in r]
    # one per rollout (the second after two updates): the engine samples from the trainer's weights
    assert len(diffs) == 2 and all(d < 1e-3 for d in diffs), diffs
    summary, _, thoughts, stdout = vllm_eval
    assert summary["engine"] == "vllm" and summary["method"] == "btpo" and summary["n"] == 12
    # stdout is for programs: the written paths, one per line, and nothing of vLLM's logging
    assert stdout.splitlines() == [str(vllm_run / "eval" / f) for f in ("synthetic.json",
                                                                          "synthetic.predictions.jsonl")]
    assert len(thoughts) == 12 and all(0 < t["p_yes_chosen"] < 1 for t in thoughts)


def test_vllm_and_hf_give_the_same_greedy_eval(vllm_run: Path, vllm_eval: tuple, tmp_path: Path) -> None:
    sv, pv, tv, _ = vllm_eval
    sh, ph, th, _ = _eval_outputs(vllm_run, "hf", tmp_path / "hf")
    assert (sv["engine"], sh["engine"]) == ("vllm", "hf")
    assert [t["thought_chosen"] for t in tv] == [t["thought_chosen"] for t in th]
    assert [t["thought_rejected"] for t in tv] == [t["thought_rejected"] for t in th]
    assert [p["credit"] for p in pv] == [p["credit"] for p in ph]
    assert sv["accuracy"] == sh["accuracy"]
    for a, b in zip(tv, th, strict=True):      # same thoughts, scored by the same trainer-side model
        assert a["p_yes_chosen"] == pytest.approx(b["p_yes_chosen"], abs=1e-5)
        assert a["p_yes_rejected"] == pytest.approx(b["p_yes_rejected"], abs=1e-5)


def test_score_with_a_btpo_judge_on_vllm(vllm_run: Path, synthetic_data: Path, tmp_path: Path) -> None:
    lines = [json.loads(x) for x in (synthetic_data / "test.jsonl").read_text().splitlines()[:3]]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": r["prompt"], "candidates": [r["chosen"][0]["content"],
                                                                             r["rejected"][0]["content"]]}) + "\n"
                           for r in lines))
    out = {}
    for engine in ("vllm", "hf"):
        p = run_btpo("score", "--judge", str(vllm_run), str(inp), "--engine", engine, "--thoughts",
                     "--max-new-tokens", "8", "-q", env=ONE_THREAD)
        out[engine] = [json.loads(x) for x in p.stdout.splitlines()]      # JSONL only: vLLM logs to stderr
    assert len(out["vllm"]) == 3 and all(len(r["scores"]) == 2 for r in out["vllm"])
    for a, b in zip(out["vllm"], out["hf"], strict=True):
        assert a["best"] == b["best"] and a["thoughts"] == b["thoughts"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


@pytest.mark.slow
def test_kill_and_resume_with_vllm_equals_uninterrupted(tmp_path: Path, synthetic_data: Path) -> None:
    args = ["train", "--method", "btpo", "--data", str(synthetic_data), "--max-steps", "6", "--engine", "vllm",
            "--set", "train.save_every=2", *SMALL]
    full = tmp_path / "full"
    run_btpo(*args, "--out", str(full), env=ONE_THREAD)
    killed = tmp_path / "killed"
    p = run_btpo(*args, "--out", str(killed), env={**ONE_THREAD, "BTPO_FAULT_AT_STEP": "3"}, check=False)
    assert p.returncode == 17, p.stderr[-2000:]
    assert len(_losses(killed)) == 3
    run_btpo("train", "--out", str(killed), "--resume", env=ONE_THREAD)
    assert len(_losses(full)) == 6
    assert _losses(killed) == _losses(full)   # the same thoughts re-drawn by vLLM (derived seeds)
