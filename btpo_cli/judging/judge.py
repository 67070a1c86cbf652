"""A trained judge in use: load a ``final/`` folder, then score, compare, rank (the Python API).

::

    from btpo_cli import load_judge

    judge = load_judge("runs/btpo")                        # a run folder or its final/ (CPU or GPU)
    judge.score(["What is 2 + 3?"], ["5"])                 # [Score(score=0.93, thought="2 + 3 = 5 …")]
    judge.compare("What is 2 + 3?", "5", "6")              # Comparison(prob_a=0.81, verdict="a", …)
    judge.best_of_n("What is 2 + 3?", ["6", "5", "4"])     # BestOfN(best=1, scores=[…])
    reward = judge.reward_function()                       # trl.GRPOTrainer(reward_funcs=[reward])

Each method registers its judge class (``MethodSpec.judge``) at the end of its module; the
method's ``evaluate`` is :meth:`Judge.evaluate_pairs` (the METHOD §7 protocol) over the same
judge, so ``btpo eval`` and ``btpo score`` on the same pairs take the same decisions.

- **Pointwise** judges (bt, bt-prefilled, grpo-point, btpo) score each response on its own;
  ``compare`` scores both and turns the two scores into ``P(a ≻ b)``: σ(r_a − r_b) for the reward
  models, ``s_a / (s_a + s_b)`` for BTPO (Bradley–Terry on p(Yes)), 1 / ½ / 0 for GRPO-point's
  integer scores.
- **Pairwise** judges (gram, grpo-pair) only compare: ``compare`` asks both orders (a as A, then
  a as B) and averages; ``score`` raises; ``best_of_n`` plays every pair of candidates (both
  orders each) and ranks by mean win probability.

Every call is batched (``batch_size`` pairs, i.e. ``2·batch_size`` responses, per forward) and
runs on the judge's rollout engine (``engine=``: ``hf`` or ``vllm``). A response that does not fit
in ``max_length`` tokens gets ``Score(None, error="too_long")``; a generative judge's unparsable
answer gets the parser's error kind (``no_tag``, ``truncated``, …) and no score.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from btpo_cli.config import Config
from btpo_cli.data.pairs import DEFAULT_ASPECT, RecordSkip, to_messages
from btpo_cli.engines import check_engine_choice, engine_class, resolve_engine_name
from btpo_cli.errors import BtpoError, ConfigError
from btpo_cli.judging.protocol import PairResult, pairwise_result, pointwise_result, with_unjudged
from btpo_cli.methods.spec import get_method
from btpo_cli.runs.final import check_templates, read_checkpoint, read_meta

Messages = list[dict[str, str]]
Prompt = str | Messages
TOO_LONG = "too_long"

__all__ = ["BestOfN", "Comparison", "Item", "Judge", "RewardFunction", "Score", "load_judge", "to_prompt"]


@dataclass
class Item:
    """One response to judge: the conversation, the response text, the aspect asked about."""

    prompt: Messages
    response: str
    aspect: str
    key: tuple[Any, ...] = ()
    """Names the item's sampling seeds (``request_seed(*key)``): the pair id in evaluation, a digest of
    the text otherwise, so a response gets the same sampled thoughts whatever batch it is in."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Method inputs given instead of computed (bt-prefilled: a cached ``thought``)."""


@dataclass
class Score:
    """A pointwise judgement of one response."""

    score: float | None
    """BT / bt-prefilled: the reward; BTPO: p(Yes) after the greedy thought (the mean over sampled
    thoughts when ``samples > 0``); GRPO-point: the parsed score. None: not judged (see ``error``)."""
    error: str | None = None
    """``too_long`` (did not fit), or the parser's failure kind (GRPO-point)."""
    thought: str | None = None
    """The text the judge read or wrote: BTPO's greedy thought, GRPO-point's rationale, the base
    model's thought for bt-prefilled."""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self, thoughts: bool = False, detail: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"score": self.score}
        if self.error:
            out["error"] = self.error
        if thoughts and self.thought is not None:
            out["thought"] = self.thought
            if "sampled_thoughts" in self.detail:
                out["sampled_thoughts"] = self.detail["sampled_thoughts"]
        if detail:
            out["detail"] = {k: v for k, v in self.detail.items() if k != "sampled_thoughts"}
        return out


