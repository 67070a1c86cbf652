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
from btpo_cli.errors import ConfigError
from btpo_cli.evaluation import PairResult, pointwise_result
from btpo_cli.gpm import ThoughtSeq, score_thoughts, thought_sequence
from btpo_cli.losses import btpo_loss
from btpo_cli.models import load_causal_lm, load_tokenizer
from btpo_cli.rl_loop import RolloutPlan, run_rollouts
from btpo_cli.rollout import HFEngine, SamplingParams
from btpo_cli.runs import Run
from btpo_cli.templates import GPMPrompt, TooLong, answer_token_id, encode_gpm, end_of_turn_id
from btpo_cli.tracking import init_tracking
from btpo_cli.trainer import (
    StepTimer,
    chunks,
    load_split,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    resume_step,
    save_final,
)

PROTOCOL = "pointwise"


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
    """One rollout batch on this process: b pairs × 2 responses × K thoughts, in that order."""

    seqs: list[ThoughtSeq]            # (b·2·K,)
    old_logp: list[torch.Tensor]      # (b·2·K,) each (n_thought,)
    old_logp_yes: torch.Tensor        # (b, 2, K)
    ref_logp: list[torch.Tensor] | None


def _pad_rows(rows: list[torch.Tensor], width: int, device: Any) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float32, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


