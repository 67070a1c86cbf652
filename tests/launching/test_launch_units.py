"""The launcher's command line, the start-up check's verdicts and the launch record, in-process
(no processes started): docs/launching.md."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from btpo_cli.compare import collect, to_json
from btpo_cli.config import Config
from btpo_cli.errors import BtpoError
from btpo_cli.runs.launched import launch_of
from btpo_cli.training import launcher, preflight
from tests.test_compare import fake_run

ACC_VARS = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS", "ACCELERATE_USE_DEEPSPEED",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE", "LOCAL_WORLD_SIZE", "LOCAL_RANK", preflight.MEMORY_ENV)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ACC_VARS:
        monkeypatch.delenv(k, raising=False)


def state(world: int) -> SimpleNamespace:
    return SimpleNamespace(num_processes=world, is_main_process=True, distributed_type="MULTI_CPU",
                           wait_for_everyone=lambda: None)


def tiny(strategy: str, gpus: int = 1) -> Config:
    cfg = Config(method="bt")
    cfg.model.name = "tiny-qwen2"
    cfg.hardware.strategy, cfg.hardware.gpus = strategy, gpus
    return cfg


def test_worker_args_drop_only_the_launchers_options() -> None:
    argv = ["--recipe", "bt/x", "--gpus", "8", "--nodes=2", "--node-rank", "1", "--main-address", "h",
            "--main-port", "1234", "--dry-run", "--set", "train.seed=3", "--force"]
    assert launcher.worker_args(argv) == ["--recipe", "bt/x", "--set", "train.seed=3", "--force"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp2-offload", "zero2", "zero3"])
def test_command_uses_the_strategys_config_and_n_processes(strategy: str) -> None:
    cmd = launcher.command(strategy, 8, nodes=2, node_rank=1, main_address="10.0.0.1", args=["--recipe", "r"])
    joined = " ".join(cmd)
    assert f"--config_file {launcher.config_file(strategy)}" in joined
    assert Path(launcher.config_file(strategy)).name == f"{strategy}.yaml"
    assert "--num_processes 16 --num_machines 2 --machine_rank 1" in joined
    assert "--main_process_ip 10.0.0.1 --main_process_port 29500" in joined
    assert cmd[-4:] == ["btpo_cli", "train", "--recipe", "r"]
    with pytest.raises(BtpoError, match="no accelerate config"):
        launcher.config_file("fsdp9")


def test_check_refuses_a_mismatch_that_does_not_fit_and_warns_on_one_that_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(preflight.MEMORY_ENV, "0.001")
    with pytest.raises(BtpoError) as e:                      # recipe fsdp2 on 2, launched as plain DDP
        preflight.check(tiny("fsdp2", gpus=2), state(2))
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("launched as ddp on 2 process(es)", "the recipe says fsdp2 on 2", "btpo train --gpus 2",
                 "--set hardware.strategy=", "--force", preflight.MEMORY_ENV):
        assert part in msg, (part, msg)
    forced = preflight.check(tiny("fsdp2", gpus=2), state(2), force=True)
    assert forced["verdict"] == "no" and forced["forced"] and forced["strategy"] == "ddp"

    monkeypatch.setenv(preflight.MEMORY_ENV, "1000")         # the same mismatch fits: a warning, no refusal
    info = preflight.check(tiny("fsdp2", gpus=2), state(2))
    assert info["verdict"] in ("fits", "tight") and info["peak_gib"] > 0 and info["budget_gib"] == 1000

    monkeypatch.setenv(preflight.MEMORY_ENV, "0.001")        # launched as the recipe says: no check at all
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    info = preflight.check(tiny("fsdp2", gpus=2), state(2))
    assert info["verdict"] == "match" and info["strategy"] == "fsdp2" and "budget_gib" not in info


def test_launched_reads_zero_stage_offload_and_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    got = preflight.launched(state(16))
    assert (got["strategy"], got["zero_stage"], got["nodes"], got["processes_per_node"]) == ("zero3", 3, 2, 8)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert preflight.launched(state(16))["strategy"] == "fsdp2-offload"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert preflight.launched(state(1))["strategy"] == "single"


def test_compare_json_carries_each_runs_launch_and_none_for_old_runs(tmp_path: Path) -> None:
    new = fake_run(tmp_path, "bt-new", "m", "bt", {"hh": 0.7}, seed=0)
    fake_run(tmp_path, "bt-old", "m", "bt", {"hh": 0.6}, seed=1)                       # made before the record
    launch = {"strategy": "fsdp2", "world_size": 8, "nodes": 1, "mixed_precision": "bf16",
              "versions": {"torch": "2.x"}}
    (new / "env.json").write_text(json.dumps({"launch": launch}), encoding="utf-8")
    (tmp_path / "bt-old" / "env.json").write_text("{not json", encoding="utf-8")
    doc = json.loads(to_json(collect([tmp_path])))
    (row,) = doc["rows"]
    assert dict(zip(row["runs"], row["launch"], strict=True)) == {"bt-new": launch, "bt-old": None}
    (new / "final").mkdir()
    (new / "final" / "btpo.json").write_text(json.dumps({"launch": {**launch, "world_size": 16}}), encoding="utf-8")
    assert launch_of(new)["world_size"] == 16                # final/btpo.json first
