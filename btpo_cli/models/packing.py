"""Padding-free batches: several sequences in one row, attention that never crosses sequences.

``train.packing`` (docs/packing.md). A micro-batch's N sequences are concatenated into rows of at
most ``budget`` tokens (one row when no budget), each sequence with its own position ids
``0..L_i-1``. The attention of a row is computed per sequence:

* ``btpo_packed`` (CPU, and CUDA without flash-attention): an attention function registered with
  transformers that runs causal SDPA on each sequence's slice of q/k/v — Σ L_i² work, never the
  (T × T) block mask of a whole row, no padding; the mask builder returns ``None``.
* ``flash_attention_2`` / ``_3`` (CUDA): the model's own varlen kernel, fed ``cu_seq_lens_*``.

Unpacking: the scalar head's score at each sequence's last token (BT), the LM head's logits at each
sequence's last token (GRAM, ``logits_to_keep`` = their indices), per-token log-probs of each
sequence. The outputs equal the padded path's up to float rounding: the same products summed in
another blocking (tests/invariants/tolerances.py ``PACKING``).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from btpo_cli.errors import BtpoError

IMPL = "btpo_packed"
VARLEN = ("flash_attention_2", "flash_attention_3")
_BOUNDS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("btpo_pack_bounds", default=None)


@dataclass
class Row:
    """One packed row: ``seqs`` (indices into the caller's list) laid end to end."""

    seqs: list[int]
    input_ids: torch.Tensor      # (1, T)
    position_ids: torch.Tensor   # (1, T)
    bounds: list[int]            # [0, L_0, L_0 + L_1, …, T]

    @property
    def last(self) -> list[int]:
        """Index in the row of each sequence's last token."""
        return [b - 1 for b in self.bounds[1:]]


def rows_of(lengths: Sequence[int], budget: int | None = None) -> list[list[int]]:
    """Group sequence indices into rows of ≤ ``budget`` tokens, in order (a sequence over it goes alone)."""
    out: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if cur and budget is not None and used + n > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return out + [cur] if cur else out


def pack(seqs: Sequence[Sequence[int]], device: Any, budget: int | None = None) -> list[Row]:
    """Pack ragged token lists into rows (every sequence non-empty)."""
    out = []
    for idx in rows_of([len(s) for s in seqs], budget):
        flat = [t for i in idx for t in seqs[i]]
        pos = [p for i in idx for p in range(len(seqs[i]))]
        bounds = [0]
        for i in idx:
            bounds.append(bounds[-1] + len(seqs[i]))
        out.append(Row(idx, torch.tensor([flat], dtype=torch.long, device=device),
                       torch.tensor([pos], dtype=torch.long, device=device), bounds))
    return out


def packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal SDPA per sequence of the packed row: (1, H, T, D) → (1, T, H, D)."""
    from transformers.integrations import sdpa_attention  # heavy: imported on use

    bounds = _BOUNDS.get()
    if bounds is None:                       # an ordinary (padded) forward through this implementation
        return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = sdpa_attention.repeat_kv(key, groups), sdpa_attention.repeat_kv(value, groups)
    drop = dropout if module.training else 0.0
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=drop, scale=scaling, is_causal=True)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def _register() -> None:
    from transformers import AttentionInterface  # heavy: imported on use
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # heavy: imported on use

    AttentionInterface.register(IMPL, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL, _no_mask)


def _configs(model: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation"):
            seen.setdefault(id(c), c)
    return list(seen.values())


def blocker(model: Any) -> str | None:
    """Why packing cannot run on ``model`` (None when it can)."""
    configs = _configs(model)
    if not configs:
        return "the model has no transformers config"
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return "gradient checkpointing (the recomputed forward would not see the packed rows)"
    for c in configs:
        if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True):
            return "sliding-window attention"
        if getattr(c, "_attn_implementation", None) not in ("sdpa", "eager", None, IMPL, *VARLEN):
            return f"attn_implementation={c._attn_implementation!r}"
    return None


@contextmanager
def attending(model: Any, row: Row) -> Iterator[dict[str, Any]]:
    """Run the model's forwards inside on ``row``: yields the extra forward kwargs (varlen)."""
    configs = _configs(model)
    impl = configs[0]._attn_implementation
    if impl in VARLEN:
        cu = torch.tensor(row.bounds, dtype=torch.int32, device=row.input_ids.device)
        longest = max(b - a for a, b in zip(row.bounds[:-1], row.bounds[1:], strict=True))
        yield {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        return
    _register()
    old = [c._attn_implementation for c in configs]
    token = _BOUNDS.set(row.bounds)
    try:
        for c in configs:
            c._attn_implementation = IMPL
        yield {}
    finally:
        _BOUNDS.reset(token)
        for c, o in zip(configs, old, strict=True):
            c._attn_implementation = o


def _score_module(model: Any) -> Any:
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] == "score":
            return m
    raise ValueError("packing: the sequence-classification model has no 'score' head")


def rewards(model: Any, seqs: Sequence[Sequence[int]], device: Any, budget: int | None = None) -> torch.Tensor:
    """Scalar-head outputs at each sequence's last token, packed: (N,) float32 (BT's ``rewards``)."""
    head = _score_module(model)
    got: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, _i, o: got.append(o))
    parts: list[tuple[list[int], torch.Tensor]] = []
    try:
        for row in pack(seqs, device, budget):
            got.clear()
            with attending(model, row) as kw:
                model(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False, **kw)
            parts.append((row.seqs, got[-1][0, row.last, 0]))
    finally:
        hook.remove()
    out = torch.cat([v for _, v in parts]).float()
    order = torch.tensor([i for s, _ in parts for i in s], device=out.device)
    return out[torch.argsort(order)]


def last_logits(model: Any, seqs: Sequence[Sequence[int]], device: Any, budget: int | None = None) -> torch.Tensor:
    """LM-head logits at each sequence's last token, packed: (N, V) (GRAM's generation head)."""
    parts: list[tuple[list[int], torch.Tensor]] = []
    for row in pack(seqs, device, budget):
        keep = torch.tensor(row.last, device=row.input_ids.device)
        with attending(model, row) as kw:
            logits = model(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False,
                           logits_to_keep=keep, **kw).logits[0]                  # (n, V)
        parts.append((row.seqs, logits))
    out = torch.cat([v for _, v in parts])
    order = torch.tensor([i for s, _ in parts for i in s], device=out.device)
    return out[torch.argsort(order)]


def token_logprobs(model: Any, seqs: Sequence[Sequence[int]], device: Any,
                   budget: int | None = None) -> list[torch.Tensor]:
    """log p(token t | tokens < t) for t = 1..L_i-1 of each sequence, packed: N tensors (L_i - 1,)."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for row in pack(seqs, device, budget):
        with attending(model, row) as kw:
            logits = model(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False, **kw).logits[0]
        logp = torch.log_softmax(logits[:-1].float(), dim=-1).gather(-1, row.input_ids[0, 1:, None])[:, 0]
        for i, a, b in zip(row.seqs, row.bounds[:-1], row.bounds[1:], strict=True):
            out[i] = logp[a:b - 1]           # the last token of a sequence predicts the next one's first
    return [t for t in out if t is not None]


def resolve(setting: str, model: Any) -> bool:
    """``train.packing`` → pack or not for ``model``: ``on`` raises where it cannot, ``auto`` falls back."""
    if setting == "off":
        return False
    why = blocker(model)
    if why and setting == "on":
        raise BtpoError(f"train.packing=on: {why}; use 'auto' or 'off'")
    return why is None
