"""Tests for btpo_cli.losses: hand-computed values, edge cases, and the gradient identity of §4–§5."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from btpo_cli.losses import (
    bt_loss,
    bt_nll_estimate,
    btpo_loss,
    clipped_surrogate,
    effective_sample_size,
    kl_k3,
    log_mc_scores,
    mc_scores,
    misalignment_weight,
    misalignment_weight_from_log,
    rollout_weights,
    score_loss,
    self_normalized_scores,
    self_normalized_scores_from_log,
    thought_advantages,
)

D64 = torch.float64


def t(*values: float, dtype: torch.dtype = D64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def close(a: torch.Tensor, b: torch.Tensor | float, tol: float = 1e-10) -> None:
    b = torch.as_tensor(b, dtype=a.dtype)
    torch.testing.assert_close(a, b.expand_as(a) if b.dim() == 0 else b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- bt_loss


def test_bt_loss_hand_value() -> None:
    close(bt_loss(t(2.0), t(0.5)), math.log1p(math.exp(-1.5)))
    assert abs(math.log1p(math.exp(-1.5)) - 0.2014132779827524) < 1e-15
    # batch mean
    expected = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(1.0)) + math.log(2.0)) / 3
    close(bt_loss(t(2.0, 0.0, 3.0), t(0.5, 1.0, 3.0)), expected)


def test_bt_loss_stable_and_gradient() -> None:
    r_w = t(-1000.0, 1000.0).requires_grad_()
    r_l = t(0.0, 0.0)
    loss = bt_loss(r_w, r_l)
    close(loss, 500.0, tol=1e-9)  # mean of 1000 and ~0, no inf
    loss.backward()
    delta = (r_w - r_l).detach()
    close(r_w.grad, -torch.sigmoid(-delta) / 2)
    with pytest.raises(ValueError):
        bt_loss(t(1.0, 2.0), t(1.0))


# --------------------------------------------------------------------------- scores and weights


def test_mc_scores_and_log_mc_scores() -> None:
    p = t(0.2, 0.4, 0.6, 0.8).view(1, 4)
    close(mc_scores(p), t(0.5))
    close(log_mc_scores(p.log()), t(math.log(0.5)))
    assert torch.isneginf(log_mc_scores(torch.full((2, 3), -math.inf, dtype=D64))).all()


def test_misalignment_weight_values() -> None:
    omega = misalignment_weight(t(0.6, 0.2, 0.0, 0.0, 0.3), t(0.2, 0.6, 0.3, 0.0, 0.3))
    close(omega, t(0.25, 0.75, 1.0, 0.5, 0.5))
    # tiny but non-zero scores keep their ratio
    close(misalignment_weight(t(3e-300), t(1e-300)), t(0.25))
    # no gradient, even if the inputs carry one
    s_w = t(0.6).requires_grad_()
    out = misalignment_weight(s_w, t(0.2))
    assert not out.requires_grad


def test_misalignment_weight_from_log_matches_and_survives_underflow() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 50, generator=g, dtype=D64)
    close(misalignment_weight_from_log(s[0].log(), s[1].log()), misalignment_weight(s[0], s[1]), tol=1e-12)
    ninf = -math.inf
    close(misalignment_weight_from_log(t(ninf, ninf, -1.0), t(ninf, -1.0, ninf)), t(0.5, 1.0, 0.0))
    # float32: p = e^-200 underflows to 0, the log-space weight does not
    lw, ll = torch.tensor([-200.0]), torch.tensor([-200.0 - math.log(3.0)])
    assert misalignment_weight(lw.exp(), ll.exp()).item() == 0.5
    assert abs(misalignment_weight_from_log(lw, ll).item() - 0.25) < 1e-6


def test_self_normalized_scores() -> None:
    p = t(0.1, 0.3, 0.0, 0.6, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5).view(3, 4)
    pbar = self_normalized_scores(p)
    close(pbar[0], t(0.1, 0.3, 0.0, 0.6))
    close(pbar[1], t(0.25, 0.25, 0.25, 0.25))  # all zero -> uniform
    close(pbar[2], t(0.25, 0.25, 0.25, 0.25))
    close(pbar.sum(-1), t(1.0, 1.0, 1.0))
    q = torch.rand(5, 7, dtype=D64, requires_grad=True)
    out = self_normalized_scores(q)
    assert not out.requires_grad
    close(out.sum(-1), torch.ones(5, dtype=D64))
    # leading batch dims
    assert self_normalized_scores(torch.rand(2, 3, 4)).shape == (2, 3, 4)


def test_self_normalized_scores_from_log() -> None:
    p = torch.rand(4, 2, 6, dtype=D64)
    p[0, 0, 2] = 0.0
    close(self_normalized_scores_from_log(p.log()), self_normalized_scores(p), tol=1e-12)
    close(self_normalized_scores_from_log(torch.full((2, 3), -math.inf)), torch.full((2, 3), 1 / 3))
    lp = torch.tensor([[-200.0, -200.0 - math.log(3.0)]])  # float32 underflow in p-space
    torch.testing.assert_close(self_normalized_scores_from_log(lp), torch.tensor([[0.75, 0.25]]))


def test_bt_nll_estimate() -> None:
    p_w = t(0.6, 0.6, 0.5, 0.1).view(2, 2)
    p_l = t(0.2, 0.2, 0.3, 0.1).view(2, 2)
    close(bt_nll_estimate(p_w, p_l), t(-math.log(0.75), -math.log(0.3 / 0.5)))
    # ω̂ = 1 − exp(−nll)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 8, 4, generator=g, dtype=D64)
    close(1 - torch.exp(-bt_nll_estimate(a, b)), misalignment_weight(mc_scores(a), mc_scores(b)), tol=1e-12)
    # all zero -> log 2, one side zero -> finite
    z = torch.zeros(1, 3)
    assert abs(bt_nll_estimate(z, z).item() - math.log(2)) < 1e-6
    val = bt_nll_estimate(z, torch.full((1, 3), 0.5))
    assert torch.isfinite(val).all() and val.item() > 50


def test_effective_sample_size() -> None:
    close(effective_sample_size(torch.full((3, 4), 0.25, dtype=D64)), torch.full((3,), 4.0, dtype=D64))
    close(effective_sample_size(t(0.0, 1.0, 0.0, 0.0).view(1, 4)), t(1.0))
    close(effective_sample_size(t(0.5, 0.5, 0.0, 0.0).view(1, 4)), t(2.0))
    close(effective_sample_size(torch.ones(5, 1, dtype=D64)), torch.ones(5, dtype=D64))  # K = 1
    close(effective_sample_size(torch.zeros(2, 4, dtype=D64)), t(4.0, 4.0))  # all p = 0 -> uniform
    ess = effective_sample_size(self_normalized_scores(torch.rand(100, 6, dtype=D64)))
    assert (ess >= 1 - 1e-12).all() and (ess <= 6 + 1e-12).all()


# --------------------------------------------------------------------------- advantages


PBAR_W = (0.4, 0.3, 0.2, 0.1)
PBAR_L = (0.7, 0.1, 0.1, 0.1)


def test_grpo_advantages_hand_example() -> None:
    pw, pl = t(*PBAR_W).view(1, 4), t(*PBAR_L).view(1, 4)
    # r_w = p̄_w: mean .25, centered (.15, .05, -.05, -.15), population std sqrt(.0125)
    a_w_unit = t(1.3416407865, 0.4472135955, -0.4472135955, -1.3416407865)
    # r_l = -p̄_l: mean -.25, centered (-.45, .15, .15, .15), population std sqrt(.0675)
    a_l_unit = t(-1.7320508076, 0.5773502692, 0.5773502692, 0.5773502692)
    a_w, a_l = thought_advantages(pw, pl, t(1.0), "grpo")
    close(a_w[0], a_w_unit, tol=2e-5)  # the 1e-6 in the denominator moves things by ~1e-5
    close(a_l[0], a_l_unit, tol=2e-5)
    close(a_w[0], t(0.15, 0.05, -0.05, -0.15) / (math.sqrt(0.0125) + 1e-6))
    a_w, a_l = thought_advantages(pw, pl, t(0.25), "grpo")
    close(a_w[0], 0.25 * a_w_unit, tol=1e-5)
    close(a_l[0], 0.25 * a_l_unit, tol=1e-5)


def test_grpo_advantages_degenerate_groups() -> None:
    # uniform p̄ -> zero advantages; K = 1 -> zero advantages, no NaN
    a_w, a_l = thought_advantages(torch.full((2, 4), 0.25), torch.full((2, 4), 0.25), torch.ones(2), "grpo")
    assert (a_w == 0).all() and (a_l == 0).all()
    a_w, a_l = thought_advantages(torch.ones(3, 1), torch.ones(3, 1), torch.rand(3), "grpo")
    assert (a_w == 0).all() and (a_l == 0).all()


def test_exact_advantages_hand_example() -> None:
    pw, pl = t(*PBAR_W).view(1, 4), t(*PBAR_L).view(1, 4)
    a_w, a_l = thought_advantages(pw, pl, t(0.5), "exact")
    close(a_w[0], t(0.3, 0.1, -0.1, -0.3))
    close(a_l[0], t(-0.9, 0.3, 0.3, 0.3))
    a_w, a_l = thought_advantages(torch.ones(2, 1), torch.ones(2, 1), torch.rand(2), "exact")
    assert (a_w == 0).all() and (a_l == 0).all()  # K = 1


def test_advantages_detached_and_validated() -> None:
    pw = torch.rand(2, 3, requires_grad=True)
    a_w, a_l = thought_advantages(pw, torch.rand(2, 3), torch.rand(2, requires_grad=True), "exact")
    assert not a_w.requires_grad and not a_l.requires_grad
    with pytest.raises(ValueError, match="mode"):
        thought_advantages(torch.rand(2, 3), torch.rand(2, 3), torch.rand(2), "ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        thought_advantages(torch.rand(2, 3), torch.rand(2, 3), torch.rand(3), "exact")


# --------------------------------------------------------------------------- clipped surrogate


RATIOS = (0.5, 0.9, 1.0, 1.1, 1.5)


def _clip_case(adv: float, eps_low: float = 0.2, eps_high: float = 0.2):
    old = t(-1.0, -2.0, -0.5, -3.0, -1.5).view(1, 5)
    logp = (old + t(*RATIOS).log().view(1, 5)).requires_grad_()
    mask = torch.ones(1, 5, dtype=torch.bool)
    losses, stats = clipped_surrogate(logp, old, t(adv), mask, eps_low, eps_high, "seq-sum")
    losses.sum().backward()
    return losses, stats, logp.grad[0]


def test_clipping_positive_advantage() -> None:
    losses, stats, grad = _clip_case(1.0)
    # −min(ρ, clip(ρ)) per token: 1.5 is capped at 1.2, 0.5 is not raised (pessimistic bound)
    close(losses, t(-(0.5 + 0.9 + 1.0 + 1.1 + 1.2)))
    # ∂/∂logp of −ρA = −ρA where unclipped, 0 where the clip is active
    close(grad, t(-0.5, -0.9, -1.0, -1.1, 0.0))
    close(stats["clip_fraction"], 0.2)
    close(stats["clip_fraction_high"], 0.2)
    close(stats["clip_fraction_low"], 0.0)


def test_clipping_negative_advantage() -> None:
    losses, stats, grad = _clip_case(-1.0)
    close(losses, t(0.8 + 0.9 + 1.0 + 1.1 + 1.5))
    close(grad, t(0.0, 0.9, 1.0, 1.1, 1.5))
    close(stats["clip_fraction"], 0.2)
    close(stats["clip_fraction_low"], 0.2)
    close(stats["clip_fraction_high"], 0.0)


def test_clipping_asymmetric_and_stats() -> None:
    # eps_high = 0.6 -> 1.5 inside the range; eps_low = 0.05 -> 0.9 clipped for A < 0
    _, stats, grad = _clip_case(1.0, eps_low=0.05, eps_high=0.6)
    close(grad, t(-0.5, -0.9, -1.0, -1.1, -1.5))
    close(stats["clip_fraction"], 0.0)
    _, stats, grad = _clip_case(-1.0, eps_low=0.05, eps_high=0.6)
    close(grad, t(0.0, 0.0, 1.0, 1.1, 1.5))
    close(stats["clip_fraction"], 0.4)
    close(stats["ratio_mean"], sum(RATIOS) / 5)
    close(stats["ratio_max"], 1.5)
    close(stats["approx_kl"], -sum(math.log(r) for r in RATIOS) / 5)


def _masked_batch():
    # 3 sequences, T = 4, lengths 3, 1, 0; padding holds garbage that must not leak
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    base = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=D64)
    logp = torch.where(mask, base, torch.tensor(math.nan, dtype=D64)).requires_grad_()
    old = torch.where(mask, base, torch.tensor(-math.inf, dtype=D64))
    return logp, old, mask


@pytest.mark.parametrize(
    ("agg", "norm", "expected"),
    [
        ("token-mean", None, (-1.0, -2.0, 0.0)),
        ("seq-sum", None, (-3.0, -2.0, 0.0)),
        ("token-sum-norm", 4.0, (-0.75, -0.5, 0.0)),
    ],
)
def test_aggregations_on_masked_batch(agg, norm, expected) -> None:
    logp, old, mask = _masked_batch()
    adv = t(1.0, 2.0, 3.0)
    losses, stats = clipped_surrogate(logp, old, adv, mask, 0.2, 0.2, agg, norm)
    close(losses, t(*expected))  # ρ = 1 -> per token −A
    losses.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()
    # per-token gradient −ρA · (aggregation weight)
    weight = {
        "token-mean": t(1 / 3, 1.0, 0.0),
        "seq-sum": t(1.0, 1.0, 0.0),
        "token-sum-norm": t(0.25, 0.25, 0.0),
    }
    close(logp.grad, -(adv * weight[agg]).unsqueeze(-1) * mask)
    for v in stats.values():
        assert torch.isfinite(v)
    close(stats["ratio_mean"], 1.0)
    close(stats["approx_kl"], 0.0)


def test_aggregation_with_ratios() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    old = torch.zeros(2, 3, dtype=D64)
    logp = torch.log(t(1.1, 0.9, 7.0, 1.0, 1.2, 0.95)).view(2, 3)
    adv = t(2.0, -1.0)
    per_tok = [[-2.2, -1.8], [1.0, 1.2, 0.95]]  # A>0: −min(ρ,clip ρ)A ; A<0: 1.2 not clipped (pessimistic)
    losses, _ = clipped_surrogate(logp, old, adv, mask, 0.2, 0.2, "token-mean")
    close(losses, t(sum(per_tok[0]) / 2, sum(per_tok[1]) / 3))
    losses, _ = clipped_surrogate(logp, old, adv, mask, 0.2, 0.2, "token-sum-norm", 10.0)
    close(losses, t(sum(per_tok[0]) / 10, sum(per_tok[1]) / 10))


def test_clipped_surrogate_all_empty_and_errors() -> None:
    logp = torch.randn(2, 3, dtype=D64, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    losses, stats = clipped_surrogate(logp, logp.detach() + 5, t(1.0, -1.0), mask, 0.2, 0.2, "token-mean")
    close(losses, t(0.0, 0.0))
    losses.sum().backward()
    assert (logp.grad == 0).all()
    for v in stats.values():
        assert torch.isfinite(v)
    close(stats["clip_fraction"], 0.0)
    ok = (logp, logp.detach(), t(1.0, 1.0), mask.logical_not(), 0.2, 0.2)
    with pytest.raises(ValueError, match="norm_constant"):
        clipped_surrogate(*ok, "token-sum-norm")
    with pytest.raises(ValueError, match="aggregation"):
        clipped_surrogate(*ok, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        clipped_surrogate(logp, logp.detach(), t(1.0), mask, 0.2, 0.2, "seq-sum")


def test_clipped_surrogate_float_mask_and_bf16() -> None:
    logp = torch.randn(2, 4, dtype=torch.bfloat16)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    losses, _ = clipped_surrogate(logp, logp, torch.tensor([1.0, 2.0]), mask, 0.2, 0.2, "token-mean")
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses, torch.tensor([-1.0, -2.0]))


# --------------------------------------------------------------------------- score loss and KL


def test_score_loss_hand_value() -> None:
    pw, pl = t(0.75, 0.25).view(1, 2), t(0.5, 0.5).view(1, 2)
    lw = t(0.6, 0.2).log().view(1, 2).requires_grad_()
    ll = t(0.1, 0.1).log().view(1, 2).requires_grad_()
    out = score_loss(lw, ll, pw, pl, t(0.4))
    close(out, t(-0.4 * (0.75 * math.log(0.6) + 0.25 * math.log(0.2) - math.log(0.1))))
    out.sum().backward()
    close(lw.grad, -0.4 * pw)
    close(ll.grad, 0.4 * pl)


def test_score_loss_zero_weight_neg_inf() -> None:
    lw = t(-math.inf, -1.0).view(1, 2).requires_grad_()
    ll = t(-2.0, -2.0).view(1, 2).requires_grad_()
    out = score_loss(lw, ll, t(0.0, 1.0).view(1, 2), t(0.5, 0.5).view(1, 2), t(1.0))
    close(out, t(-(-1.0 + 2.0)))
    out.sum().backward()
    assert torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()


def test_score_floor_stops_the_rejected_push_below_it_only() -> None:
    pw, pl = t(0.75, 0.25).view(1, 2), t(0.5, 0.5).view(1, 2)
    lw = t(0.6, 0.2).log().view(1, 2).requires_grad_()
    ll = t(0.3, 0.001).log().view(1, 2).requires_grad_()          # one above the floor 0.01, one below
    out = score_loss(lw, ll, pw, pl, t(0.4), floor=0.01)
    close(out, t(-0.4 * (0.75 * math.log(0.6) + 0.25 * math.log(0.2) - 0.5 * math.log(0.3) - 0.5 * math.log(0.01))))
    out.sum().backward()
    close(lw.grad, -0.4 * pw)                                      # the chosen side is untouched
    close(ll.grad, t(0.4 * 0.5, 0.0).view(1, 2))                   # METHOD's gradient above the floor, none below
    # floor 0 is METHOD's term exactly
    ll0 = ll.detach().clone().requires_grad_()
    score_loss(lw.detach(), ll0, pw, pl, t(0.4), floor=0.0).sum().backward()
    close(ll0.grad, 0.4 * pl)


def test_btpo_loss_reports_the_share_below_the_score_floor() -> None:
    lp_yes = torch.tensor([[[0.5, 0.4], [0.3, 0.001]]], dtype=D64).log()
    logp = torch.zeros(4, 3, dtype=D64)
    mask = torch.ones(4, 3, dtype=torch.bool)
    _, st = btpo_loss(logp, logp, mask, lp_yes, lp_yes, score_floor=0.01)
    close(st["score_floor_share"], t(0.001 / 0.301)[0])
    _, st0 = btpo_loss(logp, logp, mask, lp_yes, lp_yes)
    close(st0["score_floor_share"], t(0.0)[0])


def test_kl_k3() -> None:
    logp = torch.randn(3, 5, dtype=D64, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2] = False
    close(kl_k3(logp, logp.detach(), mask), torch.zeros(3, dtype=D64))
    ref = logp.detach() + torch.randn(3, 5, dtype=D64)
    kl = kl_k3(logp, ref, mask)
    assert (kl[:2] > 0).all() and kl[2] == 0
    # hand value: ref − logp = 0.5 on all valid tokens
    close(kl_k3(logp, logp.detach() + 0.5, mask)[:2], math.exp(0.5) - 1.5)
    # masked mean with garbage in the padding
    ref2 = torch.where(mask, logp.detach() + 0.5, torch.tensor(math.inf, dtype=D64))
    kl2 = kl_k3(logp, ref2, mask)
    kl2.sum().backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[~mask] == 0).all()
    # gradient of the per-sequence mean of k3 w.r.t. logp: (1 − exp(ref − logp)) / n_valid
    close(logp.grad[0], torch.full((5,), (1 - math.exp(0.5)) / 5, dtype=D64))


# --------------------------------------------------------------------------- btpo_loss: the gradient identity


B, K, T, V, DIM = 3, 4, 5, 7, 6


def _toy(seed: int = 0):
    """A parametric toy: thought-token log-probs and log p(Yes) as smooth functions of θ (DIM,)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(DIM, generator=g, dtype=D64, requires_grad=True)
    w_tok = torch.randn(B, 2, K, T, V, DIM, generator=g, dtype=D64)
    tokens = torch.randint(0, V, (B, 2, K, T), generator=g)
    u_yes = torch.randn(B, 2, K, DIM, generator=g, dtype=D64)
    c_yes = torch.randn(B, 2, K, generator=g, dtype=D64)
    lengths = torch.randint(1, T + 1, (B, 2, K), generator=g)
    lengths[0, 1, 2] = 0  # an empty thought
    mask = torch.arange(T).view(1, 1, 1, T) < lengths.unsqueeze(-1)

    def forward(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.einsum("brktvd,d->brktv", w_tok, th)
        logp = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B,2,K,T)
        logp_yes = F.logsigmoid(torch.einsum("brkd,d->brk", u_yes, th) + c_yes)  # (B,2,K)
        return logp, logp_yes

    return theta, forward, mask


