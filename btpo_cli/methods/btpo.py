"""BTPO — Bradley–Terry Policy Optimization (METHOD.md §2–§5).

Objective. A causal LM judges one response at a time in a dialog (prompt, response, "evaluate",
thought ``z``, "is it {aspect}? Yes/No"); its score is ``s(y) = E_z[p(Yes | x, y, z)]`` and the
pair likelihood is Bradley–Terry on those scores, ``P(y_w ≻ y_l) = s_w / (s_w + s_l)`` — a ratio
of expectations over latent thoughts. We maximize ``log P`` with the consistent estimator of §4:
``K`` thoughts per response, the misalignment weight ``ω̂ = ŝ_l / (ŝ_w + ŝ_l)`` and the
self-normalized scores ``p̄_k``, realized as the surrogate ``L_score + L_thought`` of §5
(``btpo_cli/losses.py``). One rollout batch of pairs is sampled with the current weights (the
"old" policy), then split into minibatches for optimizer steps (a pair's ``2K`` sequences stay
together).

Differences from the paper: ``K = 4``, ``lr = 1e-6`` and ``β = 0`` are our choices (the paper's
values were lost); the thought log-probs are taken at the sampling temperature; only the joint
schedule is implemented (the earlier paper version's alternating schedule is not).

Run it::

    btpo train --method btpo --model tiny-qwen2 --data data/synthetic --out runs/btpo --max-steps 5
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from btpo_cli.config import Config
from btpo_cli.data import PairRecord
from btpo_cli.engines import SamplingParams, request_seed
from btpo_cli.errors import ConfigError
from btpo_cli.evaluation import PairResult, pointwise_result, with_unjudged
from btpo_cli.gpm import SeqBatch, score_thoughts, thought_sequence
from btpo_cli.losses import btpo_loss
from btpo_cli.methods import MethodSpec, register_method
from btpo_cli.rl_loop import RolloutPlan, check_rollout_sizes, logprob_diff, run_rollouts
from btpo_cli.runs import Run
from btpo_cli.session import TrainSession
from btpo_cli.templates import GPMPrompt, TooLong, answer_token_id, encode_gpm, end_of_turn_id
from btpo_cli.trainer import StepTimer, chunks


@dataclass
class Judge:
    """Token ids the GPM needs, read off the tokenizer's chat template."""

    tok: Any
    yes_id: int
    no_id: int
    eot_id: int
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tok: Any) -> Judge:
        return cls(tok, answer_token_id(tok, "Yes"), answer_token_id(tok, "No"), end_of_turn_id(tok),
                   tok.pad_token_id)


def encode_pairs(judge: Judge, records: list[PairRecord], max_prefix: int) -> tuple[list[tuple[int, GPMPrompt, GPMPrompt]], dict[str, int]]:
    """GPM prompts for both responses of every pair: [(record index, chosen, rejected)]."""
    out, stats = [], {"truncated": 0, "too_long": 0}
    for k, r in enumerate(records):
        try:
            w = encode_gpm(judge.tok, r.prompt, r.chosen_text, r.aspect, max_prefix)
            lo = encode_gpm(judge.tok, r.prompt, r.rejected_text, r.aspect, max_prefix)
        except TooLong:
            stats["too_long"] += 1
            continue
        stats["truncated"] += int(w.truncated) + int(lo.truncated)
        out.append((k, w, lo))
    return out, stats


@dataclass
class Rollout:
    """One rollout batch on this process: b pairs × 2 responses × K thoughts, in that order (rows)."""

    seqs: SeqBatch                    # (b·2·K) rows, left-padded, on the CPU
    old_logp: torch.Tensor            # (b·2·K, Tz) thought log-probs under the rollout weights, right-padded
    old_logp_yes: torch.Tensor        # (b, 2, K)
    ref_logp: torch.Tensor | None     # (b·2·K, Tz) under the reference model (β > 0)


