"""examples/btpo_step.py, the one-file BTPO step, computes what the library computes.

The example and the library get the SAME thoughts (fixed token ids: sampling is out of the
comparison) about the same two pairs on tiny-qwen2. The library's side is the training path itself:
``encode_pairs`` → ``do_rollout`` (a stub engine hands it the fixed thoughts; ``sample_and_score``
builds the sequences and scores them) → ``micro_loss`` (``score_thoughts`` with grad, ``btpo_loss``
with the config's defaults). Between the rollout and the loss the weights move, so ρ ≠ 1 and the
clip is active on part of the tokens: a drifted clip range, advantage rule or aggregation shows.

The bound: the model runs in float64 and both sides compute the same sums in another order (one
forward per sequence vs a left-padded batch, ω̂ and p̄ in two log-space forms), so they agree to a
few float64 roundings; we allow a relative 1e-9 on the loss and, per parameter, 1e-9 of the largest
gradient element (measured: 7e-13 and 2e-13; float32 would need ~1e-5 and could hide the 1e-6 of
``adv_eps``). ``do_rollout``
keeps its buffers in float32, so the rollout's log-probs are re-read in float64 by the same
``score_thoughts`` and checked against the float32 buffers first.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from btpo_cli.config import RolloutConfig, build_config
from btpo_cli.data.synthetic import TaskSpec, make_pair
from btpo_cli.engines.base import Sample
from btpo_cli.judging import templates
from btpo_cli.judging.logprobs import ScorePath, score_thoughts
from btpo_cli.losses import btpo_loss
from btpo_cli.methods.btpo import BTPOConfig, BTPOPayload, GPMTokens, do_rollout, encode_pairs, micro_loss
from btpo_cli.models.loading import load_tokenizer
from btpo_cli.models.tiny import ensure_tiny
from btpo_cli.training.steps import StepTimer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "btpo_step.py"
REL = 1e-9
"""Allowed relative difference, float64 (see the module docstring)."""
pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny float64 models: one thread is faster here


def load_example():
    spec = importlib.util.spec_from_file_location("btpo_step_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ex():
    return load_example()


@pytest.fixture(scope="module")
def tiny() -> tuple:
    path = str(ensure_tiny("tiny-qwen2"))
    model = AutoModelForCausalLM.from_pretrained(path).double().eval()
    return load_tokenizer(path, padding_side="left"), model


class FixedEngine:
    """A rollout engine that "samples" the given thoughts: ``thoughts[i]`` for prompt ``i``."""

    def __init__(self, thoughts: list[list[list[int]]], eot_id: int) -> None:
        self.thoughts, self.eot_id = thoughts, eot_id

    def generate(self, prompts, n, params, seeds=None):
        assert len(prompts) == len(self.thoughts) and all(len(t) == n for t in self.thoughts)
        return [[Sample(z, finished=z[-1] == self.eot_id) for z in group] for group in self.thoughts]


def fixed_thoughts(n_prompts: int, k: int, eot_id: int, budget: int = 6) -> list[list[list[int]]]:
    """Seeded token ids: thoughts of 1..budget tokens, about half ending on EOT, one that is EOT alone."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_prompts):
        group = []
        for _ in range(k):
            n = int(torch.randint(1, budget + 1, (1,), generator=g))
            z = torch.randint(10, 1000, (n,), generator=g).tolist()
            if torch.rand((), generator=g) < 0.5:
                z[-1] = eot_id
            group.append(z)
        out.append(group)
    out[1][0] = [eot_id]
    return out


