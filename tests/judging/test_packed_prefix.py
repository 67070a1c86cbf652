"""train.packing for the rollout methods: each prompt once with its K continuations in packed rows
(btpo_cli/judging/packed_prefix.py) gives the plain path's loss and every parameter's gradient, for
BTPO's and GRPO's (pair, point) micro loss, mixed continuation lengths, several prompts per row,
chunked log-probs, LoRA.

The bound: both paths compute the same terms — each continuation attends to the same keys with the
same positions; the masked keys get exactly zero weight — but sum them in another order (the
prompt's gradient collects the K continuations' contributions in one attention backward instead of
K separate rows; the attention's matmuls see other row lengths and blockings). So they agree to
float32's reduce-order bound (tests/invariants/tolerances.py) ``SIGMAS·eps32·sqrt(n)·scale``, ``n``
the batch's tokens (one term per position in a weight's gradient and in the loss), ``scale`` the
largest magnitude involved (``max(1, |loss|)``, the largest gradient element)."""

from __future__ import annotations

import pytest
import torch

from btpo_cli.config import build_config
from btpo_cli.errors import BtpoError, ConfigError
from btpo_cli.judging.logprobs import ScorePath, SeqBatch, prefix_groups, score_thoughts
from btpo_cli.judging.packed_prefix import pack_prefix_groups
from btpo_cli.methods import btpo as btpo_method
from btpo_cli.methods import grpo_common
from btpo_cli.training.rollouts import Rollout, score_chunked
from tests.invariants.tolerances import float32_sum_bound
from tests.judging.scoring_paths import grpo_rollout, off_on_differences, sampled_scores, thought_groups
from tests.judging.test_shared_prefix import _cfg, _model

PREFIXES = [60, 6, 9, 7]
"""A long prompt and three short ones: the three share a row beside the long one's (several per row)."""


def _compare(run, model, n: int) -> tuple[float, float]:
    """``run(packing)`` → loss for off and on; max |Δloss| and max |Δgrad| over all parameters, each as
    a fraction of its float32 reduce-order bound over ``n`` tokens (≤ 1: they agree). The "on" run
    must really take the packed path (not fall back)."""
    dl, dg, calls = off_on_differences(run, model, n, "packed_forward")
    taken = [a[1].ids.shape[0] for a, _ in calls]            # packed rows
    assert taken and max(taken) < len(PREFIXES), taken     # taken, with several prompts in a row
    return dl, dg


def test_layout_positions_and_mask() -> None:
    """Prompt once, continuations after it with positions continuing the prompt's, each attending to
    the prompt and itself only; small groups share a row; padding attends to itself."""
    seqs = SeqBatch.from_seqs(thought_groups(50, [20, 3, 3], 2, seed=0), 0)
    rows = pack_prefix_groups(seqs.ids, seqs.mask, seqs.n_thought, seqs.n_tail, prefix_groups(seqs))
    assert not isinstance(rows, str)
    r, width = rows.ids.shape
    assert r == 2                                            # the two short groups share the second row
    flat_ids, flat_pos = rows.ids.flatten(), rows.pos.flatten()
    m = rows.mask[:, 0].reshape(r, width, width)
    t = seqs.ids.shape[1]
    for i in range(len(seqs)):
        k = int(seqs.n_thought[i] + seqs.n_tail[i])
        ln = int(seqs.mask[i].sum())
        cont = rows.cols[i, 1 + rows.c - k:]
        assert torch.equal(flat_ids[cont], seqs.ids[i, t - k:])                 # the continuation's tokens
        assert flat_pos[cont].tolist() == list(range(ln - k, ln))               # positions as unpacked
        assert int(rows.last[i]) == int(cont[-1])
        row, last = int(cont[-1]) // width, int(cont[-1]) % width
        seen = m[row, last].nonzero().flatten() + row * width                  # what its last token attends to
        assert torch.equal(flat_ids[seen], seqs.ids[i, t - ln:])                # its own sequence, nothing else
        assert flat_pos[seen].tolist() == list(range(ln))
    pad = rows.ids.flatten() == 0
    assert m.any(-1).all()                                   # no empty softmax row
    assert (m.flatten(0, 1)[pad].sum(-1) == 1).all()


