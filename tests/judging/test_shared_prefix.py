"""train.shared_prefix: one prefix forward + K continuations against its KV cache gives the plain
path's loss and every parameter's gradient, for BTPO's and GRPO's micro loss.

Both paths compute the same sums in another order (the KV cache's concatenation, chunked
log-softmax), so they agree to float32's reduce-order bound (tests/invariants/tolerances.py):
``SIGMAS·eps32·sqrt(n)·scale`` with ``n`` the terms summed — the batch's tokens for the loss and a
weight's gradient (one term per position), the vocabulary for a log-softmax — and ``scale`` the
largest magnitude involved (``max(1, |loss|)``, the largest gradient element)."""

from __future__ import annotations

import pytest
import torch

from btpo_cli.config import build_config
from btpo_cli.errors import BtpoError, ConfigError
from btpo_cli.judging.logprobs import ScorePath, SeqBatch, ThoughtSeq, score_thoughts
from btpo_cli.methods import btpo as btpo_method
from btpo_cli.methods import grpo_common
from btpo_cli.models.loading import load_causal_lm
from btpo_cli.training.rollouts import Rollout, score_chunked, unit_sizes
from tests.invariants.tolerances import float32_sum_bound
from tests.judging.scoring_paths import (
    grpo_rollout,
    off_on_differences,
    sampled_scores,
    thought_groups,
)


def _cfg(name: str, method: str, k: int, shared: str, lora: bool = False, beta: float = 0.0):
    sets = [f"model.name={name}", f"rollout.n={k}", f"train.shared_prefix={shared}", "rollout.temperature=0.8"]
    if lora:
        sets += ["model.lora.r=4", "model.lora.dropout=0.0"]
    if method == "btpo":
        sets += [f"btpo.beta={beta}"]
    else:
        sets += [f"grpo.beta={beta}"]
    return build_config(flags={"method": method}, overrides=sets)


def _model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = load_causal_lm(cfg.model)
    with torch.no_grad():                      # LoRA's B starts at 0: give the adapter a real gradient path
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.train()
    return model


def _groups(model, n_groups: int, k: int, seed: int, tail: int = 4) -> list[ThoughtSeq]:
    """n_groups prefixes of different lengths, k thoughts each (some stop early; with a tail one is
    empty)."""
    vocab = model.config.vocab_size if hasattr(model, "config") else 100
    return thought_groups(vocab, [6 + 5 * i for i in range(n_groups)], k, seed, tail)


def _compare(run, model, n: int, shared_used: bool = True) -> tuple[float, float]:
    """Run ``run(shared)`` → loss for off and on; max |Δloss|, max |Δgrad| over all parameters, each
    as a fraction of its float32 reduce-order bound over ``n`` tokens (≤ 1: they agree).
    ``shared_used``: the "on" run must really take the shared-prefix path (not fall back)."""
    dl, dg, calls = off_on_differences(run, model, n, "_shared_forward")
    taken = [not isinstance(got, str) for _, got in calls]
    assert not shared_used or (taken and all(taken)), taken
    return dl, dg


def _btpo_rollout(model, cfg, pairs: int, seed: int) -> tuple[Rollout, btpo_method.GPMTokens]:
    k = cfg.rollout.n
    seqs = SeqBatch.from_seqs(_groups(model, 2 * pairs, k, seed), 0)
    judge = btpo_method.GPMTokens(None, 11, 12, 13, 0)
    with torch.no_grad():
        old, yes = score_chunked(model, seqs, 11, 12, 0, False, cfg.rollout.temperature, len(seqs))
    g = torch.Generator().manual_seed(seed + 1)
    old = old + 0.3 * torch.randn(old.shape, generator=g)           # ratios away from 1: some clip
    ref = old + 0.1 * torch.randn(old.shape, generator=g)
    yes = (yes + 0.2 * torch.randn(yes.shape, generator=g)).view(pairs, 2, k)
    return Rollout(seqs, old, ref, btpo_method.BTPOPayload(yes)), judge


@pytest.mark.parametrize("name,k,lora", [("tiny-qwen2", 2, False), ("tiny-qwen2", 4, True),
                                         ("tiny-llama", 3, False), ("tiny-llama", 2, True)])
