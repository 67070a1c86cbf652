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
from btpo_cli.errors import BtpoError
from btpo_cli.judging.lm_head import SHARD, head_weight, token_logprobs
from btpo_cli.judging.packed_prefix import NOT_PACKABLE, pack_prefix_groups, packed_forward, packing_blocker
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


NOTHING_SHARED = "no two consecutive rows share a prefix, or a row has no continuation"


@dataclass(frozen=True)
class ScorePath:
    """How :func:`score_thoughts` runs the forward (``train.shared_prefix``, ``train.chunked_logprobs``,
    ``train.packing``); the default is the plain path, bitwise what it always was."""

    shared_prefix: str = "off"
    chunked_logprobs: bool = False
    packing: str = "off"

    @classmethod
    def of(cls, train: Any) -> ScorePath:
        """From a ``train`` config section (one without ``packing``: off)."""
        return cls(train.shared_prefix, train.chunked_logprobs == "on", getattr(train, "packing", "off"))


PLAIN = ScorePath()


def score_thoughts(model: Any, seqs: SeqBatch | list[ThoughtSeq], yes_id: int, no_id: int, pad_id: int,
                   yes_no_normalize: bool = False, temperature: float = 1.0, path: ScorePath = PLAIN) -> Scores:
    """One forward over N sequences → thought log-probs and log p(Yes). Grad flows if enabled.

    Sequences are left-padded so that their tails align at the end; only the last
    ``max(n_thought + n_tail) + 1`` positions go through the LM head (``logits_to_keep``).

    ``path.shared_prefix`` (``train.shared_prefix``): ``off`` is the plain path above; ``on`` / ``auto``
    forward each run of consecutive rows that share a prefix (a response's prompt for its K thoughts,
    a GRPO query for its G completions) once and the continuations (thought + tail) against its KV
    cache (:func:`_shared_forward`); same values within float rounding, not bitwise. Where it does not
    apply (:func:`shared_prefix_blocker`) ``auto`` takes the plain path and ``on`` raises.

    ``path.chunked_logprobs`` (``train.chunked_logprobs``): the LM head runs on the last position only
    (p(Yes)); the thought log-probs come from the final hidden states through
    :func:`~btpo_cli.judging.lm_head.token_logprobs` (chunks of positions, logits recomputed in the
    backward), so no (tokens × vocab) logits are held. Models whose head is not a plain ``h Wᵀ`` raise
    (:func:`~btpo_cli.judging.lm_head.head_weight`).

    ``path.packing`` (``train.packing``): ``on`` / ``auto`` forward each group's prompt once with its
    continuations in packed rows under a prompt-sharing mask (btpo_cli/judging/packed_prefix.py); it
    supersedes ``shared_prefix``. Where it does not apply (:func:`~btpo_cli.judging.packed_prefix.packing_blocker`)
    ``auto`` goes on with ``shared_prefix`` (or the plain path) and ``on`` raises.
    """
    if not isinstance(seqs, SeqBatch):
        seqs = SeqBatch.from_seqs(seqs, pad_id)
    device = next(model.parameters()).device
    n_th, n_tl = seqs.n_thought.to(device), seqs.n_tail.to(device)               # (N,), (N,)
    tz = max(1, seqs.max_thought)
    ar = torch.arange(tz, device=device)
    zmask = ar[None, :] < n_th[:, None]                                          # (N, Tz)
    hidden = path.chunked_logprobs
    if hidden:
        _head_weight(model, before_forward=True)                                 # fail before the forward
    shared = None
    if path.packing != "off":
        reason = packing_blocker(model)
        got = reason or pack_prefix_groups(seqs.ids, seqs.mask, seqs.n_thought, seqs.n_tail, prefix_groups(seqs))
        if isinstance(got, str):
            if path.packing == "on" and got != NOT_PACKABLE:
                raise BtpoError(f"train.packing=on: {got}; use 'auto' or 'off'")
        else:
            shared = packed_forward(model, got, device, hidden)                 # (M, V|H), ..., cols (N, 1+C)
    if shared is None and path.shared_prefix != "off":
        reason = shared_prefix_blocker(model)
        got = _shared_forward(model, seqs, device, hidden) if reason is None else reason
        if isinstance(got, str):
            if path.shared_prefix == "on" and got != NOTHING_SHARED:
                raise BtpoError(f"train.shared_prefix=on: {got}; use 'auto' or 'off'")
        else:
            shared = got
    if shared is not None:
        feats, last, tok, c = shared[:4]                                         # (N, 1+C, V|H), (N, V), (N, C)
        start = c - n_tl - n_th                                                  # (N,) first thought column in tok
        tok_col = (start[:, None] + ar[None, :]).clamp(min=0, max=c - 1)         # (N, Tz)
        # the first thought token is predicted by the prefix's last position (column 0); token at
        # continuation column j by the continuation's position j-1 (column j)
        rel = torch.where(ar[None, :] == 0, torch.zeros_like(tok_col), tok_col)
        tok = tok.gather(1, tok_col)                                             # (N, Tz)
        if len(shared) == 5:                                                     # packed: rows of feats (M, F)
            rel = shared[4].gather(1, rel)
    else:
        ids, mask = seqs.ids.to(device), seqs.mask.to(device)                    # (N, T)
        t = ids.shape[1]
        keep = min(int((seqs.n_thought + seqs.n_tail).max()) + 1, t)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                    logits_to_keep=1 if hidden else keep, output_hidden_states=hidden)
        feats = out.hidden_states[-1][:, t - keep:] if hidden else out.logits   # (N, keep, H|V)
        last = out.logits[:, -1, :]                                              # (N, V)
        start_abs = t - n_tl - n_th                                              # (N,) first thought token
        tok_abs = (start_abs[:, None] + ar[None, :]).clamp(max=t - 1)            # (N, Tz)
        rel = (tok_abs - 1 - (t - keep)).clamp(min=0, max=keep - 1)              # column predicting the token
        tok = ids.gather(1, tok_abs)                                             # (N, Tz)
    if hidden:
        weight = _head_weight(model, before_forward=False)                       # FSDP2: unsharded by now

        h = _pick(feats, rel)[zmask]                                             # (M, H) thought positions only
        logp = torch.zeros(zmask.shape, dtype=torch.float32, device=device)
        logp = logp.masked_scatter(zmask, token_logprobs(h, weight, tok[zmask], temperature))
        return _answer(logp, zmask, _upcast(last), yes_id, no_id, yes_no_normalize)
    return _read_scores(feats, rel, tok, zmask, last, yes_id, no_id, yes_no_normalize, temperature)


