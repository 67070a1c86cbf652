"""Sharded training and evaluation on CPU (gloo): 2 processes under FSDP2 equal 1 process.

Launched exactly as a user would, with the shipped ``recipes/accelerate/fsdp2.yaml`` and
``--num_processes 2`` (accelerate runs FSDP only on accelerators; btpo takes its FSDP2 path over
gloo on a CPU-only machine: ``sharding.make_fsdp_on_cpu``).

The runs agree within the bounds of tests/invariants/tolerances.py (reduce order before the first
step, Adam's bound after). Each launched process runs ``OMP_NUM_THREADS`` threads (1 unless set);
the 1-process run inherits the variable too (unset: torch's default, the number of cores).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, TINY_BT, run_btpo
from tests.invariants.tolerances import assert_rows_close, assert_weights_close

BTPO_SMALL = ["--set", "rollout.batch_size=4", "--set", "train.batch_size=2", "--set", "train.micro_batch_size=1",
              "--set", "rollout.n=2", "--set", "rollout.max_new_tokens=8", "--set", "data.max_length=128",
              "--set", "optim.lr=1e-3", "--set", "optim.warmup_ratio=0", "--set", "btpo.beta=0.05"]
BTPO_TOKENS = 2 * 2 * 2 * 128
"""Terms summed into a BTPO step's loss, at most: 2 pairs × 2 responses × 2 thoughts × data.max_length."""


def launch(*args: str, config: str | None = "fsdp2", env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch [--config_file recipes/accelerate/<config>.yaml] --num_processes 2 -m btpo_cli …``."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))   # keep extra site dirs
    e = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
         "COLUMNS": "200", **(env or {})}
    cfg = ["--config_file", str(REPO / "recipes" / "accelerate" / f"{config}.yaml")] if config else ["--multi_gpu"]
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *cfg, "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "btpo_cli", *args], capture_output=True, text=True, env=e, cwd=REPO, timeout=900)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def rows(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in x]


def weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "final" / "model.safetensors"))


def assert_same_run(one: Path, two: Path, steps: int, keys: tuple[str, ...], tokens: int) -> None:
    """Same steps, learning rates, metric rows and weights (tolerances.py: rows at float32's reduce-order
    bound over ``tokens`` terms, + RHO relative after the first update; weights within Adam's bound
    2·Σ lr_t·c_t, all but NOISY_FRACTION of them within RHO of it)."""
    r1, r2 = rows(one), rows(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == list(range(1, steps + 1))
    assert [r["train/lr"] for r in r1] == [r["train/lr"] for r in r2]
    w1, w2 = weights(one), weights(two)
    n_params = sum(w.numel() for w in w1.values())
    row_diff = assert_rows_close(r1, r2, keys, {"*": tokens, "train/grad_norm": max(tokens, n_params)})
    optim = yaml.safe_load((one / "config.yaml").read_text())["optim"]
    w = assert_weights_close(w1, w2, [r["train/lr"] for r in r1], optim["beta1"], optim["beta2"])
    print(f"\nrows: largest |Δ| {row_diff}\nweights: largest |Δ| {w['max']:.3g} at {w['max_at']}; "
          f"{w['over_tight']} of {w['n']} over RHO·B = {w['tight']:.3g}; Adam's bound B = {w['bound']:.3g}")


@pytest.mark.slow
def test_fsdp2_bt_two_processes_equal_one_and_resume(tmp_path: Path, synthetic_data: Path) -> None:
    """bt: 1 process vs 2 FSDP2 processes killed after step 3 and resumed from the sharded checkpoint."""
    common = ["train", "--method", "bt", "--data", str(synthetic_data), "--max-steps", "4",
              "--set", "train.save_every=2", *TINY_BT]
    one, two = tmp_path / "one", tmp_path / "two"
    run_btpo(*common, "--out", str(one))
    p = launch(*common, "--out", str(two), env={"BTPO_FAULT_AT_STEP": "3"}, check=False)
    assert p.returncode != 0 and not (two / "final").exists()
    launch(*common, "--out", str(two), "--resume")
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    assert (two / "checkpoints").exists() and any((two / "checkpoints").glob("*/pytorch_model_fsdp_0"))
    assert_same_run(one, two, 4, ("train/accuracy", "train/reward_margin", "train/grad_norm"), 8 * 2 * 1024)
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(str(two / "final"))   # plain transformers
    assert m.score.weight.shape[0] == 1


@pytest.mark.slow
def test_fsdp2_btpo_two_processes_equal_one(tmp_path: Path, synthetic_data: Path) -> None:
    """btpo (β > 0: reference model, KL): rollouts through the gathered FSDP2 module, 2 rollouts × 2 steps."""
    common = ["train", "--method", "btpo", "--data", str(synthetic_data), "--max-steps", "4", *BTPO_SMALL]
    one, two = tmp_path / "one", tmp_path / "two"
    run_btpo(*common, "--out", str(one))
    launch(*common, "--out", str(two))
    assert_same_run(one, two, 4, ("btpo/kl", "btpo/omega_mean", "btpo/thought_len", "train/grad_norm"),
                    BTPO_TOKENS)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(two / "final"))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["shared_prefix", "packing"])
