"""The GRPO loop both GRPO baselines share (METHOD.md §5–§6): rollout → group advantages → clipped updates.

A *task* (:class:`GRPOTask`: ``methods/grpo_pair.py`` or ``methods/grpo_point.py``) says what a
training *unit* (one preference pair) turns into: ``q`` judge prompts (pair: 1, point: 2), each
sampled ``G`` times; how a completion is parsed; and how the parses of one unit become rewards.
Everything else is here, in the same order as BTPO's loop (``methods/btpo.py``):

1. Rollout with the current ("old") weights: the local slice of ``rollout.batch_size`` pairs,
   ``q`` prompts per pair, ``G = rollout.n`` completions per prompt, sampled by the rollout engine
   (``rollout.engine``) at temperature ``T`` with seeds named by (run seed, rollout, pair, query).
2. Parse, reward, and normalize rewards within each *group* (the ``G`` completions of one prompt):
   ``Â = (r − mean_group) / (std_group + 1e-6)`` with the population std
   (:func:`btpo_cli.losses.group_advantages`).
3. One no-grad forward per completion gives the old per-token log-probs (and the reference
   model's when ``β > 0``), with :func:`btpo_cli.judging.logprobs.score_thoughts` on ``prompt + completion``
   (the whole completion, end-of-turn token included, is the "thought"; there is no tail).
4. ``update_epochs`` passes over the rollout in minibatches of ``train.batch_size`` pairs (a
   pair's ``q·G`` completions stay together); each step minimizes, per pair, the mean over its
   completions of the clipped surrogate (``losses.clipped_surrogate``, ``grpo.agg``) plus
   ``β · k3`` KL, averaged over the pairs.

Checkpoints are written only at rollout boundaries; sampling seeds are derived, so a killed run
continues exactly. Prompts longer than ``data.max_length`` tokens lose conversation tokens from
the left (:func:`btpo_cli.judging.templates.encode_judge`); the responses and the instruction are never
cut; a pair whose responses alone do not fit is skipped and counted (``data/too_long``).

Metrics (every key documented):

- ``grpo/reward_mean``: mean reward of the rollout's completions.
- ``grpo/format_error_rate``: fraction of completions that did not parse (any kind).
- ``grpo/format_<kind>``: fraction of completions with that parse failure.
- ``grpo/completion_len``: mean completion length in tokens (end-of-turn included).
- ``grpo/cut_fraction``: fraction of completions cut at ``rollout.max_new_tokens``.
- ``grpo/flat_group_fraction``: fraction of groups whose ``G`` rewards are all equal (no signal).
- ``grpo/clip_fraction``, ``grpo/approx_kl``, ``grpo/ratio_max``: from the clipped surrogate.
- ``grpo/adv_abs_mean``: mean ``|Â|`` of the minibatch's completions.
- ``grpo/kl``: k3 KL to the reference (only when ``β > 0``).
- ``train/loss``, ``train/grad_norm``, ``train/lr``, ``train/epoch``, ``train/rollout``; ``perf/*`` timings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from btpo_cli.config import Config, check_choices, eval_budget, register_section, settings_budget
from btpo_cli.data.pairs import PairRecord
from btpo_cli.engines import Sample, SamplingParams, engine_for, request_seed, resolve_engine_name
from btpo_cli.judging.judge import Judge
from btpo_cli.judging.parsers import ParseStats, ScoreParse, VerdictParse
from btpo_cli.judging.protocol import JsonlWriter
from btpo_cli.judging.templates import TooLong, encode_judge, end_of_turn_id
from btpo_cli.methods import Card
from btpo_cli.runs.final import describe
from btpo_cli.runs.folder import Run

if TYPE_CHECKING:
    import torch

    from btpo_cli.engines import RolloutEngine
    from btpo_cli.training.rollouts import Rollout
    from btpo_cli.training.steps import StepTimer


@dataclass
class GRPOConfig:
    """GRPO baselines (pair: verdict [[A]]/[[B]]; point: <score>N</score>). Shares BTPO's clipped surrogate.

    Group size, temperature, completion budget, rollout batch and engine live in ``rollout``."""

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    agg: str = "token-mean"
    beta: float = 0.0


def validate_section(cfg: Config) -> None:
    check_choices(cfg, {"grpo.agg": ("token-mean", "seq-sum", "token-sum-norm")})


register_section("grpo", GRPOConfig, validate=validate_section, renamed={
    "g": "n", "temperature": "temperature", "top_p": "top_p", "max_new_tokens": "max_new_tokens",
    "rollout_batch_size": "batch_size", "update_epochs": "update_epochs"})


def plan_inputs(cfg: Config) -> dict[str, Any]:
    """``btpo plan``: the KL reference of ``grpo.beta`` and the sampled rationale budget."""
    return {"beta": cfg.grpo.beta, "gen_tokens": cfg.rollout.max_new_tokens}


def rationale_card(meta: dict[str, Any], what: str, tag: str) -> Card:
    """The model card of a GRPO judge: it writes a rationale that ends with ``tag``."""
    ids = meta.get("token_ids") or {}
    budget = settings_budget(meta.get("settings") or {})
    return Card(what, rows=[("judging thought budget", budget)], usage=[
        "model = AutoModelForCausalLM.from_pretrained(\".\").eval()",
        "# judge prompt: template.strings.judge_prompt in btpo.json (conversation as 'User: ...')",
        "enc = chat([{\"role\": \"user\", \"content\": judge_prompt}], gen=True)",
        f"out = model.generate(**enc, max_new_tokens={1000 if budget is None else budget}, do_sample=False, "
        f"eos_token_id={ids.get('end_of_turn')})",
        f"rationale = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)  # ends with {tag}"])

Parse = VerdictParse | ScoreParse


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


def decode(tok: Any, sample: Sample) -> str:
    return tok.decode(sample.token_ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- rollout

@dataclass
class GRPOPayload:
    """What a GRPO rollout carries for its loss (``Rollout.payload``)."""

    advantages: torch.Tensor
    """(N,) group-normalized advantages, one per completion."""


def do_rollout(model: Any, ref: Any, engine: RolloutEngine, tok: Any, task: GRPOTask, queries: list[Query],
               cfg: Config, eot_id: int, timer: StepTimer,
               seeds: list[int] | None = None) -> tuple[Rollout, dict[str, float]]:
    """Sample ``G`` completions per query with ``engine``; parse, reward, score with the trainer's ``model``."""
    from btpo_cli.judging.logprobs import ThoughtSeq  # heavy: imported on use
    from btpo_cli.losses import group_advantages  # heavy: imported on use
    from btpo_cli.training.rollouts import Rollout, sample_and_score  # heavy: imported on use

    g, pad_id = cfg.rollout.n, tok.pad_token_id
    sc = sample_and_score(model, ref, engine, [q.ids for q in queries], cfg, eot_id, timer, seeds,
                          lambda i, s: ThoughtSeq(queries[i].ids + s.token_ids, len(s.token_ids), 0),
                          (pad_id, pad_id, pad_id), False, cfg.train.micro_batch_size * task.queries_per_unit * g)
    samples = sc.samples                                                            # (b·q, G)
    parses = [[task.parse(decode(tok, s), s.finished) for s in group] for group in samples]
    rewards = task.rewards(queries, parses)                                         # (b·q, G)
    adv = group_advantages(rewards)
    pstats = task.new_stats()
    for group in parses:
        for p in group:
            pstats.add(p)
    flat = sc.flat
    lens = sc.seqs.n_thought.tolist()
    stats = {"reward": float(rewards.sum()), "n": float(rewards.numel()), "groups": float(rewards.shape[0]),
             "flat": float((rewards.amax(-1) == rewards.amin(-1)).sum()),
             "len": float(sum(lens)), "cut": float(sum(1 for s in flat if not s.finished)),
             "errors": float(pstats.errors), **{f"fmt_{k}": float(pstats.counts[k]) for k in pstats.kinds},
             **sc.logprob_diff()}
    return Rollout(sc.seqs, sc.old_logp, sc.ref_logp, GRPOPayload(adv.reshape(-1))), stats


