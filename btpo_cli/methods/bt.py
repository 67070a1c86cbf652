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

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from btpo_cli.config import Config
from btpo_cli.data import PairRecord
from btpo_cli.evaluation import PairResult, pointwise_result
from btpo_cli.losses import bt_loss
from btpo_cli.models import load_reward_model, load_tokenizer
from btpo_cli.runs import Run, maybe_fault
from btpo_cli.templates import TooLong, encode_response
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


def pad_batch(seqs: list[list[int]], pad_id: int, device: Any, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) ragged lists → input_ids, attention_mask of shape (N, T_max)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, t - len(s):] = torch.tensor(s)
            mask[i, t - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def rewards(model: Any, seqs: list[list[int]], pad_id: int, device: Any) -> torch.Tensor:
    """Scalar rewards for N sequences: (N,)."""
    ids, mask = pad_batch(seqs, pad_id, device)
    return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()


def train(cfg: Config, run: Run, resume: bool, encode: Encoder | None = None,
          meta: dict[str, Any] | None = None) -> None:
    """The BT loop. ``encode`` builds the sequences (default: :func:`encode_pairs`); ``meta`` joins btpo.json."""
    acc = make_accelerator(cfg, run)
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model.name)
    records = load_split(cfg, cfg.data.train_split, acc)
    pairs, enc_stats = encode(tok, records) if encode else encode_pairs(tok, records, cfg.data.max_length)
    model = load_reward_model(cfg.model, tok.pad_token_id, acc.device.type)
    plan = BatchPlan.from_config(len(pairs), cfg, acc.num_processes)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, plan.total_steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    init_tracking(acc, cfg, run)

    start = resume_step(acc, run, resume)
    if start == 0:
        run.log({"step": 0, "data/train_pairs": len(pairs), "data/truncated": enc_stats["truncated"],
                 "data/too_long": enc_stats["too_long"]})
    per_proc = cfg.train.batch_size // acc.num_processes
    timer = StepTimer()
    bar = TrainProgress(plan.total_steps, start, f"{cfg.method} {run.root.name}", acc.is_main_process)
    model.train()
    for step in range(start + 1, plan.total_steps + 1):
        t0 = time.perf_counter()
        local = plan.local_batch(step, acc.process_index, acc.num_processes)
        micro = list(chunks(local, cfg.train.micro_batch_size))
        sums = {"loss": 0.0, "correct": 0.0, "margin": 0.0, "r_w": 0.0, "r_l": 0.0, "tokens": 0.0}
        with timer.phase("update"):
            for j, mb in enumerate(micro):
                batch = [pairs[i] for i in mb]
                seqs = [p.chosen for p in batch] + [p.rejected for p in batch]   # (2m,) chosen first
                sync = j == len(micro) - 1
                with (nullcontext() if sync else acc.no_sync(model)), acc.autocast():
                    r = rewards(model, seqs, tok.pad_token_id, acc.device)   # (2m,)
                    r_w, r_l = r[:len(mb)], r[len(mb):]
                    loss = bt_loss(r_w, r_l) * len(mb) / per_proc            # share of the per-process mean
                    acc.backward(loss)
                sums["loss"] += loss.item() * per_proc
                sums["correct"] += (r_w > r_l).float().sum().item()
                sums["margin"] += (r_w - r_l).sum().item()
                sums["r_w"] += r_w.sum().item()
                sums["r_l"] += r_l.sum().item()
                sums["tokens"] += sum(len(s) for s in seqs)
            grad_norm, lr = optimizer_step(acc, model, opt, sched, cfg.optim.max_grad_norm)
        tot = reduce_stats(acc, sums, acc.device)
        n = cfg.train.batch_size
        dt = time.perf_counter() - t0
        metrics = {"step": step, "train/epoch": round(plan.epoch_of(step), 4), "train/loss": tot["loss"] / n,
                   "train/accuracy": tot["correct"] / n, "train/reward_margin": tot["margin"] / n,
                   "train/reward_chosen": tot["r_w"] / n, "train/reward_rejected": tot["r_l"] / n,
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
    save_final(acc, model, tok, run, {"method": cfg.method, "base_model": cfg.model.name,
                                      "model_class": "AutoModelForSequenceClassification", **(meta or {})})
    acc.end_training()


def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any,
             progress: Any = None, artifacts: Any = None, encode: Encoder | None = None) -> list[PairResult]:
    """Score chosen and rejected of every pair with the trained reward model (pointwise protocol)."""
    tok = load_tokenizer(model_dir)
    model = load_reward_model(cfg.model, tok.pad_token_id, device.type, inference=True, path=model_dir)
    model.to(device).eval()
    pairs, _ = encode(tok, records) if encode else encode_pairs(tok, records, cfg.data.max_length)
    results: list[PairResult] = []
    with torch.no_grad():
        for batch_ids in chunks(list(range(len(pairs))), cfg.eval.batch_size):
            seqs = [pairs[i].chosen for i in batch_ids] + [pairs[i].rejected for i in batch_ids]
            r = rewards(model, seqs, tok.pad_token_id, device).tolist()
            m = len(batch_ids)
            for j, i in enumerate(batch_ids):
                results.append(pointwise_result(records[pairs[i].index].id, r[j], r[m + j]))
            if progress:
                progress(m)
    # Pairs too long to score count as format failures, so n always equals the test-set size.
    scored = {p.index for p in pairs}
    results.extend(pointwise_result(r.id, None, None, reason="too_long")
                   for k, r in enumerate(records) if k not in scored)
    return results