def score_chunked(model: Any, seqs: SeqBatch, yes_id: int, no_id: int, pad_id: int, normalize: bool,
                  temperature: float, batch: int, path: ScorePath = PLAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad :func:`score_thoughts` in chunks of ``batch`` rows: thought
    log-probs (N, Tz) right-padded, log p(Yes) (N,) (GRPO passes the pad id for Yes and No and
    reads only the log-probs). ``path``: :class:`ScorePath` (with a shared
    prefix keep ``batch`` a multiple of the group size so that no group is split)."""
    n = len(seqs)
    logp = torch.zeros(n, max(1, seqs.max_thought), dtype=torch.float32)
    yes = torch.zeros(n, dtype=torch.float32)
    for start in range(0, n, batch):
        rows = list(range(start, min(n, start + batch)))
        sc = score_thoughts(model, seqs.select(rows), yes_id, no_id, pad_id, normalize, temperature, path)
        logp[start:start + len(rows), :sc.logp.shape[1]] = sc.logp.float().cpu()
        yes[start:start + len(rows)] = sc.logp_yes.float().cpu()
    return logp, yes


def _head_weight(model: Any, before_forward: bool) -> torch.Tensor | None:
    """The LM head weight for ``train.chunked_logprobs`` (:func:`~btpo_cli.judging.lm_head.head_weight`),
    or a one-line error. Before the forward a sharded weight is fine (FSDP2 gathers it then)."""
    got = head_weight(_unwrap(model))
    if isinstance(got, str) and not (before_forward and got == SHARD):
        raise BtpoError(f"train.chunked_logprobs=on: {got}; use 'off'")
    return got if isinstance(got, torch.Tensor) else None


def _pick(feats: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """``feats[i, rel[i, j]]`` (N, Tz, F) for per-row features (N, cols, F); ``feats[rel[i, j]]`` for
    packed ones (M, F)."""
    if feats.dim() == 2:
        return feats[rel]
    return feats[torch.arange(feats.shape[0], device=feats.device)[:, None], rel]


def _read_scores(logits: torch.Tensor, rel: torch.Tensor, tok: torch.Tensor, zmask: torch.Tensor,
                 last: torch.Tensor, yes_id: int, no_id: int, yes_no_normalize: bool, temperature: float) -> Scores:
    """Thought log-probs from ``logits[i, rel[i, j]]`` (predicting ``tok[i, j]``, :func:`_pick`) and
    log p(Yes) from ``last`` (N, V), the last position's logits."""
    sel = _upcast(_pick(logits, rel))                                           # (N, Tz, V)
    if temperature != 1.0:
        sel = sel / temperature
    logp = sel.gather(-1, tok[..., None]).squeeze(-1) - torch.logsumexp(sel, dim=-1)
    logp = torch.where(zmask, logp, torch.zeros_like(logp))
    return _answer(logp, zmask, _upcast(last), yes_id, no_id, yes_no_normalize)


def _answer(logp: torch.Tensor, zmask: torch.Tensor, last: torch.Tensor, yes_id: int, no_id: int,
            yes_no_normalize: bool) -> Scores:
    """:class:`Scores` from thought log-probs and the last position's (upcast) logits ``last`` (N, V)."""
    lse = torch.logsumexp(last, dim=-1)                                          # (N,)
    if yes_no_normalize:
        logp_yes = torch.nn.functional.logsigmoid(last[:, yes_id] - last[:, no_id])
    else:
        logp_yes = last[:, yes_id] - lse
    with torch.no_grad():
        mass = (last[:, yes_id] - lse).exp() + (last[:, no_id] - lse).exp()
    return Scores(logp, zmask.to(logp.dtype), logp_yes, mass)


def _unwrap(model: Any) -> Any:
    """The module under DDP / accelerate wrappers (``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def shared_prefix_blocker(model: Any) -> str | None:
    """Why the shared-prefix forward does not apply to ``model`` (None when it does): it needs a
    transformers KV cache of plain :class:`DynamicLayer` s (no sliding-window or linear-attention
    layers) and no gradient checkpointing in training (which turns the cache off)."""
    m = _unwrap(model)
    cfg = getattr(m, "config", None)
    ckpt = getattr(m, "is_activation_checkpointing", None)
    if ckpt is None:
        ckpt = getattr(m, "is_gradient_checkpointing", False)
    if m.training and torch.is_grad_enabled() and ckpt:
        return "gradient checkpointing turns the KV cache off in training"
    if cfg is None:
        return "the model has no transformers config"
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False:
        return f"{text.model_type} has sliding-window attention layers"
    if any(t != "full_attention" for t in (getattr(text, "layer_types", None) or [])):
        return f"{text.model_type} has layers other than full attention"
    return None


def prefix_groups(seqs: SeqBatch) -> list[int]:
    """Group index of every row: consecutive rows with the same prefix (the tokens before thought +
    tail) share one."""
    ids, lens = seqs.ids, seqs.mask.sum(-1).tolist()
    t = ids.shape[1]
    plen = [ln - int(a) - int(b) for ln, a, b in zip(lens, seqs.n_thought, seqs.n_tail, strict=True)]
    group: list[int] = []
    for i in range(len(lens)):
        b, h = t - lens[i], i - 1
        same = i > 0 and plen[i] == plen[h] and torch.equal(ids[i, b:b + plen[i]], ids[h, t - lens[h]:t - lens[h] + plen[h]])
        group.append(group[-1] if same else (group[-1] + 1 if group else 0))
    return group


def _shared_forward(model: Any, seqs: SeqBatch, device: Any,
                    hidden: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | str:
    """Shared-prefix forward: ``(logits (N, 1+C, V) — or final hidden states (N, 1+C, H) when
    ``hidden`` —, last-position logits (N, V), continuation ids (N, C), C)``, or why not (the plain
    path then runs).

    Consecutive rows whose prefix (``ids`` before thought + tail) is the same form a group. The G
    group prefixes go through the model once (left-padded, ``use_cache=True``, logits of the last
    position only); the cache is indexed to the N rows (``batch_select_indices``: an autograd
    gather, so each row's gradient reaches the prefix as in N separate forwards) and the N
    continuations (thought + tail, left-padded to C, positions continuing at the prefix's length,
    attention mask = prefix mask ++ continuation mask) run against it. Column 0 of the logits is the
    prefix's last position, column ``1 + j`` the continuation's position ``j``."""
    from transformers.cache_utils import DynamicLayer  # heavy: imported on use

    ids, mask = seqs.ids, seqs.mask
    n, t = ids.shape
    lens = mask.sum(-1)
    clen = seqs.n_thought + seqs.n_tail                                          # (N,)
    plen = lens - clen
    if n == 0 or int(clen.min()) == 0 or int(plen.min()) == 0:
        return NOTHING_SHARED
    group = prefix_groups(seqs)
    heads = [group.index(g) for g in range(group[-1] + 1)]
    if len(heads) == n:
        return NOTHING_SHARED
    pmax, c = int(plen[heads].max()), int(clen.max())
    pids = torch.full((len(heads), pmax), int(ids[0, 0]), dtype=torch.long)
    pmask = torch.zeros((len(heads), pmax), dtype=torch.long)
    cids = torch.full((n, c), int(ids[0, 0]), dtype=torch.long)
    cmask = torch.zeros((n, c), dtype=torch.long)
    for g, h in enumerate(heads):
        p, b = int(plen[h]), t - int(lens[h])
        pids[g, pmax - p:] = ids[h, b:b + p]
        pmask[g, pmax - p:] = 1
    for i in range(n):
        k = int(clen[i])
        cids[i, c - k:] = ids[i, t - k:]
        cmask[i, c - k:] = 1
    pids, pmask, cids, cmask = pids.to(device), pmask.to(device), cids.to(device), cmask.to(device)
    idx = torch.tensor(group, device=device)
    pre = model(input_ids=pids, attention_mask=pmask, position_ids=positions(pmask), use_cache=True,
                logits_to_keep=1, output_hidden_states=hidden)
    cache = pre.cache if hasattr(pre, "cache") else getattr(pre, "past_key_values", None)
    if cache is None or not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
        return "the model's KV cache is not made of plain DynamicLayers"
    cache.batch_select_indices(idx)
    cpos = (plen.to(device)[:, None] + (cmask.cumsum(-1) - 1)).clamp(min=0)      # (N, C)
    out = model(input_ids=cids, attention_mask=torch.cat([pmask[idx], cmask], 1), position_ids=cpos,
                cache=cache, use_cache=True, logits_to_keep=1 if hidden else 0, output_hidden_states=hidden)
    if hidden:
        feats = torch.cat([pre.hidden_states[-1][:, -1:][idx], out.hidden_states[-1]], 1)
    else:
        feats = torch.cat([pre.logits[idx], out.logits], 1)
    return feats, out.logits[:, -1, :], cids, c


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precisions to float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
