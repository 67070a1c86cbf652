"""One set-up for every training method: accelerator, tokenizer, policy, reference, optimizer,
scheduler, trackers and the resume state — built in one order, in one place.

A method's ``train`` reads top to bottom::

    sess = TrainSession.begin(cfg, run, resume, padding_side="left")   # accelerator, seed, tokenizer
    records = sess.load_split()                                        # the training split
    units, counts = encode(sess.tok, records, ...)                     # the method's own encoding
    sess.build("causal", total_steps, reference=cfg.btpo.beta > 0)     # model, ref, opt, sched, resume
    sess.log_data(len(units), counts)                                  # step-0 data row (fresh runs)
    run_supervised(sess, …) or run_rollouts(sess, …)                   # the shared loops
    sess.finish(meta)                                                  # final/ + trackers closed

This is the one place that knows how a model is wrapped for training (``accelerator.prepare``)
and how full weights are read back out of it (:meth:`TrainSession.full_weights`, used for the
rollout engine's weight sync and for ``final/``).
"""

from __future__ import annotations

from collections.abc import Iterator
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
        return load_split(self.cfg, split or self.cfg.data.train_split, self.acc)

    def build(self, kind: Literal["causal", "reward"], total_steps: int, reference: bool = False) -> int:
        """Load the policy (and reference), make optimizer and scheduler, prepare, start trackers, resume.

        Returns the step training continues from."""
        from btpo_cli.models import load_causal_lm, load_reward_model

        cfg, acc = self.cfg, self.acc
        if kind == "causal":
            model = load_causal_lm(cfg.model, acc.device.type)
        else:
            model = load_reward_model(cfg.model, self.tok.pad_token_id, acc.device.type)
        if reference:
            self.ref = load_causal_lm(cfg.model, acc.device.type, inference=True).to(acc.device).eval()
            self.ref.requires_grad_(False)
        opt = make_optimizer(model, cfg)
        sched = make_scheduler(opt, cfg, total_steps)
        self.model, self.opt, self.sched = acc.prepare(model, opt, sched)
        if cfg.train.report_to != "none":
            acc.init_trackers(cfg.name or self.run.root.name, config=cfg.to_dict())
        self.start = resume_step(acc, self.run, self.resume)
        return self.start

    def log_data(self, n_units: int, counts: dict[str, int]) -> None:
        """The ``data/`` row at step 0 of a fresh run (docs/metrics.md)."""
        if self.start == 0:
            self.run.log({"step": 0, "data/train_pairs": n_units, "data/truncated": counts.get("truncated", 0),
                          "data/too_long": counts.get("too_long", 0)})

    def policy(self) -> Any:
        """The bare transformers module under whatever wrapper ``prepare`` added."""
        return self.acc.unwrap_model(self.model)

    def full_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, full tensor) for every weight of the policy, for an engine's weight sync.

        Without sharding these are the policy's own parameters (no copy)."""
        yield from self.policy().state_dict().items()

    def rollout_engine(self, max_new_tokens: int | None = None) -> Any:
        """This process's rollout engine (``rollout.engine``), holding the policy's current weights.

        The ``hf`` engine shares the policy's parameters (no copy); other engines load the
        backbone and receive the trained weights through ``update_weights`` at every rollout."""
        from btpo_cli.engines import engine_for
        from btpo_cli.models import resolve_model

        return engine_for(self.cfg, resolve_model(self.cfg.model.name), self.tok.pad_token_id, self.device,
                          module=self.policy(), max_new_tokens=max_new_tokens)

    def finish(self, meta: dict[str, Any]) -> None:
        """Write ``final/`` (weights, tokenizer, ``btpo.json`` with ``meta``) and close the trackers."""
        save_final(self.acc, self.model, self.tok, self.run, meta)
        self.acc.end_training()
