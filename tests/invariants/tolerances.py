"""Tolerances of the invariant tests (1 process = N processes, resume, shared-prefix / chunked paths),
derived from how the compared runs differ, not tuned to one CPU.

Two runs that should compute the same thing differ only in the ORDER in which float32 sums are taken:
the gradient all-reduce / reduce-scatter of N processes, matmul blocking (which changes with the
thread count), the shared-prefix path's KV-cache concatenation, the chunked log-softmax. Hence:

1. **Values before the optimizer acts** (a loss or metric from identical weights, a gradient):
   float32 summation of ``n`` terms in two orders. Each of the ``n`` additions rounds by at most
   ``u·|partial sum|`` (unit roundoff ``u = eps32 / 2``); modelled as independent, these errors add
   like a random walk, so with ``scale`` the partial sums' magnitude the two results differ by about
   ``u·sqrt(n)·scale``, and :data:`SIGMAS` standard deviations give
   ``float32_sum_bound(n, scale) = SIGMAS·eps32·sqrt(n)·scale``. ``scale``: ``max(1, |value|)`` for a
   loss (its terms are log-probabilities and log-ratios of order 1), the largest element for a
   gradient (the worst case, Higham's ``(n-1)·u·Σ|x|`` per order, needs adversarial data).

2. **A value after optimizer steps** (a later row's loss): the weights then differ as in 3; an
   element's update is well determined to :data:`RHO` (relative) unless its gradient is rounding
   noise, so such values get ``RHO`` relative on top of the bound of 1.

3. **Weights after AdamW steps.** Adam's update of one element at step ``t`` is
   ``lr_t·m̂_t / (sqrt(v̂_t) + eps)``, and by Cauchy–Schwarz ``|m̂_t| / sqrt(v̂_t) ≤ c_t`` for ANY
   gradient history (:func:`adam_update_bound`: ``c_1 = 1``; ``c_t ≈ 1.002`` for t ≤ 4 at betas
   (0.9, 0.95)). So whatever the gradients, two runs from the same weights end at most
   ``B = 2·Σ_t lr_t·c_t`` apart in every element (:func:`adam_drift_bound`; decoupled weight decay
   only contracts the difference). Adam divides by the gradient's own size, so an element whose
   gradient is near zero (|g| comparable to the rounding noise of 1, e.g. a k_proj bias, whose exact
   gradient is 0 because softmax ignores a per-query shift) turns rounding into steps of up to lr:
   such elements may use all of ``B``. An element whose gradient is known to relative ``RHO`` has
   an update known to about ``2·RHO`` (m̂ and sqrt(v̂) each off by ``RHO``), hence
   ``|Δw| ≤ RHO·B`` — the tight bound. All but a fraction :data:`NOISY_FRACTION` of the elements
   must meet it. A real fault (a missing or extra step, one process's gradient lost, a wrong
   scale before clipping, a wrong batch) moves nearly every element by ~lr ≫ ``RHO·B``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

EPS32 = torch.finfo(torch.float32).eps   # 2**-23: float32's spacing at 1 (unit roundoff u = EPS32 / 2)
SIGMAS = 4.0
"""Standard deviations of the random-walk rounding model allowed (each rounding error is uniform in
±u·scale, standard deviation u·scale/sqrt(3); the difference of two sums has standard deviation
≤ u·sqrt(2n/3)·scale ≈ 0.41·EPS32·sqrt(n)·scale: 4·EPS32·sqrt(n)·scale is ≈ 10 of them)."""
RHO = 1e-3
"""Relative accuracy that makes a gradient element "well determined": its sign and size are known to
0.1 %, which holds for any element whose magnitude is ≥ 1000× the rounding noise of 1."""
NOISY_FRACTION = 1e-3
"""Elements allowed between the tight bound ``RHO·B`` and Adam's bound ``B``: those whose gradient is
within 1/RHO of the rounding noise. In tiny-qwen2 (262,720 elements) the structurally zero-gradient
k_proj biases alone are 64 (2.4e-4); a fault moves a fraction near 1."""


def float32_sum_bound(n: int, scale: float = 1.0) -> float:
    """Difference of two float32 sums of ``n`` terms taken in different orders, their partial sums of
    magnitude ≤ ``scale`` (random-walk rounding model, :data:`SIGMAS`)."""
    return SIGMAS * EPS32 * math.sqrt(max(1, n)) * scale


def adam_update_bound(t: int, beta1: float, beta2: float) -> float:
    """Largest ``|m̂_t| / sqrt(v̂_t)`` of bias-corrected Adam over every gradient history g_1 … g_t.

    ``m̂ = Σ a_i g_i``, ``v̂ = Σ b_i g_i²`` with ``a_i = (1-β1)β1^(t-i) / (1-β1^t)`` and
    ``b_i = (1-β2)β2^(t-i) / (1-β2^t)``; Cauchy–Schwarz on ``Σ (a_i/√b_i)(√b_i g_i)`` gives
    ``sqrt(Σ a_i²/b_i)``, reached at ``g_i ∝ a_i/b_i``."""
    s = 0.0
    for i in range(1, t + 1):
        a = (1 - beta1) * beta1 ** (t - i) / (1 - beta1 ** t)
        b = (1 - beta2) * beta2 ** (t - i) / (1 - beta2 ** t)
        s += a * a / b
    return math.sqrt(s)


def adam_drift_bound(lrs: Sequence[float], beta1: float = 0.9, beta2: float = 0.95) -> float:
    """``B = 2·Σ_t lr_t·c_t``: the most one element can differ between two AdamW runs that start from
    the same weights and take the steps with learning rates ``lrs``, whatever their gradients."""
    return 2 * sum(lr * adam_update_bound(t, beta1, beta2) for t, lr in enumerate(lrs, start=1))


def assert_weights_close(w1: Mapping[str, torch.Tensor], w2: Mapping[str, torch.Tensor],
                         lrs: Sequence[float], beta1: float = 0.9, beta2: float = 0.95) -> dict[str, float]:
    """Weights of two runs after AdamW steps at ``lrs``: every element within ``B``
    (:func:`adam_drift_bound`), all but :data:`NOISY_FRACTION` within ``RHO·B``. Returns the measures."""
    assert sorted(w1) == sorted(w2)
    bound = adam_drift_bound(lrs, beta1, beta2)
    tight = RHO * bound
    n = over = 0
    worst, worst_at = 0.0, ""
    for k in sorted(w1):
        assert w1[k].shape == w2[k].shape, k
        d = (w1[k].double() - w2[k].double()).abs()
        top = float(d.max()) if d.numel() else 0.0
        if top > worst:
            worst, worst_at = top, f"{k}{[int(i) for i in torch.unravel_index(d.argmax(), d.shape)]}"
        assert top <= bound, f"{k}: differs by {top:.3g} > Adam's bound 2·Σ lr_t·c_t = {bound:.3g} (lrs {list(lrs)})"
        n += d.numel()
        over += int((d > tight).sum())
    assert over <= NOISY_FRACTION * n, \
        f"{over} of {n} elements differ by more than RHO·B = {tight:.3g} (at most {NOISY_FRACTION:g} of them may)"
    return {"max": worst, "max_at": worst_at, "bound": bound, "tight": tight, "over_tight": over, "n": n}


def assert_rows_close(r1: Sequence[Mapping], r2: Sequence[Mapping], keys: Sequence[str],
                      n_terms: Mapping[str, int]) -> dict[str, float]:
    """Metric rows of two runs (``step``, ``train/loss``, ``keys``): row 1 is computed from the same
    weights (bound 1: ``float32_sum_bound(n_terms[key], max(1, |value|))``); later rows after updates
    also get ``RHO`` relative (bound 2). ``n_terms``: terms summed into each key (``"*"``: default)."""
    assert [r["step"] for r in r1] == [r["step"] for r in r2]
    worst: dict[str, float] = {}
    for a, b in zip(r1, r2, strict=True):
        for key in ("train/loss", *keys):
            assert (key in a) == (key in b), (key, a["step"])
            if key not in a:
                continue
            x, y = float(a[key]), float(b[key])
            tol = float32_sum_bound(n_terms.get(key, n_terms["*"]), max(1.0, abs(x), abs(y)))
            if a["step"] > 1:
                tol += RHO * max(abs(x), abs(y))
            assert abs(x - y) <= tol, (key, a["step"], x, y, f"bound {tol:.3g}")
            worst[key] = max(worst.get(key, 0.0), abs(x - y))
    return worst



def packing_bound(tokens: int, scale: float) -> float:
    """``train.packing`` against the padded path, same weights: every value is the same float32 products
    summed in another order — linear layers over a (1, ΣL) row instead of (N, L_max) change the matmul
    blocking, per-sequence causal SDPA replaces a masked one (the masked tail added exact zeros) — and
    no term is added or dropped (padding tokens never reach an unpadded position). A loss or reward is a
    reduction over at most the micro-batch's ``tokens`` positions; a weight's gradient sums one term per
    position. Hence bound 1 with ``n = tokens``: :func:`float32_sum_bound` ``(tokens, scale)``, ``scale``
    ``max(1, |loss|)`` for a loss, the largest element for a gradient."""
    return float32_sum_bound(tokens, scale)
