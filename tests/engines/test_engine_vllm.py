"""What only the vLLM engine has to get right (the shared contract is tests/engines/test_engines.py).

Lifecycle (close, rebuild in the same process), the prefix cache after a weight sync, updates that
are refused before vLLM sees them (vLLM cannot undo a half-done reload), the process-wide state
vLLM touches (RNG, torch.set_num_threads), and two processes under ``accelerate launch``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from btpo_cli.engines import EngineSpec, SamplingParams, build_engine
from btpo_cli.errors import BtpoError
from btpo_cli.models.tiny import ensure_tiny
from tests.conftest import REPO
from tests.engines.test_engines import assert_greedy, checkpoint_weights, perturbed

pytestmark = pytest.mark.vllm

GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


def _spec(folder: Path, **kw: Any) -> EngineSpec:
    return EngineSpec(model_path=str(folder), pad_token_id=0, max_model_len=512, max_num_seqs=16, **kw)


@pytest.fixture(scope="module")
def folder() -> Path:
    return ensure_tiny("tiny-qwen2")


@pytest.fixture(scope="module")
def ref(folder: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(folder: Path) -> Iterator[Any]:
    eng = build_engine("vllm", _spec(folder))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1, 1400) for _ in range(n)] for n in (300, 40, 7)]   # 300 > 2 KV blocks of 128


def test_prefix_cache_shared_then_dropped_after_a_weight_sync(engine: Any, ref: Any, prompts: list[list[int]]) -> None:
    long = prompts[0]
    s0 = engine.stats()["prefix_cached_tokens"]
    engine.generate([long], 4, SamplingParams(temperature=1.0, max_new_tokens=4), [7])
    s1 = engine.stats()["prefix_cached_tokens"]
    assert s1 - s0 >= 3 * 256                       # samples 2..4 reuse the prompt's two full blocks
    new = perturbed(ref, seed=9)
    engine.update_weights(checkpoint_weights(new))
    got = engine.generate([long], 1, GREEDY)[0][0]
    assert engine.stats()["prefix_cached_tokens"] == s1   # nothing computed with the old weights is reused
    assert_greedy(new, long, got.token_ids, 8)
    engine.update_weights(checkpoint_weights(ref))
    assert_greedy(ref, long, engine.generate([long], 1, GREEDY)[0][0].token_ids, 8)


@pytest.mark.parametrize("case", ["unknown", "shape", "missing"])
def test_refused_update_leaves_the_engine_working(engine: Any, ref: Any, prompts: list[list[int]], case: str) -> None:
    before = engine.generate(prompts, 1, GREEDY)
    weights = checkpoint_weights(perturbed(ref, seed=4))
    if case == "unknown":
        bad, err, match = [*weights, ("model.norm.bias", torch.zeros(64))], KeyError, "model.norm.bias"
    elif case == "shape":
        bad, err, match = [(n, t[:-1] if n == "model.norm.weight" else t) for n, t in weights], ValueError, "shape"
    else:
        bad, err, match = weights[:-3], ValueError, "missing"
    with pytest.raises(err, match=match):
        engine.update_weights(bad)
    assert engine.generate(prompts, 1, GREEDY) == before


def test_seeded_batch_larger_than_one_step(engine: Any, ref: Any) -> None:
    """More prompt tokens than one scheduler step takes (with chunked prefill this crashed vLLM's
    CPU build: a seeded request split across steps rewinds a CPU generator's offset)."""
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 1400) for _ in range(450)] for _ in range(12)]     # 12·450·2 > 4096
    sp = SamplingParams(temperature=1.0, max_new_tokens=4, logprobs=True)
    res = engine.generate(prompts, 2, sp, list(range(12)))
    assert [len(s.token_ids) for g in res for s in g] == [4] * 24
    assert engine.generate(prompts[5:6], 2, sp, [5])[0] == res[5]


def test_prompt_longer_than_max_model_len_is_a_clear_error(engine: Any) -> None:
    with pytest.raises(BtpoError, match="max_model_len 512"):
        engine.generate([[5] * 510], 1, GREEDY)


def test_sleep_wake_is_a_noop_on_cpu(engine: Any, prompts: list[list[int]]) -> None:
    before = engine.generate(prompts, 1, GREEDY)
    engine.sleep()
    engine.wake()
    assert engine.generate(prompts, 1, GREEDY) == before


def test_leaves_process_state_alone(engine: Any, prompts: list[list[int]]) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=6), [1, 2, 3])
    assert torch.equal(torch.rand(3), expected)      # vLLM's per-step draws did not move the global RNG
    n = torch.get_num_threads()
    torch.set_num_threads(1)                         # vLLM's CPU worker replaces this with a no-op; undone
    assert torch.get_num_threads() == 1
    torch.set_num_threads(n)


def test_head_dim_vllm_cpu_cannot_run_is_a_clear_error(tmp_path: Path, folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_attention_heads"], cfg["num_key_value_heads"] = 4, 2      # head dim 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BtpoError, match="head dim 16"):
        build_engine("vllm", _spec(tmp_path))


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(tmp_path: Path, folder: Path, engine: Any,
                                               prompts: list[list[int]]) -> None:
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        str(REPO / "tests" / "engines" / "vllm_two_procs.py"), str(folder), str(tmp_path), str(tmp_path / "prompts.json")],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(i for r in ranks for i in r["mine"]) == list(range(len(prompts)))
    sp = SamplingParams(temperature=1.0, max_new_tokens=8)
    want = engine.generate(prompts, 2, sp, [1000 + i for i in range(len(prompts))])   # one process, all prompts
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for q in ref.parameters():
            q.add_(torch.randn(q.shape, generator=g) * 0.05)
    for r in ranks:
        assert r["world"] == 2 and r["external_launcher"] and r["allreduce"] == 3.0
        for k, i in enumerate(r["mine"]):
            assert r["sampled"][k] == [s.token_ids for s in want[i]]   # same samples as one process
            assert r["again"][k] == r["sampled"][k]
            assert_greedy(ref, prompts[i], r["greedy"][k], 8)


def test_one_engine_per_process_then_close_and_build_another(folder: Path, engine: Any,
                                                              prompts: list[list[int]]) -> None:
    """Last in the module: it closes the module's engine."""
    with pytest.raises(BtpoError, match="already running"):
        build_engine("vllm", _spec(folder))
    sp = SamplingParams(temperature=1.0, max_new_tokens=6)
    first = engine.generate(prompts, 2, sp, [4, 5, 6])
    engine.close()
    engine.close()                                   # idempotent
    with pytest.raises(BtpoError, match="closed"):
        engine.generate(prompts, 1, GREEDY)
    assert not torch.distributed.is_initialized()    # the group vLLM made for its single process is gone
    b = build_engine("vllm", _spec(folder))
    assert b.generate(prompts, 2, sp, [4, 5, 6]) == first
    b.close()
