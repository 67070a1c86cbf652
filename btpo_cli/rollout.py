"""Rollout engines: prompt token ids in, ``n`` sampled continuations out.

The interface is deliberately narrow so that other engines (vLLM, transformers' continuous
batching) plug in without touching the methods::

    engine.generate(prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]

``result[i][j]`` is the ``j``-th continuation of ``prompts[i]``. A continuation's ``token_ids``
include the stop token when generation stopped on it (``finished=True``); a continuation cut at
``max_new_tokens`` has ``finished=False``.

:class:`HFEngine` runs the model's own forward with a KV cache: the batch of prompts is
left-padded and prefilled ONCE, the cache is then repeated ``n`` times along the batch
(``shared_prefill=True``) and the ``B·n`` continuations are decoded together. With
``shared_prefill=False`` the prompts are repeated before the prefill (what
``generate(num_return_sequences=n)`` does), kept for the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    """Seed a private generator for this call (else the global torch RNG is used)."""


@dataclass
class Sample:
    token_ids: list[int]
    finished: bool


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]: ...


def left_pad(seqs: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) ragged → input_ids, attention_mask (N, T), padded on the left."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, t - len(s):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: (N, T) → (N, T)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model: Any) -> str:
    """transformers ≥ 5.24 renamed ``past_key_values`` to ``cache``; use whichever forward takes."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: Any = None) -> torch.Tensor:
    """(N, V) logits → (N,) token ids. temperature 0 = argmax; top-p keeps the smallest nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p       # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class HFEngine:
    """Batched sampling with the transformers model and its KV cache; shared prefill across ``n``."""

    def __init__(self, model: Any, pad_token_id: int, batch_size: int = 64, shared_prefill: bool = True):
        self.model = model
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        """Prompts per prefill (each expands to ``batch_size * n`` decoded rows)."""
        self.shared_prefill = shared_prefill
        self.stats = {"generated_tokens": 0, "prefill_tokens": 0}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self._device()).manual_seed(params.seed)
        out: list[list[Sample]] = []
        for i in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(prompts[i:i + self.batch_size], n, params, gen))
        return out

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generate_batch(self, prompts: list[list[int]], n: int, params: SamplingParams, gen: Any) -> list[list[Sample]]:
        from transformers import DynamicCache

        device = self._device()
        rows = prompts if self.shared_prefill else [p for p in prompts for _ in range(n)]
        ids, mask = left_pad(rows, self.pad_token_id, device)                      # (P, T)
        cache = DynamicCache()
        ck = cache_kwarg(self.model)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                         use_cache=True, logits_to_keep=1, **{ck: cache})
        self.stats["prefill_tokens"] += int(mask.sum())
        logits = out.logits[:, -1, :]                                              # (P, V)
        if self.shared_prefill and n > 1:
            cache.batch_repeat_interleave(n)                                       # (P·n, ...)
            mask = mask.repeat_interleave(n, dim=0)
            logits = logits.repeat_interleave(n, dim=0)
        rows_n = mask.shape[0]
        stop = torch.tensor(params.stop_token_ids or [-1], device=device)
        done = torch.zeros(rows_n, dtype=torch.bool, device=device)
        tokens = torch.full((rows_n, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        lengths = torch.zeros(rows_n, dtype=torch.long, device=device)
        for t in range(params.max_new_tokens):
            nxt = sample_next(logits, params.temperature, params.top_p, gen)      # (P·n,)
            was_done = done
            nxt = torch.where(was_done, torch.full_like(nxt, self.pad_token_id), nxt)
            tokens[:, t] = nxt
            lengths += (~was_done).long()
            done = was_done | torch.isin(nxt, stop)
            if bool(done.all()) or t == params.max_new_tokens - 1:
                break
            mask = torch.cat([mask, (~was_done).long()[:, None]], dim=1)          # the new token is real
            pos = mask.sum(-1, keepdim=True) - 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                             use_cache=True, **{ck: cache})
            logits = out.logits[:, -1, :]
        self.stats["generated_tokens"] += int(lengths.sum())
        tok_list, len_list = tokens.tolist(), lengths.tolist()
        stop_set = set(params.stop_token_ids)
        res: list[list[Sample]] = []
        for i in range(len(prompts)):
            group = []
            for j in range(n):
                r = i * n + j
                toks = tok_list[r][:len_list[r]]
                group.append(Sample(toks, bool(toks) and toks[-1] in stop_set))
            res.append(group)
        return res