def flat_grads(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def test_example_defaults_and_prompts_are_the_librarys(ex, tiny) -> None:
    tok, _ = tiny
    lib = BTPOConfig()
    assert (lib.clip_eps_low, lib.clip_eps_high) == (ex.CLIP_EPS_LOW, ex.CLIP_EPS_HIGH)
    assert (RolloutConfig().n, RolloutConfig().temperature) == (ex.K, ex.TEMPERATURE)
    assert inspect.signature(btpo_loss).parameters["adv_eps"].default == ex.ADV_EPS
    assert templates.EVAL_INSTRUCTION == ex.EVAL_INSTRUCTION
    assert templates.RATING_QUESTION == ex.RATING_QUESTION
    # what the example leaves out must be off by default in the library (else it would have to show it)
    assert (lib.thought_advantage, lib.agg, lib.beta, lib.score_floor, lib.yes_no_normalize,
            lib.misalignment_weight, lib.schedule) == ("grpo", "token-mean", 0.0, 0.0, False, True, "joint")
    ids = GPMTokens.from_tokenizer(tok)
    assert ex.special_ids(tok) == (ids.yes_id, ids.eot_id)
    rec = make_pair(random.Random(0), 0, "train", TaskSpec())
    for text in (rec.chosen_text, rec.rejected_text):
        want = templates.encode_gpm(tok, rec.prompt, text, rec.aspect, 1024)
        assert ex.gpm_prompt(tok, rec.prompt, text, rec.aspect) == (want.prefix, want.suffix)


def test_example_loss_and_gradients_equal_the_library(ex, tiny) -> None:
    tok, model = tiny
    cfg = build_config(flags={"method": "btpo"})          # the library's defaults, as `btpo train` has them
    k, rng = cfg.rollout.n, random.Random(0)
    records = [make_pair(rng, i, "train", TaskSpec()) for i in range(2)]
    judge = GPMTokens.from_tokenizer(tok)
    pairs, _ = encode_pairs(judge, records, cfg.data.max_length)
    thoughts = fixed_thoughts(2 * len(pairs), k, judge.eot_id)           # (pair, response) → K thoughts

    # the library's rollout, then its log-probs re-read in float64 by the same scoring function
    ro, _ = do_rollout(model, None, FixedEngine(thoughts, judge.eot_id), pairs, judge, cfg, StepTimer())
    with torch.no_grad():
        old = score_thoughts(model, ro.seqs, judge.yes_id, judge.no_id, judge.pad_id, False,
                             cfg.rollout.temperature, ScorePath.of(cfg.train))
    torch.testing.assert_close(old.logp_yes.view(-1, 2, k).float(), ro.payload.old_logp_yes, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(old.logp.float(), ro.old_logp, rtol=1e-6, atol=1e-6)
    ro = dataclasses.replace(ro, old_logp=old.logp, payload=BTPOPayload(old.logp_yes.view(-1, 2, k)))

    # the example's rollout numbers, from the same thoughts
    yes_id, eot_id = ex.special_ids(tok)
    prompts = [[ex.gpm_prompt(tok, r.prompt, t, r.aspect) for t in (r.chosen_text, r.rejected_text)]
               for r in records]
    per_pair = [thoughts[2 * i: 2 * i + 2] for i in range(len(pairs))]
    with torch.no_grad():
        old_ex = ex.score_all(model, prompts, per_pair, yes_id, eot_id)
    torch.testing.assert_close(old_ex[1], ro.payload.old_logp_yes, rtol=REL, atol=0.0)

    # the weights move (a later minibatch of the rollout): ρ ≠ 1, part of the tokens clipped
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.abs().mean() * torch.randn(p.shape, generator=g, dtype=p.dtype))
        loss_lib, stats = micro_loss(model, ro, list(range(len(pairs))), judge, cfg, torch.device("cpu"))
        grads_lib = flat_grads(loss_lib, model)
        new_ex = ex.score_all(model, prompts, per_pair, yes_id, eot_id)
        loss_ex, diag = ex.btpo_loss(new_ex, old_ex)
        grads_ex = flat_grads(loss_ex, model)
        loss_drift, _ = ex.btpo_loss(ex.score_all(model, prompts, per_pair, yes_id, eot_id), old_ex,
                                     eps_low=0.3, eps_high=0.3)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n])

    assert 0.05 < float(stats["clip_fraction"]) < 0.95, stats["clip_fraction"]   # the clip matters here
    assert diag["clip_fraction"] == pytest.approx(float(stats["clip_fraction"]), rel=1e-12)
    for key in ("loss_score", "loss_thought", "bt_nll_est", "omega_mean", "score_chosen", "score_rejected",
                "ess_mean"):
        assert diag[key] == pytest.approx(float(stats[key]), rel=1e-9, abs=1e-15), key
    torch.testing.assert_close(loss_ex, loss_lib, rtol=REL, atol=0.0)
    scale = max(float(gr.abs().max()) for gr in grads_lib)
    assert scale > 0
    for (name, _), ge, gl in zip(model.named_parameters(), grads_ex, grads_lib, strict=True):
        torch.testing.assert_close(ge, gl, rtol=REL, atol=REL * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # and the comparison sees a changed clip range: the example with ε = 0.3 is far outside the bound
    assert abs(loss_drift.item() - loss_lib.item()) > 1e3 * REL * abs(loss_lib.item())


def test_example_step_samples_and_updates(ex, tiny) -> None:
    tok, model = tiny[0], copy.deepcopy(tiny[1])
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        loss, diag = ex.btpo_step(model, tok, ex.PAIRS[:1], opt, k=2, max_thought_tokens=4)
    assert torch.isfinite(loss) and 1 <= diag["thought_len"] <= 4 and 0 < diag["omega_mean"] < 1
    assert diag["grad_norm"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