@torch.no_grad()
def score_chunked(model: Any, seqs: SeqBatch, judge: Judge, cfg: Config, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad scoring in chunks of ``batch`` rows: thought log-probs (N, Tz) right-padded, log p(Yes) (N,)."""
    n = len(seqs)
    logp = torch.zeros(n, max(1, seqs.max_thought), dtype=torch.float32)
    yes = torch.zeros(n, dtype=torch.float32)
    for start in range(0, n, batch):
        rows = list(range(start, min(n, start + batch)))
        sc = score_thoughts(model, seqs.select(rows), judge.yes_id, judge.no_id, judge.pad_id,
                            cfg.btpo.yes_no_normalize, cfg.rollout.temperature)
        logp[start:start + len(rows), :sc.logp.shape[1]] = sc.logp.float().cpu()
        yes[start:start + len(rows)] = sc.logp_yes.float().cpu()
    return logp, yes


def do_rollout(model: Any, ref: Any, engine: Any, pairs: list[tuple[int, GPMPrompt, GPMPrompt]], judge: Judge,
               cfg: Config, timer: StepTimer, seeds: list[int] | None = None) -> tuple[Rollout, dict[str, float]]:
    """Sample K thoughts per response with ``engine``; score them with the trainer's ``model`` (no grad)."""
    k = cfg.rollout.n
    prompts = [p for _, w, lo in pairs for p in (w, lo)]                          # (2b,)
    params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens, [judge.eot_id],
                            logprobs=True)
    with timer.phase("generate"):
        samples = engine.generate([p.prefix for p in prompts], k, params, seeds)  # (2b, K)
    seqs = SeqBatch.from_seqs([thought_sequence(p, s, judge.eot_id) for p, group in zip(prompts, samples, strict=True)
                               for s in group], judge.pad_id)
    with timer.phase("score"):
        old_logp, old_yes = score_chunked(model, seqs, judge, cfg, cfg.train.micro_batch_size * 2 * k)
        ref_logp = score_chunked(ref, seqs, judge, cfg, cfg.train.micro_batch_size * 2 * k)[0] if ref else None
    flat = [s for group in samples for s in group]
    lens = seqs.n_thought.tolist()
    stats = {"len": float(sum(lens)), "n": float(len(lens)),
             "cut": float(sum(1 for s in flat if not s.finished and len(s.token_ids) >= cfg.rollout.max_new_tokens)),
             **logprob_diff([s.logprobs for s in flat], old_logp, lens)}
    return Rollout(seqs, old_logp, old_yes.view(len(pairs), 2, k), ref_logp), stats


def rollout_seeds(seed: int, r_idx: int, pair_indices: list[int]) -> list[int]:
    """Request seeds of a rollout's 2b responses: named by (run seed, rollout, pair, response)."""
    return [request_seed(seed, r_idx, i, side) for i in pair_indices for side in (0, 1)]


def train(cfg: Config, run: Run, resume: bool) -> None:
    sess = TrainSession.begin(cfg, run, resume, padding_side="left")
    check_rollout_sizes(cfg, sess.world)
    if cfg.btpo.schedule != "joint":
        raise ConfigError("btpo.schedule: only 'joint' is implemented")
    judge = Judge.from_tokenizer(sess.tok)
    records = sess.load_split()
    pairs, enc_stats = encode_pairs(judge, records, cfg.data.max_length)
    plan = RolloutPlan.from_config(len(pairs), cfg, sess.world)
    sess.build("causal", plan.total_steps, reference=cfg.btpo.beta > 0)
    sess.log_data(len(pairs), enc_stats)
    engine = sess.rollout_engine()

    def rollout(local: list[int], r_idx: int, timer: StepTimer) -> tuple[Rollout, dict[str, float]]:
        return do_rollout(sess.model, sess.ref, engine, [pairs[i] for i in local], judge, cfg, timer,
                          rollout_seeds(cfg.train.seed, r_idx, [pairs[i][0] for i in local]))

    run_rollouts(
        sess, engine=engine, plan=plan, prefix="btpo", title=f"btpo {run.root.name}", rollout=rollout,
        rollout_metrics=lambda rs: {"btpo/thought_len": rs["len"] / rs["n"],
                                    "btpo/thought_cut_fraction": rs["cut"] / rs["n"]},
        loss=lambda ro, ids: micro_loss(sess.model, ro, ids, judge, cfg, sess.device),
        bar_info=lambda m: f"loss {m['train/loss']:.4f} ω̂ {m.get('btpo/omega_mean', 0):.3f}")
    engine.close()
    sess.finish({"method": "btpo", "base_model": cfg.model.name, "model_class": "AutoModelForCausalLM"})


