"""One set-up for every training method: accelerator, tokenizer, policy, reference, optimizer,
scheduler, trackers and the resume state — built in one order, in one place.

A method's ``train`` reads top to bottom::

    sess = TrainSession.begin(cfg, run, resume, padding_side="left")   # accelerator, seed, tokenizer
    records = sess.load_split()                                        # the training split (less held-out eval pairs)
    units, counts = encode(sess.tok, records, ...)                     # the method's own encoding
    sess.build("causal", total_steps, reference=cfg.btpo.beta > 0)     # model, ref, opt, sched, resume
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from btpo_cli.config import Config
from btpo_cli.data.pairs import load_split
from btpo_cli.engines import RolloutEngine, WeightStream, engine_for
from btpo_cli.fsio import publish_dir, staging_dir
from btpo_cli.models.aliases import resolve_model
from btpo_cli.models.loading import load_causal_lm, load_policy, load_tokenizer
from btpo_cli.models.lora import (
    AdapterDisabled,
    dequantized_state,
    dequantized_state_shapes,
    is_peft,
    merged_weights,
    scaling,
)
from btpo_cli.runs.final import write_meta
from btpo_cli.runs.folder import Run
from btpo_cli.runs.provenance import write_weights_digest
from btpo_cli.training import preflight
from btpo_cli.training.accelerator import make_accelerator
from btpo_cli.training.eval_pairs import split_eval_pairs
from btpo_cli.training.sharding import (
    base_module,
    full_state,
    full_state_meta,
    gathered,
    strategy_of,
    unpartitioned_loading,
)
from btpo_cli.training.steps import make_optimizer, make_scheduler, resume_step
from btpo_cli.training.tracking import init_tracking

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from btpo_cli.training.eval_pairs import EvalPairs


class PeriodicEval(Protocol):
    """What the session needs of the evaluation during training (``training.periodic_eval.TrainEval``,
    which builds on the session: typed here by its shape, so the two modules do not import each other)."""

    stopped: bool
    best: float | None
    best_step: int | None
    patience: int

    def state(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class TrainSession:
    """The state one training run shares between its set-up, its loop and its end."""

    cfg: Config
    run: Run
    resume: bool
    acc: Accelerator
    tok: PreTrainedTokenizerBase
    model: torch.nn.Module | None = None
    """The policy as prepared by accelerate (DDP-wrapped under several processes)."""
    opt: torch.optim.Optimizer | None = None
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    ref: torch.nn.Module | AdapterDisabled | None = None
    """Frozen reference model for a KL term (``reference=True``), in eval mode."""
    start: int = 0
    """Optimizer steps already taken (the resumed checkpoint's step; 0 for a fresh run)."""
    meta: dict[str, Any] | None = None
    """The ``btpo.json`` of the run's model (:func:`~btpo_cli.runs.final.describe`), set by the method
    before its loop: ``best/`` and the in-memory judge of ``train.eval_every`` read it."""
    eval_pairs: EvalPairs | None = None
    """The pairs ``train.eval_every`` evaluates on (:class:`~btpo_cli.training.eval_pairs.EvalPairs`), split off
    by :meth:`load_split`."""
    evals: PeriodicEval | None = None
    """Evaluation during training (:class:`~btpo_cli.training.periodic_eval.TrainEval`), started by the loop."""

    @classmethod
    def begin(cls, cfg: Config, run: Run, resume: bool, padding_side: str = "right") -> TrainSession:
        """Accelerator, seed and tokenizer: everything a method needs to encode its data."""
        from accelerate.utils import set_seed  # heavy: imported on use

        acc = make_accelerator(cfg, run)
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.name, padding_side=padding_side)
        return cls(cfg, run, resume, acc, tok)

    @property
    def device(self) -> torch.device:
        device: torch.device = self.acc.device
        return device

    @property
    def world(self) -> int:
        return int(self.acc.num_processes)

    @property
    def rank(self) -> int:
        return int(self.acc.process_index)

    @property
    def is_main(self) -> bool:
        return bool(self.acc.is_main_process)

    def load_split(self, split: str | None = None) -> list[Any]:
        """A split of the run's data; the training split without the pairs of ``train.eval_every``
        (``data.valid_split=heldout``: :func:`~btpo_cli.training.eval_pairs.split_eval_pairs`)."""
        split = split or self.cfg.data.train_split
        records = load_split(self.cfg, split, self.acc, record_skips=self.run.record_skips)
        if split == self.cfg.data.train_split and self.cfg.train.eval_every:
            records, self.eval_pairs = split_eval_pairs(self.cfg, records, self.acc, self.run, self.resume)
        return records

    def build(self, kind: Literal["causal", "reward"], total_steps: int, reference: bool = False) -> int:
        """Load the policy (and reference), make optimizer and scheduler, prepare, start trackers, resume.

        With ``model.lora.r > 0`` the policy is a peft LoRA model and the reference is the same
        module with its adapter disabled (:class:`~btpo_cli.models.lora.AdapterDisabled`); otherwise the
        reference is a separate frozen copy (full on every process, also under FSDP2 / ZeRO-3).
        Returns the step training continues from."""
        cfg, acc = self.cfg, self.acc
        model = load_policy(cfg.model, kind, self.tok.pad_token_id, acc.device)
        if reference and not cfg.model.lora.r:
            with unpartitioned_loading():      # a full frozen copy, also under ZeRO-3
                ref = load_causal_lm(cfg.model, acc.device.type, inference=True).to(acc.device).eval()
            ref.requires_grad_(False)
            self.ref = ref
        opt = make_optimizer(model, cfg)
        sched = make_scheduler(opt, cfg, total_steps)
        self.model, self.opt, self.sched = acc.prepare(model, opt, sched)
        if reference and cfg.model.lora.r:
            self.ref = AdapterDisabled(self.policy())

        init_tracking(acc, cfg, self.run)
        self.start = resume_step(acc, self.run, self.resume)
        return self.start

    @property
    def strategy(self) -> str:
        """``single``, ``ddp``, ``fsdp2``, ``zero2`` or ``zero3`` (:mod:`btpo_cli.training.sharding`)."""
        return strategy_of(self.acc)

    def log_data(self, n_units: int, counts: dict[str, int]) -> None:
        """The ``data/`` row at step 0 of a fresh run (docs/metrics.md)."""
        if self.start == 0:
            self.run.log({"step": 0, "data/train_pairs": n_units, "data/truncated": counts.get("truncated", 0),
                          "data/too_long": counts.get("too_long", 0)})

    def policy(self) -> Any:
        """The bare module under whatever wrapper ``prepare`` added (a peft model with LoRA)."""
        return base_module(self.acc, self.model)

    def full_weights(self) -> WeightStream:
        """(HF checkpoint name, full tensor) for every weight of the policy, one tensor at a time,
        with every name and shape announced up front (``WeightStream.shapes``: the same pipeline run
        on ``meta`` tensors, nothing gathered) so that an engine checks them before the first copy.

        What an engine's ``update_weights`` and ``final/`` receive. Under FSDP2 / ZeRO-3 each tensor
        is gathered in turn (every process must consume the whole stream); with LoRA the names
        are the base model's and the adapter is merged in (``W + (alpha/r) B A``, new tensors).
        Without sharding or LoRA these are the policy's own tensors (no copy)."""
        policy = self.policy()
        base = policy.get_base_model() if is_peft(policy) else policy
        qlora = getattr(base, "is_loaded_in_4bit", False)      # QLoRA: NF4 weights dequantized (single / DDP)

        def weights(meta: bool) -> Iterator[tuple[str, torch.Tensor]]:
            if qlora:
                stream: Any = dequantized_state_shapes(policy) if meta else dequantized_state(policy)
            else:
                stream = full_state_meta(self.acc, self.model) if meta else full_state(self.acc, self.model)
            yield from merged_weights(stream, scaling(policy)) if is_peft(policy) else stream

        return WeightStream({name: t.shape for name, t in weights(meta=True)}, weights(meta=False))

    def rollout_engine(self, max_new_tokens: int | None = None) -> RolloutEngine:
        """This process's rollout engine (``rollout.engine``), holding the policy's current weights.

        The ``hf`` engine generates with the trainer's own module (no copy; see
        :meth:`engine_weights` for sharded strategies); other engines load the backbone and
        receive the trained weights through ``update_weights`` at every rollout."""
        engine: RolloutEngine = engine_for(self.cfg, resolve_model(self.cfg.model.name), self.tok.pad_token_id,
                                           self.device, module=self.policy(), max_new_tokens=max_new_tokens)
        return engine

    @contextmanager
    def engine_weights(self, engine: RolloutEngine) -> Iterator[None]:
        """Within: ``engine`` generates with the policy's current weights.

        An engine that shares the trainer's module (``hf``) needs no copy: under FSDP2 / ZeRO-3 its
        parameters are gathered for the duration (:func:`~btpo_cli.training.sharding.gathered`: one
        all-gather per rollout, the memory of one full copy while it lasts, no collective per
        decoding step), with LoRA it runs the adapter as is. Any other engine gets
        :meth:`full_weights` (merged, gathered shard by shard) through ``update_weights``."""
        engine.wake()
        if engine.shares_module(self.policy()):
            with gathered(self.acc, self.model):
                yield
            return
        engine.update_weights(self.full_weights())
        yield

    def checkpoint_state(self, **state: Any) -> dict[str, Any]:
        """A checkpoint's ``trainer_state.json``: the loop's position plus the evaluation state."""
        return {**state, **(self.evals.state() if self.evals else {})}

    def save_model(self, meta: dict[str, Any], dest: Path | None = None) -> None:
        """Write ``final/`` (or ``dest``: ``best/``) atomically: full weights loadable by plain
        transformers, tokenizer, btpo.json, README.md (the model card). Every process calls this.

        The weights come from :meth:`full_weights` (gathered shard by shard under FSDP2 / ZeRO-3,
        every process taking part; kept on the main process's CPU); with LoRA they are the merged
        weights under the base model's names, and ``final/adapter/`` holds the adapter alone."""
        acc, run = self.acc, self.run
        dest = run.final_dir if dest is None else dest
        acc.wait_for_everyone()
        main = acc.is_main_process
        state: dict[str, torch.Tensor] = {}
        for name, t in self.full_weights():      # every process takes part in the gathers
            if main:
                state[name] = t.detach().to("cpu", copy=True).contiguous()
        policy = self.policy()
        adapter_state = None
        if is_peft(policy):
            adapter_state = {n: t.detach().to("cpu", copy=True) for n, t in full_state(acc, self.model)
                             if main and (".lora_" in n or ".modules_to_save." in n)}
        if main:
            tmp = staging_dir(dest)
            base = policy.get_base_model() if is_peft(policy) else policy
            base.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            if adapter_state is not None:
                policy.save_pretrained(str(tmp / "adapter"), state_dict=adapter_state, safe_serialization=True)
            self.tok.save_pretrained(str(tmp))

            if preflight.LAST is not None:      # how it was trained: strategy, world size, nodes, precision
                meta = {**meta, "launch": preflight.LAST}
            write_meta(tmp, meta)       # btpo.json + README.md (the model card)
            write_weights_digest(tmp, self._saved_step(meta, dest))   # weights.sha256.json: hashed once, here
            publish_dir(tmp, dest)      # a kill at any point leaves the old model or the new one (fsio)
        acc.wait_for_everyone()

    def _saved_step(self, meta: dict[str, Any], dest: Path) -> int | None:
        """The step of the weights being saved: ``best/``'s selected step, else the last checkpoint's (written
        at the loop's end, before ``final/``)."""
        if dest != self.run.final_dir:
            return (meta.get("selected") or {}).get("step")
        ckpt = self.run.latest_checkpoint()
        return int(self.run.read_state(ckpt)["step"]) if ckpt is not None else None

    def finish(self, meta: dict[str, Any]) -> None:
        """Write ``final/`` (full weights, tokenizer, ``btpo.json`` with ``meta``; ``adapter/`` with LoRA)
        and close the trackers."""
        if self.evals:
            self.evals.close()
            if self.evals.stopped:          # btpo.json says the run ended early and where its best was
                meta = {**meta, "training": {**meta.get("training", {}), "early_stop": {
                    "best_step": self.evals.best_step, "best_raw_accuracy": self.evals.best,
                    "patience": self.evals.patience}}}
        self.save_model(meta)
        self.acc.end_training()

