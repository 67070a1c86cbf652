"""Loading models and tokenizers by alias, Hub id or folder (aliases: :mod:`btpo_cli.models.aliases`).

transformers and torch are imported inside the loaders: the CLI and the config load without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from btpo_cli.console import quiet_transformers
from btpo_cli.errors import BtpoError
from btpo_cli.models.aliases import resolve_model
from btpo_cli.models.inputs import with_pad_token
from btpo_cli.models.lora import apply_lora, quantization_config, require_peft


def _load_error(name: str, e: Exception) -> BtpoError:
    first = str(e).splitlines()[0][:240] if str(e) else type(e).__name__
    hint = "" if Path(name).exists() else " (no local folder of that name; is the Hub reachable and the id right?)"
    return BtpoError(f"could not load model '{name}': {first}{hint}")


def load_tokenizer(name: str, padding_side: str = "right") -> Any:
    """Load the tokenizer of an alias, Hub id or folder, with a pad token (:func:`~btpo_cli.models.inputs.with_pad_token`)."""
    from transformers import AutoTokenizer  # heavy: imported on use

    quiet_transformers()
    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - converted to a one-line error
        raise _load_error(name, e) from e
    return with_pad_token(tok, padding_side)


def torch_dtype(dtype: str, device_type: str) -> Any:
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float32":
        return torch.float32
    # auto: fp32 master weights everywhere (bf16 autocast on GPU comes from the accelerator).
    return torch.float32


def _common_kwargs(model_cfg: Any, device_type: str, inference: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": model_cfg.trust_remote_code}
    dtype = torch_dtype(model_cfg.dtype, device_type)
    if inference and device_type == "cuda" and model_cfg.dtype == "auto":
        dtype = torch.bfloat16
    kw["dtype"] = dtype
    if model_cfg.attn_implementation:
        kw["attn_implementation"] = model_cfg.attn_implementation
    return kw


def load_causal_lm(model_cfg: Any, device_type: str = "cpu", inference: bool = False,
                   path: str | None = None, **extra: Any) -> Any:
    """A causal LM (the GPM policy). bf16 for inference on GPU; fp32 master weights for training."""
    from transformers import AutoModelForCausalLM  # heavy: imported on use

    src = path or resolve_model(model_cfg.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **_common_kwargs(model_cfg, device_type, inference), **extra)
    except Exception as e:  # noqa: BLE001
        raise _load_error(src, e) from e
    if model_cfg.gradient_checkpointing and not inference:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def load_reward_model(model_cfg: Any, pad_token_id: int, device_type: str = "cpu", inference: bool = False,
                      path: str | None = None, **extra: Any) -> Any:
    """The backbone with a one-label scalar head (``AutoModelForSequenceClassification``)."""
    from transformers import AutoModelForSequenceClassification  # heavy: imported on use

    src = path or resolve_model(model_cfg.name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            src, num_labels=1, **_common_kwargs(model_cfg, device_type, inference), **extra)
    except Exception as e:  # noqa: BLE001
        raise _load_error(src, e) from e
    model.config.pad_token_id = pad_token_id
    if model_cfg.gradient_checkpointing and not inference:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def load_policy(model_cfg: Any, kind: str, pad_token_id: int, device: Any) -> Any:
    """The model a run trains: causal LM (``kind="causal"``) or scalar-head model (``"reward"``),
    wrapped in a LoRA adapter when ``model.lora.r > 0`` (4-bit NF4 base with ``load_in_4bit``)."""
    lora = model_cfg.lora
    extra: dict[str, Any] = {}
    if lora.r and lora.load_in_4bit:
        require_peft()
        extra = {"quantization_config": quantization_config(lora, device.type), "device_map": {"": device}}
    if kind == "causal":
        model = load_causal_lm(model_cfg, device.type, **extra)
    else:
        model = load_reward_model(model_cfg, pad_token_id, device.type, **extra)
    if lora.r:
        model = apply_lora(model, lora, kind, model_cfg.gradient_checkpointing)
    return model
