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

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from btpo_cli.config import (
    Config,
    check_choices,
    check_fraction,
    eval_budget,
    register_section,
    settings_budget,
)
from btpo_cli.data.pairs import DEFAULT_ASPECT, PairRecord
from btpo_cli.engines import SamplingParams, engine_for, request_seed
from btpo_cli.errors import ConfigError
from btpo_cli.judging.judge import TOO_LONG, Item, Judge, Score, judge_for_eval
from btpo_cli.judging.protocol import JsonlWriter, PairResult, pointwise_result, summarize
from btpo_cli.judging.templates import (
    EVAL_INSTRUCTION,
    PLACEHOLDER_PROMPT,
    RATING_QUESTION,
    GPMPrompt,
    TooLong,
    answer_token_id,
    encode_gpm,
    end_of_turn_id,
    gpm_messages,
    render,
)
from btpo_cli.methods import Card, MethodSpec, register_method
from btpo_cli.plan.estimate import Geometry, PlanInputs
from btpo_cli.runs.final import describe
from btpo_cli.runs.folder import Run

if TYPE_CHECKING:
    import torch

    from btpo_cli.engines import RolloutEngine
    from btpo_cli.training.rollouts import Rollout
    from btpo_cli.training.steps import StepTimer


@dataclass
class BTPOConfig:
    """BTPO (METHOD.md §5). Defaults marked (ours) were lost from the paper and are our choice.

    The sampling settings (K, temperature, thought budget, rollout batch, update epochs, engine)
    live in the ``rollout`` section."""

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    misalignment_weight: bool = True
    """False sets ω̂ = 1 (the paper's ablation)."""
    thought_advantage: str = "grpo"
    """``grpo`` (the paper's implementation) or ``exact`` (the §4 estimator with a 1/K baseline)."""
    agg: str = "token-mean"
    """``token-mean`` (GRPO), ``seq-sum``, or ``token-sum-norm`` (Dr. GRPO: token sum / rollout.max_new_tokens)."""
    beta: float = 0.0
    """KL (k3) coefficient to the frozen reference model; 0 loads no reference."""
    yes_no_normalize: bool = False
    """p(Yes) = e^{l_yes}/(e^{l_yes}+e^{l_no}) instead of the full-vocabulary softmax."""
    score_floor: float = 0.0
    """(ours) p(Yes) below which a rejected response's thought gets no more score-term push
    (``losses.score_loss``); 0 is METHOD's unbounded term. docs/experiments.md: the collapse it stops."""
    schedule: str = "joint"
    """``joint`` (L_score + L_thought together). The earlier paper version's alternating schedule is not implemented."""


def validate_section(cfg: Config) -> None:
    check_choices(cfg, {"btpo.thought_advantage": ("grpo", "exact"),
                        "btpo.agg": ("token-mean", "seq-sum", "token-sum-norm"), "btpo.schedule": ("joint",)})
    check_fraction(cfg, "btpo.score_floor")


register_section("btpo", BTPOConfig, validate=validate_section, renamed={
    "k": "n", "temperature": "temperature", "top_p": "top_p", "max_thought_tokens": "max_new_tokens",
    "rollout_batch_size": "batch_size", "update_epochs": "update_epochs", "rollout_engine": "engine"})


@dataclass
class GPMTokens:
    """Token ids the GPM needs, read off the tokenizer's chat template."""

    tok: Any
    yes_id: int
    no_id: int
    eot_id: int
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tok: Any) -> GPMTokens:
        return cls(tok, answer_token_id(tok, "Yes"), answer_token_id(tok, "No"), end_of_turn_id(tok),
                   tok.pad_token_id)


def encode_pairs(judge: GPMTokens, records: list[PairRecord], max_prefix: int) -> tuple[list[tuple[int, GPMPrompt, GPMPrompt]], dict[str, int]]:
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
class BTPOPayload:
    """What a BTPO rollout carries for its loss (``Rollout.payload``)."""

    old_logp_yes: torch.Tensor
    """(b, 2, K) log p(Yes) after each thought under the rollout weights (ω̂, p̄, the advantages)."""


