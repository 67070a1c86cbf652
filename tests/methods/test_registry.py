"""The method registry: a seventh method is one file. This test file IS that file.

Importing this module registers two: ``toy-hinge`` (a scalar-head reward model trained with a hinge
loss on the reward margin, with its own config section ``toy``) and ``toy-rl`` (a thinking judge
trained with the rollout loop: K thoughts per response, rewarded for a thought length near
``toy_rl.target_len``, GRPO-style clipped updates, its advantages in a payload of its own, its own
training curve, eval setting and eval-summary entry). The CLI finds them through
``BTPO_PLUGINS=tests.methods.test_registry``. Nothing outside this file knows about them: ``btpo plan``
sizes them (``plan_geometry``), their ``final/README.md`` says what they are (``card``) and ``btpo compare``
gives them a row, compares their eval settings and plots their curve.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from btpo_cli.config import Config, RolloutConfig, register_section
from btpo_cli.methods import Card, MethodSpec, register_method
from btpo_cli.methods import bt as bt_method
from btpo_cli.methods import btpo as btpo_method
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


# ----------------------------------------------------------------------------- toy-rl: a rollout-based seventh method


@dataclass
class ToyRLConfig:
    target_len: int = 4
    """Training reward of a thought: −|its tokens − target_len|."""
    eval_normalize: bool = False
    """Eval: p(Yes) renormalized over {Yes, No} (its own eval setting, ``toy_eval_normalize``)."""


@dataclass
class ToyPayload:
    """What a toy-rl rollout carries for its loss (``Rollout.payload``)."""

    advantages: torch.Tensor
    """(N,) advantages of the thoughts, normalized within each response's K thoughts."""