def micro_loss(model: Any, ro: Rollout, pair_ids: list[int], judge: Judge, cfg: Config,
               device: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BTPO surrogate on a micro-batch of pairs (all 2K sequences of each)."""
    k = cfg.rollout.n
    rows = torch.tensor([(i * 2 + r) * k + j for i in pair_ids for r in range(2) for j in range(k)])   # (m·2·K,)
    sc = score_thoughts(model, ro.seqs.select(rows), judge.yes_id, judge.no_id, judge.pad_id,
                        cfg.btpo.yes_no_normalize, cfg.rollout.temperature)
    width = sc.logp.shape[1]
    old = ro.old_logp[rows, :width].to(device)                                            # (m·2·K, Tz)
    ref = ro.ref_logp[rows, :width].to(device) if ro.ref_logp is not None else None
    m = len(pair_ids)
    return btpo_loss(
        sc.logp, old, sc.mask, sc.logp_yes.view(m, 2, k), ro.old_logp_yes[pair_ids].to(device),
        thought_advantage=cfg.btpo.thought_advantage, agg=cfg.btpo.agg, eps_low=cfg.btpo.clip_eps_low,
        eps_high=cfg.btpo.clip_eps_high, norm_constant=float(cfg.rollout.max_new_tokens),
        misalignment_weight=cfg.btpo.misalignment_weight, ref_logp=ref, beta=cfg.btpo.beta)


# ----------------------------------------------------------------------------- evaluation

def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any, progress: Any = None,
             artifacts: Path | None = None) -> list[PairResult]:
    """Greedy thought per response, then p(Yes) (METHOD.md §7); optionally the mean over sampled thoughts.

    Each result's detail carries the thought lengths, whether they were cut at the budget and the
    Yes + No mass at the answer position; ``<artifacts>.thoughts.jsonl`` holds the thoughts."""
    from btpo_cli.engines import engine_for
    from btpo_cli.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir, padding_side="left")
    judge = Judge.from_tokenizer(tok)
    model = load_causal_lm(cfg.model, device.type, inference=True, path=model_dir).to(device).eval()
    engine = engine_for(cfg, model_dir, judge.pad_id, device, module=model,
                        prompts_per_batch=max(1, cfg.eval.batch_size * 2), max_new_tokens=cfg.eval.max_new_tokens)
    pairs, _ = encode_pairs(judge, records, cfg.data.max_length)
    budget = cfg.eval.max_new_tokens
    greedy = SamplingParams(0.0, 1.0, budget, [judge.eot_id])
    ks = cfg.eval.samples
    results: list[PairResult] = []
    thoughts_path = artifacts.parent / (artifacts.name + ".thoughts.jsonl") if artifacts else None
    thoughts_f = open(thoughts_path, "w", encoding="utf-8") if thoughts_path else None  # noqa: SIM115
    try:
        for part in chunks(pairs, cfg.eval.batch_size):
            prompts = [p for _, w, lo in part for p in (w, lo)]
            samples = [g[0] for g in engine.generate([p.prefix for p in prompts], 1, greedy)]      # (2m,)
            seqs = SeqBatch.from_seqs([thought_sequence(p, s, judge.eot_id) for p, s in zip(prompts, samples,
                                                                                        strict=True)], judge.pad_id)
            with torch.no_grad():
                sc = score_thoughts(model, seqs, judge.yes_id, judge.no_id, judge.pad_id, cfg.btpo.yes_no_normalize)
            p_yes = sc.logp_yes.float().exp().view(-1, 2).tolist()
            mass = sc.yes_no_mass.float().view(-1, 2).tolist()
            sampled = None
            if ks:
                params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, budget, [judge.eot_id])
                seeds = [request_seed("eval", cfg.train.seed, records[ri].id, side) for ri, _, _ in part
                         for side in (0, 1)]
                smp = engine.generate([p.prefix for p in prompts], ks, params, seeds)
                sseqs = SeqBatch.from_seqs([thought_sequence(p, s, judge.eot_id) for p, g in zip(prompts, smp, strict=True)
                                            for s in g], judge.pad_id)
                _, syes = score_chunked(model, sseqs, judge, cfg, cfg.eval.batch_size * 2)
                sampled = syes.exp().view(-1, 2, ks).mean(-1).tolist()
            for j, (ri, _, _) in enumerate(part):
                rec = records[ri]
                sw, sl = samples[2 * j], samples[2 * j + 1]
                detail = {"thought_tokens": [len(sw.token_ids), len(sl.token_ids)],
                          "thought_cut": [_cut(sw, budget), _cut(sl, budget)], "yes_no_mass": mass[j]}
                if sampled:
                    detail.update(sampled_chosen=sampled[j][0], sampled_rejected=sampled[j][1])
                results.append(pointwise_result(rec.id, p_yes[j][0], p_yes[j][1], **detail))
                if thoughts_f:
                    tw, tl = (tok.decode(s.token_ids, skip_special_tokens=True) for s in (sw, sl))
                    thoughts_f.write(json.dumps({
                        "id": rec.id, "thought_chosen": tw, "p_yes_chosen": p_yes[j][0],
                        "tokens_chosen": len(sw.token_ids), "cut_chosen": _cut(sw, budget),
                        "thought_rejected": tl, "p_yes_rejected": p_yes[j][1],
                        "tokens_rejected": len(sl.token_ids), "cut_rejected": _cut(sl, budget)},
                        ensure_ascii=False) + "\n")
            if progress:
                progress(len(part))
    finally:
        if thoughts_f:
            thoughts_f.close()
        engine.close()
    return with_unjudged(results, records, {ri for ri, _, _ in pairs}, "pointwise")


def _cut(sample: Any, budget: int) -> bool:
    """A thought that hit the token budget without ending its turn."""
    return not sample.finished and len(sample.token_ids) >= budget


METHOD = register_method(MethodSpec(
    name="btpo", help="BTPO (this paper): a thinking judge, latent-thought Bradley-Terry, the consistent estimator.",
    train=train, evaluate=evaluate, protocol="pointwise", model_class="AutoModelForCausalLM",
    config_section="btpo", generative=True, order=50))
