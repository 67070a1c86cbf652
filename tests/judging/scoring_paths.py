"""A scoring path (``train.shared_prefix``, ``train.packing``) against plain, with a spy on the path taken:
loss and gradients of the update, and BTPO's ``--samples K`` scores (tests/judging/test_shared_prefix.py,
test_packed_prefix.py)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

import btpo_cli.judging.logprobs as logprobs
from btpo_cli.config import build_config
from btpo_cli.judging.logprobs import SeqBatch, ThoughtSeq, score_chunked
from btpo_cli.methods.grpo_common import GRPOPayload
from btpo_cli.training.rollouts import Rollout
from tests.invariants.tolerances import float32_sum_bound


@contextmanager
def spying(name: str):
    """``logprobs.<name>`` records ``(args, result)`` of every call into the list it yields, then is restored."""
    real, calls = getattr(logprobs, name), []

    def spy(*a: Any, **kw: Any) -> Any:
        got = real(*a, **kw)
        calls.append((a, got))
        return got

    setattr(logprobs, name, spy)
    try:
        yield calls
    finally:
        setattr(logprobs, name, real)


def grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def off_on_differences(run: Callable[[str], torch.Tensor], model: Any, n: int,
                       spied: str) -> tuple[float, float, list[Any]]:
    """``run(value)`` → loss for ``off`` and ``on``: max |Δloss| and max |Δgrad| over all parameters, each
    as a fraction of its float32 reduce-order bound over ``n`` tokens (≤ 1: they agree), and the calls
    ``logprobs.<spied>`` saw (``(args, result)``: whether the "on" run really took the path)."""
    res = {}
    with spying(spied) as calls:
        for value in ("off", "on"):
            model.zero_grad(set_to_none=True)
            loss = run(value)
            loss.backward()
            res[value] = (loss.detach(), grads(model))
    (l0, g0), (l1, g1) = res["off"], res["on"]
    assert g0.keys() == g1.keys() and g0
    tol_l = float32_sum_bound(n, max(1.0, float(l0.abs())))
    tol_g = float32_sum_bound(n, max(float(g.abs().max()) for g in g0.values()))
    dl = float((l0 - l1).abs()) / tol_l
    return dl, max(float((g0[k] - g1[k]).abs().max()) for k in g0) / tol_g, calls


def sampled_scores(setting: str, spied: str) -> tuple[dict[str, list[float]], list[Any], int]:
    """Scores of three items by a tiny-qwen2 BTPO judge (3 sampled thoughts each) with ``setting`` (a
    ``train.*`` key) ``off`` and ``on``; what ``logprobs.<spied>`` returned on each call; the vocabulary size."""
    from btpo_cli.judging.judge import Item
    from btpo_cli.methods.btpo import BTPOJudge
    from btpo_cli.models.aliases import resolve_model

    scores, vocab = {}, 0
    with spying(spied) as returned:
        for value in ("off", "on"):
            cfg = build_config(flags={"method": "btpo"}, overrides=["eval.samples=3", "eval.max_new_tokens=6",
                                                                   f"{setting}={value}", "eval.batch_size=2"])
            judge = BTPOJudge(resolve_model("tiny-qwen2"), cfg, torch.device("cpu"), {})
            items = [Item([{"role": "user", "content": f"What is {i} + 1?"}], str(i + 1), "correct", (0, i, 0))
                     for i in range(3)]
            scores[value] = [s.score for s in judge._score_chunk(items)]
            vocab = judge.model.config.vocab_size
    return scores, [got for _, got in returned], vocab


def thought_groups(vocab: int, prefixes: list[int], k: int, seed: int, tail: int = 4) -> list[ThoughtSeq]:
    """One group per prefix length, k continuations each of mixed lengths (with a tail one thought
    is empty)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, p in enumerate(prefixes):
        prefix = torch.randint(5, vocab, (p,), generator=g).tolist()
        for j in range(k):
            n_th = [7, 2, 5, 0 if tail else 1, 3][(i + j) % 5]
            th = torch.randint(5, vocab, (n_th,), generator=g).tolist()
            tl = torch.randint(5, vocab, (tail,), generator=g).tolist()
            out.append(ThoughtSeq(prefix + th + tl, n_th, tail))
    return out


def grpo_rollout(model: Any, seqs: SeqBatch, temperature: float) -> Rollout:
    """A GRPO rollout of ``seqs`` for the update: old log-probs from ``model`` moved by noise (the policy
    has moved since), a reference near them, random advantages (seeded)."""
    with torch.no_grad():
        old, _ = score_chunked(model, seqs, 0, 0, 0, False, temperature, len(seqs))
    gen = torch.Generator().manual_seed(9)
    old = old + 0.3 * torch.randn(old.shape, generator=gen)
    return Rollout(seqs, old, old + 0.1 * torch.randn(old.shape, generator=gen),
                   GRPOPayload(torch.randn(len(seqs), generator=gen)))
