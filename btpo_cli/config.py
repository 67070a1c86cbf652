"""Typed run configuration.

A run is described by one :class:`Config`: nested dataclasses, one per concern. YAML recipes in
``recipes/`` only fill values; ``--set key=value`` overrides any key (dotted path, value parsed
as YAML); an unknown key is an error that lists the valid ones. The resolved config is written
to every run folder as ``config.yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from btpo_cli.errors import ConfigError

METHODS = ("bt", "bt-prefilled", "gram", "grpo-pair", "grpo-point", "btpo")


@dataclass
class ModelConfig:
    name: str = "tiny-qwen2"
    """Alias (``btpo models``), Hub id, or local path of the backbone."""
    dtype: str = "auto"
    """Weights dtype: ``auto`` (fp32 master weights; bf16 autocast on GPU), ``bfloat16``, ``float32``."""
    attn_implementation: str | None = None
    """``sdpa``, ``eager``, ``flash_attention_2``; None lets transformers choose."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    path: str = "data/synthetic"
    """Dataset folder (train.jsonl/test.jsonl), a JSONL/parquet file, a datasets folder or a Hub id."""
    train_split: str = "train"
    eval_split: str = "test"
    max_length: int = 1024
    """Token budget of one rendered (prompt, response) sequence; prompts are cut from the left."""
    limit: int | None = None
    """Use only the first N training pairs (quick runs)."""
    strict: bool = False
    """Fail on the first unusable record instead of skipping and counting it."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    scheduler: str = "cosine"
    """``cosine``, ``linear`` or ``constant`` (each after linear warmup)."""
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    """Cosine decays to ``lr * min_lr_ratio``."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables."""


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: float = 1.0
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides ``epochs``)."""
    batch_size: int = 32
    """Global batch: pairs per optimizer step, summed over processes and accumulation steps."""
    micro_batch_size: int = 4
    """Pairs per forward/backward on one process; accumulation = batch / (micro * processes)."""
    save_every: int = 100
    """Checkpoint every N optimizer steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    log_every: int = 1
    report_to: str = "none"
    """``none``, ``tensorboard`` or ``wandb`` (through accelerate's trackers)."""
    precision: str = "auto"
    """``auto`` (bf16 autocast on GPU, fp32 on CPU), ``bf16``, ``fp32``."""


