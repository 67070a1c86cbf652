r"""Losses for BTPO and the BT baseline, as pure functions on tensors (METHOD.md §3–§6).

Shapes use these letters: ``B`` preference pairs, ``K`` thoughts per response, ``T`` thought
tokens (padded), ``N`` thought sequences (``N = B * 2 * K`` inside :func:`btpo_loss`).
Nothing here touches a model; the trainer runs the forward passes and hands in log-probs.

The objective
-------------
A generative preference model scores a response ``y`` by the expected probability of "Yes"
after a thought ``z`` it samples itself, ``s(y) = E_{z ~ π(·|x,y)} p(Yes | x, y, z)``, and
the Bradley–Terry likelihood with ``exp r(y) = s(y)`` is

    P(y_w ≻ y_l | x) = s(y_w) / (s(y_w) + s(y_l)),      loss = − log P.

Its gradient is ``∇ log P = ω (∇ log s_w − ∇ log s_l)`` with the *misalignment weight*
``ω = s_l / (s_w + s_l) = P(y_l ≻ y_w)``, and by the score-function identity
``∇ log s = E_z[(p(Yes|z) / s) ∇(log π(z) + log p(Yes|z))]``.

The estimator
-------------
With ``K`` sampled thoughts per response and ``p_k = p(Yes | z_k)`` (all stop-gradient):
``ŝ = mean_k p_k`` (:func:`mc_scores`), ``ω̂ = ŝ_l / (ŝ_w + ŝ_l)``
(:func:`misalignment_weight`), ``p̄_k = p_k / Σ_j p_j`` (:func:`self_normalized_scores`), and

    ĝ = ω̂ [ Σ_k p̄^w_k ∇(log π(z^w_k) + log p(Yes|z^w_k)) − Σ_k p̄^l_k ∇(log π(z^l_k) + log p(Yes|z^l_k)) ],

biased for finite ``K`` but consistent as ``K → ∞``.

How the surrogate realizes it
-----------------------------
:func:`btpo_loss` minimizes, per pair, ``L = L_score + L_thought (+ β KL)``:

* ``L_score = −ω̂ [Σ_k p̄^w_k log p(Yes|z^w_k) − Σ_k p̄^l_k log p(Yes|z^l_k)]``
  (:func:`score_loss`): its gradient is the ``∇ log p(Yes|z)`` half of ``−ĝ``.
* ``L_thought = − Σ_{r∈{w,l}} (1/K) Σ_k agg_t min(ρ_t Â^r_k, clip(ρ_t, 1−ε_low, 1+ε_high) Â^r_k)``
  (:func:`clipped_surrogate`) with thought advantages from :func:`thought_advantages`:
  ``exact`` uses ``Â^w_k = ω̂ (K p̄^w_k − 1)``, ``Â^l_k = −ω̂ (K p̄^l_k − 1)``; with
  ``agg = "seq-sum"`` and ``ρ = 1`` (first step on a fresh rollout) the gradient of
  ``L_thought`` is ``−ω̂ [Σ_k (p̄^w_k − 1/K) ∇log π(z^w_k) − Σ_k (p̄^l_k − 1/K) ∇log π(z^l_k)]``,
  so ``∇L = −ĝ`` up to the ``1/K`` baseline (whose expectation vanishes). ``grpo`` (the
  paper's implementation, default) standardizes the rewards ``p̄^w`` and ``−p̄^l`` within each
  group of ``K`` and multiplies by ``ω̂``.

Choices that are ours (the paper and METHOD.md leave them open)
----------------------------------------------------------------
* ``grpo`` advantages use the population standard deviation (``correction=0``) plus
  ``1e-6``; with ``K = 1`` every advantage is exactly 0 (no NaN).
* ``ω̂ = 0.5`` when ``ŝ_w = ŝ_l = 0``; ``p̄`` is uniform ``1/K`` when ``Σ_k p_k = 0`` (the
  limit of equal scores). :func:`btpo_loss` computes ``ω̂`` and ``p̄`` in log space from
  ``log p(Yes)`` (``sigmoid`` of the log-score gap, ``softmax`` over ``K``), so a ``p(Yes)``
  that would underflow in float32 still gets its correct relative weight.
* ``token-mean`` averages over each sequence's own valid tokens (GRPO), then the ``1/K``
  mean and the pair mean follow; it is not a minibatch-wide token mean (DAPO).
* ``clip_fraction`` counts valid tokens whose clipped branch is the active one, i.e. whose
  gradient the clip zeroes: ``ρ > 1+ε_high`` with ``Â > 0`` or ``ρ < 1−ε_low`` with ``Â < 0``.
* The optional KL term is the k3 estimator ``exp(ref−logp) − (ref−logp) − 1``, averaged over
  each sequence's valid tokens and combined across thoughts like ``L_thought``
  (sum over the two responses of the mean over ``K``).
* Masked (padding) positions are ignored by value: they may hold anything, even ``inf`` or
  ``NaN``, without reaching the loss or the gradient. A sequence with no valid token
  contributes 0.
* Log-probs in float16/bfloat16 are upcast to float32 before ``exp`` and the clip.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

AdvantageMode = Literal["grpo", "exact"]
Aggregation = Literal["token-mean", "seq-sum", "token-sum-norm"]

ADVANTAGE_MODES: tuple[str, ...] = ("grpo", "exact")
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-sum", "token-sum-norm")

__all__ = [
    "ADVANTAGE_MODES",
    "AGGREGATIONS",
    "AdvantageMode",
    "Aggregation",
    "bt_loss",
    "bt_nll_estimate",
    "btpo_diagnostics",
    "btpo_loss",
    "clipped_surrogate",
    "effective_sample_size",
    "gram_loss",
    "group_advantages",
    "kl_k3",
    "log_mc_scores",
    "mc_scores",
    "misalignment_weight",
    "misalignment_weight_from_log",
    "rollout_weights",
    "score_loss",
    "self_normalized_scores",
    "self_normalized_scores_from_log",
    "thought_advantages",
]


# ----------------------------------------------------------------------------- helpers


def _upcast(x: Tensor) -> Tensor:
    """Cast float16/bfloat16 to float32; leave float32/float64 alone."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` is true, 0 elsewhere (also kills inf/NaN in padding, and its gradient)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------- BT baseline


