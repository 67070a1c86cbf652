"""The dialog-based generative preference model (METHOD.md §2): sequences and one-pass scoring.

A scored sequence is ``prefix + thought + tail`` where ``prefix`` ends at the generation head of
the thought turn, ``thought`` is what the policy sampled (its end-of-turn token included when it
stopped on it) and ``tail`` closes the thought turn, asks the rating question and opens the
answer turn. ONE forward pass over it gives

- the per-token log-probabilities of the thought tokens (the policy term ``log π(z | x, y)``), and
- ``log p(Yes | x, y, z)`` from the next-token distribution at the last position,

for the no-grad rollout pass (old log-probs, weights) and the training pass alike.

The thought's log-probabilities include its end-of-turn token when it has one, so that π is a
proper distribution over thoughts of at most ``max_thought_tokens`` tokens. They are computed at
the sampling temperature (``logits / T``), the distribution the thoughts were drawn from; at
``T = 1`` that is π itself. ``p(Yes)`` always uses the raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from btpo_cli.engines.base import Sample
from btpo_cli.judging.templates import GPMPrompt
from btpo_cli.models.inputs import left_pad, positions


@dataclass
class ThoughtSeq:
    ids: list[int]
    """prefix + thought + tail."""
    n_thought: int
    """Thought tokens (scored by the policy term), directly before the tail."""
    n_tail: int


def thought_sequence(prompt: GPMPrompt, sample: Sample | list[int], eot_id: int) -> ThoughtSeq:
    """Join a GPM prompt and a sampled thought. A thought that ended on the end-of-turn token
    shares it with the tail (the tail's first token); a cut-off thought gets the whole tail."""
    toks = sample.token_ids if isinstance(sample, Sample) else list(sample)
    tail = prompt.suffix
    if toks and toks[-1] == eot_id and tail and tail[0] == eot_id:
        tail = tail[1:]
    return ThoughtSeq(prompt.prefix + toks + tail, len(toks), len(tail))


@dataclass
class SeqBatch:
    """N sequences to score as ONE left-padded tensor, kept from the rollout to the loss.

    Built once per rollout (:meth:`from_seqs`); a micro-batch is :meth:`select` of its rows (only
    the columns some selected row uses are kept), so nothing is re-padded from Python lists at
    every micro-step.
    """

    ids: torch.Tensor
    """(N, T) token ids, left-padded with the pad id."""
    mask: torch.Tensor
    """(N, T) 1 for real tokens."""
    n_thought: torch.Tensor
    """(N,) thought tokens, directly before the tail."""
    n_tail: torch.Tensor
    """(N,) tail tokens at the end."""

    @classmethod
    def from_seqs(cls, seqs: list[ThoughtSeq], pad_id: int) -> SeqBatch:
        ids, mask = left_pad([s.ids for s in seqs], pad_id, "cpu")
        return cls(ids, mask, torch.tensor([s.n_thought for s in seqs]), torch.tensor([s.n_tail for s in seqs]))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, rows: list[int] | torch.Tensor) -> SeqBatch:
        """The given rows, without the leading columns that are padding in all of them."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        mask = self.mask[idx]
        first = int((mask.shape[1] - mask.sum(-1)).min()) if len(idx) else 0
        return SeqBatch(self.ids[idx, first:], mask[:, first:], self.n_thought[idx], self.n_tail[idx])

    @property
    def max_thought(self) -> int:
        return int(self.n_thought.max()) if len(self) else 0


@dataclass
class Scores:
    logp: torch.Tensor
    """(N, Tz) log-probabilities of the thought tokens (0 where masked)."""
    mask: torch.Tensor
    """(N, Tz) 1 for thought tokens."""
    logp_yes: torch.Tensor
    """(N,) log p(Yes | x, y, z)."""
    yes_no_mass: torch.Tensor | None = None
    """(N,) p(Yes) + p(No) under the full-vocabulary softmax (detached): how well the judge keeps the format."""


def score_thoughts(model: Any, seqs: SeqBatch | list[ThoughtSeq], yes_id: int, no_id: int, pad_id: int,
                   yes_no_normalize: bool = False, temperature: float = 1.0) -> Scores:
    """One forward over N sequences → thought log-probs and log p(Yes). Grad flows if enabled.

    Sequences are left-padded so that their tails align at the end; only the last
    ``max(n_thought + n_tail) + 1`` positions go through the LM head (``logits_to_keep``).
    """
    if not isinstance(seqs, SeqBatch):
        seqs = SeqBatch.from_seqs(seqs, pad_id)
    device = next(model.parameters()).device
    ids, mask = seqs.ids.to(device), seqs.mask.to(device)                        # (N, T)
    n, t = ids.shape
    n_th, n_tl = seqs.n_thought.to(device), seqs.n_tail.to(device)               # (N,), (N,)
    keep = min(int((seqs.n_thought + seqs.n_tail).max()) + 1, t)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                logits_to_keep=keep)
    logits = out.logits                                                          # (N, keep, V)
    tz = max(1, seqs.max_thought)
    start_abs = t - n_tl - n_th                                                  # (N,) first thought token
    ar = torch.arange(tz, device=device)
    tok_abs = (start_abs[:, None] + ar[None, :]).clamp(max=t - 1)                # (N, Tz)
    zmask = ar[None, :] < n_th[:, None]                                          # (N, Tz)
    rel = (tok_abs - 1 - (t - keep)).clamp(min=0, max=keep - 1)                  # logits predicting the token
    sel = _upcast(logits[torch.arange(n, device=device)[:, None], rel])         # (N, Tz, V)
    if temperature != 1.0:
        sel = sel / temperature
    tok = ids.gather(1, tok_abs)                                                 # (N, Tz)
    logp = sel.gather(-1, tok[..., None]).squeeze(-1) - torch.logsumexp(sel, dim=-1)
    logp = torch.where(zmask, logp, torch.zeros_like(logp))
    last = _upcast(logits[:, -1, :])                                             # (N, V)
    lse = torch.logsumexp(last, dim=-1)                                          # (N,)
    if yes_no_normalize:
        logp_yes = torch.nn.functional.logsigmoid(last[:, yes_id] - last[:, no_id])
    else:
        logp_yes = last[:, yes_id] - lse
    with torch.no_grad():
        mass = (last[:, yes_id] - lse).exp() + (last[:, no_id] - lse).exp()
    return Scores(logp, zmask.to(logp.dtype), logp_yes, mass)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precisions to float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