@dataclass
class Comparison:
    """A judgement of ``a`` against ``b`` for one prompt."""

    prob_a: float | None
    """P(a ≻ b) (see the module docstring); None when no judgement was possible."""
    verdict: Literal["a", "b", "tie"] | None
    error: str | None = None
    orders: tuple[str | None, str | None] = (None, None)
    """Pairwise judges: the verdict letter ('A', 'B', 'tie' or None) with a shown as A, then as B."""
    scores: tuple[Score, Score] | None = None
    """Pointwise judges: the two scores behind the comparison."""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self, thoughts: bool = False, detail: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"prob_a": self.prob_a, "verdict": self.verdict}
        if self.error:
            out["error"] = self.error
        if self.scores:
            out["score_a"], out["score_b"] = self.scores[0].score, self.scores[1].score
            if thoughts:
                out["thought_a"], out["thought_b"] = self.scores[0].thought, self.scores[1].thought
        else:
            out["orders"] = list(self.orders)
            if thoughts and "rationales" in self.detail:
                out["rationales"] = self.detail["rationales"]
        if detail:
            out["detail"] = {k: v for k, v in self.detail.items() if k != "rationales"}
        return out


@dataclass
class BestOfN:
    """The ranking of N candidates for one prompt."""

    best: int | None
    """Index of the best candidate (the first of equals); None when none could be judged."""
    scores: list[float | None]
    """Pointwise: each candidate's score; pairwise: its mean win probability over the others."""
    errors: list[str | None]
    thoughts: list[str | None]


def to_prompt(value: Any, field_name: str = "prompt") -> Messages:
    """A plain string (one user turn) or a list of chat messages ending with a user turn; else ValueError."""
    try:
        msgs = to_messages(value, field_name, "user")
    except RecordSkip as e:
        raise ValueError(str(e)) from None
    if not msgs:
        raise ValueError(f"{field_name}: empty")
    if msgs[-1]["role"] != "user":
        raise ValueError(f"{field_name}: must end with a user turn")
    return msgs


def text_key(seed: int, prompt: Messages, response: str, aspect: str) -> tuple[Any, ...]:
    """The default sampling key of an item: the judge's seed and a digest of what is judged."""
    digest = hashlib.sha1(json.dumps([prompt, response, aspect], ensure_ascii=False).encode()).hexdigest()[:16]
    return ("judge", seed, digest)