def bt_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Bradley–Terry loss of a scalar reward model (METHOD.md §6, baseline "BT").

    Args:
        r_chosen: ``(B,)`` rewards of the preferred responses.
        r_rejected: ``(B,)`` rewards of the less-preferred responses.

    Returns:
        ``()`` scalar: ``mean_b −log σ(r_chosen[b] − r_rejected[b])`` (via ``F.logsigmoid``).
    """
    _check_same_shape("r_chosen", r_chosen, "r_rejected", r_rejected)
    return -F.logsigmoid(_upcast(r_chosen) - _upcast(r_rejected)).mean()


# ----------------------------------------------------------------------------- scores and weights


def mc_scores(p: Tensor) -> Tensor:
    """Monte-Carlo score ``ŝ = (1/K) Σ_k p_k`` of a response (METHOD.md §4).

    Args:
        p: ``(..., K)`` ``p(Yes | x, y, z_k)`` of ``K`` thoughts.

    Returns:
        ``(...)`` the mean over the last dimension. Keeps the graph of ``p``.
    """
    return p.mean(dim=-1)


def log_mc_scores(logp_yes: Tensor) -> Tensor:
    """``log ŝ = logsumexp_k log p_k − log K``, the log of :func:`mc_scores`, computed stably.

    Args:
        logp_yes: ``(..., K)`` ``log p(Yes | x, y, z_k)``; ``-inf`` allowed.

    Returns:
        ``(...)`` ``log ŝ`` (``-inf`` when every ``p_k`` is 0). Keeps the graph of the input.
    """
    return torch.logsumexp(logp_yes, dim=-1) - math.log(logp_yes.shape[-1])


def misalignment_weight(s_w: Tensor, s_l: Tensor) -> Tensor:
    """Misalignment weight ``ω̂ = ŝ_l / (ŝ_w + ŝ_l)``, the estimated ``P(y_l ≻ y_w)`` (METHOD.md §4).

    Args:
        s_w: ``(B,)`` scores ``ŝ`` of the preferred responses (non-negative).
        s_l: ``(B,)`` scores ``ŝ`` of the less-preferred responses (non-negative).

    Returns:
        ``(B,)`` ``ω̂`` in ``[0, 1]``, detached (no gradient). ``0.5`` where both scores are 0.
    """
    _check_same_shape("s_w", s_w, "s_l", s_l)
    s_w, s_l = s_w.detach(), s_l.detach()
    denom = s_w + s_l
    ok = denom > 0
    safe = torch.where(ok, denom, torch.ones_like(denom))
    return torch.where(ok, s_l / safe, torch.full_like(denom, 0.5))


def misalignment_weight_from_log(log_s_w: Tensor, log_s_l: Tensor) -> Tensor:
    """:func:`misalignment_weight` from log-scores: ``ω̂ = σ(log ŝ_l − log ŝ_w)``.

    Args:
        log_s_w: ``(B,)`` ``log ŝ`` of the preferred responses (``-inf`` allowed).
        log_s_l: ``(B,)`` ``log ŝ`` of the less-preferred responses (``-inf`` allowed).

    Returns:
        ``(B,)`` ``ω̂``, detached. ``0.5`` where both are ``-inf``.
    """
    _check_same_shape("log_s_w", log_s_w, "log_s_l", log_s_l)
    log_s_w, log_s_l = log_s_w.detach(), log_s_l.detach()
    both_zero = torch.isneginf(log_s_w) & torch.isneginf(log_s_l)
    gap = torch.where(both_zero, torch.zeros_like(log_s_w), log_s_l - log_s_w)
    return torch.sigmoid(gap)


def self_normalized_scores(p: Tensor) -> Tensor:
    """Self-normalized conditional preference scores ``p̄_k = p_k / Σ_j p_j`` (METHOD.md §4).

    Args:
        p: ``(..., K)`` ``p(Yes | z_k)`` of ``K`` thoughts (non-negative).

    Returns:
        ``(..., K)`` ``p̄``, detached, summing to 1 over the last dimension; uniform ``1/K``
        where ``Σ_k p_k = 0``.
    """
    p = p.detach()
    total = p.sum(dim=-1, keepdim=True)
    ok = total > 0
    safe = torch.where(ok, total, torch.ones_like(total))
    return torch.where(ok, p / safe, torch.full_like(p, 1.0 / p.shape[-1]))


def self_normalized_scores_from_log(logp_yes: Tensor) -> Tensor:
    """:func:`self_normalized_scores` from ``log p(Yes)``: a softmax over ``K``.

    Args:
        logp_yes: ``(..., K)`` ``log p(Yes | z_k)`` (``-inf`` allowed).

    Returns:
        ``(..., K)`` ``p̄``, detached; uniform ``1/K`` where every entry is ``-inf``.
    """
    logp_yes = logp_yes.detach()
    top = logp_yes.amax(dim=-1, keepdim=True)
    all_zero = torch.isneginf(top)
    shifted = logp_yes - torch.where(all_zero, torch.zeros_like(top), top)
    e = shifted.exp()  # the max entry is exp(0) = 1, so the sum is >= 1 unless all are -inf
    total = e.sum(dim=-1, keepdim=True)
    safe = torch.where(all_zero, torch.ones_like(total), total)
    return torch.where(all_zero, torch.full_like(e, 1.0 / e.shape[-1]), e / safe)


def bt_nll_estimate(p_w: Tensor, p_l: Tensor) -> Tensor:
    """Plug-in estimate of the BT loss, ``−log P̂ = −log(ŝ_w / (ŝ_w + ŝ_l))`` (METHOD.md §3).

    Computed in log space as ``softplus(log ŝ_l − log ŝ_w)``; each ``ŝ`` is clamped below at
    the dtype's smallest normal number so the result stays finite (``log 2`` when both are 0).
    Note ``ω̂ = 1 − exp(−(−log P̂))``. A metric: callers normally pass detached inputs.

    Args:
        p_w: ``(B, K)`` ``p(Yes)`` of the thoughts about the preferred responses.
        p_l: ``(B, K)`` ``p(Yes)`` of the thoughts about the less-preferred responses.

    Returns:
        ``(B,)`` ``−log P̂`` per pair.
    """
    _check_same_shape("p_w", p_w, "p_l", p_l)
    p_w, p_l = _upcast(p_w), _upcast(p_l)
    tiny = torch.finfo(p_w.dtype).tiny
    log_s_w = mc_scores(p_w).clamp_min(tiny).log()
    log_s_l = mc_scores(p_l).clamp_min(tiny).log()
    return F.softplus(log_s_l - log_s_w)


def effective_sample_size(pbar: Tensor) -> Tensor:
    """Effective sample size of the self-normalized weights, ``1 / Σ_k p̄_k²``.

    The input is renormalized first (so unnormalized ``p`` gives the same answer, and
    all-zero input counts as uniform).

    Args:
        pbar: ``(..., K)`` ``p̄`` (or any non-negative weights).

    Returns:
        ``(...)`` ESS in ``[1, K]``: ``K`` for uniform weights, 1 for one-hot. Detached.
    """
    w = self_normalized_scores(pbar)
    return 1.0 / (w * w).sum(dim=-1)


# ----------------------------------------------------------------------------- advantages


def thought_advantages(
    pbar_w: Tensor,
    pbar_l: Tensor,
    omega: Tensor,
    mode: AdvantageMode,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Per-thought advantages ``Â`` for the clipped thought surrogate (METHOD.md §5).

    * ``grpo``: rewards ``r^w = p̄^w``, ``r^l = −p̄^l``; within each group of ``K`` thoughts
      ``(r − mean) / (std + eps)`` with the *population* std (``correction=0``); times ``ω̂``.
      ``K = 1`` gives 0.
    * ``exact``: ``Â^w = ω̂ (K p̄^w − 1)``, ``Â^l = −ω̂ (K p̄^l − 1)`` (``eps`` unused).

    Args:
        pbar_w: ``(B, K)`` ``p̄`` of the preferred responses' thoughts.
        pbar_l: ``(B, K)`` ``p̄`` of the less-preferred responses' thoughts.
        omega: ``(B,)`` ``ω̂`` (pass ones to switch the misalignment weight off).
        mode: ``"grpo"`` or ``"exact"``.
        eps: added to the std in ``grpo`` mode.

    Returns:
        ``(A_w, A_l)``, each ``(B, K)``, detached.
    """
    _check_same_shape("pbar_w", pbar_w, "pbar_l", pbar_l)
    if pbar_w.dim() != 2 or omega.shape != pbar_w.shape[:1]:
        raise ValueError(
            f"expected pbar (B, K) and omega (B,), got {tuple(pbar_w.shape)} and {tuple(omega.shape)}"
        )
    pbar_w, pbar_l, w = pbar_w.detach(), pbar_l.detach(), omega.detach().unsqueeze(-1)
    k = pbar_w.shape[-1]
    if mode == "grpo":

        def standardize(r: Tensor) -> Tensor:
            centered = r - r.mean(dim=-1, keepdim=True)
            return centered / (r.std(dim=-1, correction=0, keepdim=True) + eps)

        return w * standardize(pbar_w), w * standardize(-pbar_l)
    if mode == "exact":
        return w * (k * pbar_w - 1.0), -w * (k * pbar_l - 1.0)
    raise ValueError(f"unknown thought advantage mode {mode!r}; expected one of {ADVANTAGE_MODES}")