def micro_loss(model: Any, ro: Rollout, unit_ids: list[int], per_unit: int, pad_id: int, cfg: Config,
               device: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO surrogate on a micro-batch of units: mean over each unit's ``q·G`` completions, mean over units."""
    import torch  # heavy: imported on use

    from btpo_cli.judging.logprobs import ScorePath, score_thoughts  # heavy: imported on use
    from btpo_cli.losses import clipped_surrogate, kl_k3  # heavy: imported on use

    rows = torch.tensor([u * per_unit + j for u in unit_ids for j in range(per_unit)])   # (m·q·G,)
    sc = score_thoughts(model, ro.seqs.select(rows), pad_id, pad_id, pad_id, False, cfg.rollout.temperature,
                        ScorePath.of(cfg.train))
    width = sc.logp.shape[1]
    old = ro.old_logp[rows, :width].to(device)                                         # (m·q·G, T)
    assert isinstance(ro.payload, GRPOPayload), "a GRPO rollout carries advantages"
    adv = ro.payload.advantages[rows].to(device)                                       # (m·q·G,)
    seq_loss, stats = clipped_surrogate(sc.logp, old, adv, sc.mask, cfg.grpo.clip_eps_low, cfg.grpo.clip_eps_high,
                                        cfg.grpo.agg, norm_constant=float(cfg.rollout.max_new_tokens))
    m = len(unit_ids)
    unit_loss = seq_loss.view(m, per_unit).mean(-1)                                   # (m,)
    out = {"clip_fraction": stats["clip_fraction"], "approx_kl": stats["approx_kl"],
           "ratio_max": stats["ratio_max"], "adv_abs_mean": adv.abs().mean()}
    if ro.ref_logp is not None:
        ref = ro.ref_logp[rows, :width].to(device)
        kl = kl_k3(sc.logp, ref, sc.mask).view(m, per_unit).mean(-1)                  # (m,)
        unit_loss = unit_loss + cfg.grpo.beta * kl
        out["kl"] = kl.detach().mean()
    loss = unit_loss.mean()
    out["loss"] = loss.detach()
    return loss, out


# ----------------------------------------------------------------------------- training

def train(cfg: Config, run: Run, resume: bool, task: GRPOTask,
          templates: Callable[[Any, str], dict[str, Any]] | None = None) -> None:
    from btpo_cli.training.rollouts import (  # heavy: imported on use
        RolloutPlan,
        check_rollout_sizes,
        run_rollouts,
    )
    from btpo_cli.training.session import TrainSession  # heavy: imported on use

    sess = TrainSession.begin(cfg, run, resume, padding_side="left")
    check_rollout_sizes(cfg, sess.world)
    tok = sess.tok
    eot_id, pad_id = end_of_turn_id(tok), tok.pad_token_id
    records = sess.load_split()
    units, enc_stats = task.encode(tok, records, cfg.data.max_length)
    g = cfg.rollout.n
    per_unit = task.queries_per_unit * g
    plan = RolloutPlan.from_config(len(units), cfg, sess.world)
    sess.build("causal", plan.total_steps, reference=cfg.grpo.beta > 0)
    sess.log_data(len(units), enc_stats)
    engine = sess.rollout_engine()
    aspect = Counter(r.aspect for r in records).most_common(1)[0][0]
    sess.meta = describe(cfg, records, templates=templates(tok, aspect) if templates else {},
                         token_ids={"end_of_turn": eot_id, "pad": pad_id})

    def rollout(local: list[int], r_idx: int, timer: StepTimer) -> tuple[Any, dict[str, float]]:
        queries = task.queries([units[i] for i in local], r_idx, cfg.train.seed)
        q = task.queries_per_unit
        seeds = [request_seed(cfg.train.seed, r_idx, units[i].index, j) for i in local for j in range(q)]
        return do_rollout(sess.model, sess.ref, engine, tok, task, queries, cfg, eot_id, timer, seeds)

    def rollout_metrics(rs: dict[str, float]) -> dict[str, float]:
        n = max(rs["n"], 1.0)
        return {"grpo/reward_mean": rs["reward"] / n, "grpo/format_error_rate": rs["errors"] / n,
                **{f"grpo/format_{k[4:]}": v / n for k, v in rs.items() if k.startswith("fmt_")},
                "grpo/completion_len": rs["len"] / n, "grpo/cut_fraction": rs["cut"] / n,
                "grpo/flat_group_fraction": rs["flat"] / max(rs["groups"], 1.0)}

    run_rollouts(
        sess, engine=engine, plan=plan, prefix="grpo", title=f"{task.name} {run.root.name}", rollout=rollout,
        rollout_metrics=rollout_metrics,
        loss=lambda ro, ids: micro_loss(sess.model, ro, ids, per_unit, pad_id, cfg, sess.device),
        bar_info=lambda m: f"loss {m['train/loss']:.4f} reward {m.get('grpo/reward_mean', 0):.3f}")
    engine.close()
    sess.finish(sess.meta)


# ----------------------------------------------------------------------------- evaluation helpers

class RationaleJudge(Judge):
    """A judge that writes a rationale greedily and ends it with a parsable answer (both GRPO baselines).

    The rollout engine (``rollout.engine``) decodes greedily up to ``eval.max_new_tokens`` tokens
    (default: the training budget), stopping at the end of the turn; subclasses build the judge prompts and parse the answers."""

    def __init__(self, model_dir: str, cfg: Config, device: Any, meta: dict[str, Any], module: Any = None):
        from btpo_cli.models.loading import load_tokenizer  # heavy: imported on use

        super().__init__(model_dir, cfg, device, meta)
        self.tok = load_tokenizer(model_dir, padding_side="left")
        if module is None and resolve_engine_name(cfg.rollout.engine) == "hf":   # the hf engine generates with it
            module = self.causal_lm()
        self.engine = engine_for(cfg, model_dir, self.tok.pad_token_id, device, module=module,
                                 prompts_per_batch=max(1, cfg.eval.batch_size * 2),
                                 max_new_tokens=eval_budget(cfg))
        self.params = SamplingParams(0.0, 1.0, eval_budget(cfg), [end_of_turn_id(self.tok)])

    def encode(self, build: Callable[[Any], Any], prompt: Any) -> list[int] | None:
        """``encode_judge`` of one judge prompt; None when it does not fit in ``data.max_length``."""
        try:
            return encode_judge(self.tok, build, prompt, self.cfg.data.max_length)[0]
        except TooLong:
            return None

    def greedy(self, prompts: list[list[int]]) -> list[tuple[str, bool]]:
        """Greedy completion of each prompt: (decoded text, finished on end-of-turn)."""
        if not prompts:
            return []
        return [(decode(self.tok, g[0]), g[0].finished) for g in self.engine.generate(prompts, 1, self.params)]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = None


def evaluate_rationales(judge: Judge, records: list[PairRecord], progress: Any, artifacts: Path | None,
                        row: Callable[[str, Any], dict[str, Any]]) -> list[Any]:
    """Evaluation shared by both GRPO baselines: ``judge.evaluate_pairs`` (METHOD §7) with every judged
    pair's ``row(id, judgement)`` written to ``<artifacts>.rationales.jsonl``."""
    try:
        with JsonlWriter(artifacts) as out:
            return judge.evaluate_pairs(records, progress, sink=lambda rec, judged, _: out.write(row(rec.id, judged)))
    finally:
        judge.close()