class Judge:
    """Base class of every method's judge; subclasses implement ``_score_chunk`` and/or ``_compare_chunk``.

    Built by the method's ``MethodSpec.judge(model_dir, cfg, device, meta)``; use :func:`load_judge`.
    A built-in judge also takes ``module=``: a model already in memory (the trainer's policy, for
    evaluation during training: :mod:`btpo_cli.training.periodic_eval`) used instead of loading ``model_dir``'s
    weights; ``model_dir`` then only names the tokenizer.
    """

    method: str = "?"
    protocol: Literal["pointwise", "pairwise"] = "pointwise"

    def __init__(self, model_dir: str, cfg: Config, device: Any, meta: dict[str, Any]):
        self.model_dir = str(model_dir)
        self.cfg = cfg
        self.device = device
        self.meta = meta
        self.method = cfg.method
        self.aspect: str = meta.get("aspect") or DEFAULT_ASPECT
        self.batch_size: int = cfg.eval.batch_size
        """Pairs per forward (``2·batch_size`` responses)."""
        self.seed: int = cfg.train.seed
        self.forward_calls = 0
        """Batched chunks run through the model so far (one padded forward, or one generate + one pass)."""

    # ------------------------------------------------------------------ what a method implements

    def _score_chunk(self, items: list[Item]) -> list[Score]:
        raise BtpoError(f"{self.method} is a pairwise judge: it compares responses (compare, best_of_n, "
                        "candidates), it does not score one alone")

    def _compare_chunk(self, pairs: list[tuple[Item, Item]]) -> list[Comparison]:
        """Pointwise default: score a and b (interleaved, one batch) and compare the scores."""
        scores = self._score_chunk([it for pair in pairs for it in pair])
        return [self.comparison(scores[2 * j], scores[2 * j + 1]) for j in range(len(pairs))]

    def preference(self, a: float, b: float) -> float:
        """Pointwise judges: P(a ≻ b) from two scores (Bradley–Terry on rewards by default)."""
        return 1.0 / (1.0 + math.exp(-(a - b))) if abs(a - b) < 700 else float(a > b)

    def pair_result(self, rec_id: str, judged: Any) -> PairResult:
        """METHOD §7 for one pair from its judgement: (chosen Score, rejected Score) or a Comparison."""
        if self.protocol == "pointwise":
            sw, sl = judged
            return pointwise_result(rec_id, sw.score, sl.score)
        return pairwise_result(rec_id, judged.orders[0], judged.orders[1])

    def close(self) -> None:
        """Free the model and the engine."""

    # ------------------------------------------------------------------ batching

    def score_items(self, items: list[Item]) -> list[Score]:
        """Score any number of items, ``2·batch_size`` per forward."""
        out: list[Score] = []
        for part in _chunks(items, 2 * self.batch_size):
            self.forward_calls += 1
            out.extend(self._score_chunk(part))
        return out

    def compare_items(self, pairs: list[tuple[Item, Item]]) -> list[Comparison]:
        """Compare any number of (a, b) pairs, ``batch_size`` pairs per forward."""
        out: list[Comparison] = []
        for part in _chunks(pairs, self.batch_size):
            self.forward_calls += 1
            out.extend(self._compare_chunk(part))
        return out

    def item(self, prompt: Prompt, response: str, aspect: str | None = None) -> Item:
        """Validate one (prompt, response) into an :class:`Item` (ValueError naming the field)."""
        msgs = to_prompt(prompt)
        if not isinstance(response, str):
            raise ValueError(f"response: expected a string, got {type(response).__name__}")
        a = aspect or self.aspect
        return Item(msgs, response, a, text_key(self.seed, msgs, response, a))

    # ------------------------------------------------------------------ the API

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], aspect: str | None = None) -> list[Score]:
        """One :class:`Score` per response (``prompts[i]`` is the conversation of ``responses[i]``)."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts for {len(responses)} responses")
        return self.score_items([self.item(p, r, aspect) for p, r in zip(prompts, responses, strict=True)])

    def compare(self, prompt: Prompt, a: str, b: str, aspect: str | None = None) -> Comparison:
        """Is ``a`` better than ``b``? (pairwise judges ask both orders)."""
        return self.compare_items([(self.item(prompt, a, aspect), self.item(prompt, b, aspect))])[0]

    def compare_many(self, triples: Sequence[tuple[Prompt, str, str]], aspect: str | None = None) -> list[Comparison]:
        """Batched :meth:`compare` over ``(prompt, a, b)`` triples."""
        return self.compare_items([(self.item(p, a, aspect), self.item(p, b, aspect)) for p, a, b in triples])

    def best_of_n(self, prompt: Prompt, candidates: Sequence[str], aspect: str | None = None) -> BestOfN:
        """Rank ``candidates``: pointwise by score; pairwise by mean win probability over all other
        candidates (every pair, both orders; a pair without a judgement gives ½ to each)."""
        items = [self.item(prompt, c, aspect) for c in candidates]
        return self.rank(items)

    def rank(self, items: list[Item]) -> BestOfN:
        """:meth:`best_of_n` on prepared items (all for the same prompt)."""
        if not items:
            return BestOfN(None, [], [], [])
        if self.protocol == "pointwise":
            return self.rank_scores(self.score_items(items))
        n = len(items)
        if n == 1:
            return BestOfN(0, [None], [None], [None])
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        comps = self.compare_items([(items[i], items[j]) for i, j in pairs])
        wins = [0.0] * n
        for (i, j), c in zip(pairs, comps, strict=True):
            p = 0.5 if c.prob_a is None else c.prob_a
            wins[i] += p
            wins[j] += 1 - p
        return _best([w / (n - 1) for w in wins], [None] * n, [None] * n)

    @staticmethod
    def rank_scores(scores: list[Score]) -> BestOfN:
        """Pointwise: the best of already scored candidates (the first of equal scores)."""
        return _best([s.score for s in scores], [s.error for s in scores], [s.thought for s in scores])

    def reward_function(self, on_error: float = 0.0, aspect: str | None = None) -> RewardFunction:
        """This judge as a TRL reward function (``GRPOTrainer(reward_funcs=[...])``)."""
        return RewardFunction(self, on_error=on_error, aspect=aspect)

    # ------------------------------------------------------------------ the evaluation protocol

    def pair_items(self, rec: Any) -> tuple[Item, Item]:
        """A test pair's two items, seeded by the pair id (as ``btpo eval`` always has)."""
        return (Item(rec.prompt, rec.chosen_text, rec.aspect, ("eval", self.seed, rec.id, 0)),
                Item(rec.prompt, rec.rejected_text, rec.aspect, ("eval", self.seed, rec.id, 1)))

    def judge_pairs(self, records: Sequence[Any], progress: Callable[[int], None] | None = None,
                    sink: Callable[[Any, Any, PairResult], None] | None = None) -> list[PairResult | None]:
        """METHOD §7 on canonical pairs, ``batch_size`` pairs per forward: one result per record, None
        for a pair that could not be judged (too long). ``sink(record, judgement, result)`` sees every
        judged pair (method artifacts: thoughts, rationales)."""
        out: list[PairResult | None] = []
        for part in _chunks(list(records), self.batch_size):
            pairs = [self.pair_items(r) for r in part]
            if self.protocol == "pointwise":
                flat = self.score_items([it for p in pairs for it in p])
                judged: list[Any] = [(flat[2 * j], flat[2 * j + 1]) for j in range(len(part))]
                unjudged = [TOO_LONG in (a.error, b.error) for a, b in judged]
            else:
                judged = self.compare_items(pairs)
                unjudged = [c.error == TOO_LONG for c in judged]
            for rec, jd, skip in zip(part, judged, unjudged, strict=True):
                if skip:
                    out.append(None)
                    continue
                res = self.pair_result(rec.id, jd)
                if sink:
                    sink(rec, jd, res)
                out.append(res)
            if progress:
                progress(len(part))
        return out

    def evaluate_pairs(self, records: Sequence[Any], progress: Callable[[int], None] | None = None,
                       sink: Callable[[Any, Any, PairResult], None] | None = None) -> list[PairResult]:
        """What a method's ``evaluate`` returns: judged pairs in order, then the unjudged ones."""
        got = self.judge_pairs(records, progress, sink)
        return with_unjudged([r for r in got if r is not None], records,
                             {k for k, r in enumerate(got) if r is not None}, self.protocol)

    def comparison(self, a: Score, b: Score) -> Comparison:
        """Pointwise: two scores → a :class:`Comparison` (same decision rule as ``pointwise_result``)."""
        if a.score is None or b.score is None:
            err = TOO_LONG if TOO_LONG in (a.error, b.error) else (a.error or b.error or "no_score")
            return Comparison(None, None, err, scores=(a, b))
        verdict = "a" if a.score > b.score else "b" if a.score < b.score else "tie"
        return Comparison(self.preference(a.score, b.score), verdict, scores=(a, b))  # type: ignore[arg-type]

    def causal_lm(self, module: Any = None) -> Any:
        """The causal LM the judge reads: ``module`` (the policy in memory, during training) or the
        checkpoint's weights loaded for inference on the judge's device."""
        if module is not None:
            return module
        from btpo_cli.models.loading import load_causal_lm  # heavy: imported on use

        return load_causal_lm(self.cfg.model, self.device.type, inference=True, path=self.model_dir).to(self.device).eval()

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pairwise_comparison(v1: str | None, v2: str | None, p1: float | None = None, p2: float | None = None,
                        **detail: Any) -> Comparison:
    """Both orders' verdict letters (a shown as A, then as B) → a :class:`Comparison`.

    ``p1`` / ``p2``: P(a) in each order when the judge has probabilities (GRAM's label softmax over
    {A, B}); otherwise each order counts 1 for a, 0 for b, ½ for a tie or no verdict. The verdict
    follows METHOD §7's credit: a wins when the mean order credit is above ½."""
    def credit(v: str | None, a_letter: str) -> float:
        return 0.5 if v in (None, "tie") else float(v == a_letter)

    c = (credit(v1, "A") + credit(v2, "B")) / 2
    prob = (p1 + p2) / 2 if p1 is not None and p2 is not None else c
    if v1 is None and v2 is None:
        return Comparison(None, None, "no_verdict", orders=(v1, v2), detail=detail)
    verdict = "a" if c > 0.5 else "b" if c < 0.5 else "tie"
    return Comparison(prob, verdict, None, orders=(v1, v2), detail=detail)  # type: ignore[arg-type]