def test_btpo_micro_loss_shared_equals_plain(name: str, k: int, lora: bool) -> None:
    cfg = _cfg(name, "btpo", k, "off", lora=lora, beta=0.05)
    model = _model(cfg)
    ro, judge = _btpo_rollout(model, cfg, pairs=2, seed=3)

    def run(shared: str) -> torch.Tensor:
        cfg.train.shared_prefix = shared
        return btpo_method.micro_loss(model, ro, [1, 0], judge, cfg, "cpu")[0]

    dl, dg = _compare(run, model, int(ro.seqs.mask.sum()))
    assert dl <= 1 and dg <= 1, (dl, dg)


@pytest.mark.parametrize("name,g,lora", [("tiny-qwen2", 3, False), ("tiny-llama", 4, True)])
def test_grpo_micro_loss_shared_equals_plain(name: str, g: int, lora: bool) -> None:
    cfg = _cfg(name, "grpo-pair", g, "off", lora=lora, beta=0.05)
    model = _model(cfg)
    units, per_unit = 2, 2 * g                   # 2 queries per unit, G completions each
    seqs = SeqBatch.from_seqs(_groups(model, units * 2, g, seed=5, tail=0), 0)
    ro = grpo_rollout(model, seqs, cfg.rollout.temperature)

    def run(shared: str) -> torch.Tensor:
        cfg.train.shared_prefix = shared
        return grpo_common.micro_loss(model, ro, [0, 1], per_unit, 0, cfg, "cpu")[0]

    dl, dg = _compare(run, model, int(ro.seqs.mask.sum()))
    assert dl <= 1 and dg <= 1, (dl, dg)


def test_no_grad_scores_and_chunks_match() -> None:
    """Old / reference log-probs (score_chunked, chunks that split a group) equal the plain ones."""
    cfg = _cfg("tiny-qwen2", "btpo", 3, "off")
    model = _model(cfg).eval()
    seqs = SeqBatch.from_seqs(_groups(model, 4, 3, seed=7), 0)
    a = score_chunked(model, seqs, 11, 12, 0, False, 0.8, 5, ScorePath("off"))
    b = score_chunked(model, seqs, 11, 12, 0, False, 0.8, 5, ScorePath("on"))
    tol = float32_sum_bound(model.config.vocab_size, max(1.0, *(float(x.abs().max()) for x in a)))  # log-softmax
    assert all(float((x - y).abs().max()) <= tol for x, y in zip(a, b, strict=True))


def test_nothing_shared_falls_back_and_on_raises_where_it_cannot_apply() -> None:
    cfg = _cfg("tiny-qwen2", "btpo", 1, "off")
    model = _model(cfg).eval()
    seqs = SeqBatch.from_seqs(_groups(model, 3, 1, seed=1), 0)   # K = 1: no two rows share a prefix
    a = score_thoughts(model, seqs, 11, 12, 0, path=ScorePath("off"))
    b = score_thoughts(model, seqs, 11, 12, 0, path=ScorePath("on"))
    assert torch.equal(a.logp, b.logp) and torch.equal(a.logp_yes, b.logp_yes)
    model.train()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    seqs = SeqBatch.from_seqs(_groups(model, 2, 2, seed=1), 0)
    with pytest.raises(BtpoError, match="gradient checkpointing"):
        score_thoughts(model, seqs, 11, 12, 0, path=ScorePath("on"))
    auto = score_thoughts(model, seqs, 11, 12, 0, path=ScorePath("auto"))     # plain path, bitwise
    off = score_thoughts(model, seqs, 11, 12, 0, path=ScorePath("off"))
    assert torch.equal(auto.logp, off.logp)


def test_config_choices() -> None:
    assert build_config().train.shared_prefix == "off"
    with pytest.raises(ConfigError, match="train.shared_prefix"):
        build_config(overrides=["train.shared_prefix=always"])


