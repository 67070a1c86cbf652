"""Shipped recipes: ``recipes/<method>/<model>-<dataset>.yaml``, found by path or by name."""

from __future__ import annotations

import os
from pathlib import Path

from btpo_cli.config import Config, build_config
from btpo_cli.errors import ConfigError


def recipes_dir() -> Path:
    env = os.environ.get("BTPO_RECIPES")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent / "recipes"
    return here if here.is_dir() else Path.cwd() / "recipes"


def shipped() -> list[Path]:
    d = recipes_dir()
    # recipes/accelerate/ holds accelerate launch configs (strategies), not training recipes
    return sorted(p for p in d.rglob("*.yaml") if p.parent.name != "accelerate") if d.is_dir() else []


def find(name_or_path: str | Path) -> Path:
    """A path, or a name like ``bt/qwen2.5-7b-hh`` relative to the recipes folder."""
    p = Path(name_or_path)
    if p.exists():
        return p
    cand = recipes_dir() / (str(name_or_path) + ("" if str(name_or_path).endswith(".yaml") else ".yaml"))
    if cand.exists():
        return cand
    raise ConfigError(f"{name_or_path}: no such recipe file or shipped recipe (see `btpo recipes list`)")


def validate_recipe(path: Path) -> Config:
    """Load a recipe into the typed config (unknown keys, bad values and bad choices are errors)."""
    cfg = build_config(path)
    from btpo_cli.models import ALIASES

    name = cfg.model.name
    if not (name in ALIASES or "/" in name or Path(name).exists()):
        raise ConfigError(f"{path}: model.name {name!r} is neither an alias, a Hub id nor a path")
    return cfg


def description(path: Path) -> str:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return ""
    return str(data.get("description", "")) if isinstance(data, dict) else ""