def toy_rl_train(cfg: Config, run: Run, resume: bool) -> None:
    from btpo_cli.judging.logprobs import ScorePath, score_thoughts, thought_sequence
    from btpo_cli.losses import clipped_surrogate, group_advantages
    from btpo_cli.training.rollouts import Rollout, RolloutPlan, run_rollouts, sample_and_score

    sess = TrainSession.begin(cfg, run, resume, padding_side="left")
    judge = btpo_method.GPMTokens.from_tokenizer(sess.tok)
    records = sess.load_split()
    pairs, enc_stats = btpo_method.encode_pairs(judge, records, cfg.data.max_length)
    plan = RolloutPlan.from_config(len(pairs), cfg, sess.world)
    sess.build("causal", plan.total_steps)
    sess.log_data(len(pairs), enc_stats)
    engine = sess.rollout_engine()
    k, ids = cfg.rollout.n, (judge.yes_id, judge.no_id, judge.pad_id)

    def rollout(local: list[int], r_idx: int, timer: Any) -> tuple[Rollout, dict[str, float]]:
        prompts = [p for i in local for p in pairs[i][1:]]                               # (2b,)
        seeds = btpo_method.rollout_seeds(cfg.train.seed, r_idx, [pairs[i][0] for i in local])
        sc = sample_and_score(sess.model, None, engine, [p.prefix for p in prompts], cfg, judge.eot_id, timer,
                              seeds, lambda i, s: thought_sequence(prompts[i], s, judge.eot_id), ids, False,
                              cfg.train.micro_batch_size * 2 * k)
        reward = -(sc.seqs.n_thought.float() - cfg.toy_rl.target_len).abs()             # (2b·K,)
        adv = group_advantages(reward.view(-1, k)).reshape(-1)
        return Rollout(sc.seqs, sc.old_logp, None, ToyPayload(adv)), {"reward": float(reward.sum()),
                                                                        "n": float(reward.numel())}

    def loss(ro: Rollout, unit_ids: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert isinstance(ro.payload, ToyPayload)
        rows = torch.tensor([u * 2 * k + j for u in unit_ids for j in range(2 * k)])
        sc = score_thoughts(sess.model, ro.seqs.select(rows), *ids, False, cfg.rollout.temperature,
                            ScorePath.of(cfg.train))
        old = ro.old_logp[rows, :sc.logp.shape[1]].to(sess.device)
        adv = ro.payload.advantages[rows].to(sess.device)
        seq_loss, st = clipped_surrogate(sc.logp, old, adv, sc.mask, 0.2, 0.2, "token-mean")
        mean = seq_loss.view(len(unit_ids), 2 * k).mean(-1).mean()
        return mean, {"loss": mean.detach(), "clip_fraction": st["clip_fraction"]}

    aspect = records[0].aspect
    sess.meta = describe(cfg, records, templates=btpo_method.templates(sess.tok, aspect),
                         token_ids={"yes": judge.yes_id, "no": judge.no_id, "end_of_turn": judge.eot_id,
                                    "pad": judge.pad_id})
    run_rollouts(sess, engine=engine, plan=plan, prefix="toy_rl", title="toy-rl", rollout=rollout,
                 rollout_metrics=lambda rs: {"toy_rl/reward_mean": rs["reward"] / rs["n"]}, loss=loss,
                 bar_info=lambda m: f"loss {m['train/loss']:.3f}")
    engine.close()
    sess.finish(sess.meta)


def toy_rl_evaluate(cfg: Config, model_dir: str, records: list[Any], device: Any, progress: Any = None,
                    artifacts: Path | None = None) -> list[Any]:
    """BTPO's judge (a greedy thought, then p(Yes)), renormalized over {Yes, No} with ``toy_rl.eval_normalize``."""
    cfg = copy.deepcopy(cfg)
    cfg.btpo.yes_no_normalize = cfg.toy_rl.eval_normalize
    return btpo_method.evaluate(cfg, model_dir, records, device, progress, artifacts)


def toy_rl_summary(cfg: Config, results: list[Any]) -> dict[str, Any]:
    tokens = [r.detail["thought_tokens"] for r in results if "thought_tokens" in r.detail]
    return {"toy_rl": {"target_len": cfg.toy_rl.target_len, "pairs_with_thoughts": len(tokens)}}


register_section("toy_rl", ToyRLConfig)
register_method(MethodSpec(
    name="toy-rl", help="Toy: a thinking judge rewarded for thoughts of toy_rl.target_len tokens (registry test).",
    train=toy_rl_train, evaluate=toy_rl_evaluate, protocol="pointwise", model_class="AutoModelForCausalLM",
    config_section="toy_rl", generative=True, order=60, judge=btpo_method.BTPOJudge, rollouts=True,
    plan_geometry=btpo_method.plan_geometry,
    plan_inputs=lambda cfg: {"beta": 0.0, "gen_tokens": cfg.rollout.max_new_tokens},
    eval_settings=lambda cfg, meta: {"toy_eval_normalize": bool(cfg.toy_rl.eval_normalize)},
    eval_summary=toy_rl_summary, curves=(("toy_rl/reward_mean", "toy-rl thought-length reward"),),
    card=lambda meta: Card("a toy thinking judge trained for thoughts of a target length.")))

TOY_RL = ["--set", "rollout.batch_size=2", "--set", "train.batch_size=2", "--set", "train.micro_batch_size=2",
          "--set", "rollout.n=2", "--set", "rollout.max_new_tokens=6", "--set", "data.max_length=128",
          "--set", "optim.warmup_ratio=0", "--set", "toy_rl.target_len=3"]


def test_a_rollout_based_method_registered_in_a_test_file_trains_evaluates_plans_compares_and_plots(
        tmp_path: Path, synthetic_data: Path) -> None:
    from btpo_cli.compare import build_table, collect, plot, plot_panels, to_json

    env = {"BTPO_PLUGINS": "tests.methods.test_registry"}
    out = tmp_path / "toy-rl"
    run_btpo("train", "--method", "toy-rl", "--model", "tiny-qwen2", "--data", str(synthetic_data), "--out",
             str(out), "--max-steps", "2", *TOY_RL, env=env)
    steps = [r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and [r["train/rollout"] for r in steps] == [1, 2]
    # its own curve (one per rollout, with the first step after it) and its loss's stats under its prefix
    assert all(-6 <= r["toy_rl/reward_mean"] <= 0 for r in steps) and "toy_rl/clip_fraction" in steps[0]
    meta = json.loads((out / "final" / "btpo.json").read_text())
    assert meta["method"] == "toy-rl" and meta["settings"]["toy_rl"]["target_len"] == 3
    run_btpo("eval", "--checkpoint", str(out), "--limit", "6", env=env)
    summary = json.loads((out / "eval" / "synthetic.json").read_text())
    assert summary["method"] == "toy-rl" and summary["n"] == 6
    assert summary["eval_settings"]["toy_eval_normalize"] is False and summary["eval_settings"]["engine"] == "hf"
    assert summary["toy_rl"] == {"target_len": 3, "pairs_with_thoughts": 6}     # its eval_summary entry
    # a second run of the same row whose eval ran with the other value of its own setting
    other = tmp_path / "toy-rl-b"
    shutil.copytree(out, other)
    ev = json.loads((other / "eval" / "synthetic.json").read_text())
    ev["eval_settings"]["toy_eval_normalize"] = True
    (other / "eval" / "synthetic.json").write_text(json.dumps(ev))
    table = build_table(collect([out, other]))
    assert [(r.method, [x.name for x in r.runs]) for r in table.rows] == [("toy-rl", ["toy-rl", "toy-rl-b"])]
    assert table.rows[0].settings_differ == ["toy_eval_normalize"]
    assert any("eval setting 'toy_eval_normalize' differs" in w for w in table.warnings), table.warnings
    assert json.loads(to_json(table))["rows"][0]["cells"]["synthetic"]["n_runs"] == 2
    assert [k for k, _ in plot_panels(table)] == ["train/loss", "toy_rl/reward_mean"]
    assert plot(table, tmp_path / "cmp.png").stat().st_size > 0
    plan = json.loads(run_btpo("plan", "--method", "toy-rl", "--model", "qwen2.5-7b", "--gpus", "1",
                               "--strategy", "ddp", "--format", "json", env=env).stdout)
    assert plan["inputs"]["method"] == "toy-rl" and plan["geometry"]["rows_per_pair"] == 2 * RolloutConfig().n
    assert plan["strategies"]["ddp"]["peak"] > 0


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