def test_token_sizes_count_the_shared_prefix_once() -> None:
    cfg = _cfg("tiny-qwen2", "btpo", 4, "off")
    seqs = SeqBatch.from_seqs(_groups(None, 2, 4, seed=2), 0)     # 1 unit = 2 responses × K=4 rows

    class Ro:
        pass

    ro = Ro()
    ro.seqs = seqs
    plain = unit_sizes(ro, 1)(0)
    shared = unit_sizes(ro, 1, shared_prefix="on")(0)
    assert len(plain) == len(shared) == 8
    # rows × longest: plain pays the prompt K times, shared about once per group
    plen = [6, 11]
    clen = [int(x) for x in (seqs.n_thought + seqs.n_tail)]
    assert plain == [plen[i // 4] + clen[i] for i in range(8)]
    assert shared == [-(-plen[i // 4] // 4) + clen[i] for i in range(8)]
    del cfg


# ----------------------------------------------------------------------------- chunked log-probs

def test_planner_repeats_the_chunk_rule() -> None:
    """``btpo plan`` models the chunks ``lm_head`` really takes (the rule is repeated to keep the planner
    torch-free); a chunk's logits stay about the size of the hidden states, never over the cap."""
    from btpo_cli.judging.lm_head import CHUNK_BYTES, chunk_rows
    from btpo_cli.plan.estimate import logprob_chunk

    for m, v, h in [(1, 64, 32), (1216, 49152, 576), (10752, 152064, 3584), (10**6, 151936, 896), (40, 100, 200)]:
        assert logprob_chunk(m, v, h) == min(m, chunk_rows(m, v, h))
        assert chunk_rows(m, v, h) * 4 * v <= max(CHUNK_BYTES, 16 * 4 * v)
    assert chunk_rows(1216, 49152, 576) == 16            # SmolLM2, one pair at the paper's shape: 76 chunks


def test_token_logprobs_equals_log_softmax_in_value_and_grad() -> None:
    from btpo_cli.judging.lm_head import token_logprobs

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    tok = torch.randint(0, 50, (37,), generator=g)
    up = torch.randn(37, generator=g)
    for temp in (1.0, 0.7):
        ref = torch.log_softmax(h @ w.T / temp, -1).gather(-1, tok[:, None]).squeeze(-1)
        gh, gw = torch.autograd.grad((ref * up).sum(), (h, w))
        got = token_logprobs(h, w, tok, temp, rows=8)                  # 5 chunks, the last one short
        ch, cw = torch.autograd.grad((got * up).sum(), (h, w))
        # log-softmax sums the 50 logits; grad of h sums 50 vocabulary rows, of w 37 positions
        got, ref = got.detach(), ref.detach()
        assert float((got - ref).abs().max()) <= float32_sum_bound(50, max(1.0, float(ref.abs().max())))
        assert float((ch - gh).abs().max()) <= float32_sum_bound(50, float(gh.abs().max()))
        assert float((cw - gw).abs().max()) <= float32_sum_bound(37, float(gw.abs().max()))


@pytest.mark.parametrize("name,shared,lora", [("tiny-qwen2", "off", False), ("tiny-qwen2", "on", False),
                                              ("tiny-llama", "off", True), ("tiny-llama", "on", False)])
def test_btpo_micro_loss_chunked_equals_plain(name: str, shared: str, lora: bool) -> None:
    """chunked_logprobs (alone and with shared_prefix) against the plain path; tiny-qwen2 ties
    its LM head to the embeddings, tiny-llama does not."""
    cfg = _cfg(name, "btpo", 3, "off", lora=lora, beta=0.05)
    model = _model(cfg)
    ro, judge = _btpo_rollout(model, cfg, pairs=2, seed=4)

    def run(mode: str) -> torch.Tensor:
        cfg.train.shared_prefix, cfg.train.chunked_logprobs = (shared, "on") if mode == "on" else ("off", "off")
        return btpo_method.micro_loss(model, ro, [0, 1], judge, cfg, "cpu")[0]

    dl, dg = _compare(run, model, int(ro.seqs.mask.sum()), shared_used=shared == "on")
    assert dl <= 1 and dg <= 1, (dl, dg)


def test_btpo_eval_samples_shared_equals_plain() -> None:
    """``btpo eval/score --samples K`` scores its K sampled thoughts per response with the shared path."""
    scores, returned, _ = sampled_scores("train.shared_prefix", "_shared_forward")
    taken = [not isinstance(got, str) for got in returned]
    assert taken and all(taken)
    assert max(abs(a - b) for a, b in zip(scores["off"], scores["on"], strict=True)) <= 1e-6
