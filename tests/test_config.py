from __future__ import annotations

from pathlib import Path

import pytest

from btpo_cli.config import Config, build_config, parse_override, shipped, valid_keys
from btpo_cli.errors import ConfigError
from btpo_cli.recipes import validate_recipe


def test_defaults_and_overrides() -> None:
    cfg = build_config(None, ["train.batch_size=16", "optim.lr=5e-7", "btpo.misalignment_weight=false",
                              "model.attn_implementation=sdpa"], {"method": "btpo", "train.seed": 3})
    assert cfg.method == "btpo" and cfg.train.seed == 3
    assert cfg.train.batch_size == 16 and cfg.optim.lr == 5e-7
    assert cfg.btpo.misalignment_weight is False
    assert cfg.model.attn_implementation == "sdpa"


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as e:
        build_config(None, ["train.bach_size=4"])
    msg = str(e.value)
    assert "unknown key 'train.bach_size'" in msg and "train.batch_size" in msg and "\n" not in msg


@pytest.mark.parametrize("override,fragment", [
    ("train.batch_size=abc", "expected an integer"),
    ("train.batch_size=2.5", "expected an integer"),
    ("btpo.misalignment_weight=maybe", "expected true/false"),
    ("method=dpo", "is not one of"),
    ("btpo.agg=mean", "is not one of"),
    ("train.batch_size=0", "must be positive"),
    ("train", "expected key=value"),
    ("model=3", "is a section"),
])
def test_bad_values(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_config(None, [override])


def test_parse_override_yaml_values() -> None:
    assert parse_override("a.b=1e-6") == ("a.b", 1e-6)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=x=y") == ("a", "x=y")


def test_valid_keys_cover_sections() -> None:
    keys = valid_keys(Config)
    assert {"method", "train.batch_size", "rollout.n", "optim.lr", "data.path"} <= set(keys)


def test_recipe_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: bt\ntrain:\n  batch_size: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        build_config(bad)
    unk = tmp_path / "unk.yaml"
    unk.write_text("method: bt\noptim:\n  learning_rate: 1e-5\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        build_config(unk)


def test_every_shipped_recipe_validates() -> None:
    recipes = shipped()
    assert recipes, "no shipped recipes found"
    for p in recipes:
        cfg = validate_recipe(p)
        assert cfg.method == p.parent.name, f"{p}: method {cfg.method} does not match its folder"