def do_rollout(model: Any, ref: Any, engine: RolloutEngine, pairs: list[tuple[int, GPMPrompt, GPMPrompt]],
               judge: GPMTokens, cfg: Config, timer: StepTimer,
               seeds: list[int] | None = None) -> tuple[Rollout, dict[str, float]]:
    """Sample K thoughts per response with ``engine``; score them with the trainer's ``model`` (no grad)."""
    from btpo_cli.judging.logprobs import thought_sequence  # heavy: imported on use
    from btpo_cli.training.rollouts import Rollout, sample_and_score  # heavy: imported on use

    k = cfg.rollout.n
    prompts = [p for _, w, lo in pairs for p in (w, lo)]                          # (2b,)
    sc = sample_and_score(model, ref, engine, [p.prefix for p in prompts], cfg, judge.eot_id, timer, seeds,
                          lambda i, s: thought_sequence(prompts[i], s, judge.eot_id),
                          (judge.yes_id, judge.no_id, judge.pad_id), cfg.btpo.yes_no_normalize,
                          cfg.train.micro_batch_size * 2 * k)
    flat = sc.flat
    lens = sc.seqs.n_thought.tolist()
    stats = {"len": float(sum(lens)), "n": float(len(lens)),
             "cut": float(sum(1 for s in flat if _cut(s, cfg.rollout.max_new_tokens))), **sc.logprob_diff()}
    return Rollout(sc.seqs, sc.old_logp, sc.ref_logp, BTPOPayload(sc.old_logp_yes.view(len(pairs), 2, k))), stats


def rollout_seeds(seed: int, r_idx: int, pair_indices: list[int]) -> list[int]:
    """Request seeds of a rollout's 2b responses: named by (run seed, rollout, pair, response)."""
    return [request_seed(seed, r_idx, i, side) for i in pair_indices for side in (0, 1)]


def train(cfg: Config, run: Run, resume: bool) -> None:
    from btpo_cli.training.rollouts import (  # heavy: imported on use
        RolloutPlan,
        check_rollout_sizes,
        run_rollouts,
    )
    from btpo_cli.training.session import TrainSession  # heavy: imported on use

    sess = TrainSession.begin(cfg, run, resume, padding_side="left")
    check_rollout_sizes(cfg, sess.world)
    if cfg.btpo.schedule != "joint":
        raise ConfigError("btpo.schedule: only 'joint' is implemented")
    judge = GPMTokens.from_tokenizer(sess.tok)
    records = sess.load_split()
    pairs, enc_stats = encode_pairs(judge, records, cfg.data.max_length)
    plan = RolloutPlan.from_config(len(pairs), cfg, sess.world)
    sess.build("causal", plan.total_steps, reference=cfg.btpo.beta > 0)
    sess.log_data(len(pairs), enc_stats)
    engine = sess.rollout_engine()
    aspect = Counter(r.aspect for r in records).most_common(1)[0][0]
    sess.meta = describe(cfg, records, templates=templates(sess.tok, aspect),
                         token_ids={"yes": judge.yes_id, "no": judge.no_id, "end_of_turn": judge.eot_id,
                                    "pad": judge.pad_id})

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
    sess.finish(sess.meta)


