"""The GRPO loop both GRPO baselines share (METHOD.md §5–§6): rollout → group advantages → clipped updates.

A *task* (:class:`GRPOTask`: ``methods/grpo_pair.py`` or ``methods/grpo_point.py``) says what a
training *unit* (one preference pair) turns into: ``q`` judge prompts (pair: 1, point: 2), each
sampled ``G`` times; how a completion is parsed; and how the parses of one unit become rewards.
Everything else is here, in the same order as BTPO's loop (``methods/btpo.py``):

1. Rollout with the current ("old") weights: the local slice of ``grpo.rollout_batch_size`` pairs,
   ``q`` prompts per pair, ``G`` completions per prompt (``HFEngine``, temperature ``T``).
2. Parse, reward, and normalize rewards within each *group* (the ``G`` completions of one prompt):
   ``Â = (r − mean_group) / (std_group + 1e-6)`` with the population std (:func:`group_advantages`).
3. One no-grad forward per completion gives the old per-token log-probs (and the reference
   model's when ``β > 0``), with :func:`btpo_cli.gpm.score_thoughts` on ``prompt + completion``
   (the whole completion, end-of-turn token included, is the "thought"; there is no tail).
4. ``update_epochs`` passes over the rollout in minibatches of ``train.batch_size`` pairs (a
   pair's ``q·G`` completions stay together); each step minimizes, per pair, the mean over its
   completions of the clipped surrogate (``losses.clipped_surrogate``, ``grpo.agg``) plus
   ``β · k3`` KL, averaged over the pairs.

Checkpoints are written only at rollout boundaries; resuming restores the RNG (accelerate) so a
killed run continues exactly. Prompts longer than ``data.max_length`` tokens lose conversation
text from the left (whole early turns first, then the start of the earliest kept turn, marked
"…"); the responses and the instruction are never cut; a pair whose responses alone do not fit
is skipped and counted (``data/too_long``).

Metrics (every key documented):

- ``grpo/reward_mean``: mean reward of the rollout's completions.
- ``grpo/format_error_rate``: fraction of completions that did not parse (any kind).
- ``grpo/format_<kind>``: fraction of completions with that parse failure.
- ``grpo/completion_len``: mean completion length in tokens (end-of-turn included).
- ``grpo/cut_fraction``: fraction of completions cut at ``grpo.max_new_tokens``.
- ``grpo/flat_group_fraction``: fraction of groups whose ``G`` rewards are all equal (no signal).
- ``grpo/clip_fraction``, ``grpo/approx_kl``, ``grpo/ratio_max``: from the clipped surrogate.
- ``grpo/adv_abs_mean``: mean ``|Â|`` of the minibatch's completions.
- ``grpo/kl``: k3 KL to the reference (only when ``β > 0``).
- ``train/loss``, ``train/grad_norm``, ``train/lr``, ``train/epoch``, ``train/rollout``; ``perf/*`` timings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from btpo_cli.config import Config
from btpo_cli.data import PairRecord
from btpo_cli.errors import ConfigError
from btpo_cli.gpm import ThoughtSeq, score_thoughts
from btpo_cli.losses import clipped_surrogate, kl_k3
from btpo_cli.models import load_causal_lm, load_tokenizer
from btpo_cli.parsers import ParseStats, ScoreParse, VerdictParse
from btpo_cli.rl_loop import RolloutPlan, run_rollouts
from btpo_cli.rollout import HFEngine, Sample, SamplingParams
from btpo_cli.runs import Run
from btpo_cli.templates import Messages, TooLong, encode_text, end_of_turn_id, render
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

Parse = VerdictParse | ScoreParse
_CUT_MARK = "…"


# ----------------------------------------------------------------------------- prompts

def encode_judge(tok: Any, build: Callable[[Messages], Messages], prompt: Messages,
                 max_length: int) -> tuple[list[int], bool]:
    """Token ids of the judge chat ``build(prompt)`` up to its generation head, at most ``max_length``.

    Over-long prompts lose conversation text from the left: whole early turns, then the start of the
    earliest kept turn (replaced by "…"). ``build`` must embed the conversation and nothing else of
    ``prompt``. Returns ``(ids, truncated)``; raises :class:`TooLong` if even an empty conversation
    does not fit.
    """
    ids = encode_text(tok, render(tok, build(prompt), add_generation_prompt=True))
    if len(ids) <= max_length:
        return ids, False
    msgs = [dict(m) for m in prompt]
    slack = len(encode_text(tok, _CUT_MARK)) + 1
    for _ in range(8):                       # re-tokenization may leave a few tokens over: cut again
        cut = len(ids) - max_length + slack
        while cut > 0 and msgs:
            text = msgs[0]["content"]
            content = encode_text(tok, text[len(_CUT_MARK):] if text.startswith(_CUT_MARK) else text)
            if len(content) <= cut:
                msgs.pop(0)
                cut -= len(content) + 1
            else:
                msgs[0]["content"] = _CUT_MARK + tok.decode(content[cut:])
                cut = 0
        ids = encode_text(tok, render(tok, build(msgs), add_generation_prompt=True))
        if len(ids) <= max_length:
            return ids, True
        if not msgs:
            raise TooLong(f"the judge prompt is over {max_length} tokens without any conversation")
    raise TooLong(f"could not fit the judge prompt into {max_length} tokens")


@dataclass
class Query:
    """One judge prompt of a unit, sampled ``G`` times."""

    ids: list[int]
    label: str
    """What a correct answer is, for the task's reward: pair → 'A'/'B'; point → 'chosen'/'rejected'."""


