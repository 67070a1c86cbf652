"""Token log-probabilities from final hidden states without holding the (tokens × vocab) logits.

:func:`token_logprobs` is ``log_softmax(h Wᵀ / T)[tok]`` for M positions, computed in chunks of
positions: the forward keeps only the hidden states and each position's log-sum-exp; the backward
recomputes each chunk's logits and turns them into the gradients of ``h`` and ``W`` (the idea of
Liger's fused linear cross-entropy). So neither an (M, V) logits tensor nor its float32 upcast is
ever alive at once: peak extra memory is one chunk, ``rows × V`` floats, where a chunk's logits are
about the size of the M hidden states themselves (:func:`chunk_rows`).

Matmuls run in the autocast dtype when autocast is on (as the model's own LM head would), the
softmax in float32.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_BYTES = 1 << 28
"""Float32 logits one chunk may hold at most (256 MiB)."""


def chunk_rows(m: int, vocab: int, hidden: int) -> int:
    """Positions per chunk for M positions: ``⌈M / ⌈V/H⌉⌉`` (Liger's rule: one chunk's logits about
    as large as the (M, H) hidden states), at least 16 (matmuls not too thin), at most
    :data:`CHUNK_BYTES` of float32 logits. ``btpo_cli/plan/estimate.py`` repeats this rule."""
    per = -(-m // -(-vocab // hidden))
    return max(1, min(max(16, per), CHUNK_BYTES // (4 * vocab)))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, temperature: float,
                rows: int) -> torch.Tensor:
        cd = _compute_dtype(h)
        m = h.shape[0]
        out = torch.empty(m, dtype=torch.float32, device=h.device)
        lse = torch.empty(m, dtype=torch.float32, device=h.device)
        wc = w.to(cd)
        for s in range(0, m, rows):
            lg = (h[s:s + rows].to(cd) @ wc.T).float()                      # (r, V) one chunk
            if temperature != 1.0:
                lg = lg / temperature
            lse[s:s + rows] = torch.logsumexp(lg, -1)
            out[s:s + rows] = lg.gather(-1, tok[s:s + rows, None]).squeeze(-1) - lse[s:s + rows]
        ctx.save_for_backward(h, w, tok, lse)
        ctx.temperature, ctx.rows, ctx.cd = temperature, rows, cd
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        h, w, tok, lse = ctx.saved_tensors
        t, rows, cd = ctx.temperature, ctx.rows, ctx.cd
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.zeros_like(h) if need_h else None
        # the weight's gradient accumulates in the weight's dtype, in place (addmm_: no (V, H) temporary
        # per chunk) when the matmuls run in that dtype; under autocast with fp32 weights, in fp32
        gw = torch.zeros_like(w, dtype=w.dtype if w.dtype == cd else torch.float32) if need_w else None
        wc = w.to(cd)
        grad = grad.float()
        for s in range(0, h.shape[0], rows):
            hc = h[s:s + rows].to(cd)
            lg = (hc @ wc.T).float()
            if t != 1.0:
                lg = lg / t
            g = grad[s:s + rows, None]
            d = torch.exp(lg - lse[s:s + rows, None]).mul_(-g)              # d logp / d logits = onehot − p
            d.scatter_add_(-1, tok[s:s + rows, None], g)
            if t != 1.0:
                d = d / t
            if gh is not None:
                gh[s:s + rows] = (d.to(cd) @ wc).to(h.dtype)
            if gw is not None and gw.dtype == cd:
                gw.addmm_(d.to(cd).T, hc)
            elif gw is not None:
                gw += (d.to(cd).T @ hc).float()
        return gh, (gw.to(w.dtype) if gw is not None else None), None, None, None


def token_logprobs(h: torch.Tensor, weight: torch.Tensor, tok: torch.Tensor, temperature: float = 1.0,
                   rows: int | None = None) -> torch.Tensor:
    """(M, H) hidden states, (V, H) LM-head weight, (M,) targets → (M,) float32
    ``log_softmax(h Wᵀ / T)[tok]``; differentiable in ``h`` and ``weight``."""
    if h.shape[0] == 0:
        return (h.sum(-1) * 0).float()
    return _TokenLogprobs.apply(h, weight, tok, float(temperature), rows or chunk_rows(h.shape[0], *weight.shape))


def head_weight(model: Any) -> torch.Tensor | str:
    """The LM head's weight when the logits are exactly ``h Wᵀ`` (no bias, no soft-capping or
    logit scaling), else why not.

    Under FSDP2 the head sits in the root unit, whose parameters stay unsharded from its forward to
    its backward (the root is not resharded after forward): asked after the model's forward, the
    weight is the full parameter and its gradient is reduce-scattered with the rest. Asked before (or
    under ZeRO-3, which frees it after the forward) it is a shard, and this says so."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return "the model has no plain output embedding"
    if getattr(head, "bias", None) is not None:
        return "the LM head has a bias"
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(text, attr, None) not in (None, 1, 1.0):
            return f"{getattr(text, 'model_type', 'the model')} scales its logits ({attr})"
    w = head.weight
    if hasattr(w, "ds_id"):
        return "the LM head weight is partitioned by ZeRO-3"
    if type(w) is not torch.nn.Parameter and type(w) is not torch.Tensor:
        return SHARD
    return w


SHARD = "the LM head weight is an FSDP2 shard outside the model's forward"
