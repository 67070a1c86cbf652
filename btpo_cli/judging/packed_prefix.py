"""``train.packing`` for the rollout methods: each prompt ONCE with its K continuations, packed in rows.

The rows a rollout method scores come in groups that share a prompt (a BTPO response's K thoughts, a
GRPO query's G completions; :func:`~btpo_cli.judging.logprobs.prefix_groups`). The packed layout puts a
group in one stretch of a row — the prompt's ``P`` tokens once, then its continuations (thought +
tail) one after the other — with

- position ids ``0 … P-1`` for the prompt and ``P … P+T_k-1`` for every continuation ``k`` (each
  continuation sits where it sits in its own unpacked sequence), and
- a dense boolean attention mask ``(R, 1, L, L)``: a prompt token attends to the prompt causally, a
  continuation token to the whole prompt and to its own continuation causally, nothing else.

So every continuation sees exactly what it sees alone, and the prompt's activations exist once: the
gradients of the K continuations meet in the prompt's tokens as in K separate forwards (the same
sums, in another order). Several groups share a row (block-diagonal) while the row stays within
``row_tokens`` (default: the longest group, so packing never lengthens the attention of a row);
rows are left-padded, a padding token attends to itself only (no empty softmax row).

The mask goes to the model as a 4D tensor, which transformers' ``masking_utils`` passes through
untouched to the ``sdpa`` / ``eager`` attention; that is why :func:`packing_blocker` wants one of
those and full-attention layers only (a sliding window or a linear-attention / SSM layer would not
honour a custom mask). Measured alternatives and the GPU story: docs/packing-prefix.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NOT_PACKABLE = "a row has no prompt or no continuation"
"""Not a blocker of the model: the batch itself has nothing to pack (``auto`` and ``on`` fall back)."""

MASK_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take a custom dense 4D mask as is."""


@dataclass
class PackedRows:
    """The packed layout of N scored sequences (see the module docstring)."""

    ids: torch.Tensor
    """(R, L) token ids (left padding: the first id of the batch; masked out)."""
    pos: torch.Tensor
    """(R, L) position ids."""
    mask: torch.Tensor
    """(R, 1, L, L) bool, True where a query (row 2) may attend to a key (row 3)."""
    cols: torch.Tensor
    """(N, 1 + C) flat positions ``r · L + l``: column 0 the prompt's last token, column ``1 + j`` the
    continuation's ``j``-th column, continuations left-padded to C (padding columns repeat column 0)."""
    last: torch.Tensor
    """(N,) flat position of each continuation's last token (the p(Yes) position)."""
    cids: torch.Tensor
    """(N, C) continuation ids, left-padded like :attr:`cols`."""

    @property
    def c(self) -> int:
        return int(self.cids.shape[1])


def pack_prefix_groups(ids: torch.Tensor, mask: torch.Tensor, n_thought: torch.Tensor, n_tail: torch.Tensor,
                       group: list[int], row_tokens: int | None = None) -> PackedRows | str:
    """The packed layout of N left-padded sequences ``ids`` / ``mask`` (N, T) whose last
    ``n_thought + n_tail`` tokens are the continuation, rows of the same ``group`` sharing the prompt
    before it; or :data:`NOT_PACKABLE`."""
    n, t = ids.shape
    lens = mask.sum(-1).tolist()
    clen = (n_thought + n_tail).tolist()
    plen = [ln - c for ln, c in zip(lens, clen, strict=True)]
    if n == 0 or min(clen) <= 0 or min(plen) <= 0:
        return NOT_PACKABLE
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group):
        members.setdefault(g, []).append(i)
    size = {g: plen[rows[0]] + sum(clen[i] for i in rows) for g, rows in members.items()}
    cap = max(row_tokens or 0, max(size.values()))
    bins: list[list[int]] = []                                   # first fit, longest group first
    room: list[int] = []
    for g in sorted(members, key=lambda g: (-size[g], g)):
        b = next((j for j, r in enumerate(room) if r >= size[g]), None)
        if b is None:
            bins.append([])
            room.append(cap)
            b = len(bins) - 1
        bins[b].append(g)
        room[b] -= size[g]
    width = max(cap - r for r in room)
    pad = int(ids[0, 0])
    r_ids = torch.full((len(bins), width), pad, dtype=torch.long)
    r_pos = torch.zeros((len(bins), width), dtype=torch.long)
    seg = -1 - torch.arange(len(bins) * width).view(len(bins), width)   # padding: a segment of its own
    part = torch.zeros((len(bins), width), dtype=torch.long)
    c = max(clen)
    cols = torch.zeros((n, 1 + c), dtype=torch.long)
    cids = torch.full((n, c), pad, dtype=torch.long)
    last = torch.zeros(n, dtype=torch.long)
    for r, gs in enumerate(bins):
        at = width - (cap - room[r])                                 # left padding
        for g in gs:
            rows = members[g]
            h, p = rows[0], plen[rows[0]]
            b = t - lens[h]
            r_ids[r, at:at + p] = ids[h, b:b + p]
            r_pos[r, at:at + p] = torch.arange(p)
            seg[r, at:at + size[g]] = g
            plast = r * width + at + p - 1
            at += p
            for k, i in enumerate(rows):
                ck = clen[i]
                r_ids[r, at:at + ck] = ids[i, t - ck:]
                r_pos[r, at:at + ck] = torch.arange(p, p + ck)
                part[r, at:at + ck] = k + 1
                cols[i] = plast
                cols[i, 1 + c - ck:] = r * width + at + torch.arange(ck)
                cids[i, c - ck:] = ids[i, t - ck:]
                last[i] = r * width + at + ck - 1
                at += ck
    ar = torch.arange(width)
    m = (seg[:, :, None] == seg[:, None, :]) & (ar[None, :, None] >= ar[None, None, :]) \
        & ((part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :]))
    return PackedRows(r_ids, r_pos, m[:, None], cols, last, cids)