# ----------------------------------------------------------------------------- per-sequence losses


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    agg: Aggregation,
    norm_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-style clipped policy-gradient loss on thought tokens, aggregated per sequence.

    Per token ``−min(ρ_t A, clip(ρ_t, 1−eps_low, 1+eps_high) A)`` with ``ρ_t = exp(logp − old_logp)``.

    Args:
        logp: ``(N, T)`` current per-token log-probs of the thought tokens (carries the graph).
        old_logp: ``(N, T)`` the same under the rollout ("old") policy; detached here.
        advantages: ``(N,)`` one advantage per sequence; detached here.
        mask: ``(N, T)`` valid thought tokens (bool, or 0/1; nonzero counts as valid).
        eps_low: lower clip range, ``ρ ≥ 1 − eps_low``.
        eps_high: upper clip range, ``ρ ≤ 1 + eps_high``.
        agg: ``"token-mean"`` (sum over the valid tokens / their number; GRPO),
            ``"seq-sum"`` (sum over valid tokens) or ``"token-sum-norm"`` (sum / ``norm_constant``;
            Dr. GRPO).
        norm_constant: required for ``"token-sum-norm"`` (e.g. ``max_thought_tokens``).

    Returns:
        ``(losses, stats)``: ``losses`` is ``(N,)`` per-sequence (0 for a sequence with no valid
        token); ``stats`` holds detached ``()`` tensors over all valid tokens: ``clip_fraction``
        (clipped branch active, gradient zeroed), ``clip_fraction_low``, ``clip_fraction_high``,
        ``approx_kl`` (mean of ``old_logp − logp``), ``ratio_mean``, ``ratio_max``.
    """
    _check_same_shape("logp", logp, "old_logp", old_logp)
    _check_same_shape("logp", logp, "mask", mask)
    if logp.dim() != 2 or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"expected logp (N, T) and advantages (N,), got {tuple(logp.shape)} and {tuple(advantages.shape)}"
        )
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")
    if agg == "token-sum-norm" and (norm_constant is None or not norm_constant > 0):
        raise ValueError("agg='token-sum-norm' needs a positive norm_constant (e.g. max_thought_tokens)")

    mask = mask.bool()
    logp = _masked(_upcast(logp), mask)
    old_logp = _masked(_upcast(old_logp).detach(), mask)
    adv = _upcast(advantages).detach().to(logp.dtype).unsqueeze(-1)  # (N, 1)

    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = _masked(-torch.minimum(unclipped, clipped), mask)  # (N, T)

    token_sum = per_token.sum(dim=-1)
    n_valid = mask.sum(dim=-1)
    if agg == "token-mean":
        losses = token_sum / n_valid.clamp_min(1).to(token_sum.dtype)
    elif agg == "seq-sum":
        losses = token_sum
    else:
        losses = token_sum / float(norm_constant)  # type: ignore[arg-type]

    with torch.no_grad():
        denom = mask.sum().clamp_min(1).to(logp.dtype)
        high = mask & (ratio > 1.0 + eps_high) & (adv > 0)
        low = mask & (ratio < 1.0 - eps_low) & (adv < 0)
        stats = {
            "clip_fraction": (high | low).sum().to(logp.dtype) / denom,
            "clip_fraction_low": low.sum().to(logp.dtype) / denom,
            "clip_fraction_high": high.sum().to(logp.dtype) / denom,
            "approx_kl": _masked(-log_ratio, mask).sum() / denom,
            "ratio_mean": _masked(ratio, mask).sum() / denom,
            "ratio_max": _masked(ratio, mask).amax() if mask.any() else ratio.new_ones(()),
        }
    return losses, stats


def score_loss(
    logp_yes_w: Tensor,
    logp_yes_l: Tensor,
    pbar_w: Tensor,
    pbar_l: Tensor,
    omega: Tensor,
    floor: float = 0.0,
) -> Tensor:
    """Scoring term ``L_score = −ω̂ [Σ_k p̄^w_k log p(Yes|z^w_k) − Σ_k p̄^l_k log p(Yes|z^l_k)]`` (§5).

    With ``floor > 0`` (ours) the rejected side reads ``max(log p(Yes|z^l_k), log floor)``: a
    rejected thought whose p(Yes) is already below ``floor`` is pushed no further. Above the floor
    the term and its gradient are METHOD's exactly; below it the push on log p(Yes), which is
    unbounded below (and, through the Yes logit the two sides share, drags the chosen side down with
    it), stops. ``floor = 0`` is METHOD's term.

    Args:
        logp_yes_w: ``(B, K)`` current ``log p(Yes | x, y_w, z^w_k)`` (carries the graph).
        logp_yes_l: ``(B, K)`` current ``log p(Yes | x, y_l, z^l_k)`` (carries the graph).
        pbar_w: ``(B, K)`` ``p̄^w`` (detached here).
        pbar_l: ``(B, K)`` ``p̄^l`` (detached here).
        omega: ``(B,)`` ``ω̂`` (detached here).
        floor: p(Yes) below which a rejected thought's score term is constant (0: none).

    Returns:
        ``(B,)`` per-pair loss. A thought with ``p̄ = 0`` contributes exactly 0, even if its
        ``log p(Yes)`` is ``-inf``.
    """
    for name, t in (("logp_yes_l", logp_yes_l), ("pbar_w", pbar_w), ("pbar_l", pbar_l)):
        _check_same_shape("logp_yes_w", logp_yes_w, name, t)
    if logp_yes_w.dim() != 2 or omega.shape != logp_yes_w.shape[:1]:
        raise ValueError(
            f"expected (B, K) inputs and omega (B,), got {tuple(logp_yes_w.shape)} and {tuple(omega.shape)}"
        )

    def weighted(logp_yes: Tensor, pbar: Tensor) -> Tensor:
        logp_yes, pbar = _upcast(logp_yes), _upcast(pbar).detach()
        return _masked(pbar * logp_yes, pbar > 0).sum(dim=-1)

    if floor > 0:
        logp_yes_l = _upcast(logp_yes_l).clamp_min(math.log(floor))
    return -omega.detach() * (weighted(logp_yes_w, pbar_w) - weighted(logp_yes_l, pbar_l))


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """k3 estimator of ``KL(π_θ || π_ref)`` on thought tokens, mean over each sequence's valid tokens.

    Per token ``exp(ref − logp) − (ref − logp) − 1`` (≥ 0, 0 iff ``ref == logp``).

    Args:
        logp: ``(N, T)`` current per-token log-probs (carries the graph).
        ref_logp: ``(N, T)`` reference-model per-token log-probs (detached here).
        mask: ``(N, T)`` valid tokens.

    Returns:
        ``(N,)`` per-sequence mean (0 for a sequence with no valid token).
    """
    _check_same_shape("logp", logp, "ref_logp", ref_logp)
    _check_same_shape("logp", logp, "mask", mask)
    mask = mask.bool()
    d = _masked(_upcast(ref_logp).detach(), mask) - _masked(_upcast(logp), mask)
    per_token = _masked(d.exp() - d - 1.0, mask)
    return per_token.sum(dim=-1) / mask.sum(dim=-1).clamp_min(1).to(per_token.dtype)


# ----------------------------------------------------------------------------- baselines


def gram_loss(logp_a: Tensor, logp_b: Tensor, target_is_a: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """GRAM's per-judgement loss ``−(1−ε) log p(correct) − ε log p(other)`` (METHOD.md §6).

    ``p`` is the full-vocabulary distribution at the generation head; with ``ε > 0`` the smoothing
    mass goes to the other label only (the target is the two-point distribution (1−ε, ε)).

    Args:
        logp_a: ``(N,)`` log p("A") of N judgements.
        logp_b: ``(N,)`` log p("B").
        target_is_a: ``(N,)`` bool, whether "A" is the correct label.
        label_smoothing: ``ε`` in ``[0, 1)``.

    Returns:
        ``(N,)`` losses.
    """
    _check_same_shape("logp_a", logp_a, "logp_b", logp_b)
    correct = torch.where(target_is_a, logp_a, logp_b)
    other = torch.where(target_is_a, logp_b, logp_a)
    return -(1.0 - label_smoothing) * correct - label_smoothing * other


def group_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantages: ``(r − mean) / (std + eps)`` over the last dim, population std (``correction=0``).

    Args:
        rewards: ``(n_groups, G)`` rewards.
        eps: added to the std; a group of equal rewards (or ``G = 1``) gets advantages exactly 0.

    Returns:
        ``(n_groups, G)`` advantages (float32).
    """
    r = rewards.float()
    centered = r - r.mean(dim=-1, keepdim=True)
    return centered / (r.std(dim=-1, correction=0, keepdim=True) + eps)


