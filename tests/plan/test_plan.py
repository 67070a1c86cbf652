"""``btpo plan`` (the memory planner) and the fit check of ``btpo recipes validate``.

The planner's numbers are checked against measured peak memory in ``bench/plan_memory.py``
(docs/experiments.md); ``test_planned_within_15_percent_of_measured`` runs one of those rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from btpo_cli.plan.estimate import GiB, PlanInputs, estimate, plan_all
from tests.conftest import REPO, run_btpo


def _qwen7b(**kw) -> PlanInputs:
    from btpo_cli.plan.shapes import model_shape

    return PlanInputs(method="bt", shape=model_shape("qwen2.5-7b"), **kw)


def test_model_state_formulas() -> None:
    """Weights/gradients/AdamW bytes per parameter and what each strategy shards (docs/plan.md)."""
    inp = _qwen7b(precision="amp", gpus=8, gpu_memory_gb=80)
    p = inp.shape.params("reward")
    assert 7.0e9 < p < 7.7e9
    e = {x.strategy: x for x in plan_all(inp)}
    assert e["ddp"].update["weights"] == 4 * p and e["ddp"].update["optimizer state"] == 8 * p
    assert e["fsdp2"].update["weights"] == pytest.approx(4 * p / 8)
    assert e["fsdp2"].update["optimizer state"] == pytest.approx(8 * p / 8)
    assert e["zero2"].update["weights"] == 2 * p                       # full bf16 weights, sharded rest
    assert e["zero2"].update["optimizer state"] == pytest.approx(12 * p / 8)
    assert e["zero3"].update["weights"] == pytest.approx(2 * p / 8)
    off = e["fsdp2-offload"]
    assert "weights" not in off.update or off.update["weights"] == 0
    assert off.host == pytest.approx(16 * p / 8)
    assert e["ddp"].verdict(80) == "no" and e["fsdp2"].verdict(80) == "fits"
    for x in e.values():
        assert x.peak == max(x.update_total, x.rollout_total)


def test_checkpointing_lora_and_reference() -> None:
    base = dict(precision="amp", gpus=8, prompt_tokens=2048, gen_tokens=1000, n=4, beta=0.05)
    from btpo_cli.plan.shapes import model_shape

    full = estimate(PlanInputs(method="btpo", shape=model_shape("qwen2.5-7b"), **base), "fsdp2")
    ckpt = estimate(PlanInputs(method="btpo", shape=model_shape("qwen2.5-7b"), gradient_checkpointing=True, **base),
                    "fsdp2")
    assert ckpt.info["activations_checkpointing"] < full.info["activations_no_checkpointing"] / 4
    assert ckpt.update_total < full.update_total
    assert full.update["reference model"] == pytest.approx(2 * full.info["params"])   # bf16 copy, per process
    lora = estimate(PlanInputs(method="btpo", shape=model_shape("qwen2.5-7b"), lora_r=16, **base), "ddp")
    assert "reference model" not in lora.update                    # adapter disabled, not a second copy
    assert lora.update["optimizer state"] < 0.01 * 8 * full.info["params"]


def test_plan_cli_text_and_json() -> None:
    args = ["plan", "--recipe", "btpo/qwen2.5-7b-hh", "--gpus", "8", "--gpu-memory", "80"]
    text = run_btpo(*args).stdout
    for row in ("weights", "gradients", "optimizer state", "activations", "logits (loss head)", "overhead",
                "update phase", "rollout phase", "peak", "fits 80 GiB:"):
        assert row in text, row
    assert "without gradient checkpointing" in text
    fits_line = next(x for x in text.splitlines() if x.startswith("fits 80 GiB:"))
    assert "fsdp2" in fits_line and "ddp" not in fits_line
    j = json.loads(run_btpo(*args, "--format", "json").stdout)
    assert j["unit"] == "GiB" and j["recipe_strategy"] == "fsdp2" and j["inputs"]["gpus"] == 8
    s = j["strategies"]
    assert sorted(s) == sorted(["ddp", "fsdp2", "fsdp2-offload", "zero2", "zero3"])
    assert s["ddp"]["verdict"] == "no" and s["fsdp2"]["verdict"] == "fits"
    for x in s.values():
        assert x["update_total"] == pytest.approx(sum(x["update"].values()), abs=0.01)
        assert x["peak"] == pytest.approx(max(x["update_total"], x["rollout_total"]), abs=1e-3)
        assert x["activations_no_checkpointing"] > x["activations_checkpointing"] > 0
    bad = run_btpo("plan", "--recipe", "btpo/qwen2.5-7b-hh", "--strategy", "zero9", check=False)
    assert bad.returncode != 0 and "--strategy" in bad.stderr and "Traceback" not in bad.stderr


def test_recipes_validate_flags_a_recipe_that_cannot_fit(tmp_path: Path) -> None:
    """The shipped 7B BTPO recipe on DDP (every GPU holds fp32 weights, gradients and AdamW state)."""
    text = (REPO / "recipes" / "btpo" / "qwen2.5-7b-hh.yaml").read_text()
    assert "strategy: fsdp2" in text
    bad = tmp_path / "ddp-7b.yaml"
    bad.write_text(text.replace("strategy: fsdp2", "strategy: ddp"))
    p = run_btpo("recipes", "validate", str(bad), str(REPO / "recipes" / "btpo" / "qwen2.5-7b-hh.yaml"), check=False)
    assert p.returncode == 1
    out = p.stdout + p.stderr
    assert "does not fit its hardware: ddp on 8×80 GiB" in out and "1 of 2 recipe(s)" in out
    assert "ok   " in out and "fsdp2 on 8×80 GiB" in out


def test_every_large_shipped_recipe_fits_its_hardware() -> None:
    from btpo_cli.config import shipped
    from btpo_cli.recipes import check_fit, validate_recipe

    large = [p for p in shipped() if any(s in p.name for s in ("-3b", "-7b", "-8b"))]
    assert len(large) >= 70
    for p in large:
        cfg = validate_recipe(p)
        assert cfg.hardware.gpus == 8 and cfg.hardware.gpu_memory_gb == 80, p
        fit = check_fit(cfg, p)
        assert fit.verdict in ("fits", "tight"), (p, fit)
        assert f"~{fit.peak_gib:.0f} GiB" in p.read_text(), p     # the header states the planner's estimate


@pytest.mark.slow
def test_planned_within_15_percent_of_measured(tmp_path: Path) -> None:
    """One row of bench/plan_memory.py: a real `bt` run of a random-init ~31 M-parameter Qwen2 shape,
    peak RSS of its training steps (fp32, CPU) against the planner's estimate."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import plan_memory

    rows = plan_memory.main(["--sizes", "30m", "--methods", "bt", "--workdir", str(tmp_path), "--quiet"])
    (row,) = rows
    assert row["measured"] > 0.3 * GiB
    assert 0.85 <= row["ratio"] <= 1.15, row
