"""GRAM — the pairwise generative judge without a thought (METHOD.md §6).

Objective. A causal LM reads a judge prompt holding the conversation ``x`` and both responses as
"A" and "B" (``templates.GRAM_PROMPT``, rendered with the model's chat template and its generation
head) and answers with one label token. Every training pair is shown in BOTH orders: chosen as A
(target "A") and chosen as B (target "B"). With ``p`` the full-vocabulary softmax at the generation
head, ``c`` the correct label and ``o`` the other one, each judgement's loss is

    ℓ = −(1 − ε) · log p(c) − ε · log p(o)          (ε = ``gram.label_smoothing``, default 0)

i.e. the ordinary next-token cross-entropy of a one-token answer when ε = 0, and with ε > 0 the
smoothing mass goes to the *other label* (not spread over the vocabulary): the target is the
two-point distribution (1 − ε, ε) on {c, o}, scored against the full-vocabulary distribution. The
loss is averaged over the 2·B judgements of a global batch of B pairs (``train.batch_size`` counts
pairs; both orders of a pair always sit in the same micro-batch).

Evaluation: both orders of every test pair, greedy in the only sense that matters for a one-token
answer — the verdict is "A" if ``p(A) > p(B)`` at the generation head, "B" if less, "tie" if
equal — then ``pairwise_result`` averages the two orders (METHOD.md §7).

Truncation. ``data.max_length`` bounds the whole judge prompt. When it is too long, tokens are
cut from the left of the *quoted conversation* only (the instruction header, both responses and
the question are kept); when even an empty conversation would not fit, the pair is dropped as
too long (training) or counted as a format failure in both orders (evaluation).

Differences from the paper (GRAM, Wang et al. 2025, as summarized in METHOD.md §6): the exact
judge prompt is ours (``GRAM_PROMPT``); label smoothing as above; no pre-training stage on
unlabeled data — only the labelled fine-tuning stage on the same pairs as the other methods.

Run it::

    btpo train --method gram --model tiny-qwen2 --data data/synthetic --out runs/gram --max-steps 20
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from btpo_cli.config import Config, check_fraction, register_section
from btpo_cli.data.pairs import PairRecord
from btpo_cli.judging.judge import TOO_LONG, Comparison, Item, Judge, judge_for_eval, pairwise_comparison
from btpo_cli.judging.protocol import PairResult, pairwise_result
from btpo_cli.judging.templates import (
    GRAM_PROMPT,
    PLACEHOLDER_PROMPT,
    TooLong,
    answer_token_id,
    encode_judge,
    encode_judge_prompts,
    pairwise_messages,
    render,
)
from btpo_cli.methods import Card, MethodSpec, no_grad, register_method
from btpo_cli.plan.estimate import Geometry, PlanInputs
from btpo_cli.runs.final import describe
from btpo_cli.runs.folder import Run

if TYPE_CHECKING:
    import torch


@dataclass
class GRAMConfig:
    """GRAM: pairwise A/B label token trained by cross-entropy on both orders."""

    label_smoothing: float = 0.0
    """0.1 is the optional smoothing of METHOD.md §6."""


register_section("gram", GRAMConfig, validate=lambda cfg: check_fraction(cfg, "gram.label_smoothing"))

# ----------------------------------------------------------------------------- encoding

@dataclass
class JudgePair:
    index: int
    """Position of the pair in the record list it came from."""
    ab: list[int]
    """Judge prompt with the chosen response as A (correct label "A")."""
    ba: list[int]
    """Judge prompt with the chosen response as B (correct label "B")."""


def encode_pairs(tokenizer: Any, records: list[PairRecord], max_length: int) -> tuple[list[JudgePair], dict[str, int]]:
    """Both orders of every pair; count truncated judge prompts and pairs too long to keep."""
    enc, stats = encode_judge_prompts(tokenizer, records, (
        lambda r, p: pairwise_messages(GRAM_PROMPT, p, r.chosen_text, r.rejected_text, r.aspect),
        lambda r, p: pairwise_messages(GRAM_PROMPT, p, r.rejected_text, r.chosen_text, r.aspect)), max_length)
    return [JudgePair(k, ab, ba) for k, (ab, ba) in enc], stats


@dataclass
class Labels:
    a_id: int
    b_id: int

    @classmethod
    def from_tokenizer(cls, tok: Any) -> Labels:
        a, b = answer_token_id(tok, "A"), answer_token_id(tok, "B")
        if a == b:
            raise ValueError("the tokenizer maps the labels A and B to the same token")
        return cls(a, b)


# ----------------------------------------------------------------------------- the judgement and the loss

def label_logprobs(model: Any, seqs: list[list[int]], labels: Labels, pad_id: int,
                   device: Any, packed: bool = False, budget: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary log p(A), log p(B) at the generation head of N judge prompts: (N,), (N,).

    Left-padded with position ids that skip the padding; only the last position reaches the LM head.
    ``packed``: padding-free rows of ≤ ``budget`` tokens instead (``train.packing``), the LM head on
    each prompt's last position.
    """
    import torch  # heavy: imported on use

    from btpo_cli.models.inputs import left_pad, positions  # heavy: imported on use
    from btpo_cli.models.packing import last_logits  # heavy: imported on use

    if packed:
        logits = last_logits(model, seqs, device, budget)                        # (N, V)
    else:
        ids, mask = left_pad(seqs, pad_id, device)                               # (N, T)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                       logits_to_keep=1).logits[:, -1, :]                        # (N, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp[:, labels.a_id], logp[:, labels.b_id]