def _explicit_minus_ghat(logp, logp_yes, mask):
    """−(1/B) Σ_b ĝ_b (1/K baseline in the ∇log π part), written straight from METHOD.md §4."""
    with torch.no_grad():
        p = logp_yes.exp()
        s = p.mean(-1)  # (B,2)
        omega = s[:, 1] / (s[:, 0] + s[:, 1])
        pbar = p / p.sum(-1, keepdim=True)
    log_pi = (logp * mask).sum(-1)  # (B,2,K)
    per_resp = ((pbar - 1.0 / K) * log_pi + pbar * logp_yes).sum(-1)  # (B,2)
    return -(omega * (per_resp[:, 0] - per_resp[:, 1])).mean()


@pytest.mark.parametrize("flatten", [False, True])
def test_exact_seq_sum_gradient_is_minus_ghat(flatten: bool) -> None:
    theta, forward, mask = _toy()
    logp, logp_yes = forward(theta)
    args = (logp, logp.detach(), mask)
    if flatten:
        args = tuple(x.reshape(B * 2 * K, T) for x in args)
    loss, stats = btpo_loss(
        *args,
        logp_yes,
        logp_yes.detach(),
        thought_advantage="exact",
        agg="seq-sum",
        eps_low=0.2,
        eps_high=0.28,
    )
    (grad,) = torch.autograd.grad(loss, theta)

    logp2, logp_yes2 = forward(theta)
    (expected,) = torch.autograd.grad(_explicit_minus_ghat(logp2, logp_yes2, mask), theta)
    assert grad.norm() > 1e-3
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    for v in stats.values():
        assert torch.isfinite(v)


