"""The bounds of tolerances.py hold for torch's AdamW and separate reduce-order noise from real faults."""

from __future__ import annotations

import math

import pytest
import torch

from tests.invariants.tolerances import (
    NOISY_FRACTION,
    RHO,
    adam_drift_bound,
    adam_update_bound,
    assert_weights_close,
    float32_sum_bound,
)

LRS = [1e-3 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]   # the tests' cosine schedule, 4 steps


def test_adam_update_bound_is_reached_and_never_exceeded() -> None:
    """c_t bounds torch's AdamW step for any gradient history, and the maximising history reaches it."""
    b1, b2 = 0.9, 0.95
    assert adam_update_bound(1, b1, b2) == pytest.approx(1.0)
    assert all(1.0 <= adam_update_bound(t, b1, b2) < 1.01 for t in range(1, 5))
    g = torch.Generator().manual_seed(0)
    for t in range(1, 6):
        a = [(1 - b1) * b1 ** (t - i) / (1 - b1 ** t) for i in range(1, t + 1)]
        b = [(1 - b2) * b2 ** (t - i) / (1 - b2 ** t) for i in range(1, t + 1)]
        worst = torch.tensor([x / y for x, y in zip(a, b, strict=True)])       # g_i ∝ a_i / b_i
        histories = torch.cat([worst[None], torch.randn(2000, t, generator=g) * torch.rand(2000, 1, generator=g) ** 4,
                               torch.randn(2000, t, generator=g).sign() * 10.0 ** torch.randint(-6, 2, (2000, t),
                                                                                         generator=g)])
        p = torch.zeros(len(histories), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.AdamW([p], lr=1.0, betas=(b1, b2), eps=1e-30, weight_decay=0.0)
        for i in range(t):
            before = p.detach().clone()
            p.grad = histories[:, i].double().clone()
            opt.step()
        step = (p.detach() - before).abs()
        c = adam_update_bound(t, b1, b2)
        assert float(step.max()) <= c * (1 + 1e-9)
        assert float(step[0]) == pytest.approx(c, rel=1e-6)                   # reached


def _train(grads: list[torch.Tensor], lrs: list[float]) -> torch.Tensor:
    w = torch.zeros_like(grads[0], requires_grad=True)
    opt = torch.optim.AdamW([w], lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for g, lr in zip(grads, lrs, strict=True):
        opt.param_groups[0]["lr"] = lr
        w.grad = g.clone()
        opt.step()
    return w.detach()


def test_reduce_order_noise_passes_and_faults_fail() -> None:
    """Gradients of 100,000 elements summed over 64 terms in two orders (some near zero, as where
    Adam amplifies rounding) pass; a missing step, a gradient from half the batch, or an element
    off by more than Adam's bound fail."""
    g = torch.Generator().manual_seed(1)
    terms = [torch.randn(64, 100_000, generator=g) for _ in LRS]
    for t in terms:
        t[:, :50] -= t[:, :50].mean(0, keepdim=True)              # 50 elements whose exact gradient is ~0
    fwd = [t.sum(0) for t in terms]
    rev = [t.flip(0).sum(0) for t in terms]
    assert any(bool((a != b).any()) for a, b in zip(fwd, rev, strict=True))
    one, two = _train(fwd, LRS), _train(rev, LRS)
    got = assert_weights_close({"w": one}, {"w": two}, LRS)
    assert got["max"] <= got["bound"] and got["over_tight"] <= NOISY_FRACTION * got["n"]
    assert got["tight"] == pytest.approx(RHO * adam_drift_bound(LRS))
    with pytest.raises(AssertionError, match="elements differ"):
        assert_weights_close({"w": one}, {"w": _train(rev[:3], LRS[:3])}, LRS)                  # a step missing
    with pytest.raises(AssertionError, match="elements differ"):
        assert_weights_close({"w": one}, {"w": _train([t[:32].sum(0) for t in terms], LRS)}, LRS)   # half the batch
    far = two.clone()                                           # a well-determined element
    far[500] += 1.01 * adam_drift_bound(LRS)
    with pytest.raises(AssertionError, match="Adam's bound"):
        assert_weights_close({"w": one}, {"w": far}, LRS)


def test_float32_sum_bound_covers_two_orders() -> None:
    """Sequential float32 sums of n terms, forwards and backwards, differ by less than the bound
    with ``scale`` the partial sums' magnitude, for n from 10 to 10⁴ (200 sums each)."""
    g = torch.Generator().manual_seed(2)
    for n in (10, 1000, 10_000):
        x = torch.randn(200, n, generator=g)
        sums, scale = [], torch.zeros(200)
        for order in (x, x.flip(1)):
            acc = torch.zeros(200)
            for k in range(n):                       # one float32 rounding per addition
                acc = acc + order[:, k]
                scale = torch.maximum(scale, acc.abs())
            sums.append(acc)
        d = (sums[0] - sums[1]).abs()
        assert bool((d > 0).any())
        assert bool((d <= torch.tensor([float32_sum_bound(n, float(s)) for s in scale])).all())