def _best(scores: list[float | None], errors: list[str | None], thoughts: list[str | None]) -> BestOfN:
    valid = [(s, -i) for i, s in enumerate(scores) if s is not None]
    best = -max(valid)[1] if valid else None
    return BestOfN(best, scores, errors, thoughts)


def _chunks(xs: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(xs), max(1, n)):
        yield xs[i:i + n]


# ----------------------------------------------------------------------------- loading

def load_judge(path: str | Path, *, device: str | None = None, engine: str | None = None,
               batch_size: int | None = None, max_new_tokens: int | None = None, samples: int | None = None,
               seed: int | None = None, aspect: str | None = None, packing: str | None = None) -> Judge:
    """Load the judge in ``path`` (a run folder or its ``final/``) from its ``btpo.json``.

    ``device``: ``cpu``, ``cuda``, ``cuda:1`` (default: cuda when present). ``engine``: the rollout
    engine of generative judges (``auto``, ``hf``, ``vllm``). ``max_new_tokens``: the thought /
    rationale budget (default: the one ``btpo eval`` uses). ``samples`` (BTPO): score by the mean
    p(Yes) over that many sampled thoughts, seeded by ``seed`` and the text. ``aspect``: the default
    aspect (else the checkpoint's). ``packing``: ``train.packing`` for the judge's batches (default: the
    run's): BT, BT-prefilled, GRAM pack their sequences; BTPO with ``samples`` each prompt once with its
    sampled thoughts."""
    from btpo_cli.models.device import resolve_device  # heavy: imported on use (torch)

    dev = resolve_device(device)
    ck = read_checkpoint(path)
    cfg = ck.cfg
    override_eval(cfg, batch_size=batch_size, max_new_tokens=max_new_tokens, samples=samples, engine=engine,
                  packing=packing)
    if seed is not None:
        cfg.train.seed = seed
    spec = get_method(cfg.method)
    if spec.judge is None:
        raise BtpoError(f"method '{cfg.method}' registers no judge (MethodSpec.judge)")
    if spec.generative:
        engine_class(resolve_engine_name(cfg.rollout.engine))     # not installed: one line now
    check_templates(ck.meta, str(ck.model_dir))
    meta = dict(ck.meta)
    if aspect:
        meta["aspect"] = aspect
    return spec.judge(str(ck.model_dir), cfg, dev, meta)


