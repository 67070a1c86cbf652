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

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from btpo_cli.config import Config
from btpo_cli.data import PairRecord
from btpo_cli.evaluation import PairResult, pairwise_result
from btpo_cli.models import load_causal_lm, load_tokenizer
from btpo_cli.rollout import left_pad, positions
from btpo_cli.runs import Run, maybe_fault
from btpo_cli.templates import (
    GRAM_PROMPT,
    Messages,
    TooLong,
    answer_token_id,
    conversation_text,
    encode_text,
    pairwise_messages,
    render,
)
from btpo_cli.tracking import init_tracking
from btpo_cli.trainer import (
    BatchPlan,
    StepTimer,
    TrainProgress,
    chunks,
    load_split,
    log_metrics,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    reduce_stats,
    resume_step,
    save_final,
)

PROTOCOL = "pairwise"


# ----------------------------------------------------------------------------- encoding

def encode_judge(tokenizer: Any, prompt: Messages, response_a: str, response_b: str, aspect: str,
                 max_length: int) -> tuple[list[int], bool]:
    """The judge prompt (chat-rendered, ending at the generation head) → (token ids, truncated).

    Over ``max_length``: only the quoted conversation loses tokens, from the left (its last turns
    are kept). Raises :class:`TooLong` when the rest alone does not fit.
    """
    text = render(tokenizer, pairwise_messages(GRAM_PROMPT, prompt, response_a, response_b, aspect),
                  add_generation_prompt=True)
    ids = encode_text(tokenizer, text)
    if len(ids) <= max_length:
        return ids, False
    conv = conversation_text(prompt)
    anchor = "[Conversation]\n"
    at = text.find(anchor + conv)
    if at < 0:                       # a template that rewrote the content: keep the tail
        return ids[len(ids) - max_length:], True
    start = at + len(anchor)
    head = encode_text(tokenizer, text[:start])
    tail = encode_text(tokenizer, text[start + len(conv):])
    budget = max_length - len(head) - len(tail)
    if budget < 1:
        raise TooLong(f"judge prompt without the conversation is {len(head) + len(tail)} tokens, "
                      f"more than max_length={max_length}")
    conv_ids = encode_text(tokenizer, conv)
    return head + conv_ids[len(conv_ids) - budget:] + tail, True


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
    out, stats = [], {"truncated": 0, "too_long": 0}
    for k, r in enumerate(records):
        try:
            ab, t1 = encode_judge(tokenizer, r.prompt, r.chosen_text, r.rejected_text, r.aspect, max_length)
            ba, t2 = encode_judge(tokenizer, r.prompt, r.rejected_text, r.chosen_text, r.aspect, max_length)
        except TooLong:
            stats["too_long"] += 1
            continue
        stats["truncated"] += int(t1) + int(t2)
        out.append(JudgePair(k, ab, ba))
    return out, stats


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