def verdict(logp_a: float, logp_b: float) -> str:
    """'A' if p(A) > p(B), 'B' if p(B) > p(A), 'tie' if equal."""
    if logp_a > logp_b:
        return "A"
    if logp_b > logp_a:
        return "B"
    return "tie"


# ----------------------------------------------------------------------------- training

def train(cfg: Config, run: Run, resume: bool) -> None:
    import torch  # heavy: imported on use

    from btpo_cli.losses import gram_loss  # heavy: imported on use
    from btpo_cli.models.packing import resolve  # heavy: imported on use
    from btpo_cli.training.session import TrainSession  # heavy: imported on use
    from btpo_cli.training.steps import BatchPlan  # heavy: imported on use
    from btpo_cli.training.supervised import run_supervised  # heavy: imported on use

    sess = TrainSession.begin(cfg, run, resume, padding_side="left")
    tok = sess.tok
    labels = Labels.from_tokenizer(tok)
    records = sess.load_split()
    pairs, enc_stats = encode_pairs(tok, records, cfg.data.max_length)
    plan = BatchPlan.from_config(len(pairs), cfg, sess.world)
    sess.build("causal", plan.total_steps)
    sess.log_data(len(pairs), enc_stats)
    model, device, eps = sess.model, sess.device, cfg.gram.label_smoothing
    packed = resolve(cfg.train.packing, model)
    aspect = Counter(r.aspect for r in records).most_common(1)[0][0]
    sess.meta = describe(cfg, records, templates=templates(tok, aspect),
                         token_ids={"A": labels.a_id, "B": labels.b_id, "pad": tok.pad_token_id},
                         label_token_ids={"A": labels.a_id, "B": labels.b_id})

    def loss(ids: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Mean over the micro-batch's 2m judgements (both orders of each pair)."""
        batch = [pairs[i] for i in ids]
        m = len(batch)
        seqs = [p.ab for p in batch] + [p.ba for p in batch]                  # (2m,) chosen as A, then as B
        target_is_a = torch.arange(2 * m, device=device) < m                    # (2m,)
        la, lb = label_logprobs(model, seqs, labels, tok.pad_token_id, device, packed,
                                cfg.train.micro_batch_tokens)                  # (2m,)
        per = gram_loss(la, lb, target_is_a, eps)                               # (2m,)
        with torch.no_grad():
            margin = torch.where(target_is_a, la - lb, lb - la)                  # (2m,)
            stats = {"loss": per.mean(), "correct": (margin > 0).float().mean(), "margin": margin.mean(),
                     "label_mass": (la.exp() + lb.exp()).mean(), "tokens": sum(len(s) for s in seqs) / m}
        return per.mean(), stats

    run_supervised(
        sess, plan, loss=loss,
        metrics=lambda t, n: {"train/accuracy": t["correct"] / n, "gram/label_margin": t["margin"] / n,
                              "gram/label_mass": t["label_mass"] / n},
        bar_info=lambda m: f"loss {m['train/loss']:.4f} acc {m['train/accuracy']:.2f}",
        sizes=lambda i: [len(pairs[i].ab), len(pairs[i].ba)])
    sess.finish(sess.meta)


# ----------------------------------------------------------------------------- evaluation

class GramJudge(Judge):
    """GRAM's judge (pairwise): both orders of (a, b) in one batch; in each order the verdict is the
    likelier label at the generation head, and P(a) is p(a's label) / (p(A) + p(B)); ``prob_a`` is the
    mean over the two orders."""

    protocol = "pairwise"
    packs = True
    """Its batches follow ``train.packing`` (recorded in the eval settings when not off)."""

    def __init__(self, model_dir: str, cfg: Config, device: Any, meta: dict[str, Any], module: Any = None):
        from btpo_cli.models.loading import load_tokenizer  # heavy: imported on use
        from btpo_cli.models.packing import resolve  # heavy: imported on use

        super().__init__(model_dir, cfg, device, meta)
        self.tok = load_tokenizer(model_dir, padding_side="left")
        self.labels = Labels.from_tokenizer(self.tok)
        self.model = self.causal_lm(module)
        self.packed = resolve(cfg.train.packing, self.model)

    def encode(self, a: Item, b: Item) -> tuple[list[int], list[int]] | None:
        """Judge prompts with a shown as A, then as B; None when too long."""
        try:
            return tuple(encode_judge(self.tok, lambda p, x=x, y=y: pairwise_messages(GRAM_PROMPT, p, x, y, a.aspect),
                                      a.prompt, self.cfg.data.max_length)[0]
                         for x, y in ((a.response, b.response), (b.response, a.response)))  # type: ignore[return-value]
        except TooLong:
            return None

    @no_grad
    def _compare_chunk(self, pairs: list[tuple[Item, Item]]) -> list[Comparison]:
        enc = [self.encode(a, b) for a, b in pairs]
        idx = [i for i, e in enumerate(enc) if e is not None]
        out = [Comparison(None, None, TOO_LONG) for _ in pairs]
        if not idx:
            return out
        m = len(idx)
        la, lb = label_logprobs(self.model, [enc[i][0] for i in idx] + [enc[i][1] for i in idx], self.labels,
                                self.tok.pad_token_id, self.device, self.packed)        # (2m,) a as A, then a as B
        pa, pb = la.exp().tolist(), lb.exp().tolist()
        la_l, lb_l = la.tolist(), lb.tolist()
        for j, i in enumerate(idx):
            v1, v2 = verdict(la_l[j], lb_l[j]), verdict(la_l[m + j], lb_l[m + j])
            p1 = pa[j] / (pa[j] + pb[j]) if pa[j] + pb[j] > 0 else 0.5
            p2 = pb[m + j] / (pa[m + j] + pb[m + j]) if pa[m + j] + pb[m + j] > 0 else 0.5
            out[i] = pairwise_comparison(v1, v2, p1, p2, p_ab=[pa[j], pb[j]], p_ba=[pa[m + j], pb[m + j]])
        return out

    def pair_result(self, rec_id: str, judged: Any) -> PairResult:
        return pairwise_result(rec_id, judged.orders[0], judged.orders[1], p_ab=judged.detail["p_ab"],
                               p_ba=judged.detail["p_ba"])

    def close(self) -> None:
        self.model = None


def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any,
             progress: Any = None, artifacts: Path | None = None) -> list[PairResult]:
    """:class:`GramJudge` on both orders of every pair, batched; verdict from p(A) vs p(B)."""
    with judge_for_eval(GramJudge, cfg, model_dir, device) as judge:
        return judge.evaluate_pairs(records, progress)


