"""A btpo judge as the reward of a real TRL ``GRPOTrainer``: two steps on tiny-qwen2.

TRL is not a dependency of btpo. The test installs ``trl==1.16.0`` (the version checked against
transformers 5.24 / torch 2.13; 1.13 needs ``requests`` and fails to import here) with
``pip install --no-deps --target`` into the test cache, once, and runs the trainer in a
subprocess with that folder on ``PYTHONPATH``. ``BTPO_TRL_SITE`` may point at such a folder
installed beforehand (a machine without PyPI access).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ONE_THREAD, REPO

TRL_SPEC = "trl==1.16.0"

SCRIPT = r"""
import json, sys
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from btpo_cli import load_judge
from btpo_cli.judging.judge import RewardFunction
from btpo_cli.models.aliases import resolve_model

judge_dir, data, out = sys.argv[1:4]


class Recording(RewardFunction):
    log = []

    def __call__(self, prompts, completions, **kwargs):
        rewards = super().__call__(prompts, completions, **kwargs)
        self.log.append({"rewards": rewards, "conversational": isinstance(prompts[0], list),
                         "completions": [c[-1]["content"] if isinstance(c, list) else c for c in completions]})
        return rewards


judge = load_judge(judge_dir, device="cpu", max_new_tokens=8)
reward = Recording(judge)
path = resolve_model("tiny-qwen2")
rows = [json.loads(x) for x in open(data, encoding="utf-8")][:8]
args = GRPOConfig(output_dir=out, max_steps=2, per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=8, learning_rate=1e-4, logging_steps=1, report_to="none", use_cpu=True,
                  save_strategy="no", bf16=False, seed=0, dataloader_num_workers=0)
trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=[reward], args=args,
                      train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in rows]),
                      processing_class=AutoTokenizer.from_pretrained(path))
trainer.train()
key = f"rewards/{reward.__name__}/mean"
print("RESULT " + json.dumps({"global_step": trainer.state.global_step, "calls": reward.log,
                              "logged": [h[key] for h in trainer.state.log_history if key in h]}))
"""


@pytest.fixture(scope="session")
def trl_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("BTPO_TRL_SITE")
    if given:
        return Path(given)
    root = Path(os.environ.get("BTPO_TEST_CACHE") or tmp_path_factory.mktemp("trl")) / "trl-1.16.0"
    if not (root / "trl" / "__init__.py").exists():
        p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                            "--target", str(root), TRL_SPEC], capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (f"could not install {TRL_SPEC} for this test (it needs PyPI, or BTPO_TRL_SITE set "
                                   f"to a folder made by `pip install --no-deps --target DIR {TRL_SPEC}`):\n"
                                   f"{p.stderr[-2000:]}")
    return root


@pytest.mark.slow
def test_grpo_trainer_runs_two_steps_with_a_btpo_judge_as_reward(trained_judge, trl_site: Path, synthetic_data: Path,
                                                                 tmp_path: Path) -> None:
    run = trained_judge("btpo")
    script = tmp_path / "grpo_with_btpo.py"
    script.write_text(SCRIPT)
    env = {**os.environ, **ONE_THREAD,
           "PYTHONPATH": os.pathsep.join([str(REPO), str(trl_site), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, str(script), str(run / "final"), str(synthetic_data / "train.jsonl"),
                        str(tmp_path / "grpo_out")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    print(f"\nGRPOTrainer + btpo judge: {res['global_step']} steps, rewards {[c['rewards'] for c in res['calls']]}, "
          f"logged means {res['logged']}")
    assert res["global_step"] == 2
    assert len(res["calls"]) == 2                                      # one reward call per step
    for call in res["calls"]:
        assert call["conversational"] and len(call["rewards"]) == 4    # 1 prompt × 4 generations per step
        assert all(0.0 < r < 1.0 for r in call["rewards"])             # p(Yes) after a thought
    # what TRL logged is what the judge returned
    assert res["logged"] == pytest.approx([sum(c["rewards"]) / 4 for c in res["calls"]], abs=1e-5)
    rewards = [r for c in res["calls"] for r in c["rewards"]]
    texts = [t for c in res["calls"] for t in c["completions"]]
    assert len(set(texts)) > 1 and len({round(r, 6) for r in rewards}) > 1   # different completions, different rewards