@pytest.mark.parametrize("k,lora,chunked", [(2, False, False), (4, True, False), (3, False, True)])
def test_btpo_micro_loss_packed_equals_plain(k: int, lora: bool, chunked: bool) -> None:
    cfg = _cfg("tiny-qwen2", "btpo", k, "off", lora=lora, beta=0.05)
    cfg.train.chunked_logprobs = "on" if chunked else "off"
    model = _model(cfg)
    pairs = 2
    seqs = SeqBatch.from_seqs(thought_groups(model.config.vocab_size, PREFIXES, k, seed=3), 0)
    judge = btpo_method.GPMTokens(None, 11, 12, 13, 0)
    with torch.no_grad():
        old, yes = score_chunked(model, seqs, 11, 12, 0, False, cfg.rollout.temperature, len(seqs))
    g = torch.Generator().manual_seed(4)
    old = old + 0.3 * torch.randn(old.shape, generator=g)                # ratios away from 1: some clip
    ro = Rollout(seqs, old, old + 0.1 * torch.randn(old.shape, generator=g),
                 btpo_method.BTPOPayload((yes + 0.2 * torch.randn(yes.shape, generator=g)).view(pairs, 2, k)))

    def run(packing: str) -> torch.Tensor:
        cfg.train.packing = packing
        return btpo_method.micro_loss(model, ro, [1, 0], judge, cfg, "cpu")[0]

    dl, dg = _compare(run, model, int(seqs.mask.sum()))
    assert dl <= 1 and dg <= 1, (dl, dg)


@pytest.mark.parametrize("method", ["grpo-pair", "grpo-point"])
def test_grpo_micro_loss_packed_equals_plain(method: str) -> None:
    cfg = _cfg("tiny-qwen2", method, 3, "off", beta=0.05)
    model = _model(cfg)
    per_unit = 2 * 3                                         # 2 queries per unit, G completions each
    seqs = SeqBatch.from_seqs(thought_groups(model.config.vocab_size, PREFIXES, 3, seed=5, tail=0), 0)
    ro = grpo_rollout(model, seqs, cfg.rollout.temperature)

    def run(packing: str) -> torch.Tensor:
        cfg.train.packing = packing
        return grpo_common.micro_loss(model, ro, [0, 1], per_unit, 0, cfg, "cpu")[0]

    dl, dg = _compare(run, model, int(seqs.mask.sum()))
    assert dl <= 1 and dg <= 1, (dl, dg)


def test_no_grad_scores_match_and_packing_supersedes_shared_prefix() -> None:
    """Old / reference log-probs (score_chunked; chunks that split a group) equal the plain ones, with
    ``shared_prefix`` on as well (packing goes first); under gradient checkpointing (where the shared
    path cannot run) packing still applies."""
    cfg = _cfg("tiny-qwen2", "btpo", 3, "off")
    model = _model(cfg).eval()
    seqs = SeqBatch.from_seqs(thought_groups(model.config.vocab_size, PREFIXES, 3, seed=7), 0)
    a = score_chunked(model, seqs, 11, 12, 0, False, 0.8, 5, ScorePath("off"))
    b = score_chunked(model, seqs, 11, 12, 0, False, 0.8, 5, ScorePath("on", packing="on"))
    tol = float32_sum_bound(model.config.vocab_size, max(1.0, *(float(x.abs().max()) for x in a)))  # log-softmax
    assert all(float((x - y).abs().max()) <= tol for x, y in zip(a, b, strict=True))
    model.train()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with pytest.raises(BtpoError, match="gradient checkpointing"):
        score_thoughts(model, seqs, 11, 12, 0, path=ScorePath("on"))
    p = score_thoughts(model, seqs, 11, 12, 0, path=ScorePath("on", packing="on"))
    o = score_thoughts(model, seqs, 11, 12, 0, path=ScorePath("off"))
    assert float((p.logp_yes - o.logp_yes).detach().abs().max()) <= float32_sum_bound(model.config.vocab_size,
                                                                              float(o.logp_yes.abs().max()))


