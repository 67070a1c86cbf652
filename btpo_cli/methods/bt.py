"""BT — the Bradley–Terry reward model baseline (METHOD.md §6).

Objective. The backbone with a one-label scalar head (``AutoModelForSequenceClassification``)
reads the chat-rendered ``(x, y)`` and outputs ``r(x, y)``; the loss over a pair is

    L = −log σ(r(x, y_w) − r(x, y_l))

averaged over the global batch. The reward is read at the last non-pad token (transformers'
own rule, so ``final/`` scores identically when loaded with plain transformers).

Differences from the paper: none in the objective; the paper does not give BT's optimizer
settings, ours are in ``recipes/bt/``.

Run it::

    btpo train --method bt --model tiny-qwen2 --data data/synthetic --out runs/bt --max-steps 20
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from btpo_cli.config import Config
from btpo_cli.data.pairs import PairRecord
from btpo_cli.judging.judge import TOO_LONG, Item, Judge, Score, judge_for_eval
from btpo_cli.judging.protocol import PairResult
from btpo_cli.judging.templates import PLACEHOLDER_PROMPT, TooLong, encode_response, render
from btpo_cli.methods import Card, MethodSpec, no_grad, register_method
from btpo_cli.plan.estimate import Geometry, PlanInputs
from btpo_cli.runs.final import describe
from btpo_cli.runs.folder import Run

if TYPE_CHECKING:
    import torch


@dataclass
class EncodedPair:
    index: int
    """Position of the pair in the record list it came from."""
    chosen: list[int]
    rejected: list[int]


def encode_pairs(tokenizer: Any, records: list[PairRecord], max_length: int,
                 response_fn: Any = None) -> tuple[list[EncodedPair], dict[str, int]]:
    """Render and tokenize both sides of every pair; count truncations and pairs too long to keep.

    ``response_fn(record, side)`` may replace the response text (BT-prefilled appends a thought).
    """
    out, stats = [], {"truncated": 0, "too_long": 0}
    for k, r in enumerate(records):
        sides = []
        try:
            for side in ("chosen", "rejected"):
                text = response_fn(r, side) if response_fn else getattr(r, f"{side}_text")
                enc = encode_response(tokenizer, r.prompt, text, max_length)
                stats["truncated"] += int(enc.truncated)
                sides.append(enc.input_ids)
        except TooLong:
            stats["too_long"] += 1
            continue
        out.append(EncodedPair(k, *sides))
    return out, stats


Encoder = Callable[[Any, list[PairRecord]], tuple[list[EncodedPair], dict[str, int]]]
"""``(tokenizer, records) → (encoded pairs, counts)``: replaces :func:`encode_pairs` (BT-prefilled)."""


def rewards(model: Any, seqs: list[list[int]], pad_id: int, device: Any, packed: bool = False,
            budget: int | None = None) -> torch.Tensor:
    """Scalar rewards for N sequences: (N,). ``packed``: padding-free rows of ≤ ``budget`` tokens
    (``train.packing``, :mod:`btpo_cli.models.packing`) instead of one right-padded batch."""
    from btpo_cli.models.inputs import pad_batch  # heavy: imported on use

    if packed:
        from btpo_cli.models.packing import rewards as packed_rewards  # heavy: imported on use

        return packed_rewards(model, seqs, device, budget)
    ids, mask = pad_batch(seqs, pad_id, device)
    return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()


def train(cfg: Config, run: Run, resume: bool, encode: Encoder | None = None,
          meta: dict[str, Any] | None = None, templates_of: Callable[[Any], dict[str, Any]] | None = None) -> None:
    """The BT run. ``encode`` builds the sequences (default: :func:`encode_pairs`); ``meta`` joins
    btpo.json; ``templates_of(tokenizer)`` describes the input in it (default: :func:`templates`)."""
    import torch  # heavy: imported on use

    from btpo_cli.losses import bt_loss  # heavy: imported on use
    from btpo_cli.models.packing import resolve  # heavy: imported on use
    from btpo_cli.training.session import TrainSession  # heavy: imported on use
    from btpo_cli.training.steps import BatchPlan  # heavy: imported on use
    from btpo_cli.training.supervised import run_supervised  # heavy: imported on use

    sess = TrainSession.begin(cfg, run, resume)
    tok = sess.tok
    records = sess.load_split()
    pairs, enc_stats = encode(tok, records) if encode else encode_pairs(tok, records, cfg.data.max_length)
    plan = BatchPlan.from_config(len(pairs), cfg, sess.world)
    sess.build("reward", plan.total_steps)
    sess.log_data(len(pairs), enc_stats)
    model, device, pad = sess.model, sess.device, tok.pad_token_id
    packed = resolve(cfg.train.packing, model)
    info = describe(cfg, records, templates=(templates_of or templates)(tok), token_ids={"pad": tok.pad_token_id})
    sess.meta = {**info, **(meta or {})}

    def loss(ids: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = [pairs[i] for i in ids]
        seqs = [p.chosen for p in batch] + [p.rejected for p in batch]            # (2m,) chosen first
        r = rewards(model, seqs, pad, device, packed, cfg.train.micro_batch_tokens)  # (2m,)
        r_w, r_l = r[:len(ids)], r[len(ids):]
        mean = bt_loss(r_w, r_l)
        with torch.no_grad():
            stats = {"loss": mean.detach(), "correct": (r_w > r_l).float().mean(), "margin": (r_w - r_l).mean(),
                     "r_w": r_w.mean(), "r_l": r_l.mean(), "tokens": sum(len(s) for s in seqs) / len(ids)}
        return mean, stats

    run_supervised(
        sess, plan, loss=loss,
        metrics=lambda t, n: {"train/accuracy": t["correct"] / n, "train/reward_margin": t["margin"] / n,
                              "train/reward_chosen": t["r_w"] / n, "train/reward_rejected": t["r_l"] / n},
        bar_info=lambda m: f"loss {m['train/loss']:.4f} acc {m['train/accuracy']:.2f}",
        sizes=lambda i: [len(pairs[i].chosen), len(pairs[i].rejected)])
    sess.finish(sess.meta)


# ----------------------------------------------------------------------------- the judge and evaluation

class RewardJudge(Judge):
    """BT's judge: ``score`` is the scalar head's reward r(x, y) on the chat-rendered (prompt, response);
    ``compare`` is σ(r_a − r_b). One right-padded forward per ``2·batch_size`` responses."""

    protocol = "pointwise"
    packs = True
    """Its batches follow ``train.packing`` (recorded in the eval settings when not off)."""

    def __init__(self, model_dir: str, cfg: Config, device: Any, meta: dict[str, Any], module: Any = None):
        from btpo_cli.models.loading import load_reward_model, load_tokenizer  # heavy: imported on use
        from btpo_cli.models.packing import resolve  # heavy: imported on use

        super().__init__(model_dir, cfg, device, meta)
        self.tok = load_tokenizer(model_dir)
        self.model = module if module is not None else load_reward_model(
            cfg.model, self.tok.pad_token_id, device.type, inference=True, path=model_dir).to(device).eval()
        self.packed = resolve(cfg.train.packing, self.model)

    def encode(self, items: list[Item]) -> list[tuple[list[int] | None, str | None]]:
        """(token ids or None when too long, the thought read) per item."""
        out: list[tuple[list[int] | None, str | None]] = []
        for it in items:
            try:
                out.append((encode_response(self.tok, it.prompt, it.response, self.cfg.data.max_length).input_ids, None))
            except TooLong:
                out.append((None, None))
        return out

    @no_grad
    def _score_chunk(self, items: list[Item]) -> list[Score]:
        enc = self.encode(items)
        idx = [i for i, (ids, _) in enumerate(enc) if ids is not None]
        r = rewards(self.model, [enc[i][0] for i in idx], self.tok.pad_token_id, self.device,
                    self.packed).tolist() if idx else []
        out = [Score(None, TOO_LONG, thought=t) for _, t in enc]
        for i, v in zip(idx, r, strict=True):
            out[i] = Score(v, thought=enc[i][1])
        return out

    def close(self) -> None:
        self.model = None


def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any,
             progress: Any = None, artifacts: Any = None) -> list[PairResult]:
    """Score chosen and rejected of every pair with the trained reward model (pointwise protocol)."""
    with judge_for_eval(RewardJudge, cfg, model_dir, device) as judge:
        return judge.evaluate_pairs(records, progress)


def templates(tok: Any) -> dict[str, Any]:
    """What ``btpo.json`` records of BT's input: the chat of the prompt and the response."""
    return {"strings": {}, "rendered": render(tok, PLACEHOLDER_PROMPT + [{"role": "assistant", "content": "{response}"}])}