def templates(tok: Any, aspect: str) -> dict[str, Any]:
    """What ``btpo.json`` records of the judge prompt: the string and its chat rendering."""
    return {"strings": {"judge_prompt": GRAM_PROMPT},
            "rendered": render(tok, pairwise_messages(GRAM_PROMPT, PLACEHOLDER_PROMPT, "{response_a}", "{response_b}",
                                                      aspect), add_generation_prompt=True)}


def plan_geometry(inp: PlanInputs) -> Geometry:
    """Both orders of a pair; one LM-head position (the label token)."""
    return Geometry("causal", 2, inp.prompt_tokens, 1, False, 0)


def card(meta: dict[str, Any]) -> Card:
    ids = meta.get("token_ids") or {}
    return Card("a pairwise generative judge without a thought: shown both responses as A and B, it answers "
                "with one label token; btpo asks both orders.", usage=[
                    "model = AutoModelForCausalLM.from_pretrained(\".\").eval()",
                    "# judge prompt: template.strings.judge_prompt in btpo.json, formatted with the conversation "
                    "as 'User: ...', response_a, response_b and the aspect",
                    "logits = model(**chat([{\"role\": \"user\", \"content\": judge_prompt}], gen=True)).logits[0, -1]",
                    f"a_wins = logits[{ids.get('A')}] > logits[{ids.get('B')}]   # ask again with A and B swapped"])


METHOD = register_method(MethodSpec(
    name="gram", help="GRAM: pairwise A/B label token trained by cross-entropy on both orders (no thought).",
    train=train, evaluate=evaluate, protocol="pairwise", model_class="AutoModelForCausalLM",
    config_section="gram", order=20, judge=GramJudge,
    plan_geometry=plan_geometry, card=card))
