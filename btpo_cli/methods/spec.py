"""The method registry's lower half: ``MethodSpec``, ``register_method`` and the look-ups.

What every layer may read (``config``, ``runs.final``, ``judging.judge``, ``training``, ``plan``) without
importing the method modules: the look-ups first call the loader that ``btpo_cli.methods`` (the package, which
imports the built-in methods and the plugins by name) installs when it is imported, and Python imports that
package before this module. So the import graph has no cycle through the registry (docs/architecture.md,
``tests/invariants/test_architecture.py``) and a look-up still sees every method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from btpo_cli.errors import BtpoError

F = TypeVar("F", bound=Callable[..., Any])

@dataclass(frozen=True)
class MethodSpec:
    """What the rest of btpo needs to know about a training method."""

    name: str
    """The ``--method`` value."""
    help: str
    """One line for ``btpo train --help``."""
    train: Callable[..., None]
    """``train(cfg, run, resume)``: the whole training run, ``final/`` included."""
    evaluate: Callable[..., Any]
    """``evaluate(cfg, model_dir, records, device, progress=None, artifacts=None) → [PairResult]``."""
    protocol: Literal["pointwise", "pairwise"]
    """How the judge is asked (METHOD.md §7): one score per response, or both orders of a pair."""
    model_class: str
    """The transformers class of ``final/`` (``AutoModelForCausalLM``, ``AutoModelForSequenceClassification``)."""
    config_section: str | None = None
    """The ``Config`` section holding this method's own settings, if any."""
    generative: bool = False
    """Whether it samples text (thoughts, rationales) with a rollout engine in training or evaluation."""
    order: int = 100
    """Position of its rows in ``btpo compare`` (lower first)."""
    judge: Callable[..., Any] | None = None
    """``judge(model_dir, cfg, device, meta) → btpo_cli.judging.judge.Judge``: how a trained model scores new data
    (``btpo score``, ``btpo serve``, ``load_judge``); its ``evaluate`` should be this judge's
    ``evaluate_pairs`` so that eval and score cannot disagree. None: the method cannot be used as a judge."""
    rollouts: bool = False
    """Whether training samples with the ``rollout`` settings (BTPO, GRPO): ``btpo.json`` then records them."""
    plan_geometry: Callable[..., Any] | None = None
    """``plan_geometry(inp: PlanInputs) → Geometry`` (``btpo_cli.plan.estimate``): rows, lengths and LM-head
    positions of one micro-batch, for ``btpo plan``. None: the method has no memory model."""
    plan_inputs: Callable[..., dict[str, Any]] | None = None
    """``plan_inputs(cfg) → {PlanInputs field: value}``: the planner inputs the method's own settings decide
    (``beta`` of a KL reference, ``gen_tokens`` sampled per row). None: no reference, nothing sampled."""
    eval_settings: Callable[..., dict[str, Any]] | None = None
    """``eval_settings(cfg, meta) → {setting: value}``: the method's own settings that change its eval figures,
    added to the engine and thought budget of a generative judge (``judging.run_eval.eval_settings``).
    ``meta`` is the checkpoint's ``btpo.json``, or None for an eval summary older than ``eval_settings``
    (only its ``eval`` section and engine are known): a value None means "not known" and is left out."""
    check_model: Callable[[str, dict[str, Any]], None] | None = None
    """``check_model(model, meta)``: raise a ``BtpoError`` when ``btpo eval`` of this model (its ``btpo.json``
    as ``meta``) cannot work with this method beyond its model class (e.g. no thought writer recorded)."""
    card: Callable[[dict[str, Any]], Card] | None = None
    """``card(meta) → Card``: the method's part of ``final/README.md``. None: a generic card."""
    eval_summary: Callable[..., dict[str, Any]] | None = None
    """``eval_summary(cfg, results: [PairResult]) → {key: value}``: the method's own entries of its eval JSON,
    from the details its ``evaluate`` put in each result (BTPO: ``sampled``, the figures of the mean over
    sampled thoughts). None or ``{}``: nothing more."""
    curves: tuple[tuple[str, str], ...] = ()
    """``((metrics key, panel title), …)``: training curves ``btpo compare --plot`` draws beside ``train/loss``
    (BTPO: ``btpo/omega_mean``); a panel appears when a compared run logged the key."""
    compare_baseline: bool = False
    """Whether ``btpo compare`` measures the other rows of a backbone block against this method's row
    (``delta_bt``; BT). When several methods say so, the first in table order is the baseline."""


@dataclass(frozen=True)
class Card:
    """A method's part of its model card (``btpo_cli.runs.final.model_card``)."""

    what: str
    """Completes "This is …": what the model is and how it judges (``{aspect}`` is filled in)."""
    rows: list[tuple[str, Any]] = field(default_factory=list)
    """Rows of the Training table after the shared ones (a None value is left out)."""
    usage: list[str] = field(default_factory=list)
    """Python lines that judge with plain transformers, after the shared preamble (``tok``, ``prompt``,
    ``chat(msgs, gen=False)``)."""


_REGISTRY: dict[str, MethodSpec] = {}
_loader: Callable[[], None] | None = None
"""Reads the built-in method modules and the plugins once: set by ``btpo_cli.methods`` when it is imported
(always before this module, its parent package)."""


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add (or replace) a method; returns ``spec`` so a module can keep it as ``METHOD``."""
    _REGISTRY[spec.name] = spec
    return spec


def no_grad(fn: F) -> F:
    """``@torch.no_grad()`` that imports torch when ``fn`` is called, so that a method module imports
    without it (``btpo --help`` and ``build_config`` stay torch-free)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch  # heavy: imported on use

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def get_method(name: str) -> MethodSpec:
    if _loader is not None:
        _loader()
    if name not in _REGISTRY:
        raise BtpoError(f"unknown method '{name}' (available: {', '.join(method_names())})")
    return _REGISTRY[name]


def method_specs() -> list[MethodSpec]:
    """Every registered method, in table order."""
    if _loader is not None:
        _loader()
    return sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name))


def method_names() -> list[str]:
    return [s.name for s in method_specs()]


def available() -> list[str]:
    return method_names()
