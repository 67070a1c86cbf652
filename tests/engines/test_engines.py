"""The rollout-engine contract (``btpo_cli/engines/base.py``), checked for every registered engine.

One module, parametrized over ``available_engines()`` × the tiny models: an engine joins by being
registered (marks for engines that need extra packages are in ``ENGINE_MARKS``). Every check is
against transformers itself, fp32, without a KV cache: the engine must decode what the weights say.

- greedy equals a cache-free argmax decode (a divergence is allowed only at a numerical tie);
- seeded sampling: reproducible, independent of batch composition and of ``n``; ``params.seed``
  means ``request_seed(seed, i)``; different seeds give different samples;
- ``n`` samples per prompt; stop tokens end a sample and are kept (``finished``); ``max_new_tokens``;
- log-probs equal the trainer's (log-softmax at the sampling temperature) when asked;
- ``update_weights``: after a sync the engine decodes the new model; a bad name is a clear error.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from btpo_cli.engines import (
    EngineSpec,
    RolloutEngine,
    SamplingParams,
    available_engines,
    build_engine,
    request_seed,
)
from btpo_cli.models.tiny import ensure_tiny

ENGINE_MARKS: dict[str, list[Any]] = {"vllm": [pytest.mark.vllm]}
MODELS = ["tiny-qwen2", "tiny-llama"]
TIE = 1e-4
"""Greedy may follow the other branch only where the reference's top-2 logits are this close."""
LOGPROB_ATOL = 1e-4

MESSAGES = [
    [{"role": "user", "content": "What is 37 + 48? Let's think step by step."}],
    [{"role": "user", "content": "Is the response helpful?"},
     {"role": "assistant", "content": "Yes, the response is clear and correct."},
     {"role": "user", "content": "Evaluate your previous response for helpful and harmless."}],
    [{"role": "user", "content": "Hi"}],
]


@dataclass
class Ctx:
    engine: Any
    ref: Any
    """transformers model, fp32, the weights the engine was built from"""
    prompts: list[list[int]]
    folder: str


def _params() -> list[Any]:
    return [pytest.param((e, m), marks=ENGINE_MARKS.get(e, []), id=f"{e}-{m}")
            for e in available_engines() for m in MODELS]


@pytest.fixture(scope="module", params=_params())
def ctx(request: pytest.FixtureRequest) -> Iterator[Ctx]:
    engine_name, model = request.param
    folder = ensure_tiny(model)
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
               for m in MESSAGES]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engine = build_engine(engine_name, EngineSpec(model_path=str(folder), pad_token_id=tok.pad_token_id,
                                                  max_model_len=512, max_num_seqs=32, seed=0))
    yield Ctx(engine, ref, prompts, str(folder))
    engine.close()


# ----------------------------------------------------------------------------- references