PACKING_HELP = ("Padding-free batches off | on | auto: BT, BT-prefilled, GRAM pack their sequences, BTPO with "
                "--samples K each prompt once with its K thoughts (default: the run's train.packing).")
"""``--packing`` of ``btpo eval``, ``score`` and ``serve`` (:func:`override_eval` applies it)."""


def override_eval(cfg: Config, *, batch_size: int | None = None, max_new_tokens: int | None = None,
                  samples: int | None = None, engine: str | None = None, packing: str | None = None) -> None:
    """Apply the judging settings a caller overrides (``btpo eval``'s flags, :func:`load_judge`'s
    arguments) to the config the judge will run on; ``None`` keeps the config's. The engine name is
    checked here (``auto`` or a registered engine); ``packing`` is ``train.packing`` (off, on, auto)."""
    if batch_size is not None:
        cfg.eval.batch_size = batch_size
    if max_new_tokens is not None:
        cfg.eval.max_new_tokens = max_new_tokens
    if samples is not None:
        cfg.eval.samples = samples
    if engine:
        check_engine_choice(engine)
        cfg.rollout.engine = engine
    if packing is not None:
        if packing not in ("off", "on", "auto"):
            raise ConfigError(f"packing: {packing!r} is not one of off, on, auto")
        cfg.train.packing = packing