def test_fsdp2_btpo_scoring_path_chunked_two_processes_equal_one(tmp_path: Path, synthetic_data: Path,
                                                                path: str) -> None:
    """train.shared_prefix=on (or train.packing=on: each prompt once with its K thoughts in packed rows)
    + train.chunked_logprobs=on under FSDP2 on 2 CPU processes equals 1 process: the LM head weight is
    read after the root unit's forward (unsharded then) and its gradient reduce-scattered like the others."""
    common = ["train", "--method", "btpo", "--data", str(synthetic_data), "--max-steps", "2", *BTPO_SMALL,
              "--set", f"train.{path}=on", "--set", "train.chunked_logprobs=on"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_btpo(*common, "--out", str(one))
    launch(*common, "--out", str(two))
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    assert_same_run(one, two, 2, ("btpo/kl", "btpo/thought_len", "train/grad_norm"), BTPO_TOKENS)


@pytest.mark.slow
def test_two_process_eval_equals_one(tmp_path: Path, synthetic_data: Path) -> None:
    """`accelerate launch … -m btpo_cli eval` writes the same JSON and predictions as one process,
    for a pointwise (bt) and a pairwise (gram) method."""
    for method in ("bt", "gram"):
        run = tmp_path / method
        run_btpo("train", "--method", method, "--data", str(synthetic_data), "--max-steps", "2", *TINY_BT,
                 "--set", "eval.batch_size=5", "--out", str(run))
        # one intra-op thread like each launched process: the thread count changes how matmuls sum
        run_btpo("eval", "--checkpoint", str(run), "--limit", "23", env={"OMP_NUM_THREADS": "1"})
        ev = run / "eval"
        one = {f.name: f.read_text() for f in ev.iterdir()}
        for f in ev.iterdir():
            f.unlink()
        launch("eval", "--checkpoint", str(run), "--limit", "23", config=None)
        two = {f.name: f.read_text() for f in ev.iterdir()}
        assert sorted(one) == sorted(two)
        assert json.loads(one["synthetic.json"])["n"] == 23
        for name in one:
            assert _without_eval_time(one[name]) == _without_eval_time(two[name]), (method, name)


def _without_eval_time(text: str) -> str:
    """An eval file with the one field that must differ between two evaluations blanked: the summary's
    ``provenance.evaluated_at`` (when it ran); everything else is compared as written."""
    return re.sub(r'"evaluated_at": "[^"]*"', '"evaluated_at": "…"', text)


DS_SPECS = ["deepspeed==0.19.8", "hjson", "msgpack", "ninja", "py-cpuinfo", "einops", "nvidia-ml-py"]
"""DeepSpeed and its small dependencies, without torch (the venv's is used): installed for these tests
only, because an installed deepspeed logs to stdout from any process that imports it."""


@pytest.fixture(scope="session")
def ds_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with DeepSpeed for PYTHONPATH: ``pip install --no-deps --target`` once per session (it
    builds from its sdist in seconds without CUDA), or ``BTPO_DS_SITE`` if set."""
    if os.environ.get("BTPO_DS_SITE"):
        return Path(os.environ["BTPO_DS_SITE"])
    root = tmp_path_factory.mktemp("ds_site")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                        "--target", str(root), *DS_SPECS], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"could not install DeepSpeed for this test (needs PyPI or BTPO_DS_SITE):\n{p.stderr[-3000:]}"
    return root


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_steps_once_per_global_batch(tmp_path: Path, synthetic_data: Path, config: str,
                                               ds_site: Path) -> None:
    """Real DeepSpeed (its CPU accelerator, gloo) under the shipped ZeRO configs, 2 processes × 2
    micro-batches per global batch, equals 1 plain process × 4 micro-batches at every step and in
    final/. Had the engine stepped per micro-batch (its own accumulation count, or none), AdamW at
    lr 1e-3 would have taken 2× the steps and the losses and weights would differ."""
    common = ["train", "--method", "bt", "--data", str(synthetic_data), "--max-steps", "3",
              "--set", "train.batch_size=8", "--set", "train.micro_batch_size=2", "--set", "optim.lr=1e-3",
              "--set", "optim.warmup_ratio=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_btpo(*common, "--out", str(one))
    launch(*common, "--out", str(two), config=config, env={"PYTHONPATH": os.pathsep.join([str(REPO), str(ds_site)])})
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    # weights: ZeRO's gradient reduction sums in another order; AdamW turns that rounding into up to
    # ~2e-5 on elements whose gradient is near zero (k_proj biases; 2 / 12 of 168 576 over RHO·B with
    # ZeRO-2 / ZeRO-3 here, NOISY_FRACTION allows 168).
    # An extra or missing step would move nearly every element by ~lr = 1e-3 ≫ RHO·B.
    assert_same_run(one, two, 3, ("train/accuracy", "train/reward_margin", "train/grad_norm"), 8 * 2 * 1024)
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(str(two / "final"))   # plain transformers


def test_token_budget_micro_batches_give_the_per_pair_gradient() -> None:
    """``train.micro_batch_tokens`` groups pairs of different lengths into padded forwards; through
    ``steps.accumulate`` the gradient equals one pair per forward (``micro_batch_size: 1``)."""
    from accelerate import Accelerator

    from btpo_cli.config import build_config
    from btpo_cli.losses import bt_loss
    from btpo_cli.methods.bt import rewards
    from btpo_cli.models.loading import load_reward_model, load_tokenizer
    from btpo_cli.training import steps

    per_pair = build_config(overrides=["method=bt", "train.micro_batch_size=1"])
    budget = build_config(overrides=["method=bt", "train.micro_batch_tokens=160"])
    tok = load_tokenizer(per_pair.model.name)
    model = load_reward_model(per_pair.model, tok.pad_token_id)
    acc = Accelerator(cpu=True)
    g = torch.Generator().manual_seed(0)

    def seq() -> list[int]:
        n = int(torch.randint(6, 40, (1,), generator=g))
        return torch.randint(5, 1000, (n,), generator=g).tolist()

    pairs = [(seq(), seq()) for _ in range(10)]
    ids = list(range(len(pairs)))

    def loss_fn(batch: list[int]) -> tuple[torch.Tensor, dict]:
        r = rewards(model, [pairs[i][0] for i in batch] + [pairs[i][1] for i in batch], tok.pad_token_id, "cpu")
        mean = bt_loss(r[:len(batch)], r[len(batch):])
        return mean, {"loss": mean.detach()}

    def grads(micro: list[list[int]]) -> tuple[torch.Tensor, float]:
        model.zero_grad(set_to_none=True)
        sums = steps.accumulate(acc, model, micro, len(ids), loss_fn)
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]), sums["loss"]

    sizes = lambda i: [len(pairs[i][0]), len(pairs[i][1])]   # noqa: E731
    one = steps.micro_batches(ids, per_pair, sizes)
    by_tokens = steps.micro_batches(ids, budget, sizes)
    assert one == [[i] for i in ids]
    assert 1 < len(by_tokens) < len(ids) and sum(by_tokens, []) == ids
    assert any(len(m) > 1 for m in by_tokens)
    for m in by_tokens:   # rows × longest row within the budget, unless a unit alone is over it
        assert len(m) == 1 or 2 * len(m) * max(max(sizes(i)) for i in m) <= 160
    g1, l1 = grads(one)
    g2, l2 = grads(by_tokens)
    assert float(g1.abs().max()) > 0
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    assert l2 == pytest.approx(l1, rel=1e-5)
