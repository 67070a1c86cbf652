"""What a model is fed: padded batches, position ids, and a tokenizer with a usable pad token.

One padding helper for every path (rollout engines, GPM scoring, GRAM, BT's scalar head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, device: Any, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) ragged → input_ids, attention_mask (N, T_max), padded on the right (or on the left)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        cols = slice(t - len(s), t) if left else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) ragged → input_ids, attention_mask (N, T), padded on the left."""
    return pad_batch(seqs, pad_id, device, left=True)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: (N, T) → (N, T)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def with_pad_token(tok: Any, padding_side: str = "right") -> Any:
    """Give ``tok`` a pad token distinct from the chat end token when the vocabulary has one."""
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
