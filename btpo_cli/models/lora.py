"""LoRA / QLoRA adapters (peft): building the adapted policy, its reference, and its merged weights.

- :func:`apply_lora` wraps a loaded transformers model in a peft ``LoraConfig`` adapter
  (``model.lora.*``); a scalar head (BT's ``score``) is trained and saved in full
  (``modules_to_save``).
- :class:`AdapterDisabled` is the KL reference: the same module with the adapter switched off,
  i.e. exactly the base model, without a second copy of the weights.
- :func:`merged_weights` turns a stream of the adapted model's (peft name, full tensor) into the
  base model's (checkpoint name, ``W + (alpha/r) B A``): what an engine's weight sync receives and
  what ``final/`` holds, so plain transformers (and vLLM) load it without peft.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from btpo_cli.errors import BtpoError

PEFT_PREFIX = "base_model.model."


def require_peft() -> Any:
    try:
        import peft  # optional extra: imported on use
    except ImportError as e:
        raise BtpoError("model.lora.r > 0 needs peft: pip install 'btpo[peft]' (or pip install peft)") from e
    return peft


def quantization_config(lora: Any, device_type: str) -> Any:
    """``BitsAndBytesConfig`` for 4-bit NF4 base weights (QLoRA), or a one-line error where it cannot run."""
    if device_type != "cuda":
        raise BtpoError("model.lora.load_in_4bit: 4-bit base weights need a CUDA GPU (bitsandbytes); "
                        "on this machine use model.lora.load_in_4bit=false")
    try:
        import bitsandbytes  # optional: probed before transformers needs it  # noqa: F401
    except ImportError as e:
        raise BtpoError("model.lora.load_in_4bit needs bitsandbytes: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig  # heavy: imported on use

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)


def apply_lora(model: Any, lora: Any, kind: str, gradient_checkpointing: bool = False) -> Any:
    """Wrap ``model`` (causal LM or scalar-head model) in a trainable LoRA adapter; the base is frozen."""
    peft = require_peft()
    if getattr(model, "is_loaded_in_4bit", False):
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()       # frozen embeddings: checkpointed blocks still need a grad input
    target = lora.target_modules
    conf = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        task_type="SEQ_CLS" if kind == "reward" else "CAUSAL_LM",
        modules_to_save=["score"] if kind == "reward" else None)
    try:
        return peft.get_peft_model(model, conf)
    except ValueError as e:
        raise BtpoError(f"model.lora.target_modules={target!r}: {str(e).splitlines()[0][:200]}") from e


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel  # optional extra: imported on use
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def scaling(model: Any) -> float:
    """``alpha / r`` of the active adapter (peft's scaling without rsLoRA)."""
    conf = model.peft_config[model.active_adapter]
    if getattr(conf, "use_rslora", False):
        return conf.lora_alpha / conf.r ** 0.5
    return conf.lora_alpha / conf.r


def merged_weights(named: Iterable[tuple[str, torch.Tensor]], scale: float,
                   adapter: str = "default") -> Iterator[tuple[str, torch.Tensor]]:
    """peft state-dict stream → the base model's names with the adapter merged in.

    ``…q_proj.base_layer.weight``, ``…q_proj.lora_A.<adapter>.weight`` and ``…lora_B…`` (consecutive
    in a state dict) become one ``…q_proj.weight = W + scale · B @ A`` (computed in fp32, returned in
    W's dtype); ``…base_layer.bias`` → ``…bias``; ``score.modules_to_save.<adapter>.*`` →
    ``score.*`` (its frozen ``original_module`` copy is dropped). New tensors: the model's own are
    never modified (no merge/unmerge round trip that would drift the bf16 weights)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in named:
        n = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        part = None
        if n.endswith(".base_layer.weight"):
            part, prefix = "W", n[:-len(".base_layer.weight")]
        elif n.endswith(f".lora_A.{adapter}.weight"):
            part, prefix = "A", n[:-len(f".lora_A.{adapter}.weight")]
        elif n.endswith(f".lora_B.{adapter}.weight"):
            part, prefix = "B", n[:-len(f".lora_B.{adapter}.weight")]
        if part is not None:
            d = pending.setdefault(prefix, {})
            d[part] = t
            if len(d) == 3:
                w = d["W"]
                merged = w.float() + scale * (d["B"].float() @ d["A"].float())
                yield prefix + ".weight", merged.to(w.dtype)
                del pending[prefix]
            continue
        if ".lora_" in n:
            raise BtpoError(f"cannot merge adapter weight {name!r} (only LoRA on linear layers is supported)")
        if ".original_module." in n:
            continue
        yield n.replace(f".modules_to_save.{adapter}.", ".").replace(".base_layer.", "."), t
    if pending:
        raise BtpoError(f"incomplete LoRA weights for {sorted(pending)[:3]} (base, lora_A and lora_B expected)")


class AdapterDisabled:
    """The KL reference of a LoRA policy: calls the policy with its adapter switched off.

    ``with model.disable_adapter()`` skips every LoRA branch, so the forward is the frozen base
    model's, bit for bit, with no second copy of the weights. Only for no-grad scoring."""

    def __init__(self, peft_model: Any):
        self.peft_model = peft_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.peft_model.parameters()

    def eval(self) -> AdapterDisabled:
        return self


def dequantized_state(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """A 4-bit (QLoRA) model's state as full-precision tensors: NF4 weights dequantized to bf16.

    Walks parameters and persistent buffers rather than ``state_dict()``, whose 4-bit entries are
    packed bytes plus quantization-state keys."""
    import bitsandbytes.functional as bnbf  # optional extra: imported on use

    for name, p in model.named_parameters():
        if type(p).__name__ == "Params4bit":
            yield name, bnbf.dequantize_4bit(p.data, p.quant_state).to(torch.bfloat16)
        else:
            yield name, p.detach()
    persistent = set(model.state_dict().keys())
    for name, b in model.named_buffers():
        if name in persistent:
            yield name, b


def dequantized_state_shapes(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`dequantized_state`'s names with ``meta`` tensors of its shapes and dtypes."""
    for name, p in model.named_parameters():
        if type(p).__name__ == "Params4bit":
            yield name, torch.empty(tuple(p.quant_state.shape), dtype=torch.bfloat16, device="meta")
        else:
            yield name, torch.empty(tuple(p.shape), dtype=p.dtype, device="meta")
    persistent = set(model.state_dict().keys())
    for name, b in model.named_buffers():
        if name in persistent:
            yield name, torch.empty(tuple(b.shape), dtype=b.dtype, device="meta")
