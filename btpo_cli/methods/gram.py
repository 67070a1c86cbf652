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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from btpo_cli.config import Config
from btpo_cli.data import PairRecord
from btpo_cli.engines.hf import left_pad, positions
from btpo_cli.evaluation import PairResult, pairwise_result, with_unjudged
from btpo_cli.losses import gram_loss
from btpo_cli.methods import MethodSpec, register_method
from btpo_cli.models import load_causal_lm, load_tokenizer
from btpo_cli.runs import Run
from btpo_cli.session import TrainSession
from btpo_cli.sl_loop import run_supervised
from btpo_cli.templates import GRAM_PROMPT, answer_token_id, encode_judge_prompts, pairwise_messages
from btpo_cli.trainer import BatchPlan, chunks

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
                   device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary log p(A), log p(B) at the generation head of N judge prompts: (N,), (N,).

    Left-padded with position ids that skip the padding; only the last position reaches the LM head.
    """
    ids, mask = left_pad(seqs, pad_id, device)                                   # (N, T)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                   logits_to_keep=1).logits[:, -1, :]                            # (N, V)
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
    sess = TrainSession.begin(cfg, run, resume, padding_side="left")
    tok = sess.tok
    labels = Labels.from_tokenizer(tok)
    records = sess.load_split()
    pairs, enc_stats = encode_pairs(tok, records, cfg.data.max_length)
    plan = BatchPlan.from_config(len(pairs), cfg, sess.world)
    sess.build("causal", plan.total_steps)
    sess.log_data(len(pairs), enc_stats)
    model, device, eps = sess.model, sess.device, cfg.gram.label_smoothing

    def loss(ids: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Mean over the micro-batch's 2m judgements (both orders of each pair)."""
        batch = [pairs[i] for i in ids]
        m = len(batch)
        seqs = [p.ab for p in batch] + [p.ba for p in batch]                  # (2m,) chosen as A, then as B
        target_is_a = torch.arange(2 * m, device=device) < m                    # (2m,)
        la, lb = label_logprobs(model, seqs, labels, tok.pad_token_id, device)  # (2m,)
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
    sess.finish({"method": "gram", "base_model": cfg.model.name, "model_class": "AutoModelForCausalLM",
                 "label_token_ids": {"A": labels.a_id, "B": labels.b_id}})


# ----------------------------------------------------------------------------- evaluation

def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any,
             progress: Any = None, artifacts: Path | None = None) -> list[PairResult]:
    """Both orders of every pair, batched; verdict from p(A) vs p(B) at the generation head."""
    tok = load_tokenizer(model_dir, padding_side="left")
    labels = Labels.from_tokenizer(tok)
    model = load_causal_lm(cfg.model, device.type, inference=True, path=model_dir).to(device).eval()
    pairs, _ = encode_pairs(tok, records, cfg.data.max_length)
    results: list[PairResult] = []
    with torch.no_grad():
        for part in chunks(pairs, cfg.eval.batch_size):
            m = len(part)
            la, lb = label_logprobs(model, [p.ab for p in part] + [p.ba for p in part], labels,
                                    tok.pad_token_id, device)                                   # (2m,)
            pa, pb = la.exp().tolist(), lb.exp().tolist()
            la_l, lb_l = la.tolist(), lb.tolist()
            for j, p in enumerate(part):
                v1 = verdict(la_l[j], lb_l[j])               # chosen shown as A
                v2 = verdict(la_l[m + j], lb_l[m + j])       # chosen shown as B
                results.append(pairwise_result(records[p.index].id, v1, v2,
                                               p_ab=[pa[j], pb[j]], p_ba=[pa[m + j], pb[m + j]]))
            if progress:
                progress(m)
    return with_unjudged(results, records, {p.index for p in pairs}, "pairwise")


METHOD = register_method(MethodSpec(
    name="gram", help="GRAM: pairwise A/B label token trained by cross-entropy on both orders (no thought).",
    train=train, evaluate=evaluate, protocol="pairwise", model_class="AutoModelForCausalLM",
    config_section="gram", order=20))