def gram_loss(logp_a: torch.Tensor, logp_b: torch.Tensor, target_is_a: torch.Tensor,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-judgement loss (N,): ``−(1−ε) log p(correct) − ε log p(other)``, p over the full vocabulary.

    ``logp_a``, ``logp_b``: (N,) label log-probs; ``target_is_a``: (N,) bool.
    """
    correct = torch.where(target_is_a, logp_a, logp_b)
    other = torch.where(target_is_a, logp_b, logp_a)
    return -(1.0 - label_smoothing) * correct - label_smoothing * other


def verdict(logp_a: float, logp_b: float) -> str:
    """'A' if p(A) > p(B), 'B' if p(B) > p(A), 'tie' if equal."""
    if logp_a > logp_b:
        return "A"
    if logp_b > logp_a:
        return "B"
    return "tie"


# ----------------------------------------------------------------------------- training

def train(cfg: Config, run: Run, resume: bool) -> None:
    acc = make_accelerator(cfg, run)
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model.name, padding_side="left")
    labels = Labels.from_tokenizer(tok)
    records = load_split(cfg, cfg.data.train_split, acc)
    pairs, enc_stats = encode_pairs(tok, records, cfg.data.max_length)
    model = load_causal_lm(cfg.model, acc.device.type)
    plan = BatchPlan.from_config(len(pairs), cfg, acc.num_processes)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, plan.total_steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    init_tracking(acc, cfg, run)

    start = resume_step(acc, run, resume)
    if start == 0:
        run.log({"step": 0, "data/train_pairs": len(pairs), "data/truncated": enc_stats["truncated"],
                 "data/too_long": enc_stats["too_long"]})
    eps = cfg.gram.label_smoothing
    per_proc = cfg.train.batch_size // acc.num_processes
    timer = StepTimer()
    bar = TrainProgress(plan.total_steps, start, f"gram {run.root.name}", acc.is_main_process)
    model.train()
    for step in range(start + 1, plan.total_steps + 1):
        t0 = time.perf_counter()
        local = plan.local_batch(step, acc.process_index, acc.num_processes)
        micro = list(chunks(local, cfg.train.micro_batch_size))
        sums = {"loss": 0.0, "correct": 0.0, "margin": 0.0, "label_mass": 0.0, "tokens": 0.0}
        with timer.phase("update"):
            for j, mb in enumerate(micro):
                batch = [pairs[i] for i in mb]
                m = len(batch)
                seqs = [p.ab for p in batch] + [p.ba for p in batch]      # (2m,) chosen as A, then as B
                target_is_a = torch.arange(2 * m, device=acc.device) < m  # (2m,)
                sync = j == len(micro) - 1
                with (nullcontext() if sync else acc.no_sync(model)), acc.autocast():
                    la, lb = label_logprobs(model, seqs, labels, tok.pad_token_id, acc.device)   # (2m,)
                    per = gram_loss(la, lb, target_is_a, eps)                                   # (2m,)
                    loss = per.sum() / (2 * per_proc)           # share of the per-process mean over judgements
                    acc.backward(loss)
                with torch.no_grad():
                    margin = torch.where(target_is_a, la - lb, lb - la)                          # (2m,)
                    sums["loss"] += per.sum().item()
                    sums["correct"] += (margin > 0).float().sum().item()
                    sums["margin"] += margin.sum().item()
                    sums["label_mass"] += (la.exp() + lb.exp()).sum().item()
                sums["tokens"] += sum(len(s) for s in seqs)
            grad_norm, lr = optimizer_step(acc, model, opt, sched, cfg.optim.max_grad_norm)
        tot = reduce_stats(acc, sums, acc.device)
        n = 2 * cfg.train.batch_size                                   # judgements per step
        dt = time.perf_counter() - t0
        metrics = {"step": step, "train/epoch": round(plan.epoch_of(step), 4), "train/loss": tot["loss"] / n,
                   "train/accuracy": tot["correct"] / n, "gram/label_margin": tot["margin"] / n,
                   "gram/label_mass": tot["label_mass"] / n,
                   "train/grad_norm": float(grad_norm), "train/lr": lr,
                   "perf/step_s": round(dt, 4), "perf/tokens_per_s": round(tot["tokens"] / dt, 1),
                   **timer.pop()}
        log_metrics(acc, run, cfg, metrics, step, plan.total_steps)
        bar.update(step, f"loss {metrics['train/loss']:.4f} acc {metrics['train/accuracy']:.2f}")
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == plan.total_steps:
            run.save_checkpoint(acc, step, {"step": step, "epoch": plan.epoch_of(step)},
                                cfg.train.keep_checkpoints)
        maybe_fault(step)
    bar.close()
    save_final(acc, model, tok, run, {"method": "gram", "base_model": cfg.model.name,
                                      "model_class": "AutoModelForCausalLM",
                                      "label_token_ids": {"A": labels.a_id, "B": labels.b_id}})
    acc.end_training()


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
    # Pairs too long to judge count as format failures in both orders, so n equals the test-set size.
    scored = {p.index for p in pairs}
    results.extend(pairwise_result(r.id, None, None, reason="too_long")
                   for k, r in enumerate(records) if k not in scored)
    return results
