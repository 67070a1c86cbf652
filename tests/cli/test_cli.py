"""Every subcommand end to end on a tiny model, through a fresh interpreter as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_BT, run_btpo


def test_version_and_help() -> None:
    p = run_btpo("--version")
    assert p.stdout.startswith("btpo ")
    for cmd in (["--help"], ["train", "--help"], ["eval", "--help"], ["compare", "--help"],
                ["build-data", "--help"], ["build-data", "synthetic", "--help"], ["recipes", "--help"]):
        h = run_btpo(*cmd)
        assert "Usage" in h.stdout


def test_bad_usage_exits_2_runtime_error_exits_1(tmp_path: Path) -> None:
    p = run_btpo("train", "--no-such-flag", check=False)
    assert p.returncode == 2
    p = run_btpo("train", "--method", "bt", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"),
                 check=False)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "missing" in lines[0], p.stderr
    p = run_btpo("train", "--set", "train.bach_size=3", check=False)
    assert p.returncode == 2 and "Valid keys" in p.stderr and "Traceback" not in p.stderr   # usage: exit 2
    p = run_btpo("eval", "--checkpoint", str(tmp_path), check=False)
    assert p.returncode == 1 and "not a run folder" in p.stderr


def test_models_and_recipes() -> None:
    assert "qwen2.5-7b" in run_btpo("models").stdout
    lst = run_btpo("recipes", "list").stdout
    assert "bt/qwen2.5-7b-hh" in lst
    assert "recipe(s) valid" in run_btpo("recipes", "validate").stderr
    shown = run_btpo("recipes", "show", "bt/tiny-qwen2-synthetic").stdout
    assert "micro_batch_size: 8" in shown


@pytest.mark.slow
def test_pipeline_build_train_eval_compare(tmp_path: Path) -> None:
    data = tmp_path / "d"
    run_btpo("build-data", "synthetic", "--out", str(data), "--n-train", "64", "--n-test", "16")
    assert json.loads((data / "manifest.json").read_text())["counts"] == {"train": 64, "test": 16}
    run_dir = tmp_path / "runs" / "bt"
    run_btpo("train", "--method", "bt", "--model", "tiny-qwen2", "--data", str(data), "--out", str(run_dir),
             "--max-steps", "6", *TINY_BT)
    for f in ("config.yaml", "env.json", "metrics.jsonl", "final/model.safetensors", "final/btpo.json"):
        assert (run_dir / f).exists(), f
    env = json.loads((run_dir / "env.json").read_text())
    assert env["btpo_version"] and "torch" in env["libraries"]
    # again without --resume/--overwrite refuses to clobber
    p = run_btpo("train", "--method", "bt", "--data", str(data), "--out", str(run_dir), check=False)
    assert p.returncode == 1 and "already exists" in p.stderr

    p = run_btpo("eval", "--checkpoint", str(run_dir))
    summary = json.loads((run_dir / "eval" / "synthetic.json").read_text())
    assert summary["n"] == 16 and 0.5 <= summary["accuracy"] <= 1 and summary["eval_version"]
    assert "accuracy" in p.stderr          # the table; stdout holds the paths written
    assert p.stdout.splitlines() == [str(run_dir / "eval" / "synthetic.json"),
                                     str(run_dir / "eval" / "synthetic.predictions.jsonl")]

    # final/ loads with plain transformers and reproduces the eval scores
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from btpo_cli.data.pairs import read_pairs
    from btpo_cli.judging.templates import encode_response

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "final").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    rec = read_pairs(data, "test")[0][0]
    ids = encode_response(tok, rec.prompt, rec.chosen_text, 1024).input_ids
    with torch.no_grad():
        r = model(input_ids=torch.tensor([ids])).logits.item()
    pred = json.loads((run_dir / "eval" / "synthetic.predictions.jsonl").read_text().splitlines()[0])
    assert pred["id"] == rec.id and abs(pred["chosen"] - r) < 1e-4

    for fmt in ("table", "markdown", "csv", "json"):
        out = run_btpo("compare", str(run_dir), str(tmp_path / "runs"), "--format", fmt).stdout
        assert "bt" in out
    csv_out = run_btpo("compare", str(run_dir), "--format", "csv").stdout.splitlines()
    assert csv_out[0].startswith("model,method,run,synthetic,synthetic_raw,synthetic_n")


def test_results_on_stdout_are_not_wrapped_when_piped(tmp_path: Path) -> None:
    """Piped stdout has no terminal width: a path (or table row) longer than 80 columns must stay one
    line, or ``RUN=$(btpo …)`` and a logged markdown table break."""
    folder = tmp_path / ("a folder with a long name " * 4).strip() / "synthetic"
    p = run_btpo("build-data", "synthetic", "--out", str(folder), "--n-train", "16", "--n-test", "4",
                 env={"COLUMNS": ""})                    # no width given: rich's 80 columns when piped
    assert len(str(folder)) > 100
    assert p.stdout.splitlines() == [str(folder)]
