"""Architecture numbers of a backbone, for the memory planner (``btpo plan``).

:func:`model_shape` reads them from the model's ``config.json``: a local folder's own, a tiny
model's (built locally on first use), or — because no Hub is reachable from where plans are
made — one of the small JSON files shipped next to this module for the paper backbones and the
small models (``qwen2.5-{0.5b,3b,7b}``, ``llama3.2-3b``, ``llama3.1-8b``, ``smollm2-135m``). Those
files copy the published ``config.json`` numbers (hidden size, layers, heads, KV heads, head dim,
intermediate size, vocabulary, tied embeddings); an alias or its Hub id finds them.

Parameter counts follow the Llama/Qwen2 decoder exactly (the shipped shapes reproduce the
published totals: Qwen2.5-7B 7.62 B, Llama-3.1-8B 8.03 B, … — ``tests/plan/test_plan.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from btpo_cli.errors import BtpoError
from btpo_cli.models.aliases import resolve_model

HERE = Path(__file__).resolve().parent

Head = Literal["causal", "reward"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """A Llama/Qwen2-style decoder: embedding, ``layers`` × (attention + SwiGLU MLP), norm, head."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    """``tie_word_embeddings``: the LM head is the embedding matrix (no separate parameters)."""
    qkv_bias: bool
    """Qwen2 has biases on q/k/v; Llama has ``attention_bias`` (false in every Llama 3)."""
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in features, out features) of each linear of one decoder layer."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params_per_layer(self) -> int:
        """Weights (and biases) of the seven linears of one layer."""
        n = sum(a * b for a, b in self.linear_shapes().values())
        if self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.mlp_bias:
            n += 2 * self.intermediate + self.hidden
        return n

    def layer_params(self) -> int:
        """One decoder layer: the linears and two RMSNorm weights."""
        return self.linear_params_per_layer() + 2 * self.hidden

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self, head: Head) -> int:
        """The output head: the LM head (0 when tied) or the one-label score head (no bias)."""
        if head == "reward":
            return self.hidden
        return 0 if self.tied else self.vocab * self.hidden

    def params(self, head: Head = "causal") -> int:
        """Every parameter: embedding, layers, final norm, head."""
        return self.embed_params() + self.layers * self.layer_params() + self.hidden + self.head_params(head)

    def largest_unit(self, head: Head = "causal") -> int:
        """Parameters of the largest block a sharded strategy gathers at once (a layer or the embedding/head)."""
        return max(self.layer_params(), self.embed_params(), self.head_params(head))


def from_config(name: str, cfg: dict[str, Any], source: str = "config.json") -> ModelShape:
    """Read the numbers the planner needs from a ``config.json`` mapping (a one-line error if one is missing)."""
    text = cfg.get("text_config")
    if isinstance(text, dict):     # multimodal wrappers keep the decoder's numbers in text_config
        cfg = {**cfg, **text}

    def need(key: str) -> int:
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise BtpoError(f"{source}: field '{key}' is missing or not a positive integer ({v!r})")
        return v

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    model_type = str(cfg.get("model_type", ""))
    qkv_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
    return ModelShape(name=name, model_type=model_type, hidden=hidden, layers=need("num_hidden_layers"),
                      heads=heads, kv_heads=int(kv), head_dim=int(head_dim),
                      intermediate=need("intermediate_size"), vocab=need("vocab_size"),
                      tied=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
                      mlp_bias=bool(cfg.get("mlp_bias", False)))


def known_shapes() -> dict[str, Path]:
    """Alias → shipped JSON file."""
    return {p.stem: p for p in sorted(HERE.glob("*.json"))}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BtpoError(f"{path}: cannot read the model's config ({e})") from e
    if not isinstance(data, dict):
        raise BtpoError(f"{path}: a model config must be a JSON object")
    return data


def model_shape(name: str) -> ModelShape:
    """Shape of ``name``: a local folder (its config.json), a tiny model, a shipped alias or its Hub id."""
    p = Path(name)
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.exists():
            raise BtpoError(f"{p}: no config.json in this model folder")
        return from_config(name, _read(cfg_path), str(cfg_path))
    if p.suffix == ".json" and p.is_file():
        return from_config(name, _read(p), str(p))
    known = known_shapes()
    if name in known:
        return from_config(name, _read(known[name]), str(known[name]))
    for alias, path in known.items():       # a Hub id: the Instruct model or its base (same architecture)
        data = _read(path)
        hub = str(data.get("_hub_id", "")).lower()
        if hub and name.lower() in (hub, hub.removesuffix("-instruct")):
            return from_config(alias, data, str(path))
    if name.startswith("tiny-"):
        folder = Path(resolve_model(name))
        return from_config(name, _read(folder / "config.json"), str(folder / "config.json"))
    raise BtpoError(f"model '{name}': no shape known offline — pass a local model folder (its config.json) "
                    f"or one of: {', '.join(known)}")