# ----------------------------------------------------------------------------- BTPO


def rollout_weights(
    old_logp_yes: Tensor,
    mode: AdvantageMode,
    misalignment_weight: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """``ω̂``, ``p̄`` and the thought advantages of a rollout, from its ``log p(Yes)``.

    Everything is per pair, so a minibatch that keeps each pair's ``2K`` thoughts together
    gets the same values as the whole rollout batch.

    Args:
        old_logp_yes: ``(B, 2, K)`` rollout-time ``log p(Yes | z)``; index 0 of dim 1 is the
            preferred response ``y_w``, index 1 the less-preferred ``y_l``.
        mode: thought advantage, ``"grpo"`` or ``"exact"``.
        misalignment_weight: ``False`` sets ``ω̂ = 1`` (the ablation of §5).
        eps: std epsilon of ``grpo``.

    Returns:
        ``(omega, pbar, advantages)``: ``(B,)``, ``(B, 2, K)``, ``(B, 2, K)``; all detached.
        ``omega`` is the *applied* weight (ones when ``misalignment_weight`` is False).
    """
    if old_logp_yes.dim() != 3 or old_logp_yes.shape[1] != 2:
        raise ValueError(f"expected old_logp_yes of shape (B, 2, K), got {tuple(old_logp_yes.shape)}")
    lp = _upcast(old_logp_yes).detach()
    pbar = self_normalized_scores_from_log(lp)  # (B, 2, K)
    if misalignment_weight:
        log_s = log_mc_scores(lp)  # (B, 2)
        omega = misalignment_weight_from_log(log_s[:, 0], log_s[:, 1])
    else:
        omega = torch.ones(lp.shape[0], dtype=lp.dtype, device=lp.device)
    a_w, a_l = thought_advantages(pbar[:, 0], pbar[:, 1], omega, mode, eps)
    return omega, pbar, torch.stack((a_w, a_l), dim=1)


def btpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    logp_yes: Tensor,
    old_logp_yes: Tensor,
    *,
    thought_advantage: AdvantageMode = "grpo",
    agg: Aggregation = "token-mean",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    norm_constant: float | None = None,
    misalignment_weight: bool = True,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    adv_eps: float = 1e-6,
    score_floor: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """BTPO surrogate loss of a minibatch of ``B`` pairs (METHOD.md §5).

    Layout: per-thought tensors are ``(B, 2, K)``; per-token tensors are ``(B, 2, K, T)``, or
    the same flattened to ``(B*2*K, T)`` in row-major ``(pair, response, thought)`` order
    (``x.view(B, 2, K, T)`` must recover it). On dim 1, index 0 is the preferred response
    ``y_w`` and index 1 the less-preferred ``y_l``.

    Per pair ``L = L_score + L_thought + β KL`` with
    ``L_thought = Σ_{r∈{w,l}} (1/K) Σ_k clipped_surrogate(...)[r, k]`` and
    ``KL = Σ_{r∈{w,l}} (1/K) Σ_k kl_k3(...)[r, k]``; the returned loss is the mean over pairs.
    ``ω̂``, ``p̄`` and ``Â`` come from ``old_logp_yes`` (:func:`rollout_weights`).

    With ``thought_advantage="exact"``, ``agg="seq-sum"`` and ``old_logp == logp.detach()``,
    ``old_logp_yes == logp_yes.detach()`` and ``β = 0``, the gradient is ``−(1/B) Σ_b ĝ_b`` with
    the ``1/K`` baseline subtracted in its ``∇ log π`` part.

    Args:
        logp: ``(B, 2, K, T)`` or ``(B*2*K, T)`` current thought-token log-probs (graph).
        old_logp: same shape, rollout-time log-probs (no graph needed).
        mask: same shape, valid thought tokens.
        logp_yes: ``(B, 2, K)`` current ``log p(Yes | x, y, z)`` (graph).
        old_logp_yes: ``(B, 2, K)`` rollout-time ``log p(Yes | x, y, z)``.
        thought_advantage: ``"grpo"`` (default) or ``"exact"``.
        agg: ``"token-mean"``, ``"seq-sum"`` or ``"token-sum-norm"``.
        eps_low: lower clip range.
        eps_high: upper clip range.
        norm_constant: the constant of ``"token-sum-norm"`` (``max_thought_tokens``).
        misalignment_weight: ``False`` sets ``ω̂ = 1`` in the score term and the advantages.
        ref_logp: per-token reference log-probs, same shape as ``logp``; needed when ``beta > 0``.
        beta: KL coefficient (0 by default, METHOD.md §5).
        adv_eps: std epsilon of ``grpo`` advantages.
        score_floor: the rejected side's p(Yes) floor in the score term (:func:`score_loss`; 0: METHOD's term).

    Returns:
        ``(loss, stats)``: ``loss`` is ``()``; ``stats`` maps names to detached ``()`` tensors:
        ``loss``, ``loss_score``, ``loss_thought``, ``kl`` (when ``ref_logp`` is given),
        ``omega_mean``, ``score_chosen``/``score_rejected`` (mean ``ŝ``), ``bt_nll_est``,
        ``pair_accuracy`` (``ŝ_w > ŝ_l``, ties 0.5), ``ess_mean`` (mean ESS of ``p̄``),
        ``adv_abs_mean``, and the :func:`clipped_surrogate` stats over all thought tokens.
    """
    if logp_yes.dim() != 3 or logp_yes.shape[1] != 2:
        raise ValueError(f"expected logp_yes of shape (B, 2, K), got {tuple(logp_yes.shape)}")
    _check_same_shape("logp_yes", logp_yes, "old_logp_yes", old_logp_yes)
    n_pairs, _, k = logp_yes.shape
    n_seq = n_pairs * 2 * k

    def flat(name: str, x: Tensor) -> Tensor:
        if x.dim() == 4 and tuple(x.shape[:3]) == (n_pairs, 2, k):
            return x.reshape(n_seq, x.shape[-1])
        if x.dim() == 2 and x.shape[0] == n_seq:
            return x
        raise ValueError(
            f"{name} must be (B, 2, K, T) or (B*2*K, T) with B={n_pairs}, K={k}; got {tuple(x.shape)}"
        )

    logp_f, old_f, mask_f = flat("logp", logp), flat("old_logp", old_logp), flat("mask", mask)
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")

    omega, pbar, adv = rollout_weights(old_logp_yes, thought_advantage, misalignment_weight, adv_eps)

    l_score = score_loss(logp_yes[:, 0], logp_yes[:, 1], pbar[:, 0], pbar[:, 1], omega, score_floor)  # (B,)
    seq_losses, clip_stats = clipped_surrogate(
        logp_f, old_f, adv.reshape(n_seq), mask_f, eps_low, eps_high, agg, norm_constant
    )
    l_thought_r = seq_losses.view(n_pairs, 2, k).mean(dim=-1)  # (B, 2): chosen, rejected
    l_thought = l_thought_r.sum(dim=-1)  # (B,)
    per_pair = l_score + l_thought

    kl_pair: Tensor | None = None
    if ref_logp is not None:
        kl_pair = kl_k3(logp_f, flat("ref_logp", ref_logp), mask_f).view(n_pairs, 2, k).mean(-1).sum(-1)
        if beta > 0:
            per_pair = per_pair + beta * kl_pair
    loss = per_pair.mean()

    stats = btpo_diagnostics(loss, l_score, l_thought, l_thought_r, logp_yes, old_logp_yes, omega, pbar, adv,
                             clip_stats, kl_pair, score_floor)
    return loss, stats


@torch.no_grad()
def btpo_diagnostics(
    loss: Tensor,
    l_score: Tensor,
    l_thought: Tensor,
    l_thought_r: Tensor,
    logp_yes: Tensor,
    old_logp_yes: Tensor,
    omega: Tensor,
    pbar: Tensor,
    adv: Tensor,
    clip_stats: dict[str, Tensor],
    kl_pair: Tensor | None,
    score_floor: float,
) -> dict[str, Tensor]:
    """The stats :func:`btpo_loss` returns (detached ``()`` tensors): the loss and its terms, split by side
    of the pair; the Monte-Carlo scores ``ŝ`` and what they say of the pair (``bt_nll_est``,
    ``pair_accuracy``); ``ω̂``, ESS of ``p̄`` and ``|Â|``; how hard the score term pushes each side's Yes
    logit; the drift of ``log p(Yes)`` since the rollout; and ``clip_stats`` (``kl`` when ``kl_pair``).

    Shapes as in :func:`btpo_loss`: ``l_score``, ``l_thought`` ``(B,)``; ``l_thought_r`` ``(B, 2)``;
    ``logp_yes``, ``old_logp_yes``, ``pbar``, ``adv`` ``(B, 2, K)``; ``omega`` ``(B,)``. Nothing here
    enters the loss."""
    lp_old = _upcast(old_logp_yes).detach()
    # log ŝ clamped at the smallest normal number, as in bt_nll_estimate (both 0 -> a tie)
    log_s = log_mc_scores(lp_old).clamp_min(math.log(torch.finfo(lp_old.dtype).tiny))  # (B, 2)
    gap = log_s[:, 0] - log_s[:, 1]
    # per-term diagnostics: which side of the pair each term pushes, and how hard
    lp_new = _upcast(logp_yes).detach()
    l_score_w = score_loss(lp_new[:, 0], lp_new[:, 1], pbar[:, 0], torch.zeros_like(pbar[:, 1]), omega)
    # d(L_score)/d(Yes logit) under a full-vocabulary softmax is ω̂ p̄ (1 − p) per thought: the
    # chosen side's push saturates as p → 1, the rejected side's does not as p → 0
    p_old = lp_old.exp()
    push = omega[:, None, None] * pbar * (1.0 - p_old)  # (B, 2, K)
    stats: dict[str, Tensor] = {
        "loss": loss.detach(),
        "loss_score": l_score.detach().mean(),
        "loss_score_chosen": l_score_w.mean(),
        "loss_score_rejected": (l_score.detach() - l_score_w).mean(),
        "loss_thought": l_thought.detach().mean(),
        "loss_thought_chosen": l_thought_r[:, 0].detach().mean(),
        "loss_thought_rejected": l_thought_r[:, 1].detach().mean(),
        "logp_yes_chosen": lp_old[:, 0].mean(),
        "logp_yes_rejected": lp_old[:, 1].mean(),
        "logp_yes_drift_chosen": (lp_new[:, 0] - lp_old[:, 0]).mean(),
        "logp_yes_drift_rejected": (lp_new[:, 1] - lp_old[:, 1]).mean(),
        "yes_logit_push_chosen": push[:, 0].sum(-1).mean(),
        "yes_logit_push_rejected": push[:, 1].sum(-1).mean(),
        # share of the rejected side's score weight (p̄) on thoughts already below the floor
        "score_floor_share": (pbar[:, 1] * (lp_new[:, 1] < math.log(score_floor)).to(pbar.dtype)).sum(-1).mean()
        if score_floor > 0 else torch.zeros((), dtype=pbar.dtype),
        "omega_mean": omega.mean(),
        "score_chosen": log_s[:, 0].exp().mean(),
        "score_rejected": log_s[:, 1].exp().mean(),
        "bt_nll_est": F.softplus(-gap).mean(),
        "pair_accuracy": ((gap > 0).to(gap.dtype) + 0.5 * (gap == 0).to(gap.dtype)).mean(),
        "ess_mean": (1.0 / (pbar * pbar).sum(dim=-1)).mean(),
        "adv_abs_mean": adv.abs().mean(),
        **clip_stats,
    }
    if kl_pair is not None:
        stats["kl"] = kl_pair.detach().mean()
    return stats
