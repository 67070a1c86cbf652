r"""Consistency of the BTPO gradient estimator, through the code path training uses (METHOD.md §4–§5).

METHOD.md §4 requires a test on a model small enough that its thought space can be enumerated:
the exact ``log P(y_w ≻ y_l | x)`` by enumeration, its autograd gradient ``g*``, and the BTPO
estimator with a growing number ``K`` of sampled thoughts converging to it. §5 requires that test
to run through the very surrogate loss that training minimizes. So everything here goes through
the library's own pieces, in the order a training step uses them:

1. :class:`~btpo_cli.engines.hf.HFEngine` samples ``K`` thoughts per response (temperature 1,
   top-p 1, stopping on the end-of-turn token, at most ``L`` tokens),
2. :func:`~btpo_cli.judging.logprobs.thought_sequence` joins prompt, thought and tail,
3. :func:`~btpo_cli.judging.logprobs.score_thoughts` gives the thought-token log-probs and ``log p(Yes)`` (once
   without grad for the "old" rollout values, once with grad), and
4. :func:`~btpo_cli.losses.btpo_loss` with ``thought_advantage="exact"``, ``agg="seq-sum"``
   gives the loss whose negative gradient is the estimate ``ĝ`` (ρ = 1: old == current, so the
   clip is inactive; ``ĝ`` carries the ``1/K`` baseline of §5, whose contribution vanishes as
   ``K → ∞``).

The model is a 1-layer ``Qwen2ForCausalLM`` with an 8-token vocabulary in float64, its weights
initialised with a large ``initializer_range`` so that ``p(Yes | z)`` varies strongly across
thoughts (else the policy-gradient half of the gradient would be negligible and the test would
only check the scoring half). With at most ``L = 3`` thought tokens the thought space is
``{z ending with EOT, |z| ≤ L} ∪ {z of length L without EOT (cut off)}``, 400 thoughts, whose
probabilities under π sum to 1 (checked). ``s(y) = Σ_z π(z) p(Yes|z)`` is then exact.

What is checked:

* :func:`test_estimator_converges_to_exact_gradient` (slow): relative error ``‖ĝ − g*‖/‖g*‖``
  shrinks like ``1/√K`` (fitted log-log slope) and the cosine similarity is ~1 at large ``K``,
  for the whole gradient and separately for its policy-gradient (``∇ log π``) and scoring
  (``∇ log p(Yes)``) halves. The table is printed (visible with ``pytest -s``).
* :func:`test_surrogate_gradient_is_the_estimator_and_misalignment_ablation`: for a finite ``K``,
  ``−∇L`` equals the §4 formula for ``ĝ`` minus the ``1/K`` baseline, computed independently from
  the same scores; ``misalignment_weight=False`` gives, per pair, the weighted gradient divided by
  that pair's ``ω̂``, and a batch of pairs gives the mean of the per-pair gradients.
* :func:`test_scoring_and_rollout_engine`: ``score_thoughts`` on a left-padded batch equals
  scoring each sequence alone; greedy decoding with shared prefill equals decoding without it and
  equals step-by-step argmax over full forwards; the seeded sampler's thought frequencies match the
  exact π (total-variation distance), i.e. the rollout engine samples from the π that is scored.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor

from btpo_cli.engines import Sample, SamplingParams
from btpo_cli.engines.hf import HFEngine
from btpo_cli.judging.logprobs import Scores, ThoughtSeq, score_thoughts, thought_sequence
from btpo_cli.judging.templates import GPMPrompt
from btpo_cli.losses import btpo_loss, rollout_weights

VOCAB = 8
EOT, YES, NO, PAD = 1, 2, 3, 7
"""Token ids; thoughts may use any of the 8 tokens (PAD included: it is an ordinary token to the LM)."""
MAX_THOUGHT = 3
"""``L``, the thought budget (``max_new_tokens`` of the rollout)."""
INIT_RANGE = 0.24
"""12× the default 0.02: sharp attention, so that ``p(Yes | z)`` depends strongly on ``z``."""
MODEL_SEED = 0

SUFFIX = [EOT, 6]
PAIR = (GPMPrompt([4, 5, 6, 2], SUFFIX), GPMPrompt([5, 4], SUFFIX))
"""One pair ``(x, y_w), (x, y_l)``: prefixes of different lengths, so left padding is exercised."""
EXTRA_PAIRS = (
    (GPMPrompt([6, 2, 4], SUFFIX), GPMPrompt([0, 4, 4, 5, 6], SUFFIX)),
    (GPMPrompt([3, 3, 5], [EOT, 0, 6]), GPMPrompt([7, 2, 0], [EOT, 0, 6])),
)

KS = (4, 16, 64, 256, 1024, 4096)
REPEATS = 8
BASE_SEED = 1234


# --------------------------------------------------------------------------- helpers


def build_model(seed: int = MODEL_SEED) -> transformers.Qwen2ForCausalLM:
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
        max_position_embeddings=64, initializer_range=INIT_RANGE, pad_token_id=PAD,
        bos_token_id=None, eos_token_id=EOT,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(cfg)
    return model.double().eval()


@pytest.fixture(scope="module")
def model() -> transformers.Qwen2ForCausalLM:
    return build_model()


def all_thoughts(max_len: int = MAX_THOUGHT) -> list[list[int]]:
    """Every thought the rollout can produce: ends on EOT within ``max_len`` tokens, or is cut at it."""
    out: list[list[int]] = []
    for n in range(1, max_len + 1):
        for z in itertools.product(range(VOCAB), repeat=n):
            if EOT in z[:-1] or (n < max_len and z[-1] != EOT):
                continue
            out.append(list(z))
    return out


def score(model: transformers.Qwen2ForCausalLM, seqs: list[ThoughtSeq]) -> Scores:
    return score_thoughts(model, seqs, YES, NO, PAD)


def flat_grad(out: Tensor, model: torch.nn.Module, retain: bool = False) -> Tensor:
    params = list(model.parameters())
    grads = torch.autograd.grad(out, params, allow_unused=True, retain_graph=retain)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)])


def rel_err(g: Tensor, ref: Tensor) -> float:
    return float((g - ref).norm() / ref.norm())


def cosine(g: Tensor, ref: Tensor) -> float:
    return float(F.cosine_similarity(g, ref, dim=0))


def loglog_slope(ks: tuple[int, ...], errs: list[float]) -> float:
    xs, ys = [math.log(k) for k in ks], [math.log(e) for e in errs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


@dataclass
class Exact:
    log_p: float
    """Exact ``log P(y_w ≻ y_l)``."""
    g: Tensor
    """``∇ log P``."""
    g_thought: Tensor
    """The ``E[p/s ∇ log π]`` half of ``∇ log P`` (times ω, w minus l)."""
    g_score: Tensor
    """The ``E[p/s ∇ log p(Yes)]`` half."""
    pi_mass: tuple[float, float]
    """``Σ_z π(z)`` for y_w and y_l."""
    log_pi: tuple[Tensor, Tensor]
    """``log π(z)`` over :func:`all_thoughts` (detached), for y_w and y_l."""


def exact_gradient(model: transformers.Qwen2ForCausalLM, pair: tuple[GPMPrompt, GPMPrompt]) -> Exact:
    """Enumerate the thought space: exact ``log P`` and its autograd gradient, split into two halves."""
    thoughts = all_thoughts()
    log_s: list[Tensor] = []
    log_pis: list[Tensor] = []
    half_thought: Tensor | float = 0.0
    half_score: Tensor | float = 0.0
    for sign, prompt in ((1.0, pair[0]), (-1.0, pair[1])):
        sc = score(model, [thought_sequence(prompt, z, EOT) for z in thoughts])
        log_pi = (sc.logp * sc.mask).sum(-1)
        log_s.append(torch.logsumexp(log_pi + sc.logp_yes, dim=0))
        log_pis.append(log_pi.detach())
        # ∇ log s = Σ_z w_z ∇(log π(z) + log p(Yes|z)), w_z = π(z) p(Yes|z) / s (stop-gradient)
        w = torch.softmax((log_pi + sc.logp_yes).detach(), dim=0)
        half_thought = half_thought + sign * (w * log_pi).sum()
        half_score = half_score + sign * (w * sc.logp_yes).sum()
    log_p = log_s[0] - torch.logsumexp(torch.stack(log_s), dim=0)
    omega = 1.0 - float(log_p.detach().exp())
    assert isinstance(half_thought, Tensor) and isinstance(half_score, Tensor)
    g_thought = omega * flat_grad(half_thought, model, retain=True)
    g_score = omega * flat_grad(half_score, model, retain=True)
    g = flat_grad(log_p, model)
    return Exact(float(log_p.detach()), g, g_thought, g_score,
                 (float(log_pis[0].exp().sum()), float(log_pis[1].exp().sum())), (log_pis[0], log_pis[1]))


def rollout(model: transformers.Qwen2ForCausalLM, pairs: list[tuple[GPMPrompt, GPMPrompt]], k: int,
            seed: int) -> list[ThoughtSeq]:
    """Sample ``k`` thoughts per response with the training engine; sequences in (pair, response, k) order."""
    prompts = [p for pair in pairs for p in pair]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=MAX_THOUGHT, stop_token_ids=[EOT],
                            seed=seed)
    samples = HFEngine(model, PAD, shared_prefill=True).generate([p.prefix for p in prompts], k, params)
    assert all(len(group) == k for group in samples)
    return [thought_sequence(p, s, EOT) for p, group in zip(prompts, samples, strict=True) for s in group]


@dataclass
class Rollout:
    old: Scores
    cur: Scores
    n_pairs: int
    k: int

    def loss(self, *, misalignment_weight: bool = True, thought: bool = True, score: bool = True) -> Tensor:
        """``btpo_loss`` as training calls it; ``thought``/``score`` False detach that input (one half)."""
        b, k = self.n_pairs, self.k
        logp = self.cur.logp if thought else self.cur.logp.detach()
        logp_yes = self.cur.logp_yes if score else self.cur.logp_yes.detach()
        loss, stats = btpo_loss(
            logp.view(b, 2, k, -1), self.old.logp.view(b, 2, k, -1), self.cur.mask.bool().view(b, 2, k, -1),
            logp_yes.view(b, 2, k), self.old.logp_yes.view(b, 2, k),
            thought_advantage="exact", agg="seq-sum", misalignment_weight=misalignment_weight,
        )
        assert float(stats["clip_fraction"]) == 0.0 and float(stats["ratio_max"]) == pytest.approx(1.0)
        return loss


def score_rollout(model: transformers.Qwen2ForCausalLM, seqs: list[ThoughtSeq], n_pairs: int, k: int) -> Rollout:
    with torch.no_grad():
        old = score(model, seqs)
    return Rollout(old, score(model, seqs), n_pairs, k)


# --------------------------------------------------------------------------- 1. consistency


@pytest.mark.slow
def test_estimator_converges_to_exact_gradient(model: transformers.Qwen2ForCausalLM) -> None:
    t0 = time.perf_counter()
    exact = exact_gradient(model, PAIR)
    for mass in exact.pi_mass:
        assert mass == pytest.approx(1.0, abs=1e-5)  # π is a distribution over the enumerated thoughts
    # the problem is not degenerate: ω is far from 0 and both halves of the gradient matter
    assert 0.2 < 1.0 - math.exp(exact.log_p) < 0.8
    assert rel_err(exact.g_thought + exact.g_score, exact.g) < 1e-4
    assert float(exact.g_thought.norm()) > 0.2 * float(exact.g.norm())

    table: dict[str, list[tuple[float, float]]] = {"all": [], "thought": [], "score": []}
    for k in KS:
        sums = {name: [0.0, 0.0] for name in table}
        for r in range(REPEATS):
            ro = score_rollout(model, rollout(model, [PAIR], k, seed=BASE_SEED + 7919 * r + k), 1, k)
            # ĝ = −∇L, split by the chain rule into its ∇ log π and ∇ log p(Yes) halves (two backward passes)
            g_thought = -flat_grad(ro.loss(score=False), model, retain=True)
            g_score = -flat_grad(ro.loss(thought=False), model, retain=k == KS[0])
            g = g_thought + g_score
            if k == KS[0]:
                assert rel_err(-flat_grad(ro.loss(), model), g) < 1e-6
            for name, est, ref in (("all", g, exact.g), ("thought", g_thought, exact.g_thought),
                                   ("score", g_score, exact.g_score)):
                sums[name][0] += rel_err(est, ref) / REPEATS
                sums[name][1] += cosine(est, ref) / REPEATS
        for name in table:
            table[name].append((sums[name][0], sums[name][1]))

    print(f"\nexact P(y_w > y_l) = {math.exp(exact.log_p):.4f}, |g*| = {float(exact.g.norm()):.3f} "
          f"(thought half {float(exact.g_thought.norm()):.3f}, score half {float(exact.g_score.norm()):.3f}); "
          f"mean over {REPEATS} repeats")
    print(f"{'K':>6} | {'rel err':>8} {'cosine':>8} | {'thought':>8} {'cosine':>8} | {'score':>8} {'cosine':>8}")
    for i, k in enumerate(KS):
        cells = " | ".join(f"{table[n][i][0]:8.4f} {table[n][i][1]:8.5f}" for n in ("all", "thought", "score"))
        print(f"{k:>6} | {cells}")
    slopes = {name: loglog_slope(KS, [e for e, _ in rows]) for name, rows in table.items()}
    print("log-log slope of rel err vs K: " + ", ".join(f"{n} {s:.3f}" for n, s in slopes.items()))
    print(f"({time.perf_counter() - t0:.1f} s)")

    for name, rows in table.items():
        errs = [e for e, _ in rows]
        assert errs[-1] < errs[0] / 4, (name, errs)
        assert all(b < 1.25 * a for a, b in itertools.pairwise(errs)), (name, errs)  # no real increase
        assert -0.8 < slopes[name] < -0.3, (name, slopes[name])  # about 1/√K
    assert table["all"][-1][1] > 0.99
    assert table["all"][-1][0] < 0.1
    assert table["thought"][-1][1] > 0.95
    assert table["score"][-1][1] > 0.99


# --------------------------------------------------------------------------- 2. the surrogate is the estimator


def formula_estimate(model: transformers.Qwen2ForCausalLM, ro: Rollout) -> tuple[Tensor, Tensor]:
    """§4's ``ĝ`` minus the ``1/K`` baseline, per pair, written out independently of ``btpo_loss``.

    Returns ``(grads, omegas)``: ``(B, P)`` gradients of ``J_b = ω̂_b [Σ_k p̄^w_k (log π + log p(Yes))(z^w_k)
    − Σ_k p̄^l_k (…)(z^l_k)] − ω̂_b (1/K)[Σ_k log π(z^w_k) − Σ_k log π(z^l_k)]`` and ``(B,)`` ``ω̂``.
    """
    b, k = ro.n_pairs, ro.k
    log_pi = (ro.cur.logp * ro.cur.mask).sum(-1).view(b, 2, k)
    logp_yes = ro.cur.logp_yes.view(b, 2, k)
    p = ro.old.logp_yes.view(b, 2, k).double().exp()
    s_hat = p.mean(-1)  # (B, 2)
    omega = s_hat[:, 1] / (s_hat[:, 0] + s_hat[:, 1])
    pbar = p / p.sum(-1, keepdim=True)
    sign = torch.tensor([1.0, -1.0], dtype=p.dtype)
    grads = []
    for i in range(b):
        j = omega[i] * (sign[:, None] * (pbar[i] * (log_pi[i] + logp_yes[i]) - log_pi[i] / k)).sum()
        grads.append(flat_grad(j, model, retain=True))
    return torch.stack(grads), omega


def test_surrogate_gradient_is_the_estimator_and_misalignment_ablation(
    model: transformers.Qwen2ForCausalLM,
) -> None:
    pairs = [PAIR, *EXTRA_PAIRS]
    k = 8
    seqs = rollout(model, pairs, k, seed=BASE_SEED)
    per_pair = 2 * k

    # the whole batch of pairs: −∇L = mean over pairs of the per-pair ĝ (baseline subtracted)
    batch = score_rollout(model, seqs, len(pairs), k)
    g_formula, omega = formula_estimate(model, batch)
    g_batch = -flat_grad(batch.loss(), model, retain=True)
    g_batch_off = -flat_grad(batch.loss(misalignment_weight=False), model)
    assert rel_err(g_batch, g_formula.mean(0)) < 1e-5

    # ω̂ must differ between pairs for the per-pair division to be a real check
    assert float(omega.max() - omega.min()) > 0.02 and float(omega.max()) < 0.95
    omega_lib, _, _ = rollout_weights(batch.old.logp_yes.view(len(pairs), 2, k).double(), "exact")
    torch.testing.assert_close(omega_lib, omega, rtol=1e-12, atol=1e-12)

    g_off_pairs = []
    for i in range(len(pairs)):
        ro = score_rollout(model, seqs[i * per_pair:(i + 1) * per_pair], 1, k)
        loss_on, loss_off = ro.loss(), ro.loss(misalignment_weight=False)
        assert float(loss_on.detach()) == pytest.approx(float(omega[i]) * float(loss_off.detach()), rel=1e-6, abs=1e-6)
        g_on = -flat_grad(loss_on, model, retain=True)
        g_off = -flat_grad(loss_off, model)
        assert rel_err(g_on, g_formula[i]) < 1e-5  # per pair, the surrogate is the §4 formula
        assert rel_err(g_off, g_on / omega[i]) < 1e-5  # ω̂ = 1: the weighted gradient divided by ω̂
        g_off_pairs.append(g_off)
    assert rel_err(g_batch_off, torch.stack(g_off_pairs).mean(0)) < 1e-5
    # and the ablation really changes the direction of a batch's gradient (ω̂ differs across pairs)
    assert cosine(g_batch_off, g_batch) < 1 - 1e-4


# --------------------------------------------------------------------------- 3. scoring and sampling


def test_scoring_and_rollout_engine(model: transformers.Qwen2ForCausalLM) -> None:
    # score_thoughts: left padding in a batch changes nothing
    prompts = [PAIR[0], PAIR[1], *EXTRA_PAIRS[1]]
    thoughts = [[EOT], [4, EOT], [5, 5, 6], [PAD, 0, EOT], [2, 3], [0, 0, 0]]
    seqs = [thought_sequence(p, z, EOT) for p in prompts for z in thoughts]
    assert {len(s.ids) for s in seqs} != {len(seqs[0].ids)}
    batch = score(model, seqs)
    for i, s in enumerate(seqs):
        alone = score(model, [s])
        n = s.n_thought
        assert batch.mask[i].sum() == n and alone.mask[0].sum() == n
        torch.testing.assert_close(batch.logp[i, :n], alone.logp[0, :n], rtol=0, atol=1e-6)
        torch.testing.assert_close(batch.logp_yes[i], alone.logp_yes[0], rtol=0, atol=1e-6)

    # greedy decoding: shared prefill == per-row prefill == argmax over full forwards without a cache
    gen_prompts = [p.prefix for p in prompts] + [[4], [6, 6, 6, 6, 6, 6, 2]]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=[EOT])
    shared = HFEngine(model, PAD, shared_prefill=True).generate(gen_prompts, 3, greedy)
    plain = HFEngine(model, PAD, shared_prefill=False).generate(gen_prompts, 3, greedy)
    assert shared == plain
    with torch.no_grad():
        for prompt, group in zip(gen_prompts, shared, strict=True):
            toks: list[int] = []
            while len(toks) < greedy.max_new_tokens and (not toks or toks[-1] != EOT):
                logits = model(input_ids=torch.tensor([prompt + toks])).logits[0, -1]
                toks.append(int(logits.argmax()))
            assert all(s == Sample(toks, toks[-1] == EOT) for s in group), (prompt, toks, group)

    # sampling: the frequencies of the seeded sampler's thoughts match the exact π (both prefill modes)
    exact = exact_gradient(model, PAIR)
    index = {tuple(z): i for i, z in enumerate(all_thoughts())}
    n_samples = 16000

    def tv_distances(shared_prefill: bool, temperature: float) -> list[tuple[float, float]]:
        """(TV(empirical, π), E[TV] of an exact sampler) for y_w and y_l."""
        params = SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=MAX_THOUGHT,
                                stop_token_ids=[EOT], seed=BASE_SEED)
        samples = HFEngine(model, PAD, shared_prefill=shared_prefill).generate(
            [PAIR[0].prefix, PAIR[1].prefix], n_samples, params)
        out = []
        for group, log_pi in zip(samples, exact.log_pi, strict=True):
            counts = torch.zeros(len(index), dtype=torch.float64)
            for s in group:
                assert s.finished == (s.token_ids[-1] == EOT)
                counts[index[tuple(s.token_ids)]] += 1  # every sample is in the enumerated space
            pi = log_pi.double().exp()
            tv = 0.5 * float((counts / n_samples - pi).abs().sum())
            # E|count/n − π(z)| ≈ sqrt(2 π(z)(1 − π(z)) / (π_const · n)) (normal approximation)
            expected = 0.5 * float((2 * pi * (1 - pi) / (math.pi * n_samples)).sqrt().sum())
            out.append((tv, expected))
        return out

    for shared_prefill in (True, False):
        for tv, expected in tv_distances(shared_prefill, 1.0):
            assert tv < 0.05 and tv < 1.5 * expected, (shared_prefill, tv, expected)
    # the check has power: sampling from a slightly flattened π (temperature 1.2) fails it clearly
    for tv, expected in tv_distances(True, 1.2):
        assert tv > 2 * expected, (tv, expected)