def test_exact_seq_sum_gradient_closed_form_linear_toy() -> None:
    """Same identity with a gradient written out by hand (no autograd on the reference side)."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(DIM, generator=g, dtype=D64, requires_grad=True)
    f_tok = torch.randn(B, 2, K, T, DIM, generator=g, dtype=D64) * 0.3
    u = torch.randn(B, 2, K, DIM, generator=g, dtype=D64)
    mask = torch.rand(B, 2, K, T, generator=g) < 0.7
    logp = torch.einsum("brktd,d->brkt", f_tok, theta)  # ∇ logp_t = f_t
    logp_yes = F.logsigmoid(torch.einsum("brkd,d->brk", u, theta))  # ∇ log σ(a) = (1 − σ(a)) u
    loss, _ = btpo_loss(
        logp, logp.detach(), mask, logp_yes, logp_yes.detach(), thought_advantage="exact", agg="seq-sum"
    )
    (grad,) = torch.autograd.grad(loss, theta)

    with torch.no_grad():
        p = logp_yes.exp()
        s = p.mean(-1)
        omega = s[:, 1] / (s[:, 0] + s[:, 1])
        pbar = p / p.sum(-1, keepdim=True)
        grad_log_pi = (f_tok * mask.unsqueeze(-1)).sum(-2)  # (B,2,K,DIM)
        grad_log_yes = (1 - p).unsqueeze(-1) * u  # (B,2,K,DIM)
        g_resp = ((pbar - 1 / K).unsqueeze(-1) * grad_log_pi + pbar.unsqueeze(-1) * grad_log_yes).sum(2)
        g_hat = omega.unsqueeze(-1) * (g_resp[:, 0] - g_resp[:, 1])  # (B,DIM)
        expected = -g_hat.mean(0)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["grpo", "exact"])
@pytest.mark.parametrize(("agg", "norm"), [("token-mean", None), ("seq-sum", None), ("token-sum-norm", 8.0)])
def test_btpo_loss_value_at_rho_one(mode, agg, norm) -> None:
    """At ρ = 1 the loss is L_score − Σ_r (1/K) Σ_k Â agg(1)."""
    theta, forward, mask = _toy(1)
    logp, logp_yes = forward(theta)
    loss, stats = btpo_loss(
        logp,
        logp.detach(),
        mask,
        logp_yes,
        logp_yes.detach(),
        thought_advantage=mode,
        agg=agg,
        norm_constant=norm,
    )
    omega, pbar, adv = rollout_weights(logp_yes.detach(), mode)
    n = mask.sum(-1).to(D64)
    factor = {"token-mean": (n > 0).to(D64), "seq-sum": n, "token-sum-norm": n / 8.0}[agg]
    l_thought = -(adv * factor).mean(-1).sum(-1)
    l_score = -omega * ((pbar * logp_yes).sum(-1) @ t(1.0, -1.0))
    close(loss, (l_score + l_thought).mean().detach())
    close(stats["loss_score"], l_score.mean().detach())
    close(stats["loss_thought"], l_thought.mean().detach())
    close(stats["clip_fraction"], 0.0)


@pytest.mark.parametrize("mode", ["grpo", "exact"])
def test_misalignment_weight_off_divides_gradient_by_omega(mode) -> None:
    theta, forward, mask = _toy(2)
    logp, logp_yes = forward(theta)
    g = torch.Generator().manual_seed(5)
    old = logp.detach() + 0.05 * torch.randn(logp.shape, generator=g, dtype=D64)  # ρ ≠ 1, some clipping
    old_yes = logp_yes.detach() + 0.1 * torch.randn(logp_yes.shape, generator=g, dtype=D64)
    kw = {"thought_advantage": mode, "agg": "token-mean", "eps_low": 0.03, "eps_high": 0.03}
    omega, _, _ = rollout_weights(old_yes, mode)

    per_pair_on, per_pair_off = [], []
    for b in range(B):
        sl = slice(b, b + 1)
        on, _ = btpo_loss(
            logp[sl], old[sl], mask[sl], logp_yes[sl], old_yes[sl], misalignment_weight=True, **kw
        )
        off, st = btpo_loss(
            logp[sl], old[sl], mask[sl], logp_yes[sl], old_yes[sl], misalignment_weight=False, **kw
        )
        close(st["omega_mean"], 1.0)
        per_pair_on.append(torch.autograd.grad(on, theta, retain_graph=True)[0])
        per_pair_off.append(torch.autograd.grad(off, theta, retain_graph=True)[0])
        torch.testing.assert_close(per_pair_off[b], per_pair_on[b] / omega[b], rtol=1e-9, atol=1e-12)

    full_on, _ = btpo_loss(logp, old, mask, logp_yes, old_yes, misalignment_weight=True, **kw)
    full_off, _ = btpo_loss(logp, old, mask, logp_yes, old_yes, misalignment_weight=False, **kw)
    g_on = torch.autograd.grad(full_on, theta, retain_graph=True)[0]
    g_off = torch.autograd.grad(full_off, theta)[0]
    torch.testing.assert_close(g_on, torch.stack(per_pair_on).mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_off, torch.stack(per_pair_off).mean(0), rtol=1e-9, atol=1e-12)


def test_btpo_loss_layouts_agree() -> None:
    theta, forward, mask = _toy(4)
    logp, logp_yes = forward(theta)
    old = logp.detach() * 1.01
    a, sa = btpo_loss(logp, old, mask, logp_yes, logp_yes.detach() - 0.1)
    flat = (x.reshape(B * 2 * K, T) for x in (logp, old, mask))
    b, sb = btpo_loss(*flat, logp_yes, logp_yes.detach() - 0.1)
    close(a, b, tol=1e-14)
    assert sa.keys() == sb.keys()
    with pytest.raises(ValueError, match="must be"):
        btpo_loss(logp.reshape(B * 2, K * T), old, mask, logp_yes, logp_yes.detach())
    with pytest.raises(ValueError, match=r"\(B, 2, K\)"):
        btpo_loss(logp, old, mask, logp_yes[:, :1], logp_yes.detach()[:, :1])


def test_btpo_loss_kl_term() -> None:
    theta, forward, mask = _toy(6)
    logp, logp_yes = forward(theta)
    args = (logp, logp.detach(), mask, logp_yes, logp_yes.detach())
    base, _ = btpo_loss(*args)
    same, st = btpo_loss(*args, ref_logp=logp.detach(), beta=0.5)
    close(same, base, tol=1e-12)
    close(st["kl"], 0.0)
    ref = logp.detach() + 0.3
    with_kl, st = btpo_loss(*args, ref_logp=ref, beta=0.5)
    kl_pair = (
        kl_k3(logp.reshape(-1, T), ref.reshape(-1, T), mask.reshape(-1, T)).view(B, 2, K).mean(-1).sum(-1)
    )
    close(with_kl, base + 0.5 * kl_pair.mean(), tol=1e-12)
    close(st["kl"], kl_pair.mean())
    # ref_logp given, beta = 0: KL is reported, not added
    no_beta, st = btpo_loss(*args, ref_logp=ref)
    close(no_beta, base, tol=1e-12)
    assert st["kl"] > 0
    with pytest.raises(ValueError, match="ref_logp"):
        btpo_loss(*args, beta=0.1)


@pytest.mark.parametrize("mode", ["grpo", "exact"])
def test_btpo_loss_k1_and_zero_probabilities(mode) -> None:
    g = torch.Generator().manual_seed(7)
    logp = torch.randn(2, 2, 1, 3, generator=g, dtype=D64, requires_grad=True)
    logp_yes = torch.randn(2, 2, 1, generator=g, dtype=D64).clamp_max(-0.1).requires_grad_()
    mask = torch.ones(2, 2, 1, 3, dtype=torch.bool)
    mask[1] = False  # a pair with empty thoughts
    loss, stats = btpo_loss(logp, logp.detach(), mask, logp_yes, logp_yes.detach(), thought_advantage=mode)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and torch.isfinite(logp_yes.grad).all()
    close(stats["adv_abs_mean"], 0.0)  # K = 1: every thought advantage is 0
    for v in stats.values():
        assert torch.isfinite(v)

    # every rollout p(Yes) = 0 (log = −inf): p̄ uniform, ω̂ = 0.5, nothing NaN
    logp = torch.randn(2, 2, 4, 3, generator=g, dtype=D64, requires_grad=True)
    logp_yes = torch.randn(2, 2, 4, generator=g, dtype=D64).clamp_max(-0.1).requires_grad_()
    old_yes = torch.full((2, 2, 4), -math.inf, dtype=D64)
    mask = torch.ones(2, 2, 4, 3, dtype=torch.bool)
    loss, stats = btpo_loss(logp, logp.detach(), mask, logp_yes, old_yes, thought_advantage=mode)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and torch.isfinite(logp_yes.grad).all()
    close(stats["omega_mean"], 0.5)
    close(stats["ess_mean"], 4.0)
    close(stats["adv_abs_mean"], 0.0)
    close(stats["pair_accuracy"], 0.5)
    close(stats["bt_nll_est"], math.log(2), tol=1e-12)


def test_btpo_loss_stats_hand_values() -> None:
    # one pair, K = 2: p_w = (0.6, 0.2), p_l = (0.1, 0.3) -> ŝ_w = 0.4, ŝ_l = 0.2, ω̂ = 1/3
    old_yes = t(0.6, 0.2, 0.1, 0.3).log().view(1, 2, 2)
    logp = torch.zeros(1, 2, 2, 2, dtype=D64)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    _, st = btpo_loss(logp, logp, mask, old_yes.clone(), old_yes, thought_advantage="exact", agg="seq-sum")
    close(st["omega_mean"], 1 / 3)
    close(st["score_chosen"], 0.4)
    close(st["score_rejected"], 0.2)
    close(st["bt_nll_est"], -math.log(0.4 / 0.6))
    close(st["pair_accuracy"], 1.0)
    close(st["ess_mean"], (1 / (0.75**2 + 0.25**2) + 1 / (0.25**2 + 0.75**2)) / 2)
    # exact: Â_w = (1/3)(2·(.75,.25) − 1) = (1/6, −1/6), Â_l = −(1/3)(2·(.25,.75) − 1) = (1/6, −1/6)
    close(st["adv_abs_mean"], 1 / 6)
    # the loss at ρ = 1 with logp = 0 tokens: L_thought = −Σ_r mean_k 2·Â = 0 (advantages sum to 0)
    close(st["loss_thought"], 0.0)


def test_btpo_loss_per_term_stats() -> None:
    """The split terms sum to their totals; log p(Yes) levels, drifts and Yes-logit pushes by hand."""
    theta, forward, mask = _toy(7)
    logp, logp_yes = forward(theta)
    g = torch.Generator().manual_seed(3)
    old = logp.detach() + 0.05 * torch.randn(logp.shape, generator=g, dtype=D64)
    old_yes = logp_yes.detach() + 0.2 * torch.randn(logp_yes.shape, generator=g, dtype=D64)
    _, st = btpo_loss(logp, old, mask, logp_yes, old_yes, eps_low=0.03, eps_high=0.03)
    close(st["loss_score_chosen"] + st["loss_score_rejected"], st["loss_score"])
    close(st["loss_thought_chosen"] + st["loss_thought_rejected"], st["loss_thought"])
    omega, pbar, _ = rollout_weights(old_yes, "grpo")
    lp = logp_yes.detach()
    close(st["loss_score_chosen"], (-omega * (pbar[:, 0] * lp[:, 0]).sum(-1)).mean())
    assert float(st["loss_score_chosen"]) > 0 > float(st["loss_score_rejected"])
    close(st["logp_yes_chosen"], old_yes[:, 0].mean())
    close(st["logp_yes_rejected"], old_yes[:, 1].mean())
    close(st["logp_yes_drift_chosen"], (lp[:, 0] - old_yes[:, 0]).mean())
    close(st["logp_yes_drift_rejected"], (lp[:, 1] - old_yes[:, 1]).mean())
    p = old_yes.exp()
    push = omega[:, None, None] * pbar * (1 - p)
    close(st["yes_logit_push_chosen"], push[:, 0].sum(-1).mean())
    close(st["yes_logit_push_rejected"], push[:, 1].sum(-1).mean())