@torch.no_grad()
def score_chunked(model: Any, seqs: list[ThoughtSeq], judge: Judge, cfg: Config, batch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """No-grad scoring in chunks: per-sequence thought log-probs and log p(Yes) (N,)."""
    logps, yes = [], []
    for part in chunks(seqs, batch):
        sc = score_thoughts(model, part, judge.yes_id, judge.no_id, judge.pad_id, cfg.btpo.yes_no_normalize,
                            cfg.btpo.temperature)
        for i, s in enumerate(part):
            logps.append(sc.logp[i, :s.n_thought].float())
        yes.append(sc.logp_yes.float())
    return logps, torch.cat(yes)


def do_rollout(model: Any, ref: Any, engine: HFEngine, pairs: list[tuple[int, GPMPrompt, GPMPrompt]], judge: Judge,
               cfg: Config, timer: StepTimer) -> Rollout:
    k = cfg.btpo.k
    prompts = [p for _, w, lo in pairs for p in (w, lo)]                          # (2b,)
    params = SamplingParams(cfg.btpo.temperature, cfg.btpo.top_p, cfg.btpo.max_thought_tokens, [judge.eot_id])
    with timer.phase("generate"):
        samples = engine.generate([p.prefix for p in prompts], k, params)         # (2b, K)
    seqs = [thought_sequence(p, s, judge.eot_id) for p, group in zip(prompts, samples, strict=True) for s in group]
    with timer.phase("score"):
        old_logp, old_yes = score_chunked(model, seqs, judge, cfg, cfg.train.micro_batch_size * 2 * k)
        ref_logp = score_chunked(ref, seqs, judge, cfg, cfg.train.micro_batch_size * 2 * k)[0] if ref else None
    return Rollout(seqs, old_logp, old_yes.view(len(pairs), 2, k), ref_logp)


def _check(cfg: Config, world: int) -> None:
    r, b = cfg.btpo.rollout_batch_size, cfg.train.batch_size
    if r % b:
        raise ConfigError(f"btpo.rollout_batch_size={r} must be a multiple of train.batch_size={b}")
    if b % world or r % world:
        raise ConfigError(f"train.batch_size={b} and btpo.rollout_batch_size={r} must divide by {world} processes")
    if cfg.btpo.schedule != "joint":
        raise ConfigError("btpo.schedule: only 'joint' is implemented")


def train(cfg: Config, run: Run, resume: bool) -> None:
    acc = make_accelerator(cfg, run)
    from accelerate.utils import set_seed

    _check(cfg, acc.num_processes)
    set_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model.name, padding_side="left")
    judge = Judge.from_tokenizer(tok)
    records = load_split(cfg, cfg.data.train_split, acc)
    pairs, enc_stats = encode_pairs(judge, records, cfg.data.max_length)
    model = load_causal_lm(cfg.model, acc.device.type)
    ref = None
    if cfg.btpo.beta > 0:
        ref = load_causal_lm(cfg.model, acc.device.type, inference=True).to(acc.device).eval()
        ref.requires_grad_(False)

    k = cfg.btpo.k
    plan = RolloutPlan.from_config(len(pairs), cfg, cfg.btpo.rollout_batch_size, cfg.btpo.update_epochs, "btpo")
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, plan.total_steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    init_tracking(acc, cfg, run)
    start = resume_step(acc, run, resume)
    if start == 0:
        run.log({"step": 0, "data/train_pairs": len(pairs), "data/truncated": enc_stats["truncated"],
                 "data/too_long": enc_stats["too_long"]})
    engine = HFEngine(acc.unwrap_model(model), judge.pad_id, batch_size=max(1, 64 // k))

    def rollout(local: list[int], r_idx: int, timer: StepTimer) -> tuple[Rollout, dict[str, float]]:
        ro = do_rollout(engine.model, ref, engine, [pairs[i] for i in local], judge, cfg, timer)
        lens = [s.n_thought for s in ro.seqs]
        return ro, {"len": float(sum(lens)), "n": float(len(lens)),
                    "cut": float(sum(1 for n in lens if n >= cfg.btpo.max_thought_tokens))}

    run_rollouts(
        acc=acc, cfg=cfg, run=run, model=model, opt=opt, sched=sched, engine=engine, plan=plan, start=start,
        prefix="btpo", title=f"btpo {run.root.name}", rollout=rollout,
        rollout_metrics=lambda rs: {"btpo/thought_len": rs["len"] / rs["n"],
                                    "btpo/thought_cut_fraction": rs["cut"] / rs["n"]},
        loss=lambda ro, ids: _micro_loss(model, ro, ids, judge, cfg, acc.device),
        bar_info=lambda m: f"loss {m['train/loss']:.4f} ω̂ {m.get('btpo/omega_mean', 0):.3f}")
    save_final(acc, model, tok, run, {"method": "btpo", "base_model": cfg.model.name,
                                      "model_class": "AutoModelForCausalLM"})
    acc.end_training()


def _micro_loss(model: Any, ro: Rollout, pair_ids: list[int], judge: Judge, cfg: Config,
                device: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BTPO surrogate on a micro-batch of pairs (all 2K sequences of each)."""
    k = cfg.btpo.k
    rows = [(i * 2 + r) * k + j for i in pair_ids for r in range(2) for j in range(k)]   # (m·2·K,)
    seqs = [ro.seqs[x] for x in rows]
    sc = score_thoughts(model, seqs, judge.yes_id, judge.no_id, judge.pad_id, cfg.btpo.yes_no_normalize,
                        cfg.btpo.temperature)
    width = sc.logp.shape[1]
    old = _pad_rows([ro.old_logp[x] for x in rows], width, device)                       # (m·2·K, Tz)
    ref = _pad_rows([ro.ref_logp[x] for x in rows], width, device) if ro.ref_logp is not None else None
    m = len(pair_ids)
    loss, stats = btpo_loss(
        sc.logp, old, sc.mask, sc.logp_yes.view(m, 2, k), ro.old_logp_yes[pair_ids].to(device),
        thought_advantage=cfg.btpo.thought_advantage, agg=cfg.btpo.agg, eps_low=cfg.btpo.clip_eps_low,
        eps_high=cfg.btpo.clip_eps_high, norm_constant=float(cfg.btpo.max_thought_tokens),
        misalignment_weight=cfg.btpo.misalignment_weight, ref_logp=ref, beta=cfg.btpo.beta)
    return loss, stats


# ----------------------------------------------------------------------------- evaluation

def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any, progress: Any = None,
             artifacts: Path | None = None) -> list[PairResult]:
    """Greedy thought per response, then p(Yes) (METHOD.md §7); optionally the mean over sampled thoughts."""
    tok = load_tokenizer(model_dir, padding_side="left")
    judge = Judge.from_tokenizer(tok)
    model = load_causal_lm(cfg.model, device.type, inference=True, path=model_dir).to(device).eval()
    engine = HFEngine(model, judge.pad_id, batch_size=max(1, cfg.eval.batch_size * 2))
    pairs, _ = encode_pairs(judge, records, cfg.data.max_length)
    greedy = SamplingParams(0.0, 1.0, cfg.eval.max_new_tokens, [judge.eot_id])
    ks = cfg.eval.samples
    results: list[PairResult] = []
    thoughts_path = artifacts.parent / (artifacts.name + ".thoughts.jsonl") if artifacts else None
    thoughts_f = open(thoughts_path, "w", encoding="utf-8") if thoughts_path else None  # noqa: SIM115
    try:
        for part in chunks(pairs, cfg.eval.batch_size):
            prompts = [p for _, w, lo in part for p in (w, lo)]
            samples = engine.generate([p.prefix for p in prompts], 1, greedy)
            seqs = [thought_sequence(p, g[0], judge.eot_id) for p, g in zip(prompts, samples, strict=True)]
            _, yes = score_chunked(model, seqs, judge, cfg, len(seqs))
            p_yes = yes.exp().view(-1, 2).tolist()
            sampled = None
            if ks:
                params = SamplingParams(cfg.btpo.temperature, cfg.btpo.top_p, cfg.eval.max_new_tokens, [judge.eot_id])
                smp = engine.generate([p.prefix for p in prompts], ks, params)
                sseqs = [thought_sequence(p, s, judge.eot_id) for p, g in zip(prompts, smp, strict=True) for s in g]
                _, syes = score_chunked(model, sseqs, judge, cfg, cfg.eval.batch_size * 2)
                sampled = syes.exp().view(-1, 2, ks).mean(-1).tolist()
            for j, (ri, _, _) in enumerate(part):
                rec = records[ri]
                extra = {"sampled_chosen": sampled[j][0], "sampled_rejected": sampled[j][1]} if sampled else {}
                results.append(pointwise_result(rec.id, p_yes[j][0], p_yes[j][1], **extra))
                if thoughts_f:
                    tw, tl = (tok.decode(samples[2 * j + r][0].token_ids, skip_special_tokens=True) for r in (0, 1))
                    thoughts_f.write(json.dumps({"id": rec.id, "thought_chosen": tw, "p_yes_chosen": p_yes[j][0],
                                                 "thought_rejected": tl, "p_yes_rejected": p_yes[j][1]},
                                                ensure_ascii=False) + "\n")
            if progress:
                progress(len(part))
    finally:
        if thoughts_f:
            thoughts_f.close()
    scored = {ri for ri, _, _ in pairs}
    results.extend(pointwise_result(r.id, None, None, reason="too_long")
                   for k, r in enumerate(records) if k not in scored)
    return results