def micro_loss(model: Any, ro: Rollout, pair_ids: list[int], judge: GPMTokens, cfg: Config,
               device: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BTPO surrogate on a micro-batch of pairs (all 2K sequences of each)."""
    import torch  # heavy: imported on use

    from btpo_cli.judging.logprobs import ScorePath, score_thoughts  # heavy: imported on use
    from btpo_cli.losses import btpo_loss  # heavy: imported on use

    k = cfg.rollout.n
    rows = torch.tensor([(i * 2 + r) * k + j for i in pair_ids for r in range(2) for j in range(k)])   # (m·2·K,)
    sc = score_thoughts(model, ro.seqs.select(rows), judge.yes_id, judge.no_id, judge.pad_id,
                        cfg.btpo.yes_no_normalize, cfg.rollout.temperature, ScorePath.of(cfg.train))
    width = sc.logp.shape[1]
    old = ro.old_logp[rows, :width].to(device)                                            # (m·2·K, Tz)
    ref = ro.ref_logp[rows, :width].to(device) if ro.ref_logp is not None else None
    m = len(pair_ids)
    return btpo_loss(
        sc.logp, old, sc.mask, sc.logp_yes.view(m, 2, k), _yes(ro)[pair_ids].to(device),
        thought_advantage=cfg.btpo.thought_advantage, agg=cfg.btpo.agg, eps_low=cfg.btpo.clip_eps_low,
        eps_high=cfg.btpo.clip_eps_high, norm_constant=float(cfg.rollout.max_new_tokens),
        misalignment_weight=cfg.btpo.misalignment_weight, ref_logp=ref, beta=cfg.btpo.beta,
        score_floor=cfg.btpo.score_floor)


def _yes(ro: Rollout) -> torch.Tensor:
    assert isinstance(ro.payload, BTPOPayload), "a BTPO rollout carries log p(Yes)"
    return ro.payload.old_logp_yes


# ----------------------------------------------------------------------------- evaluation

class BTPOJudge(Judge):
    """BTPO's judge (METHOD.md §7): per response, a greedy thought from the dialog's evaluation turn
    (``eval.max_new_tokens``, by default the training budget; on the rollout engine), then p(Yes) at the
    answer position in one pass.

    With ``samples = K > 0`` it also samples K thoughts (``rollout.temperature`` / ``top_p``, seeds
    named by the item's key) and the score becomes their mean p(Yes), the paper's ``s(y)`` estimate;
    the greedy p(Yes) stays in ``detail["p_yes"]``. ``compare`` is Bradley–Terry on the two scores."""

    protocol = "pointwise"

    def __init__(self, model_dir: str, cfg: Config, device: Any, meta: dict[str, Any], module: Any = None):
        from btpo_cli.models.loading import load_tokenizer  # heavy: imported on use

        super().__init__(model_dir, cfg, device, meta)
        self.tok = load_tokenizer(model_dir, padding_side="left")
        self.ids = GPMTokens.from_tokenizer(self.tok)
        self.model = self.causal_lm(module)
        self.engine = engine_for(cfg, model_dir, self.ids.pad_id, device, module=self.model,
                                 prompts_per_batch=max(1, cfg.eval.batch_size * 2),
                                 max_new_tokens=eval_budget(cfg))
        self.budget = eval_budget(cfg)
        self.samples = cfg.eval.samples

    def preference(self, a: float, b: float) -> float:
        """Bradley–Terry on the scores: ``s_a / (s_a + s_b)`` (½ when both are 0)."""
        return a / (a + b) if a + b > 0 else 0.5

    def _score_chunk(self, items: list[Item]) -> list[Score]:
        import torch  # heavy: imported on use

        from btpo_cli.judging.logprobs import (  # heavy: imported on use
            ScorePath,
            SeqBatch,
            score_chunked,
            score_thoughts,
            thought_sequence,
        )

        ids = self.ids
        prompts: list[GPMPrompt | None] = []
        for it in items:
            try:
                prompts.append(encode_gpm(self.tok, it.prompt, it.response, it.aspect, self.cfg.data.max_length))
            except TooLong:
                prompts.append(None)
        idx = [i for i, p in enumerate(prompts) if p is not None]
        out = [Score(None, TOO_LONG) for _ in items]
        if not idx:
            return out
        todo = [prompts[i] for i in idx]
        greedy = SamplingParams(0.0, 1.0, self.budget, [ids.eot_id])
        samples = [g[0] for g in self.engine.generate([p.prefix for p in todo], 1, greedy)]
        seqs = SeqBatch.from_seqs([thought_sequence(p, s, ids.eot_id) for p, s in zip(todo, samples, strict=True)],
                                  ids.pad_id)
        with torch.no_grad():
            sc = score_thoughts(self.model, seqs, ids.yes_id, ids.no_id, ids.pad_id, self.cfg.btpo.yes_no_normalize)
        p_yes = sc.logp_yes.float().exp().tolist()
        mass = sc.yes_no_mass.float().tolist()
        sampled: list[list[float]] | None = None
        sampled_text: list[list[str]] = []
        if self.samples:
            k = self.samples
            params = SamplingParams(self.cfg.rollout.temperature, self.cfg.rollout.top_p, self.budget, [ids.eot_id])
            smp = self.engine.generate([p.prefix for p in todo], k, params,
                                       [request_seed(*items[i].key) for i in idx])
            sseqs = SeqBatch.from_seqs([thought_sequence(p, s, ids.eot_id) for p, g in zip(todo, smp, strict=True)
                                        for s in g], ids.pad_id)
            path = ScorePath.of(self.cfg.train)
            # with a shared prefix, chunks hold whole groups of K (a split group still scores right)
            batch = self.cfg.eval.batch_size * 2 * (k if path.shared_prefix != "off" or path.packing != "off" else 1)
            _, syes = score_chunked(self.model, sseqs, ids.yes_id, ids.no_id, ids.pad_id, self.cfg.btpo.yes_no_normalize,
                                    self.cfg.rollout.temperature, batch, path)
            sampled = syes.exp().view(-1, k).tolist()
            sampled_text = [[self.tok.decode(s.token_ids, skip_special_tokens=True) for s in g] for g in smp]
        for j, i in enumerate(idx):
            s = samples[j]
            detail: dict[str, Any] = {"p_yes": p_yes[j], "thought_tokens": len(s.token_ids),
                                      "thought_cut": _cut(s, self.budget), "yes_no_mass": mass[j]}
            score = p_yes[j]
            if sampled is not None:
                score = sum(sampled[j]) / len(sampled[j])
                detail.update(p_yes_sampled=score, samples=self.samples, sampled_p_yes=sampled[j],
                              sampled_thoughts=sampled_text[j])
            out[i] = Score(score, thought=self.tok.decode(s.token_ids, skip_special_tokens=True), detail=detail)
        return out

    def pair_result(self, rec_id: str, judged: Any) -> PairResult:
        """The greedy p(Yes) decides (METHOD §7); the sampled means ride along in the detail."""
        sw, sl = judged
        dw, dl = sw.detail, sl.detail
        detail = {"thought_tokens": [dw["thought_tokens"], dl["thought_tokens"]],
                  "thought_cut": [dw["thought_cut"], dl["thought_cut"]],
                  "yes_no_mass": [dw["yes_no_mass"], dl["yes_no_mass"]]}
        if "p_yes_sampled" in dw:
            detail.update(sampled_chosen=dw["p_yes_sampled"], sampled_rejected=dl["p_yes_sampled"])
        return pointwise_result(rec_id, dw["p_yes"], dl["p_yes"], **detail)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self.model = None


def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any, progress: Any = None,
             artifacts: Path | None = None) -> list[PairResult]:
    """:class:`BTPOJudge` on both responses of every pair: greedy thought, then p(Yes) (METHOD.md §7);
    optionally the mean over sampled thoughts.

    Each result's detail carries the thought lengths, whether they were cut at the budget and the
    Yes + No mass at the answer position; ``<artifacts>.thoughts.jsonl`` holds the thoughts."""
    judge = judge_for_eval(BTPOJudge, cfg, model_dir, device)

    def row(rec: PairRecord, judged: tuple[Score, Score]) -> dict[str, Any]:
        sw, sl = judged
        return {"id": rec.id, "thought_chosen": sw.thought, "p_yes_chosen": sw.detail["p_yes"],
                "tokens_chosen": sw.detail["thought_tokens"], "cut_chosen": sw.detail["thought_cut"],
                "thought_rejected": sl.thought, "p_yes_rejected": sl.detail["p_yes"],
                "tokens_rejected": sl.detail["thought_tokens"], "cut_rejected": sl.detail["thought_cut"]}

    try:
        with JsonlWriter(artifacts, ".thoughts.jsonl") as out:
            return judge.evaluate_pairs(records, progress, sink=lambda rec, judged, _: out.write(row(rec, judged)))
    finally:
        judge.close()


def templates(tok: Any, aspect: str) -> dict[str, Any]:
    """What ``btpo.json`` records of the GPM dialog: both instructions and the rendered dialog."""
    return {"strings": {"eval_instruction": EVAL_INSTRUCTION, "rating_question": RATING_QUESTION},
            "rendered": render(tok, gpm_messages(PLACEHOLDER_PROMPT, "{response}", aspect, "{thought}"),
                               add_generation_prompt=True)}


def _cut(sample: Any, budget: int) -> bool:
    """A thought that hit the token budget without ending its turn."""
    return not sample.finished and len(sample.token_ids) >= budget


def plan_geometry(inp: PlanInputs) -> Geometry:
    """K thoughts for each of the pair's two responses, each followed by the rating tail."""
    g = inp.gen_tokens + inp.tail_tokens
    return Geometry("causal", 2 * inp.n, inp.prompt_tokens + g, g + 1, True, 2)


def plan_inputs(cfg: Config) -> dict[str, Any]:
    return {"beta": cfg.btpo.beta, "gen_tokens": cfg.rollout.max_new_tokens}


def eval_settings(cfg: Config, meta: dict[str, Any] | None) -> dict[str, Any]:
    """Sampled-thought count and ``yes_no_normalize`` (not recorded by older evals)."""
    return {"samples": cfg.eval.samples,
            "yes_no_normalize": None if meta is None else bool(cfg.btpo.yes_no_normalize)}


def eval_summary(cfg: Config, results: list[PairResult]) -> dict[str, Any]:
    """``sampled``: the protocol's figures of the mean p(Yes) over ``eval.samples`` sampled thoughts."""
    sampled = [r for r in results if "sampled_chosen" in r.detail]
    if not sampled:
        return {}
    return {"sampled": {"samples": cfg.eval.samples, **summarize(
        [pointwise_result(r.id, r.detail["sampled_chosen"], r.detail["sampled_rejected"]) for r in sampled])}}


def card(meta: dict[str, Any]) -> Card:
    ids = meta.get("token_ids") or {}
    strings = (meta.get("template") or {}).get("strings") or {}
    aspect = meta.get("aspect", DEFAULT_ASPECT)
    budget = settings_budget(meta.get("settings") or {})
    ev = strings.get("eval_instruction", "").format(aspect=aspect)
    q = strings.get("rating_question", "").format(aspect=aspect)
    return Card(
        "a generative preference model trained with Bradley–Terry Policy Optimization: after the "
        "response it is asked to evaluate it, thinks, and is then asked whether the response is "
        "{aspect}; its score is p(Yes) after the thought.",
        rows=[("judging thought budget", budget)],
        usage=["model = AutoModelForCausalLM.from_pretrained(\".\").eval()",
               f"msgs = prompt + [{{\"role\": \"assistant\", \"content\": \"5\"}}, {{\"role\": \"user\", \"content\": {ev!r}}}]",
               "enc = chat(msgs, gen=True)",
               f"out = model.generate(**enc, max_new_tokens={1000 if budget is None else budget}, do_sample=False, "
               f"eos_token_id={ids.get('end_of_turn')})",
               "thought = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)",
               f"msgs += [{{\"role\": \"assistant\", \"content\": thought}}, {{\"role\": \"user\", \"content\": {q!r}}}]",
               f"p_yes = model(**chat(msgs, gen=True)).logits[0, -1].softmax(-1)[{ids.get('yes')}].item()",
               "# (btpo keeps the generated thought's token ids instead of re-tokenizing its text)"])


METHOD = register_method(MethodSpec(
    name="btpo", help="BTPO (this paper): a thinking judge, latent-thought Bradley-Terry, the consistent estimator.",
    train=train, evaluate=evaluate, protocol="pointwise", model_class="AutoModelForCausalLM",
    config_section="btpo", generative=True, order=50, judge=BTPOJudge,
    rollouts=True, plan_geometry=plan_geometry, plan_inputs=plan_inputs,
    eval_settings=eval_settings, eval_summary=eval_summary, card=card,
    curves=(("btpo/omega_mean", "BTPO misalignment weight ω̂ (mean)"),)))