@torch.no_grad()
def argmax_decode(model: Any, prompt: Sequence[int], steps: int, stop: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """Greedy continuation by full forwards (no cache) and the top-1 − top-2 logit margin per step."""
    seq, out, margins = list(prompt), [], []
    for _ in range(steps):
        logits = model(torch.tensor([seq])).logits[0, -1].float()
        top = logits.topk(2)
        margins.append(float(top.values[0] - top.values[1]))
        t = int(top.indices[0])
        out.append(t)
        seq.append(t)
        if t in stop:
            break
    return out, margins


def assert_greedy(model: Any, prompt: Sequence[int], got: Sequence[int], steps: int, stop: Sequence[int] = ()) -> None:
    want, margins = argmax_decode(model, prompt, steps, stop)
    if list(got) == want:
        return
    k = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    assert k < len(margins) and margins[k] < TIE, (
        f"greedy diverges from the argmax decode at step {k} (margin {margins[k] if k < len(margins) else None}):\n"
        f"engine {list(got)}\nref    {want}")


@torch.no_grad()
def trainer_logprobs(model: Any, prompt: Sequence[int], tokens: Sequence[int], temperature: float) -> list[float]:
    """log-softmax(logits / T) of each token of ``tokens`` after ``prompt``: what the trainer recomputes."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    logits = model(ids).logits[0, len(prompt) - 1:-1].float() / (temperature or 1.0)
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1).tolist()


def perturbed(model: Any, seed: int = 1, scale: float = 0.05) -> Any:
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def checkpoint_weights(model: Any) -> list[tuple[str, torch.Tensor]]:
    """What a trainer sends: every parameter once, by its Hugging Face name (tied ones once)."""
    return list(model.named_parameters())


# ----------------------------------------------------------------------------- greedy


def test_greedy_equals_argmax_decode(ctx: Ctx) -> None:
    res = ctx.engine.generate(ctx.prompts, 2, SamplingParams(temperature=0, max_new_tokens=12))
    assert [len(g) for g in res] == [2] * len(ctx.prompts)
    for p, group in zip(ctx.prompts, res, strict=True):
        assert group[0] == group[1]
        assert len(group[0].token_ids) == 12 and not group[0].finished
        assert_greedy(ctx.ref, p, group[0].token_ids, 12)


def test_greedy_stops_on_stop_token(ctx: Ctx) -> None:
    for p in ctx.prompts:
        want, _ = argmax_decode(ctx.ref, p, 8)
        k = max(i for i in range(4) if want[i] not in want[:i])      # a token first produced at step k
        stop = [want[k]]
        got = ctx.engine.generate([p], 1, SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=stop))[0][0]
        assert got.token_ids == want[:k + 1] and got.finished, (got, want, k)


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_reproducible_and_batch_independent(ctx: Ctx) -> None:
    sp = SamplingParams(temperature=1.0, max_new_tokens=10)
    seeds = [request_seed(0, 0, i) for i in range(len(ctx.prompts))]
    a = ctx.engine.generate(ctx.prompts, 3, sp, seeds)
    b = ctx.engine.generate(ctx.prompts, 3, sp, seeds)
    assert a == b
    alone = ctx.engine.generate([ctx.prompts[1]], 3, sp, [seeds[1]])
    assert alone[0] == a[1]                                            # batch composition
    reordered = ctx.engine.generate(ctx.prompts[::-1], 3, sp, seeds[::-1])
    assert reordered[::-1] == a
    one = ctx.engine.generate([ctx.prompts[0]], 1, sp, [seeds[0]])
    assert one[0][0] == a[0][0]                                        # sample j does not depend on n
    other = ctx.engine.generate(ctx.prompts, 3, sp, [s + 1 for s in seeds])
    assert other != a
    by_base = ctx.engine.generate(ctx.prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=10, seed=7))
    assert by_base == ctx.engine.generate(ctx.prompts, 3, sp, [request_seed(7, i) for i in range(len(ctx.prompts))])


def test_n_samples_differ_and_run_to_max_new_tokens(ctx: Ctx) -> None:
    res = ctx.engine.generate(ctx.prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=9), [11, 12, 13])
    for group in res:
        assert len(group) == 4
        assert all(len(s.token_ids) == 9 and not s.finished for s in group)
        assert len({tuple(s.token_ids) for s in group}) > 1


def test_sampled_stop_tokens(ctx: Ctx) -> None:
    vocab = ctx.ref.config.vocab_size
    stop = list(range(0, vocab, 7))                      # 1 token in 7 stops: most samples end early
    res = ctx.engine.generate(ctx.prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=16,
                                                             stop_token_ids=stop), [21, 22, 23])
    stop_set, n_finished = set(stop), 0
    for group in res:
        for s in group:
            assert not stop_set & set(s.token_ids[:-1])                # nothing after a stop token
            if s.finished:
                n_finished += 1
                assert s.token_ids[-1] in stop_set
            else:
                assert len(s.token_ids) == 16 and s.token_ids[-1] not in stop_set
    assert n_finished > 0


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_logprobs_match_trainer(ctx: Ctx, temperature: float) -> None:
    sp = SamplingParams(temperature=temperature, max_new_tokens=8, logprobs=True)
    res = ctx.engine.generate(ctx.prompts, 2, sp, [31, 32, 33])
    worst = 0.0
    for p, group in zip(ctx.prompts, res, strict=True):
        for s in group:
            assert s.logprobs is not None and len(s.logprobs) == len(s.token_ids)
            want = trainer_logprobs(ctx.ref, p, s.token_ids, temperature)
            worst = max(worst, max(abs(a - b) for a, b in zip(s.logprobs, want, strict=True)))
    assert worst < LOGPROB_ATOL, worst
    assert ctx.engine.generate(ctx.prompts[:1], 1, SamplingParams(temperature=temperature, max_new_tokens=4),
                               [31])[0][0].logprobs is None


# ----------------------------------------------------------------------------- weights


def test_update_weights_changes_output_to_the_new_model(ctx: Ctx) -> None:
    sp = SamplingParams(temperature=0, max_new_tokens=10)
    before = ctx.engine.generate(ctx.prompts, 1, sp)
    new = perturbed(ctx.ref)
    ctx.engine.update_weights(checkpoint_weights(new))
    after = ctx.engine.generate(ctx.prompts, 1, sp)
    assert after != before                                   # the perturbation changes the decode
    for p, group in zip(ctx.prompts, after, strict=True):
        assert_greedy(new, p, group[0].token_ids, 10)
    sampled = ctx.engine.generate(ctx.prompts, 2, SamplingParams(temperature=0.8, max_new_tokens=6, logprobs=True), [1, 2, 3])
    for p, group in zip(ctx.prompts, sampled, strict=True):
        for s in group:
            want = trainer_logprobs(new, p, s.token_ids, 0.8)
            assert max(abs(a - b) for a, b in zip(s.logprobs, want, strict=True)) < LOGPROB_ATOL
    ctx.engine.update_weights(checkpoint_weights(ctx.ref))   # and back
    assert ctx.engine.generate(ctx.prompts, 1, sp) == before
    assert ctx.engine.stats()["weight_syncs"] >= 2


def test_update_weights_bad_name_is_a_clear_error(ctx: Ctx) -> None:
    sp = SamplingParams(temperature=0, max_new_tokens=6)
    before = ctx.engine.generate(ctx.prompts, 1, sp)
    weights = checkpoint_weights(perturbed(ctx.ref, seed=3))
    with pytest.raises(KeyError, match="model.layers.0.not_a_weight"):
        ctx.engine.update_weights([*weights, ("model.layers.0.not_a_weight", torch.zeros(3))])
    assert ctx.engine.generate(ctx.prompts, 1, sp) == before          # still alive


def test_stats_count_tokens(ctx: Ctx) -> None:
    s0 = ctx.engine.stats()
    ctx.engine.generate(ctx.prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=5), [1, 2, 3])
    s1 = ctx.engine.stats()
    assert s1["generated_tokens"] - s0["generated_tokens"] == len(ctx.prompts) * 2 * 5
    assert s1["prompt_tokens"] > s0["prompt_tokens"]


def test_engine_shares_only_the_module_it_was_built_on(ctx: Ctx) -> None:
    """The trainer's sync path comes from the contract (``shares_module``): built from a folder, an engine
    holds its own weights (a sync copies them in); the ``hf`` engine built on a module shares its tensors."""
    assert isinstance(ctx.engine, RolloutEngine)
    assert ctx.engine.shares_module(ctx.ref) is False
    if ctx.engine.name == "hf":
        shared = build_engine("hf", EngineSpec(model_path=ctx.folder, pad_token_id=0, module=ctx.ref))
        assert shared.shares_module(ctx.ref) is True and shared.shares_module(perturbed(ctx.ref)) is False
