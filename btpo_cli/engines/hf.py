"""``hf``: the transformers model and its KV cache, batched, with one shared prefill per prompt.

The batch of prompts is left-padded (explicit position ids) and prefilled ONCE; the cache is then
repeated ``n`` times along the batch (``shared_prefill=True``) and the ``B·n`` continuations are
decoded together. ``shared_prefill=False`` repeats the prompts before the prefill (what
``generate(num_return_sequences=n)`` does); kept for the benchmark.

Sampling is by inverse CDF with one uniform per (sample, step), drawn up front from a CPU
generator seeded by the sample's seed (``engines/base.py``): a sample does not depend on which
other prompts share its batch, on the batch size, on the prefill mode or on the device.

Built on the trainer's own module (``EngineSpec.module``) the engine shares its parameters:
``update_weights`` with those same tensors costs nothing. Built from a folder it holds its own
copy (evaluation, data building, or a sharded trainer that sends gathered full weights).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from btpo_cli.console import quiet_transformers
from btpo_cli.engines.base import Sample, SamplingParams, WeightStream, resolve_seeds, sample_seed
from btpo_cli.models.inputs import left_pad, positions


def cache_kwarg(model: Any) -> str:
    """transformers ≥ 5.24 renamed ``past_key_values`` to ``cache``; use whichever forward takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(N, V) logits → (N, V) probabilities at ``temperature``, restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p       # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p * keep)
    return probs


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor | None) -> torch.Tensor:
    """(N, V) logits → (N,) token ids. temperature 0 = argmax; else inverse CDF at ``uniforms`` (N,)."""
    if temperature == 0:
        return logits.argmax(-1)
    if uniforms is None:
        raise ValueError("sampling at temperature > 0 needs one uniform per row")
    probs = sampling_probs(logits, temperature, top_p)
    cdf = probs.cumsum(-1)                                                   # (N, V)
    u = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]                        # scale by the total mass
    tok = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return tok.clamp(max=probs.shape[-1] - 1)


def row_uniforms(seeds: list[int], steps: int, device: Any) -> torch.Tensor:
    """(rows, steps) uniforms in [0, 1): row ``r`` from a CPU generator seeded by ``seeds[r]``."""
    g = torch.Generator()
    out = torch.empty(len(seeds), steps, dtype=torch.float64)
    for r, s in enumerate(seeds):
        g.manual_seed(s)
        out[r] = torch.rand(steps, generator=g, dtype=torch.float64)
    return out.to(device)


