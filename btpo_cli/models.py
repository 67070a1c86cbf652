"""Model aliases and loading.

``btpo models`` lists the aliases. Any other name is taken as a local path or a Hub id.
``tiny-*`` models are built locally on first use (see :mod:`btpo_cli.tiny`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btpo_cli.errors import BtpoError


@dataclass(frozen=True)
class ModelAlias:
    alias: str
    hub_id: str
    family: str
    note: str


ALIASES: dict[str, ModelAlias] = {a.alias: a for a in [
    ModelAlias("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", "qwen2", "paper backbone"),
    ModelAlias("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "qwen2", "paper backbone"),
    ModelAlias("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", "llama3", "paper backbone (gated on the Hub)"),
    ModelAlias("llama3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "llama3", "paper backbone (gated on the Hub)"),
    ModelAlias("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", "small, for benchmarks and smoke runs"),
    ModelAlias("tiny-qwen2", "(built locally)", "qwen2", "2 layers, 64 wide, local tokenizer: tests and demo"),
    ModelAlias("tiny-llama", "(built locally)", "llama3", "2 layers, 64 wide, local tokenizer: tests"),
    ModelAlias("tiny-thinker", "(pre-trained locally)", "qwen2",
               "3 layers, 96 wide, pre-trained on CPU to think a little about the synthetic task (demo); "
               "tiny-thinker-s<N>: pre-training seed N"),
]}


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
    if name in ALIASES:
        return ALIASES[name].hub_id
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
                   path: str | None = None) -> Any:
    """A causal LM (the GPM policy). bf16 for inference on GPU; fp32 master weights for training."""
    from transformers import AutoModelForCausalLM

    src = path or resolve_model(model_cfg.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **_common_kwargs(model_cfg, device_type, inference))
    except Exception as e:  # noqa: BLE001
        raise _load_error(src, e) from e
    if model_cfg.gradient_checkpointing and not inference:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def load_reward_model(model_cfg: Any, pad_token_id: int, device_type: str = "cpu", inference: bool = False,
                      path: str | None = None) -> Any:
    """The backbone with a one-label scalar head (``AutoModelForSequenceClassification``)."""
    from transformers import AutoModelForSequenceClassification

    src = path or resolve_model(model_cfg.name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            src, num_labels=1, **_common_kwargs(model_cfg, device_type, inference))
    except Exception as e:  # noqa: BLE001
        raise _load_error(src, e) from e
    model.config.pad_token_id = pad_token_id
    if model_cfg.gradient_checkpointing and not inference:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model
