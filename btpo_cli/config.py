"""Typed run configuration.

A run is described by one :class:`Config`: nested dataclasses, one per concern. YAML recipes in
``recipes/`` only fill values; ``--set key=value`` overrides any key (dotted path, value parsed
as YAML); an unknown key is an error that lists the valid ones. The resolved config is written
to every run folder as ``config.yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from btpo_cli.engines import available_engines
from btpo_cli.errors import ConfigError, ConfigUsageError, did_you_mean
from btpo_cli.methods.spec import get_method, method_names


@dataclass
class LoRAConfig:
    """LoRA / QLoRA adapters through peft (``pip install 'btpo[peft]'``); ``r: 0`` = full fine-tuning.

    The reference model of a KL term is the base with the adapter disabled (no second copy);
    ``final/`` holds the merged weights (plain transformers loads them) and ``final/adapter/``
    the adapter alone. A scalar head (BT) is trained and saved in full (``modules_to_save``)."""

    r: int = 0
    """Adapter rank; 0 disables LoRA."""
    alpha: float = 16.0
    """Scale numerator: the update is ``(alpha / r) · B A``."""
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt (e.g. ``[q_proj, k_proj, v_proj, o_proj]``) or ``all-linear``."""
    load_in_4bit: bool = False
    """QLoRA: 4-bit NF4 base weights (needs a CUDA GPU and bitsandbytes)."""


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
    lora: LoRAConfig = field(default_factory=LoRAConfig)


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
    valid_split: str = "auto"
    """The pairs ``train.eval_every`` evaluates on: ``auto`` (the dataset's ``validation`` split when the
    folder has one, else ``heldout``), ``heldout`` (``train.eval_limit`` training pairs drawn by the seed and
    removed from training; their ids go to ``RUN/eval_pairs.json``) or a split name. Never the test split
    unless named here."""


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
    micro_batch_tokens: int | None = None
    """Size micro-batches by tokens instead: units join a forward while rows × longest row ≤ this
    budget (a unit over the budget goes alone). Gradients equal those of ``micro_batch_size``."""
    shared_prefix: str = "off"
    """``off``, ``on`` or ``auto``: score a prompt's K thoughts (BTPO; a GRPO query's G completions)
    with ONE forward of the shared prompt and the K continuations against its KV cache — the
    update's forward/backward, old and reference log-probs, ``eval --samples K``. Same loss and
    gradients within float rounding (tests/judging/test_shared_prefix.py), not bitwise, so off by
    default. ``auto`` falls back to the plain path where it does not apply (gradient checkpointing,
    sliding-window or non-attention layers); ``on`` raises there. With ``micro_batch_tokens`` the
    shared prompt counts once."""
    chunked_logprobs: str = "off"
    """``off`` or ``on``: thought log-probs from the final hidden states, the LM head applied to chunks
    of positions and recomputed in the backward (btpo_cli/judging/lm_head.py), so the update never
    holds a (tokens × vocab) logits tensor nor its float32 upcast. Equal within float rounding, not
    bitwise, so off by default; models whose head is not a plain ``h Wᵀ`` (bias, soft-capping, logit
    scale) and ZeRO-3 (a partitioned head) raise; FSDP2 works."""
    packing: str = "off"
    """``off``, ``on`` or ``auto``: padding-free packed rows, for every method.
    Supervised methods (BT, BT-prefilled, GRAM) and their evaluation / ``btpo score`` / ``btpo serve``: a
    micro-batch's sequences go into one row with per-sequence position ids and attention that never
    crosses sequences (btpo_cli/models/packing.py, docs/packing.md), and a step's pairs are sorted by
    length into micro-batches (the same pairs per step, so the same gradient). A judge trained with
    packing evaluates with it (``--set train.packing=off`` turns it off).
    Rollout methods (BTPO, GRPO-pair/point): each prompt ONCE with its K thoughts (G completions) in one
    packed row under a prompt-sharing attention mask, several prompts per row
    (btpo_cli/judging/packed_prefix.py, docs/packing-prefix.md) — the update, old and reference
    log-probs, ``eval --samples K``; it supersedes ``shared_prefix`` (no per-row K/V copies, no cache)
    and works under gradient checkpointing. With ``micro_batch_tokens`` a packed prompt counts once.
    Same loss and gradients within float rounding (tests/models/test_packing.py,
    tests/judging/test_packed_prefix.py), not bitwise, so off by default. ``auto`` packs where it
    applies and falls back where it does not; ``on`` raises there (attention other than sdpa/eager,
    sliding-window or non-attention layers)."""
    save_every: int = 100
    """Checkpoint every N optimizer steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    log_every: int = 1
    eval_every: int = 0
    """Evaluate the model in memory every N optimizer steps and at the last (METHOD §7 on
    ``data.valid_split``; ``eval/`` rows in metrics.jsonl, ``best/`` kept by eval accuracy); 0 = off."""
    eval_limit: int = 256
    """Pairs evaluated: the held-out slice's size, or the first N of a validation split (0 = all of it)."""
    early_stop_patience: int = 0
    """Stop after this many evaluations in a row without a better eval accuracy (0 = never)."""
    report_to: str = "none"
    """``none``, ``tensorboard`` or ``wandb`` (through accelerate's trackers)."""
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` (bf16 compute over fp32 master weights and fp32
    optimizer state: autocast under DDP, MixedPrecisionPolicy under FSDP2, bf16 mode under
    DeepSpeed), ``fp32``. docs/plan.md gives the memory of each."""


@dataclass
class RolloutConfig:
    """Sampling for the rollout methods (BTPO, GRPO pair/point) and the engine that does it.

    Read by BTPO (``n`` = K thoughts per response, ``max_new_tokens`` = ``max_thought_tokens``),
    by both GRPO baselines (``n`` = the group size G) and, for ``engine`` and its options, by every
    other path that generates text (bt-prefilled's thought writer, generative evaluation).
    """

    engine: str = "auto"
    """Rollout engine (``btpo_cli/engines``): ``auto`` (vllm on a GPU where vLLM imports, else hf), ``hf``, ``vllm``."""
    n: int = 4
    """Samples per prompt: K thoughts per response (BTPO; ours: the paper's value was lost), G per prompt (GRPO)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1000
    """Longest sampled thought / rationale in tokens (paper: ``max_thought_tokens`` 1000)."""
    batch_size: int = 256
    """Pairs per rollout (paper: 256). Each rollout is followed by updates in minibatches of ``train.batch_size``."""
    update_epochs: int = 1
    """Passes over each rollout batch."""
    prompts_per_batch: int = 16
    """``hf`` engine: prompts per prefill (each decodes ``n`` rows). Speed only: samples do not depend on it."""
    gpu_memory_utilization: float = 0.3
    """``vllm``: share of the GPU the engine may take (the trainer needs the rest)."""
    tensor_parallel_size: int = 1
    """``vllm``: GPUs one engine spans."""
    max_model_len: int | None = None
    """``vllm``: longest prompt + continuation; None = ``data.max_length`` + ``max_new_tokens`` + the GPM tail."""
    max_num_seqs: int = 256
    """``vllm``: sequences decoded at once."""
    enable_prefix_caching: bool = True
    """``vllm``: share the KV cache of a prompt across its ``n`` samples."""
    sleep: bool = True
    """Free the engine's memory (``sleep``/``wake``) around each update phase where the engine supports it."""


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_new_tokens: int | None = None
    """Thought / rationale budget at evaluation (greedy). ``null`` (the default): the budget the run was
    trained with, ``rollout.max_new_tokens`` (:func:`eval_budget`); bt-prefilled always uses its writer's
    training budget. Older runs hold an explicit number here and keep it."""
    samples: int = 0
    """``--eval-samples K``: also report the mean p(Yes) over K sampled thoughts."""
    limit: int | None = None


def eval_budget(cfg: Config) -> int:
    """The thought / rationale budget a generative judge runs with: ``eval.max_new_tokens`` when set,
    else the rollout's (the budget a BTPO / GRPO run was trained with; 1000 for an untrained model)."""
    budget = cfg.eval.max_new_tokens
    return int(budget) if budget is not None else int(cfg.rollout.max_new_tokens)


def settings_budget(settings: dict[str, Any]) -> int | None:
    """:func:`eval_budget` of a ``btpo.json`` ``settings`` mapping (None when it names neither)."""
    ev, ro = settings.get("eval") or {}, settings.get("rollout") or {}
    budget = ev.get("max_new_tokens")
    return budget if budget is not None else ro.get("max_new_tokens")


@dataclass
class HardwareConfig:
    """The hardware a recipe is sized for. ``btpo plan`` and ``btpo recipes validate`` estimate the
    run's per-GPU memory on it (docs/plan.md); training itself does not read this section — the
    launch does: ``accelerate launch --config_file recipes/accelerate/<strategy>.yaml``."""

    gpus: int = 1
    """GPUs (processes) per node."""
    nodes: int = 1
    gpu_memory_gb: float | None = None
    """Memory of one GPU in GiB (80 for an 80 GB A100/H100); None: not checked."""
    strategy: str = "ddp"
    """``ddp``, ``fsdp2``, ``fsdp2-offload``, ``zero2`` or ``zero3``."""


@dataclass
class Config:
    method: str = "bt"
    """A registered method (``btpo train --help`` lists them): bt, bt-prefilled, gram, grpo-pair, grpo-point, btpo."""
    name: str = ""
    """Run name (defaults to the output folder's name)."""
    tag: str = ""
    """A variant label shown beside the method in ``btpo compare`` (e.g. ``no-omega``)."""
    out: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    sections: dict[str, Any] = field(default_factory=dict, repr=False)
    """The method sections (:func:`register_section`: ``btpo``, ``prefilled``, ``gram``, ``grpo``, a
    plugin's), by name; read as attributes (``cfg.btpo.beta``)."""

    def __post_init__(self) -> None:
        for name, sec in _SECTIONS.items():
            self.sections.setdefault(name, sec.cls())

    def __getattr__(self, name: str) -> Any:      # only reached for names that are not fields
        if not name.startswith("__"):
            if name not in _SECTIONS:
                _load_methods()                     # a Config made before the registry was read
            if name in _SECTIONS:
                secs = self.__dict__.setdefault("sections", {})
                if name not in secs:
                    secs[name] = _SECTIONS[name].cls()
                return secs[name]
        raise AttributeError(f"'Config' has no section or key '{name}'")

    def to_dict(self) -> dict[str, Any]:
        """Every section, the method sections after ``rollout`` (registration order)."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "sections":
                continue
            v = getattr(self, f.name)
            d[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            if f.name == "rollout":
                for name in _SECTIONS:
                    d[name] = dataclasses.asdict(getattr(self, name))
        return d


@dataclass(frozen=True)
class Section:
    """A method's config section: its dataclass, its checks and its keys of version 0.1."""

    cls: type
    validate: Callable[[Config], None] | None = None
    """Raises :class:`ConfigError` for a bad value (run on every config, whatever its method)."""
    renamed: dict[str, str] = field(default_factory=dict)
    """Keys of version 0.1 that moved to ``rollout`` (old name → ``rollout`` key): ``--set`` and recipes
    may still use them; a saved config.yaml of an old run loads through them."""


_SECTIONS: dict[str, Section] = {}


def register_section(name: str, cls: type, *, validate: Callable[[Config], None] | None = None,
                     renamed: dict[str, str] | None = None) -> None:
    """Add a top-level config section (a dataclass) for a method; its module calls this when imported."""
    if name in {f.name for f in dataclasses.fields(Config)}:
        raise ConfigError(f"config section '{name}' already exists")
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"config section '{name}' must be a dataclass, got {cls!r}")
    _SECTIONS[name] = Section(cls, validate, dict(renamed or {}))


def check_choices(cfg: Config, choices: dict[str, tuple[Any, ...]]) -> None:
    """A :class:`ConfigError` naming the first dotted key whose value is not among its choices."""
    for key, allowed in choices.items():
        v = _get(cfg, key)
        if v not in allowed:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, allowed))}"
                              f"{did_you_mean(v, map(str, allowed))}")


def check_positive(cfg: Config, keys: list[str]) -> None:
    for key in keys:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {_get(cfg, key)}")


def check_fraction(cfg: Config, key: str) -> None:
    """``0 <= value < 1``."""
    if not 0 <= _get(cfg, key) < 1:
        raise ConfigError(f"{key}: must be in [0, 1), got {_get(cfg, key)}")


# ----------------------------------------------------------------------------- building

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted keys of a config class, e.g. ``train.batch_size``."""
    out = []
    for f in dataclasses.fields(cls):
        if cls is Config and f.name == "sections":
            continue
        t = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(t):
            out.extend(valid_keys(t, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    if cls is Config:
        for name, sec in _SECTIONS.items():
            out.extend(valid_keys(sec.cls, prefix + name + "."))
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
    names = {f.name for f in dataclasses.fields(obj)} - {"sections"}
    for k, v in data.items():
        key = prefix + str(k)
        if isinstance(obj, Config) and k in _SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' is a section; expected a mapping, got {v!r}")
            renamed = _SECTIONS[k].renamed
            moved = {renamed[old]: v[old] for old in v if old in renamed}
            v = {key2: val for key2, val in v.items() if key2 not in renamed}
            if moved:
                _apply(obj.rollout, moved, "rollout.", source)
            _apply(getattr(obj, k), v, key + ".", source)
            continue
        if k not in names:
            section = type(obj)
            keys = valid_keys(section, prefix)
            raise ConfigError(f"{source}: unknown key '{key}'{did_you_mean(key, keys)}. Valid keys: {', '.join(keys)}")
        t = types[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' is a section; expected a mapping, got {v!r}")
            _apply(getattr(obj, k), v, key + ".", source)
        else:
            setattr(obj, k, _coerce(v, t, key))


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A config mapping of version 0.1 → the current layout.

    Old runs dumped every section, so a BTPO run's ``config.yaml`` also holds ``grpo.g``: each
    renamed key moves to ``rollout`` only from the section of the method that reads it (explicit
    ``rollout`` keys win); the other method's old keys are dropped.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    method = str(data.get("method", ""))
    owner = get_method(method).config_section if method in method_names() else None
    for section, renames in ((name, s.renamed) for name, s in _SECTIONS.items() if s.renamed):
        sec = data.get(section)
        if not isinstance(sec, dict):
            continue
        for old, new in renames.items():
            if old not in sec:
                continue
            value = sec.pop(old)
            if owner in (None, section):
                data.setdefault("rollout", {})
                if isinstance(data["rollout"], dict):
                    data["rollout"].setdefault(new, value)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` → (``a.b``, YAML-parsed value)."""
    if "=" not in text:
        _load_methods()
        keys = valid_keys()
        what = "" if text.strip() in keys else f"{did_you_mean(text.strip(), keys)}. Valid keys: {', '.join(keys)}"
        raise ConfigError(f"--set {text!r}: expected key=value (e.g. --set train.batch_size=16){what}")
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


def recipes_dir() -> Path:
    env = os.environ.get("BTPO_RECIPES")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent / "recipes"
    return here if here.is_dir() else Path.cwd() / "recipes"


ACCELERATE_CONFIGS = "accelerate"
"""The folder under recipes/ that holds accelerate launch configs (``<hardware.strategy>.yaml``, what
``btpo train --gpus N`` launches with), not training recipes."""


def accelerate_configs_dir() -> Path:
    """``recipes/accelerate/``: the launch config of each ``hardware.strategy``."""
    return recipes_dir() / ACCELERATE_CONFIGS


def shipped() -> list[Path]:
    d = recipes_dir()
    if not d.is_dir():
        return []
    return sorted(p for p in d.rglob("*.yaml") if p.relative_to(d).parts[0] != ACCELERATE_CONFIGS)


def find_recipe(name_or_path: str | Path) -> Path:
    """A path, or a name like ``bt/qwen2.5-7b-hh`` relative to the recipes folder."""
    p = Path(name_or_path)
    if p.exists():
        return p
    cand = recipes_dir() / (str(name_or_path) + ("" if str(name_or_path).endswith(".yaml") else ".yaml"))
    if cand.exists():
        return cand
    raise ConfigError(f"{name_or_path}: no such recipe file or shipped recipe (see `btpo recipes list`)")


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
                 flags: dict[str, Any] | None = None, base: Config | None = None) -> Config:
    """Defaults (or ``base``) ← recipe ← flags (``--method`` …) ← ``--set`` overrides; then validate.

    ``flags`` and ``overrides`` come from the command line: an unknown or malformed key there, or a
    value that validation refuses, is a :class:`~btpo_cli.errors.ConfigUsageError` (exit 2); the same in a recipe (or ``base``)
    is a :class:`ConfigError` (exit 1)."""
    _load_methods()
    cfg = base or Config()
    if recipe:
        path = find_recipe(recipe)
        _apply(cfg, migrate(load_recipe(path)), "", str(path))
    given: set[str] = set()
    try:
        for key, value in (flags or {}).items():
            if value is not None:
                given.add(key)
                _apply(cfg, _nest(key, value), "", "flag")
        for text in overrides or []:
            key, value = parse_override(text)
            given.add(key)
            _apply(cfg, _nest(key, value), "", f"--set {text}")
    except ConfigError as e:
        raise ConfigUsageError(str(e)) from e
    try:
        validate(cfg)
    except ConfigError as e:
        key = str(e).split(":", 1)[0]
        if key in given or any(k.startswith(key + ".") for k in given):
            raise ConfigUsageError(str(e)) from e
        raise
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    _load_methods()
    cfg = Config()
    _apply(cfg, migrate(data), "", source)
    return cfg


def _load_methods() -> None:
    """Method modules (and plugins) register their config sections when the registry loads."""
    method_names()


_CHOICES: dict[str, Any] = {
    "optim.scheduler": ("cosine", "linear", "constant"),
    "train.report_to": ("none", "tensorboard", "wandb"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.shared_prefix": ("off", "on", "auto"),
    "train.chunked_logprobs": ("off", "on"),
    "train.packing": ("off", "on", "auto"),
    "model.dtype": ("auto", "bfloat16", "float32"),
    "hardware.strategy": ("ddp", "fsdp2", "fsdp2-offload", "zero2", "zero3"),
}


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def validate(cfg: Config) -> None:
    # YAML 1.1 reads a bare on/off as a boolean (and a str field then holds 'True' / 'False')
    yaml_bool = {True: "on", False: "off", "True": "on", "False": "off"}
    cfg.train.shared_prefix = yaml_bool.get(cfg.train.shared_prefix, cfg.train.shared_prefix)
    cfg.train.chunked_logprobs = yaml_bool.get(cfg.train.chunked_logprobs, cfg.train.chunked_logprobs)
    cfg.train.packing = yaml_bool.get(cfg.train.packing, cfg.train.packing)
    choices_now = {"method": tuple(method_names()), "rollout.engine": ("auto", *available_engines()), **_CHOICES}
    for key, choices in choices_now.items():
        v = _get(cfg, key)
        if v not in choices:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(choices)}{did_you_mean(v, choices)}")
    if cfg.train.micro_batch_tokens is not None and cfg.train.micro_batch_tokens <= 0:
        raise ConfigError(f"train.micro_batch_tokens: must be positive, got {cfg.train.micro_batch_tokens}")
    lora = cfg.model.lora
    if lora.r < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora: need r >= 0, alpha > 0 and 0 <= dropout < 1, got r={lora.r}, "
                          f"alpha={lora.alpha}, dropout={lora.dropout}")
    if lora.load_in_4bit and lora.r == 0:
        raise ConfigError("model.lora.load_in_4bit: 4-bit base weights train only through an adapter; set model.lora.r")
    tm = lora.target_modules
    if not (isinstance(tm, str) and tm) and not (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm)):
        raise ConfigError(f"model.lora.target_modules: expected 'all-linear' or a list of module names, got {tm!r}")
    positive = ["train.batch_size", "train.micro_batch_size", "data.max_length", "rollout.n",
                "rollout.max_new_tokens", "rollout.batch_size", "rollout.update_epochs", "eval.batch_size",
                "rollout.prompts_per_batch", "rollout.max_num_seqs", "rollout.tensor_parallel_size",
                "hardware.gpus", "hardware.nodes"]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {_get(cfg, key)}")
    if cfg.eval.max_new_tokens is not None and cfg.eval.max_new_tokens <= 0:
        raise ConfigError(f"eval.max_new_tokens: must be positive, or null (the training budget), got "
                          f"{cfg.eval.max_new_tokens}")
    for key in ("train.eval_every", "train.eval_limit", "train.early_stop_patience"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {_get(cfg, key)}")
    if cfg.train.early_stop_patience and not cfg.train.eval_every:
        raise ConfigError("train.early_stop_patience: needs train.eval_every > 0 (early stopping watches eval accuracy)")
    if cfg.train.eval_every and not cfg.data.valid_split:
        raise ConfigError("data.valid_split: empty; use auto, heldout or a split name")
    if cfg.train.eval_every and cfg.data.valid_split == cfg.data.train_split:
        raise ConfigError(f"data.valid_split: {cfg.data.valid_split!r} is the training split; use heldout to "
                          "evaluate on training pairs kept out of training")
    if cfg.train.eval_every and cfg.data.valid_split == "heldout" and not cfg.train.eval_limit:
        raise ConfigError("train.eval_limit: data.valid_split=heldout needs the number of pairs to hold out (> 0)")
    if cfg.train.max_steps is not None and cfg.train.max_steps <= 0:
        raise ConfigError(f"train.max_steps: must be positive, got {cfg.train.max_steps}")
    if cfg.hardware.gpu_memory_gb is not None and cfg.hardware.gpu_memory_gb <= 0:
        raise ConfigError(f"hardware.gpu_memory_gb: must be positive, got {cfg.hardware.gpu_memory_gb}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be positive, got {cfg.optim.lr}")
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio: must be in [0, 1), got {cfg.optim.warmup_ratio}")
    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature: must be positive, got {cfg.rollout.temperature}")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p: must be in (0, 1], got {cfg.rollout.top_p}")
    if not 0 < cfg.rollout.gpu_memory_utilization < 1:
        raise ConfigError(f"rollout.gpu_memory_utilization: must be in (0, 1), got "
                          f"{cfg.rollout.gpu_memory_utilization}")
    for sec in _SECTIONS.values():
        if sec.validate is not None:
            sec.validate(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys (``{"train": {"seed": 0}}`` → ``{"train.seed": 0}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