class HFEngine:
    """Batched sampling with the transformers model and its KV cache; shared prefill across ``n``."""

    name = "hf"

    def __init__(self, model: Any, pad_token_id: int, batch_size: int = 64, shared_prefill: bool = True,
                 owns_model: bool = False):
        self.model = model
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        """Prompts per prefill (each expands to ``batch_size * n`` decoded rows)."""
        self.shared_prefill = shared_prefill
        self.owns_model = owns_model
        self._home: torch.device | None = None
        self._stats = {"generated_tokens": 0, "prompt_tokens": 0, "requests": 0, "weight_syncs": 0,
                       "weight_sync_copies": 0}

    @classmethod
    def from_spec(cls, spec: Any) -> HFEngine:
        if spec.module is not None:
            return cls(spec.module, spec.pad_token_id, batch_size=spec.prompts_per_batch)
        from transformers import AutoModelForCausalLM  # heavy: imported on use

        quiet_transformers()
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(spec.dtype)
        if dtype is None:     # auto
            dtype = torch.bfloat16 if str(spec.device).startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=dtype).to(spec.device).eval()
        return cls(model, spec.pad_token_id, batch_size=spec.prompts_per_batch, owns_model=True)

    # ------------------------------------------------------------------ lifecycle

    def update_weights(self, named_tensors: WeightStream | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full weights in by checkpoint name; a tensor that already IS the parameter is skipped.
        Names and shapes are checked before anything is copied (a rejected update changes nothing);
        then the tensors are copied one at a time as the stream yields them."""
        state = self.model.state_dict(keep_vars=True)
        stream = WeightStream.of(named_tensors)
        for name, shape in stream.shapes.items():
            p = state.get(name)
            if p is None:
                raise KeyError(f"update_weights: the engine's model has no weight named {name!r}")
            if tuple(p.shape) != shape:
                raise ValueError(f"update_weights: {name!r} has shape {shape}, the engine's model "
                                 f"{tuple(p.shape)}")
        copied = 0
        with torch.no_grad():
            for name, t in stream:
                p = state[name]
                if p.data_ptr() == t.data_ptr():
                    continue
                p.copy_(t.to(device=p.device, dtype=p.dtype))
                copied += 1
        self._stats["weight_syncs"] += 1
        self._stats["weight_sync_copies"] += copied

    def shares_module(self, module: Any) -> bool:
        """Built on the trainer's module (``EngineSpec.module``), the engine generates with its tensors."""
        return self.model is module

    def sleep(self) -> None:
        """Own weights on a GPU go to host memory until :meth:`wake`; a shared module stays (no-op)."""
        if self.owns_model and self._device().type == "cuda":
            self._home = self._device()
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self._home is not None:
            self.model.to(self._home)
            self._home = None

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ generation

    def _device(self) -> torch.device:
        device: torch.device = next(self.model.parameters()).device
        return device

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[Sample]]:
        req = resolve_seeds(len(prompts), params, seeds) if params.temperature > 0 else [0] * len(prompts)
        out: list[list[Sample]] = []
        for i in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(prompts[i:i + self.batch_size], n, params, req[i:i + self.batch_size]))
        self._stats["requests"] += len(prompts)
        return out

    def _generate_batch(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams,
                        seeds: list[int]) -> list[list[Sample]]:
        from transformers import DynamicCache  # heavy: imported on use

        device = self._device()
        rows = prompts if self.shared_prefill else [p for p in prompts for _ in range(n)]
        ids, mask = left_pad(rows, self.pad_token_id, device)                      # (P, T)
        cache = DynamicCache()
        ck = cache_kwarg(self.model)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                         use_cache=True, logits_to_keep=1, **{ck: cache})
        self._stats["prompt_tokens"] += int(mask.sum())
        logits = out.logits[:, -1, :]                                              # (P, V)
        if self.shared_prefill and n > 1:
            cache.batch_repeat_interleave(n)                                       # (P·n, ...)
            mask = mask.repeat_interleave(n, dim=0)
            logits = logits.repeat_interleave(n, dim=0)
        rows_n = mask.shape[0]
        uniforms = None
        if params.temperature > 0:
            uniforms = row_uniforms([sample_seed(s, j) for s in seeds for j in range(n)],
                                    params.max_new_tokens, device)                # (P·n, max_new)
        stop = torch.tensor(params.stop_token_ids or [-1], device=device)
        done = torch.zeros(rows_n, dtype=torch.bool, device=device)
        tokens = torch.full((rows_n, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros((rows_n, params.max_new_tokens), dtype=torch.float32, device=device) \
            if params.logprobs else None
        lengths = torch.zeros(rows_n, dtype=torch.long, device=device)
        for t in range(params.max_new_tokens):
            nxt = sample_next(logits, params.temperature, params.top_p,
                              uniforms[:, t] if uniforms is not None else None)   # (P·n,)
            if logps is not None:
                scaled = logits.float() / (params.temperature or 1.0)
                logps[:, t] = scaled.gather(-1, nxt[:, None]).squeeze(-1) - torch.logsumexp(scaled, -1)
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
        self._stats["generated_tokens"] += int(lengths.sum())
        tok_list, len_list = tokens.tolist(), lengths.tolist()
        lp_list = logps.tolist() if logps is not None else None
        stop_set = set(params.stop_token_ids)
        res: list[list[Sample]] = []
        for i in range(len(prompts)):
            group = []
            for j in range(n):
                r = i * n + j
                toks = tok_list[r][:len_list[r]]
                lp = lp_list[r][:len_list[r]] if lp_list is not None else None
                group.append(Sample(toks, bool(toks) and toks[-1] in stop_set, lp))
            res.append(group)
        return res