class GRPOTask(Protocol):
    """What a GRPO baseline adds to the shared loop (see the module docstring)."""

    name: str
    queries_per_unit: int

    def encode(self, tok: Any, records: list[PairRecord], max_length: int) -> tuple[list[Any], dict[str, int]]:
        """Training units (one per usable pair) and counts ``truncated`` / ``too_long``."""
        ...

    def queries(self, units: list[Any], rollout: int, seed: int) -> list[Query]:
        """``queries_per_unit`` prompts per unit, unit-major: (b·q,)."""
        ...

    def parse(self, text: str, finished: bool) -> Parse: ...

    def new_stats(self) -> ParseStats: ...

    def rewards(self, queries: list[Query], parses: list[list[Parse]]) -> torch.Tensor:
        """(b·q, G) rewards from the parses of each query's ``G`` completions."""
        ...


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
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


def decode(tok: Any, sample: Sample) -> str:
    return tok.decode(sample.token_ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- rollout

@dataclass
class Rollout:
    """One rollout on this process: b units × q queries × G completions, in that order."""

    seqs: list[ThoughtSeq]              # (b·q·G,) prompt + completion, n_thought = completion length
    old_logp: list[torch.Tensor]        # (b·q·G,) each (n_thought,)
    ref_logp: list[torch.Tensor] | None
    advantages: torch.Tensor            # (b·q·G,)
    stats: dict[str, float]             # sums over this process's completions / groups


@torch.no_grad()
def completion_logps(model: Any, seqs: list[ThoughtSeq], pad_id: int, temperature: float,
                     batch: int) -> list[torch.Tensor]:
    """No-grad per-token log-probs of each completion (at the sampling temperature), in chunks."""
    out: list[torch.Tensor] = []
    for part in chunks(seqs, batch):
        sc = score_thoughts(model, part, pad_id, pad_id, pad_id, False, temperature)
        out.extend(sc.logp[i, :s.n_thought].float() for i, s in enumerate(part))
    return out


def do_rollout(model: Any, ref: Any, engine: HFEngine, tok: Any, task: GRPOTask, queries: list[Query],
               cfg: Config, eot_id: int, timer: StepTimer) -> Rollout:
    g = cfg.grpo.g
    params = SamplingParams(cfg.grpo.temperature, cfg.grpo.top_p, cfg.grpo.max_new_tokens, [eot_id])
    with timer.phase("generate"):
        samples = engine.generate([q.ids for q in queries], g, params)              # (b·q, G)
    parses = [[task.parse(decode(tok, s), s.finished) for s in group] for group in samples]
    rewards = task.rewards(queries, parses)                                         # (b·q, G)
    adv = group_advantages(rewards)
    seqs = [ThoughtSeq(q.ids + s.token_ids, len(s.token_ids), 0)
            for q, group in zip(queries, samples, strict=True) for s in group]
    batch = cfg.train.micro_batch_size * task.queries_per_unit * g
    with timer.phase("score"):
        old = completion_logps(model, seqs, engine.pad_token_id, cfg.grpo.temperature, batch)
        ref_lp = completion_logps(ref, seqs, engine.pad_token_id, cfg.grpo.temperature, batch) if ref else None
    pstats = task.new_stats()
    for group in parses:
        for p in group:
            pstats.add(p)
    stats = {"reward": float(rewards.sum()), "n": float(rewards.numel()), "groups": float(rewards.shape[0]),
             "flat": float((rewards.amax(-1) == rewards.amin(-1)).sum()),
             "len": float(sum(s.n_thought for s in seqs)),
             "cut": float(sum(1 for group in samples for s in group if not s.finished)),
             "errors": float(pstats.errors), **{f"fmt_{k}": float(pstats.counts[k]) for k in pstats.kinds}}
    return Rollout(seqs, old, ref_lp, adv.reshape(-1), stats)


def _pad_to(rows: list[torch.Tensor], width: int, device: Any) -> torch.Tensor:
    out = pad_sequence(rows, batch_first=True).to(device)                           # (N, max len)
    return torch.nn.functional.pad(out, (0, width - out.shape[1]))


def micro_loss(model: Any, ro: Rollout, unit_ids: list[int], per_unit: int, pad_id: int, cfg: Config,
               device: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO surrogate on a micro-batch of units: mean over each unit's ``q·G`` completions, mean over units."""
    rows = [u * per_unit + j for u in unit_ids for j in range(per_unit)]             # (m·q·G,)
    sc = score_thoughts(model, [ro.seqs[r] for r in rows], pad_id, pad_id, pad_id, False, cfg.grpo.temperature)
    width = sc.logp.shape[1]
    old = _pad_to([ro.old_logp[r] for r in rows], width, device)                      # (m·q·G, T)
    adv = ro.advantages[rows].to(device)                                              # (m·q·G,)
    seq_loss, stats = clipped_surrogate(sc.logp, old, adv, sc.mask, cfg.grpo.clip_eps_low, cfg.grpo.clip_eps_high,
                                        cfg.grpo.agg, norm_constant=float(cfg.grpo.max_new_tokens))
    m = len(unit_ids)
    unit_loss = seq_loss.view(m, per_unit).mean(-1)                                  # (m,)
    out = {"clip_fraction": stats["clip_fraction"], "approx_kl": stats["approx_kl"],
           "ratio_max": stats["ratio_max"], "adv_abs_mean": adv.abs().mean()}
    if ro.ref_logp is not None:
        ref = _pad_to([ro.ref_logp[r] for r in rows], width, device)
        kl = kl_k3(sc.logp, ref, sc.mask).view(m, per_unit).mean(-1)                 # (m,)
        unit_loss = unit_loss + cfg.grpo.beta * kl
        out["kl"] = kl.detach().mean()
    loss = unit_loss.mean()
    out["loss"] = loss.detach()
    return loss, out


# ----------------------------------------------------------------------------- training

def _check(cfg: Config, world: int) -> None:
    r, b = cfg.grpo.rollout_batch_size, cfg.train.batch_size
    if r % b:
        raise ConfigError(f"grpo.rollout_batch_size={r} must be a multiple of train.batch_size={b}")
    if b % world or r % world:
        raise ConfigError(f"train.batch_size={b} and grpo.rollout_batch_size={r} must divide by {world} processes")
    if cfg.grpo.temperature <= 0:
        raise ConfigError(f"grpo.temperature: must be positive, got {cfg.grpo.temperature}")


def train(cfg: Config, run: Run, resume: bool, task: GRPOTask) -> None:
    acc = make_accelerator(cfg, run)
    from accelerate.utils import set_seed

    _check(cfg, acc.num_processes)
    set_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model.name, padding_side="left")
    eot_id, pad_id = end_of_turn_id(tok), tok.pad_token_id
    records = load_split(cfg, cfg.data.train_split, acc)
    units, enc_stats = task.encode(tok, records, cfg.data.max_length)
    model = load_causal_lm(cfg.model, acc.device.type)
    ref = None
    if cfg.grpo.beta > 0:
        ref = load_causal_lm(cfg.model, acc.device.type, inference=True).to(acc.device).eval()
        ref.requires_grad_(False)

    g = cfg.grpo.g
    per_unit = task.queries_per_unit * g
    plan = RolloutPlan.from_config(len(units), cfg, cfg.grpo.rollout_batch_size, cfg.grpo.update_epochs, "grpo")
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, plan.total_steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    init_tracking(acc, cfg, run)
    start = resume_step(acc, run, resume)
    if start == 0:
        run.log({"step": 0, "data/train_pairs": len(units), "data/truncated": enc_stats["truncated"],
                 "data/too_long": enc_stats["too_long"]})
    engine = HFEngine(acc.unwrap_model(model), pad_id, batch_size=max(1, 64 // g))

    def rollout(local: list[int], r_idx: int, timer: StepTimer) -> tuple[Any, dict[str, float]]:
        queries = task.queries([units[i] for i in local], r_idx, cfg.train.seed)
        ro = do_rollout(engine.model, ref, engine, tok, task, queries, cfg, eot_id, timer)
        return ro, dict(ro.stats)

    def rollout_metrics(rs: dict[str, float]) -> dict[str, float]:
        n = max(rs["n"], 1.0)
        return {"grpo/reward_mean": rs["reward"] / n, "grpo/format_error_rate": rs["errors"] / n,
                **{f"grpo/format_{k[4:]}": v / n for k, v in rs.items() if k.startswith("fmt_")},
                "grpo/completion_len": rs["len"] / n, "grpo/cut_fraction": rs["cut"] / n,
                "grpo/flat_group_fraction": rs["flat"] / max(rs["groups"], 1.0)}

    run_rollouts(
        acc=acc, cfg=cfg, run=run, model=model, opt=opt, sched=sched, engine=engine, plan=plan, start=start,
        prefix="grpo", title=f"{task.name} {run.root.name}", rollout=rollout, rollout_metrics=rollout_metrics,
        loss=lambda ro, ids: micro_loss(model, ro, ids, per_unit, pad_id, cfg, acc.device),
        bar_info=lambda m: f"loss {m['train/loss']:.4f} reward {m.get('grpo/reward_mean', 0):.3f}")
    save_final(acc, model, tok, run, {"method": task.name, "base_model": cfg.model.name,
                                      "model_class": "AutoModelForCausalLM"})
    acc.end_training()


# ----------------------------------------------------------------------------- evaluation helpers

@dataclass
class EvalJudge:
    """The model, tokenizer and greedy engine an evaluation needs."""

    tok: Any
    model: Any
    engine: HFEngine
    params: SamplingParams

    @classmethod
    def load(cls, cfg: Config, model_dir: str, device: Any, prompts_per_batch: int) -> EvalJudge:
        tok = load_tokenizer(model_dir, padding_side="left")
        model = load_causal_lm(cfg.model, device.type, inference=True, path=model_dir).to(device).eval()
        engine = HFEngine(model, tok.pad_token_id, batch_size=max(1, prompts_per_batch))
        return cls(tok, model, engine, SamplingParams(0.0, 1.0, cfg.eval.max_new_tokens, [end_of_turn_id(tok)]))

    def greedy(self, prompts: list[list[int]]) -> list[tuple[str, bool]]:
        """Greedy completion of each prompt: (decoded text, finished on end-of-turn)."""
        return [(decode(self.tok, g[0]), g[0].finished) for g in self.engine.generate(prompts, 1, self.params)]


class JsonlWriter:
    """``<artifacts>.rationales.jsonl`` when ``artifacts`` is given; a no-op otherwise."""

    def __init__(self, artifacts: Path | None, suffix: str = ".rationales.jsonl"):
        self.path = artifacts.parent / (artifacts.name + suffix) if artifacts else None
        self._f: Any = None

    def __enter__(self) -> JsonlWriter:
        if self.path:
            self._f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        return self

    def write(self, row: dict[str, Any]) -> None:
        if self._f:
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def __exit__(self, *exc: object) -> None:
        if self._f:
            self._f.close()