@dataclass
class BTPOConfig:
    """BTPO (METHOD.md §5). Defaults marked (ours) were lost from the paper and are our choice."""

    k: int = 4
    """Thoughts sampled per response (ours: the paper's value was lost)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_thought_tokens: int = 1000
    rollout_batch_size: int = 256
    """Pairs per rollout (paper: 256). Each rollout is followed by updates in minibatches of ``train.batch_size``."""
    update_epochs: int = 1
    """Passes over each rollout batch."""
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    misalignment_weight: bool = True
    """False sets ω̂ = 1 (the paper's ablation)."""
    thought_advantage: str = "grpo"
    """``grpo`` (the paper's implementation) or ``exact`` (the §4 estimator with a 1/K baseline)."""
    agg: str = "token-mean"
    """``token-mean`` (GRPO), ``seq-sum``, or ``token-sum-norm`` (Dr. GRPO: token sum / max_thought_tokens)."""
    beta: float = 0.0
    """KL (k3) coefficient to the frozen reference model; 0 loads no reference."""
    yes_no_normalize: bool = False
    """p(Yes) = e^{l_yes}/(e^{l_yes}+e^{l_no}) instead of the full-vocabulary softmax."""
    schedule: str = "joint"
    """``joint`` (L_score + L_thought together). The earlier paper version's alternating schedule is not implemented."""
    rollout_engine: str = "hf"
    """Rollout engine: ``hf`` (transformers generate with a shared prefill)."""


@dataclass
class PrefilledConfig:
    """BT with a prefilled thought: the base model writes one greedy thought per response offline."""

    max_thought_tokens: int = 1000
    batch_size: int = 16
    """Responses per generation batch when writing the thoughts."""


@dataclass
class GRAMConfig:
    """GRAM: pairwise A/B label token trained by cross-entropy on both orders."""

    label_smoothing: float = 0.0
    """0.1 is the optional smoothing of METHOD.md §6."""


@dataclass
class GRPOConfig:
    """GRPO baselines (pair: verdict [[A]]/[[B]]; point: <score>N</score>). Shares BTPO's clipped surrogate."""

    g: int = 4
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1000
    rollout_batch_size: int = 256
    """Pairs per rollout; updates follow in minibatches of ``train.batch_size``."""
    update_epochs: int = 1
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    agg: str = "token-mean"
    beta: float = 0.0


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_new_tokens: int = 1000
    """Thought / rationale budget at evaluation (greedy)."""
    samples: int = 0
    """``--eval-samples K``: also report the mean p(Yes) over K sampled thoughts."""
    limit: int | None = None


@dataclass
class Config:
    method: str = "bt"
    """One of: bt, bt-prefilled, gram, grpo-pair, grpo-point, btpo."""
    name: str = ""
    """Run name (defaults to the output folder's name)."""
    tag: str = ""
    """A variant label shown beside the method in ``btpo compare`` (e.g. ``no-omega``)."""
    out: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    btpo: BTPOConfig = field(default_factory=BTPOConfig)
    prefilled: PrefilledConfig = field(default_factory=PrefilledConfig)
    gram: GRAMConfig = field(default_factory=GRAMConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- building

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted keys of a config class, e.g. ``train.batch_size``."""
    out = []
    for f in dataclasses.fields(cls):
        t = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(t):
            out.extend(valid_keys(t, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError as e:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from e
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from e
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply(obj: Any, data: dict[str, Any], prefix: str, source: str) -> None:
    types = _field_types(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            section = type(obj)
            choices = ", ".join(valid_keys(section, prefix))
            raise ConfigError(f"{source}: unknown key '{key}'. Valid keys: {choices}")
        t = types[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' is a section; expected a mapping, got {v!r}")
            _apply(getattr(obj, k), v, key + ".", source)
        else:
            setattr(obj, k, _coerce(v, t, key))


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` → (``a.b``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value (e.g. --set train.batch_size=16)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    d: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        d = {p: d}
    return d


def load_recipe(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: recipe not found (see `btpo recipes list`)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', e)})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a YAML mapping")
    data.pop("description", None)
    return data


def build_config(recipe: str | Path | None = None, overrides: list[str] | None = None,
                 flags: dict[str, Any] | None = None) -> Config:
    """Defaults ← recipe ← flags (``--method`` …) ← ``--set`` overrides; then validate."""
    cfg = Config()
    if recipe:
        from btpo_cli.recipes import find

        path = find(recipe)
        _apply(cfg, load_recipe(path), "", str(path))
    for key, value in (flags or {}).items():
        if value is not None:
            _apply(cfg, _nest(key, value), "", "flag")
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), "", f"--set {text}")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    cfg = Config()
    _apply(cfg, data, "", source)
    return cfg


_CHOICES = {
    "method": METHODS,
    "optim.scheduler": ("cosine", "linear", "constant"),
    "train.report_to": ("none", "tensorboard", "wandb"),
    "train.precision": ("auto", "bf16", "fp32"),
    "model.dtype": ("auto", "bfloat16", "float32"),
    "btpo.thought_advantage": ("grpo", "exact"),
    "btpo.agg": ("token-mean", "seq-sum", "token-sum-norm"),
    "btpo.schedule": ("joint",),
    "btpo.rollout_engine": ("hf",),
    "grpo.agg": ("token-mean", "seq-sum", "token-sum-norm"),
}


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def validate(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        v = _get(cfg, key)
        if v not in choices:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(choices)}")
    positive = ["train.batch_size", "train.micro_batch_size", "data.max_length", "btpo.k",
                "btpo.max_thought_tokens", "btpo.rollout_batch_size", "btpo.update_epochs", "eval.batch_size",
                "grpo.g", "grpo.max_new_tokens", "grpo.rollout_batch_size", "grpo.update_epochs",
                "prefilled.max_thought_tokens", "prefilled.batch_size"]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {_get(cfg, key)}")
    if cfg.train.max_steps is not None and cfg.train.max_steps <= 0:
        raise ConfigError(f"train.max_steps: must be positive, got {cfg.train.max_steps}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be positive, got {cfg.optim.lr}")
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio: must be in [0, 1), got {cfg.optim.warmup_ratio}")
    if not 0 <= cfg.gram.label_smoothing < 1:
        raise ConfigError(f"gram.label_smoothing: must be in [0, 1), got {cfg.gram.label_smoothing}")
    if cfg.grpo.temperature <= 0:
        raise ConfigError(f"grpo.temperature: must be positive, got {cfg.grpo.temperature}")
    if cfg.btpo.temperature <= 0:
        raise ConfigError(f"btpo.temperature: must be positive, got {cfg.btpo.temperature}")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
