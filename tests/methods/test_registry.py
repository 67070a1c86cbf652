"""The method registry: a seventh method is one file. This test file IS that file.

Importing this module registers ``toy-hinge`` (a scalar-head reward model trained with a hinge
loss on the reward margin, with its own config section ``toy``); the CLI finds it through
``BTPO_PLUGINS=tests.methods.test_registry``. Nothing outside this file knows about it: ``btpo plan``
sizes it (``plan_geometry``), its ``final/README.md`` says what it is (``card``) and ``btpo compare``
gives it a row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from btpo_cli.config import Config, register_section
from btpo_cli.methods import Card, MethodSpec, register_method
from btpo_cli.methods import bt as bt_method
from btpo_cli.plan.estimate import Geometry, PlanInputs
from btpo_cli.runs.final import describe
from btpo_cli.runs.folder import Run
from btpo_cli.training.session import TrainSession
from btpo_cli.training.steps import BatchPlan
from btpo_cli.training.supervised import run_supervised
from tests.conftest import REPO, run_btpo


@dataclass
class ToyConfig:
    margin: float = 1.0
    """Hinge margin: the loss is max(0, margin − (r_w − r_l))."""


def toy_train(cfg: Config, run: Run, resume: bool) -> None:
    sess = TrainSession.begin(cfg, run, resume)
    records = sess.load_split()
    pairs, counts = bt_method.encode_pairs(sess.tok, records, cfg.data.max_length)
    plan = BatchPlan.from_config(len(pairs), cfg, sess.world)
    sess.build("reward", plan.total_steps)
    sess.log_data(len(pairs), counts)

    def loss(ids: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        seqs = [pairs[i].chosen for i in ids] + [pairs[i].rejected for i in ids]
        r = bt_method.rewards(sess.model, seqs, sess.tok.pad_token_id, sess.device)
        margin = r[:len(ids)] - r[len(ids):]
        mean = torch.relu(cfg.toy.margin - margin).mean()
        return mean, {"loss": mean.detach(), "margin": margin.mean().detach()}

    run_supervised(sess, plan, loss=loss, metrics=lambda t, n: {"toy/margin": t["margin"] / n},
                   bar_info=lambda m: f"loss {m['train/loss']:.3f}")
    # btpo.json through describe(): the spec's protocol and model class, the ``toy`` settings (the card reads them)
    sess.finish(describe(cfg, records, templates=bt_method.templates(sess.tok),
                         token_ids={"pad": sess.tok.pad_token_id}))


def toy_geometry(inp: PlanInputs) -> Geometry:
    """Like BT: both responses of a pair through the scalar head."""
    return Geometry("reward", 2, inp.prompt_tokens, 0, False, 0)


TOY_WHAT = "a toy reward model trained with a hinge loss on the reward margin"


def toy_card(meta: dict[str, Any]) -> Card:
    margin = ((meta.get("settings") or {}).get("toy") or {}).get("margin")
    return Card(TOY_WHAT + ".", rows=[("hinge margin", margin)],
                usage=["model = AutoModelForSequenceClassification.from_pretrained(\".\").eval()"])


register_section("toy", ToyConfig)
register_method(MethodSpec(name="toy-hinge", help="Toy: hinge loss on the reward margin (registry test).",
                           train=toy_train, evaluate=bt_method.evaluate, protocol="pointwise",
                           model_class="AutoModelForSequenceClassification", config_section="toy", order=5,
                           plan_geometry=toy_geometry, card=toy_card))


def test_a_method_registered_in_a_test_file_trains_evaluates_and_compares(tmp_path: Path,
                                                                          synthetic_data: Path) -> None:
    env = {"BTPO_PLUGINS": "tests.methods.test_registry"}
    help_text = run_btpo("train", "--help", env=env).stdout
    assert "toy-hinge" in help_text and "hinge loss on the reward margin" in help_text
    out = tmp_path / "toy"
    run_btpo("train", "--method", "toy-hinge", "--data", str(synthetic_data), "--out", str(out), "--max-steps", "3",
             "--set", "train.batch_size=8", "--set", "train.micro_batch_size=4", "--set", "toy.margin=2.5",
             "--set", "optim.warmup_ratio=0", env=env)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # hinge with margin 2.5 on near-equal initial rewards: the loss starts near 2.5, not at BT's ln 2
    assert 2.0 < steps[0]["train/loss"] < 3.0 and "toy/margin" in steps[0]
    assert "toy:\n  margin: 2.5" in (out / "config.yaml").read_text()
    assert json.loads((out / "final" / "btpo.json").read_text())["method"] == "toy-hinge"
    run_btpo("eval", "--checkpoint", str(out), env=env)
    summary = json.loads((out / "eval" / "synthetic.json").read_text())
    assert summary["method"] == "toy-hinge" and summary["protocol"] == "pointwise" and summary["n"] == 24
    card = (out / "final" / "README.md").read_text()
    assert f"This is {TOY_WHAT}." in card and "| hinge margin | 2.5 |" in card
    table = json.loads(run_btpo("compare", str(out), "--format", "json", env=env).stdout)
    row = next(r for r in table["rows"] if r["method"] == "toy-hinge")     # its label: the method name
    assert row["runs"] == ["toy"] and row["cells"]["synthetic"]["n_runs"] == 1
    plan = json.loads(run_btpo("plan", "--method", "toy-hinge", "--model", "qwen2.5-7b", "--gpus", "1",
                               "--strategy", "ddp", "--format", "json", env=env).stdout)
    assert plan["inputs"]["method"] == "toy-hinge" and plan["geometry"]["rows_per_pair"] == 2
    assert plan["geometry"]["head"] == "reward" and plan["strategies"]["ddp"]["peak"] > 0
    # without the plugin the method is unknown: a one-line error naming the choices, exit 2 (usage)
    p = run_btpo("train", "--method", "toy-hinge", "--data", str(synthetic_data), "--out", str(tmp_path / "x"),
                 check=False)
    assert p.returncode == 2 and "toy-hinge" in p.stderr + p.stdout and "Traceback" not in p.stderr


def test_registry_drives_choices_and_order() -> None:
    from btpo_cli.compare import method_order
    from btpo_cli.config import build_config
    from btpo_cli.errors import ConfigError
    from btpo_cli.methods import get_method, method_names

    assert method_names()[:1] == ["bt"] and "btpo" in method_names() and "toy-hinge" in method_names()
    assert method_order() == method_names()
    assert get_method("gram").protocol == "pairwise" and get_method("btpo").generative
    cfg = build_config(None, ["toy.margin=0.5"], {"method": "toy-hinge"})
    assert cfg.toy.margin == 0.5 and cfg.to_dict()["toy"] == {"margin": 0.5}
    try:
        build_config(None, [], {"method": "no-such-method"})
    except ConfigError as e:
        assert "toy-hinge" in str(e) and "btpo" in str(e)
    else:
        raise AssertionError("an unknown method must be a config error")


TORCH_FREE = """
import sys
from btpo_cli.config import build_config
from btpo_cli.methods import method_names
for m in method_names():
    build_config(None, [], {"method": m, "model.name": "tiny-qwen2", "data.path": "x"})
assert "torch" not in sys.modules, "build_config"
from btpo_cli.cli import app
for args in (["--help"], ["train", "--help"], ["recipes", "validate", "btpo/qwen2.5-7b-hh"]):
    try:
        app(args=args, prog_name="btpo", standalone_mode=False)
    except SystemExit as e:
        assert not e.code, (args, e.code)
    assert "torch" not in sys.modules, args
print("torch-free", len(method_names()))
"""


def test_config_help_and_recipe_validation_do_not_import_torch() -> None:
    """The registry reads method modules without torch: ``build_config`` of every method, ``btpo --help``,
    ``btpo train --help`` and ``btpo recipes validate`` stay light (a fresh interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "BTPO_PLUGINS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "torch-free 6" in p.stdout