def plan_geometry(inp: PlanInputs) -> Geometry:
    """Two sequences per pair through the scalar head (the last token only)."""
    return Geometry("reward", 2, inp.prompt_tokens, 0, False, 0)


def card(meta: dict[str, Any]) -> Card:
    return Card("a Bradley–Terry reward model: the backbone with a one-label scalar head reads the chat-rendered "
                "(prompt, response) and outputs a reward r(x, y); higher is better.", usage=reward_usage(meta))


def reward_usage(meta: dict[str, Any], thought: list[str] | None = None) -> list[str]:
    """Plain-transformers lines for a scalar-head reward model (``thought``: lines that append one)."""
    return ["model = AutoModelForSequenceClassification.from_pretrained(\".\").eval()",
            "msgs = prompt + [{\"role\": \"assistant\", \"content\": \"5\"}]", *(thought or []),
            "reward = model(**chat(msgs)).logits[0, 0].item()      # higher is better"]


METHOD = register_method(MethodSpec(
    name="bt", help="Bradley-Terry reward model: scalar head on (x, y), loss -log sigmoid(r_w - r_l).",
    train=train, evaluate=evaluate, protocol="pointwise", model_class="AutoModelForSequenceClassification",
    order=0, judge=RewardJudge, compare_baseline=True,
    plan_geometry=plan_geometry, card=card))
