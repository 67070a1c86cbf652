"""One set-up for every training method: accelerator, tokenizer, policy, reference, optimizer,
scheduler, trackers and the resume state — built in one order, in one place.

A method's ``train`` reads top to bottom::

    sess = TrainSession.begin(cfg, run, resume, padding_side="left")   # accelerator, seed, tokenizer
    records = sess.load_split()                                        # the training split (less held-out eval pairs)
    units, counts = encode(sess.tok, records, ...)                     # the method's own encoding
    sess.build("causal", total_steps, reference=cfg.btpo.beta > 0)     # model, ref, opt, sched, resume, evals
    sess.log_data(len(units), counts)                                  # step-0 data row (fresh runs)
    sess.meta = describe(cfg, records, ...)                            # btpo.json of best/ and final/
    run_supervised(sess, …) or run_rollouts(sess, …)                   # the shared loops (+ eval during training)
    sess.finish(sess.meta)                                             # final/ + trackers closed

This is the one place that knows how a model is wrapped for training (``accelerator.prepare``)
and how full weights are read back out of it (:meth:`TrainSession.full_weights`, used for the
rollout engine's weight sync and for ``final/``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from btpo_cli.config import Config
from btpo_cli.runs import Run
from btpo_cli.trainer import (
    load_split,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    resume_step,
    save_final,
)


@dataclass
class TrainSession:
    """The state one training run shares between its set-up, its loop and its end."""

    cfg: Config
    run: Run
    resume: bool
    acc: Any
    tok: Any
    model: Any = None
    """The policy as prepared by accelerate (DDP-wrapped under several processes)."""
    opt: Any = None
    sched: Any = None
    ref: Any = None
    """Frozen reference model for a KL term (``reference=True``), in eval mode."""
    start: int = 0
    """Optimizer steps already taken (the resumed checkpoint's step; 0 for a fresh run)."""
    meta: dict[str, Any] | None = None
    """The ``btpo.json`` of the run's model (:func:`~btpo_cli.checkpoint.describe`), set by the method
    before its loop: ``best/`` and the in-memory judge of ``train.eval_every`` read it."""
    eval_pairs: Any = None
    """The pairs ``train.eval_every`` evaluates on (:class:`~btpo_cli.train_eval.EvalPairs`), split off
    by :meth:`load_split`."""
    evals: Any = None
    """Evaluation during training (:class:`~btpo_cli.train_eval.TrainEval`), made by :meth:`build`."""

    @classmethod
    def begin(cls, cfg: Config, run: Run, resume: bool, padding_side: str = "right") -> TrainSession:
        """Accelerator, seed and tokenizer: everything a method needs to encode its data."""
        from accelerate.utils import set_seed

        from btpo_cli.models import load_tokenizer

        acc = make_accelerator(cfg, run)
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.name, padding_side=padding_side)
        return cls(cfg, run, resume, acc, tok)

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def is_main(self) -> bool:
        return bool(self.acc.is_main_process)

    def load_split(self, split: str | None = None) -> list[Any]:
        """A split of the run's data; the training split without the pairs of ``train.eval_every``
        (``data.valid_split=heldout``: :func:`~btpo_cli.train_eval.split_eval_pairs`)."""
        split = split or self.cfg.data.train_split
        records = load_split(self.cfg, split, self.acc)
        if split == self.cfg.data.train_split and self.cfg.train.eval_every:
            from btpo_cli.train_eval import split_eval_pairs

            records, self.eval_pairs = split_eval_pairs(self.cfg, records, self.acc, self.run, self.resume)
        return records

    def build(self, kind: Literal["causal", "reward"], total_steps: int, reference: bool = False) -> int:
        """Load the policy (and reference), make optimizer and scheduler, prepare, start trackers, resume.

        With ``model.lora.r > 0`` the policy is a peft LoRA model and the reference is the same
        module with its adapter disabled (:class:`~btpo_cli.lora.AdapterDisabled`); otherwise the
        reference is a separate frozen copy (full on every process, also under FSDP2 / ZeRO-3).
        Returns the step training continues from."""
        from btpo_cli.lora import AdapterDisabled
        from btpo_cli.models import load_causal_lm, load_policy

        cfg, acc = self.cfg, self.acc
        model = load_policy(cfg.model, kind, self.tok.pad_token_id, acc.device)
        if reference and not cfg.model.lora.r:
            from btpo_cli.sharding import unpartitioned_loading

            with unpartitioned_loading():      # a full frozen copy, also under ZeRO-3
                self.ref = load_causal_lm(cfg.model, acc.device.type, inference=True).to(acc.device).eval()
            self.ref.requires_grad_(False)
        opt = make_optimizer(model, cfg)
        sched = make_scheduler(opt, cfg, total_steps)
        self.model, self.opt, self.sched = acc.prepare(model, opt, sched)
        if reference and cfg.model.lora.r:
            self.ref = AdapterDisabled(self.policy())
        from btpo_cli.tracking import init_tracking

        init_tracking(acc, cfg, self.run)
        self.start = resume_step(acc, self.run, self.resume)
        from btpo_cli.train_eval import TrainEval

        ckpt = self.run.latest_checkpoint() if self.start else None
        self.evals = TrainEval(self, self.eval_pairs, self.run.read_state(ckpt) if ckpt else None)
        return self.start

    @property
    def strategy(self) -> str:
        """``single``, ``ddp``, ``fsdp2``, ``zero2`` or ``zero3`` (:mod:`btpo_cli.sharding`)."""
        from btpo_cli.sharding import strategy_of

        return strategy_of(self.acc)

    def log_data(self, n_units: int, counts: dict[str, int]) -> None:
        """The ``data/`` row at step 0 of a fresh run (docs/metrics.md)."""
        if self.start == 0:
            self.run.log({"step": 0, "data/train_pairs": n_units, "data/truncated": counts.get("truncated", 0),
                          "data/too_long": counts.get("too_long", 0)})

    def policy(self) -> Any:
        """The bare module under whatever wrapper ``prepare`` added (a peft model with LoRA)."""
        from btpo_cli.sharding import base_module

        return base_module(self.acc, self.model)

    def full_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF checkpoint name, full tensor) for every weight of the policy, one tensor at a time.

        What an engine's ``update_weights`` and ``final/`` receive. Under FSDP2 / ZeRO-3 each tensor
        is gathered in turn (every process must consume the whole stream); with LoRA the names
        are the base model's and the adapter is merged in (``W + (alpha/r) B A``, new tensors).
        Without sharding or LoRA these are the policy's own tensors (no copy)."""
        from btpo_cli.lora import dequantized_state, is_peft, merged_weights, scaling
        from btpo_cli.sharding import full_state

        policy = self.policy()
        base = policy.get_base_model() if is_peft(policy) else policy
        if getattr(base, "is_loaded_in_4bit", False):          # QLoRA: NF4 weights dequantized (single / DDP)
            stream: Any = dequantized_state(policy)
        else:
            stream = full_state(self.acc, self.model)
        yield from merged_weights(stream, scaling(policy)) if is_peft(policy) else stream

    def rollout_engine(self, max_new_tokens: int | None = None) -> Any:
        """This process's rollout engine (``rollout.engine``), holding the policy's current weights.

        The ``hf`` engine generates with the trainer's own module (no copy; see
        :meth:`engine_weights` for sharded strategies); other engines load the backbone and
        receive the trained weights through ``update_weights`` at every rollout."""
        from btpo_cli.engines import engine_for
        from btpo_cli.models import resolve_model

        return engine_for(self.cfg, resolve_model(self.cfg.model.name), self.tok.pad_token_id, self.device,
                          module=self.policy(), max_new_tokens=max_new_tokens)

    @contextmanager
    def engine_weights(self, engine: Any) -> Iterator[None]:
        """Within: ``engine`` generates with the policy's current weights.

        An engine that shares the trainer's module (``hf``) needs no copy: under FSDP2 / ZeRO-3 its
        parameters are gathered for the duration (:func:`~btpo_cli.sharding.gathered`: one
        all-gather per rollout, the memory of one full copy while it lasts, no collective per
        decoding step), with LoRA it runs the adapter as is. Any other engine gets
        :meth:`full_weights` (merged, gathered shard by shard) through ``update_weights``."""
        from btpo_cli.sharding import gathered

        engine.wake()
        if getattr(engine, "model", None) is self.policy():
            with gathered(self.acc, self.model):
                yield
            return
        engine.update_weights(self.full_weights())
        yield

    def checkpoint_state(self, **state: Any) -> dict[str, Any]:
        """A checkpoint's ``trainer_state.json``: the loop's position plus the evaluation state."""
        return {**state, **(self.evals.state() if self.evals else {})}

    def finish(self, meta: dict[str, Any]) -> None:
        """Write ``final/`` (full weights, tokenizer, ``btpo.json`` with ``meta``; ``adapter/`` with LoRA)
        and close the trackers."""
        if self.evals:
            self.evals.close()
            if self.evals.stopped:          # btpo.json says the run ended early and where its best was
                meta = {**meta, "training": {**meta.get("training", {}), "early_stop": {
                    "best_step": self.evals.best_step, "best_raw_accuracy": self.evals.best,
                    "patience": self.evals.patience}}}
        save_final(self, meta)
        self.acc.end_training()