def test_on_raises_and_auto_falls_back_where_packing_cannot_apply() -> None:
    cfg = _cfg("tiny-qwen2", "btpo", 2, "off")
    model = _model(cfg).eval()
    model.config._attn_implementation = "flash_attention_2"   # never run: the blocker answers first
    seqs = SeqBatch.from_seqs(thought_groups(model.config.vocab_size, [5, 6], 2, seed=1), 0)
    with pytest.raises(BtpoError, match="train.packing=on: attn_implementation 'flash_attention_2'"):
        score_thoughts(model, seqs, 11, 12, 0, path=ScorePath(packing="on"))
    model.config._attn_implementation = "eager"              # eager adds the (additive) mask: same scores
    e_off = score_thoughts(model, seqs, 11, 12, 0, path=ScorePath())
    e_on = score_thoughts(model, seqs, 11, 12, 0, path=ScorePath(packing="on"))
    tol = float32_sum_bound(model.config.vocab_size, max(1.0, float(e_off.logp_yes.abs().max())))
    assert float((e_on.logp_yes - e_off.logp_yes).abs().max()) <= tol
    assert float((e_on.logp - e_off.logp).abs().max()) <= tol
    model.config._attn_implementation = "sdpa"
    off = score_thoughts(model, seqs, 11, 12, 0, path=ScorePath())
    model.config._attn_implementation, model.config.sliding_window = "sdpa", 4
    auto = score_thoughts(model, seqs, 11, 12, 0, path=ScorePath(packing="auto"))   # plain path, bitwise
    assert torch.equal(auto.logp, off.logp) and torch.equal(auto.logp_yes, off.logp_yes)


def test_config_choices_and_plan_counts_the_prompt_once() -> None:
    from btpo_cli.plan.estimate import activations, geometry, inputs_from_config

    assert build_config().train.packing == "off"
    assert build_config(overrides=["train.packing=on"]).train.packing == "on"
    with pytest.raises(ConfigError, match="train.packing"):
        build_config(overrides=["train.packing=always"])
    acts = {}
    for packing in ("off", "on"):
        cfg = build_config(flags={"method": "btpo"}, overrides=["model.name=smollm2-135m", f"train.packing={packing}",
                                                                "rollout.n=4"])
        inp = inputs_from_config(cfg, device="cpu")
        geo = geometry(inp)
        acts[packing] = activations(inp, geo, False)
    assert inp.packing and geo.rows_per_pair == 8 and geo.prompts_per_pair == 2
    p, c = inp.prompt_tokens, geo.seq_len - inp.prompt_tokens
    assert acts["off"]["tokens"] == inp.micro_batch * 8 * (p + c)
    assert acts["on"]["tokens"] == inp.micro_batch * (2 * p + 8 * c)          # each prompt once
    assert acts["on"]["body"] < acts["off"]["body"]


def test_btpo_eval_samples_packed_equals_plain() -> None:
    """``btpo eval/score --samples K`` scores its K sampled thoughts per response in packed rows."""
    scores, returned, vocab = sampled_scores("train.packing", "packed_forward")
    assert returned
    # p(Yes) averaged over K: exp of a float32 log-softmax over the vocabulary, |Δp| ≤ p·|Δlog p| ≤ |Δlog p|,
    # the log-sum-exp's terms of the size of the logits (|logit| < 10 in the tiny models)
    assert max(abs(a - b) for a, b in zip(scores["off"], scores["on"], strict=True)) <= float32_sum_bound(vocab, 10.0)