def packing_blocker(model: Any) -> str | None:
    """Why the packed layout does not apply to ``model`` (None when it does): it needs an attention
    implementation that takes a dense 4D mask as is (:data:`MASK_ATTENTION`) and full-attention
    layers only. Gradient checkpointing is fine (one plain forward, no cache)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):   # DDP / accelerate
        model = model.module
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "the model has no transformers config"
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    impl = getattr(text, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", None)
    if impl not in MASK_ATTENTION:
        return f"attn_implementation {impl!r} cannot take the prompt-sharing mask (needs sdpa or eager)"
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False:
        return f"{text.model_type} has sliding-window attention layers"
    if any(t != "full_attention" for t in (getattr(text, "layer_types", None) or [])):
        return f"{text.model_type} has layers other than full attention"
    return None


def additive_mask(mask: torch.Tensor, model: Any, device: Any) -> torch.Tensor:
    """The bool mask as an additive one (0 / the dtype's minimum) in the model's dtype: SDPA then saves
    this one tensor for the backward of every layer (a bool mask it turns into a float copy per layer,
    ``R·L²·4`` bytes each), and eager attention adds it as it adds its own masks. Masked keys get
    ``exp(min − max) = 0``: the same weights as with the bool mask."""
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    out = torch.zeros(mask.shape, dtype=dtype, device=device)
    return out.masked_fill_(~mask.to(device), torch.finfo(dtype).min)


def packed_forward(model: Any, rows: PackedRows, device: Any, hidden: bool) -> tuple[torch.Tensor, ...]:
    """One forward of the packed rows: ``(feats (M, V|H), last-position logits (N, V), continuation ids
    (N, C), C, cols (N, 1 + C))`` with ``cols`` indexing ``feats``'s rows like :attr:`PackedRows.cols`.

    Only the columns some sequence reads go through the LM head (``logits_to_keep`` as a tensor of
    columns, the union over rows); with ``hidden`` (``train.chunked_logprobs``) the thought positions
    are read from the final hidden states and the head runs on the p(Yes) columns only."""
    r, width = rows.ids.shape
    cols, last = rows.cols.to(device), rows.last.to(device)
    need = torch.unique(last % width) if hidden else torch.unique(torch.cat([cols.flatten(), last]) % width)
    out = model(input_ids=rows.ids.to(device), attention_mask=additive_mask(rows.mask, model, device),
                position_ids=rows.pos.to(device), use_cache=False, logits_to_keep=need,
                output_hidden_states=hidden)
    at = torch.full((width,), -1, dtype=torch.long, device=device)
    at[need] = torch.arange(len(need), device=device)                      # column → kept column

    def kept(flat: torch.Tensor) -> torch.Tensor:                           # r·L + l → r·|need| + kept(l)
        return flat // width * len(need) + at[flat % width]

    logits = out.logits.reshape(r * len(need), -1)
    if hidden:
        feats = out.hidden_states[-1].reshape(r * width, -1)
    else:
        feats, cols = logits, kept(cols)
    return feats, logits[kept(last)], rows.cids.to(device), rows.c, cols