def judge_for_eval(factory: Callable[..., Judge], cfg: Config, model_dir: str, device: Any) -> Judge:
    """The judge a method's ``evaluate`` runs on: the run's config, the checkpoint's ``btpo.json``."""
    meta = read_meta(model_dir)
    if not meta.get("aspect"):
        meta["aspect"] = DEFAULT_ASPECT
    return factory(model_dir, cfg, device, meta)


# ----------------------------------------------------------------------------- TRL reward function

class RewardFunction:
    """A judge as a reward function for TRL's ``GRPOTrainer(reward_funcs=[...])``.

    Called as ``f(prompts=..., completions=..., **kwargs) -> list[float]``, one reward per
    completion, in both of TRL's formats: *conversational* (each prompt a list of messages, each
    completion ``[{"role": "assistant", "content": ...}]``) and *plain* (strings). A dataset column
    named ``aspect`` (in ``kwargs``) sets each sample's aspect.

    Pointwise judges: the reward is the score (BTPO p(Yes), a BT reward, a GRPO-point score);
    pairwise judges: completions of the same prompt (TRL's group of ``num_generations``) play each
    other and the reward is the mean win probability. A response that could not be judged gets
    ``on_error``.
    """

    def __init__(self, judge: Judge, on_error: float = 0.0, aspect: str | None = None):
        self.judge = judge
        self.on_error = on_error
        self.aspect = aspect
        self.__name__ = f"btpo_{judge.method.replace('-', '_')}"
        self.calls = 0

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        aspects = kwargs.get("aspect")
        items = []
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            a = aspects[i] if isinstance(aspects, (list, tuple)) and isinstance(aspects[i], str) else self.aspect
            items.append(self.judge.item(p, _completion_text(c), a))
        self.calls += 1
        if self.judge.protocol == "pointwise":
            return [self.on_error if s.score is None else float(s.score) for s in self.judge.score_items(items)]
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(json.dumps([it.prompt, it.aspect], ensure_ascii=False), []).append(i)
        rewards = [self.on_error] * len(items)
        for idx in groups.values():
            if len(idx) < 2:
                continue
            ranked = self.judge.rank([items[i] for i in idx])
            for i, s in zip(idx, ranked.scores, strict=True):
                rewards[i] = self.on_error if s is None else float(s)
        return rewards


def _completion_text(c: Any) -> str:
    """TRL completion → text: a string, or the content of the last message of a conversational one."""
    if isinstance(c, str):
        return c
    if isinstance(c, dict) and "content" in c:
        return str(c["content"])
    if isinstance(c, list) and c and isinstance(c[-1], dict) and "content" in c[-1]:
        return "".join(str(m.get("content", "")) for m in c if m.get("role", "assistant") == "assistant")
    raise ValueError(f"completion: expected a string or a list of messages, got {type(c).__name__}")
