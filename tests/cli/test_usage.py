"""Exit codes as documented (docs/cli.md): bad usage is 2 with the valid values and a close suggestion;
named errors for a missing GPU and an unreachable Hub; whole tables and help texts in a pipe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import typer.main
import typer.rich_utils
import yaml

from btpo_cli.cli import app, main
from btpo_cli.config import Config
from tests.conftest import ONE_THREAD, REPO, run_btpo

METHODS = "bt, bt-prefilled, gram, grpo-pair, grpo-point, btpo"


@pytest.mark.parametrize("args,valid,suggestion", [
    (["eval", "--format", "yaml"], "table, json, tsv", None),
    (["train", "--log-every", "5x"], "(30s)", None),
    (["train", "--method", "nope"], METHODS, None),
    (["train", "--method", "btpoo"], METHODS, "'btpo'"),
    (["train", "--engine", "foo"], "auto, hf, vllm", None),
    (["eval", "--which", "foo"], "final, best", None),
    (["plan", "--strategy", "foo"], "ddp, fsdp2, fsdp2-offload, zero2, zero3, all", None),
    (["train", "--report-to", "foo"], "none, tensorboard, wandb", None),
    (["eval", "--benchmark", "judgbench"], "judgebench, rewardbench", "'judgebench'"),
    (["eval", "--method", "nope", "--model", "tiny-qwen2"], METHODS, None),
    (["score", "--judge", ".", "--engine", "foo"], "auto, hf, vllm", None),
    (["compare", ".", "--show", "foo"], "clipped, raw, skips", None),
    (["recipes", "list", "--method", "nope"], METHODS, None),
    (["train", "--set", "nokey"], "Valid keys: method, name", None),
    (["train", "--set", "nokey=1"], "Valid keys: method, name", None),
    (["train", "--set", "train.bach_size=3"], "train.batch_size", "'train.batch_size'"),
    (["train", "--bogus"], "No such option: --bogus", None),
    (["train", "--mdoel", "x"], "No such option: --mdoel", "--model"),
])
def test_bad_usage_exits_2_with_valid_values_and_a_close_suggestion(args: list[str], valid: str,
                                                                    suggestion: str | None) -> None:
    p = run_btpo(*args, check=False)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert valid in p.stderr and "Traceback" not in p.stderr, p.stderr
    offered = "did you mean" in p.stderr.lower() or "possible options" in p.stderr.lower()
    if suggestion is None:
        assert not offered, p.stderr          # `--bogus` used to get "(Possible options: --out)"
    else:
        assert offered and suggestion in p.stderr, p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA")
def test_device_cuda_without_cuda_is_a_named_error(trained_judge) -> None:
    run = trained_judge("bt")
    for args in (["eval", "--checkpoint", str(run)], ["score", "--judge", str(run), "-"]):
        p = run_btpo(*args, "--device", "cuda", check=False, env=ONE_THREAD)
        assert p.returncode == 1 and "Traceback" not in p.stderr and "AssertionError" not in p.stderr, p.stderr
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "--device cuda: CUDA is not available here" in errors[0], p.stderr
    p = run_btpo("eval", "--checkpoint", str(run), "--device", "gpu", check=False)
    assert p.returncode == 2 and "cpu, cuda, cuda:N" in p.stderr


NO_HUB = {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9",   # nothing listens
          "HTTP_PROXY": "", "HTTPS_PROXY": "", "http_proxy": "", "https_proxy": "", "ALL_PROXY": "", "all_proxy": ""}
"""A Hub that does not answer, on any machine (the discard port refuses), and no offline switch set."""


@pytest.mark.parametrize("kind", ["train --model", "eval --model", "train --data"])
def test_unreachable_hub_fails_in_one_line_without_retry_lines(kind: str, synthetic_data: Path,
                                                               tmp_path: Path) -> None:
    args = {"train --model": ["train", "--model", "some-org/some-model", "--data", str(synthetic_data)],
            "eval --model": ["eval", "--model", "some-org/some-model", "--method", "bt", "--data", str(synthetic_data)],
            "train --data": ["train", "--model", "tiny-qwen2", "--data", "some-org/some-dataset"]}[kind]
    start = time.monotonic()
    p = run_btpo(*args, "--out", str(tmp_path / "run"), check=False,
                 env={**NO_HUB, "HF_HOME": str(tmp_path / "hf"), **ONE_THREAD})
    print(f"{kind}: failed after {time.monotonic() - start:.1f} s")      # reported, not asserted
    assert p.returncode == 1, p.stderr
    for third_party in ("Retrying in", "thrown while requesting", "Traceback", "Warning"):
        assert third_party not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "does not answer" in errors[0] and "some-" in errors[0], p.stderr
    assert all(ln.startswith(("error:", "btpo train ")) for ln in p.stderr.splitlines() if ln.strip()), p.stderr


def test_unreachable_hub_uses_a_cached_model_with_one_note(synthetic_data: Path, tmp_path: Path) -> None:
    from btpo_cli.models.aliases import resolve_model

    snapshot = tmp_path / "hf" / "hub" / "models--some-org--cached" / "snapshots" / ("0" * 40)
    shutil.copytree(resolve_model("tiny-qwen2"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    p = run_btpo("eval", "--model", "some-org/cached", "--method", "btpo", "--data", str(synthetic_data),
                 "--limit", "4", "--max-new-tokens", "6", "--out", str(tmp_path / "run"), check=False,
                 env={**NO_HUB, "HF_HOME": str(tmp_path / "hf"), **ONE_THREAD})
    assert p.returncode == 0, p.stderr
    assert "does not answer" in p.stderr and "using the cached copy of some-org/cached" in p.stderr
    assert "Retrying in" not in p.stderr
    assert json.loads((tmp_path / "run" / "eval" / "synthetic.json").read_text())["n"] == 4


def test_recipes_validate_writes_its_table_to_stdout_whole_in_a_pipe() -> None:
    p = run_btpo("recipes", "validate", env={"COLUMNS": ""})
    rows = [ln for ln in p.stdout.splitlines() if "bt/qwen2.5-7b-hh.yaml" in ln]   # what `| grep` sees
    assert len(rows) == 1 and " ok " in rows[0] and "bt" in rows[0] and "GiB per GPU" in rows[0], p.stdout
    assert "recipe(s) valid" in p.stderr
    tsv = run_btpo("recipes", "validate", "--format", "tsv").stdout.splitlines()
    assert tsv[0].split("\t") == ["recipe", "status", "method", "model", "note"]
    assert {ln.split("\t")[1] for ln in tsv[1:]} == {"ok"}


def _commands(cmd, path: tuple[str, ...] = ()):
    subs = getattr(cmd, "commands", {})
    if not subs:
        yield path, cmd
    for name, sub in subs.items():
        yield from _commands(sub, (*path, name))


def test_help_in_a_pipe_is_not_cut_and_keeps_brackets(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)          # a plain pipe: no width given
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", None)
    for path, cmd in _commands(typer.main.get_command(app)):
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        flags = [o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
        missing = [f for f in flags if f not in text]
        assert not missing, (path, missing, text)          # `--no-load-in-4b…` at 80 columns
        assert "[bold]" not in text and "[/]" not in text, path
        if path == ("compare",):
            assert "raw figure in [brackets] where clipped" in " ".join(text.split())


def test_status_prints_accuracy_in_percent_like_eval_and_compare(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(Config().to_dict()))
    summary = {"dataset": "synthetic", "split": "test", "n": 8, "accuracy": 0.625, "raw_accuracy": 0.5,
               "tie_rate": 0.0, "format_error_rate": 0.0, "method": "bt", "model": "tiny-qwen2"}
    (run / "eval" / "synthetic.json").write_text(json.dumps(summary))
    p = run_btpo("status", str(run), check=False, env={"COLUMNS": ""})
    assert p.returncode == 3, p.stderr
    assert "accuracy (%)" in p.stdout and "raw accuracy (%)" in p.stdout
    row = next(ln for ln in p.stdout.splitlines() if "synthetic" in ln and "test" in ln)
    assert "62.5" in row and "50.0" in row and "0.625" not in row, p.stdout
    js = json.loads(run_btpo("status", str(run), "--format", "json", check=False).stdout)
    assert js["evals"]["synthetic"]["accuracy"] == 0.625          # JSON keeps fractions (docs/cli.md)


def test_reproduce_paper_help_prints_the_header_only() -> None:
    p = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_paper.sh"), "--help"], capture_output=True,
                       text=True, timeout=60, env={**os.environ})
    assert p.returncode == 0 and "--backbone B" in p.stdout and "BTPO (default: btpo)" in p.stdout
    assert "set -euo pipefail" not in p.stdout and "#" not in p.stdout.splitlines()[0]
