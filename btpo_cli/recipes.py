"""Shipped recipes: ``recipes/<method>/<model>-<dataset>.yaml``, found by path or by name.

A recipe may say what hardware it is sized for (the ``hardware`` section: gpus, nodes,
gpu_memory_gb, strategy); :func:`check_fit` runs the memory planner on it (``btpo recipes
validate`` fails a recipe whose estimate exceeds its GPU). ``recipes/accelerate/`` holds the
accelerate launch configs, not recipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from btpo_cli.config import Config, build_config
from btpo_cli.errors import BtpoError, ConfigError
from btpo_cli.models.aliases import ALIASES
from btpo_cli.plan.estimate import GiB, estimate, inputs_from_config


def validate_recipe(path: Path) -> Config:
    """Load a recipe into the typed config (unknown keys, bad values and bad choices are errors)."""
    cfg = build_config(path)

    name = cfg.model.name
    if not (name in ALIASES or "/" in name or Path(name).exists()):
        raise ConfigError(f"{path}: model.name {name!r} is neither an alias, a Hub id nor a path")
    return cfg


@dataclass
class FitCheck:
    """The planner's verdict on a recipe's own ``hardware`` block (None fields: nothing to check)."""

    strategy: str
    peak_gib: float | None
    verdict: str
    """``fits``, ``tight``, ``no``, or ``?`` (no GPU size given, or no shape known offline)."""
    note: str = ""


def check_fit(cfg: Config, path: Path | str = "") -> FitCheck:
    """Run the memory planner for the recipe's ``hardware`` (docs/plan.md); ``no`` = cannot fit."""
    hw = cfg.hardware
    if hw.gpu_memory_gb is None:
        return FitCheck(hw.strategy, None, "?", "no hardware.gpu_memory_gb: not checked")
    try:
        inp = inputs_from_config(cfg)
    except BtpoError as e:
        return FitCheck(hw.strategy, None, "?", f"not planned: {e}")
    est = estimate(inp, hw.strategy)
    return FitCheck(hw.strategy, est.peak / GiB, est.verdict(hw.gpu_memory_gb))


def description(path: Path) -> str:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return ""
    return str(data.get("description", "")) if isinstance(data, dict) else ""



