"""The memory planner behind ``btpo plan``: estimated per-GPU memory of a training run, by component.

Every formula here is written out, with its assumptions, in ``docs/plan.md``; the two must agree.
In short, for one process (one GPU) of a run with ``N = gpus × nodes`` processes:

- **model state** — weights, gradients and optimizer state per trainable parameter, by precision
  (:data:`STATE_BYTES`) and strategy (what is sharded ``1/N``: :data:`SHARDED`); DDP's gradient
  buckets; the working copies a strategy materializes (bf16 autocast copies under DDP, gathered
  layers and the unsharded root under FSDP2, prefetched layers under ZeRO-3);
- **activations** of one micro-batch — the tensors autograd saves per token and layer
  (:func:`layer_bytes_per_token`), all layers without gradient checkpointing, the layer inputs
  plus one recomputed layer with it; the LM head's logits over the positions the loss reads
  (the GPM's thought + tail, GRPO's completion); the attention masks;
- **reference model** (``β > 0``; none with LoRA: the adapter is disabled instead);
- **rollout engine** — ``hf``: full weights where the trainer's are sharded, the KV cache of
  ``prompts_per_batch × n`` rows at prompt + generation length, prefill transients; ``vllm``:
  its ``gpu_memory_utilization`` share of the GPU;
- **LoRA** adapter (+ its gradients and optimizer state) over a frozen base (bf16, fp32 or 4-bit);
- **overhead** — CUDA context, NCCL buffers, allocator fragmentation (none on ``cpu``).

Two phases are estimated: *update* (forward/backward of one micro-batch with the optimizer state
present, or the optimizer step) and *rollout* (sampling + no-grad scoring, gradients freed); the
peak is the larger. ``device="cpu"`` with ``fp32`` is the mode the estimates are validated in on
a machine without a GPU (``bench/plan_memory.py``, ``docs/experiments.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from btpo_cli.errors import BtpoError, ConfigError
from btpo_cli.methods.spec import get_method, method_specs
from btpo_cli.plan.shapes import LINEARS, Head, ModelShape, model_shape

GiB = float(2**30)
STRATEGIES = ("ddp", "fsdp2", "fsdp2-offload", "zero2", "zero3")
PRECISIONS = ("fp32", "amp", "bf16")
"""``fp32``: fp32 everything. ``amp``: fp32 master weights, bf16 autocast (btpo's GPU default).
``bf16``: bf16 weights and gradients, fp32 optimizer state."""

# Bytes per trainable parameter: (weights, gradients, optimizer state). AdamW keeps two moments.
STATE_BYTES: dict[str, tuple[float, float, float]] = {"fp32": (4, 4, 8), "amp": (4, 4, 8), "bf16": (2, 2, 8)}
# DeepSpeed with bf16 keeps bf16 weights and gradients and, in the optimizer, fp32 master weights
# plus both moments (the ZeRO paper's 2 + 2 + 12); with fp32 it keeps 4 + 4 + 8.
DS_STATE_BYTES: dict[str, tuple[float, float, float]] = {"fp32": (4, 4, 8), "amp": (2, 2, 12), "bf16": (2, 2, 12)}
# Which of (weights, gradients, optimizer) a strategy shards over the N processes; "host" = offloaded.
SHARDED: dict[str, tuple[str, str, str]] = {
    "ddp": ("full", "full", "full"),
    "fsdp2": ("shard", "shard", "shard"),
    "fsdp2-offload": ("host", "host", "host"),
    "zero2": ("full", "shard", "shard"),
    "zero3": ("shard", "shard", "shard"),
}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""4-bit NF4 weight with double quantization: 4 bits + an 8-bit absmax per 64 + an fp32 per 256 blocks."""


@dataclass(frozen=True)
class Geometry:
    """What one micro-batch of one method looks like to the model."""

    head: Head
    rows_per_pair: int
    """Sequences per preference pair in a forward (BT: 2; BTPO: 2K; GRPO pair: G; point: 2G)."""
    seq_len: int
    keep: int
    """Positions that go through the LM head (0 = a scalar head reads the last token)."""
    rollout: bool
    prompts_per_pair: int
    """Prompts the rollout engine samples ``n`` times per pair (BTPO: 2, GRPO pair: 1, point: 2)."""


@dataclass
class PlanInputs:
    """Everything the estimate depends on. :func:`inputs_from_config` fills it from a run's Config."""

    method: str
    shape: ModelShape
    device: str = "cuda"
    precision: str = "amp"
    gpus: int = 1
    """Processes (GPUs) per node."""
    nodes: int = 1
    gpu_memory_gb: float | None = None
    micro_batch: int = 1
    """Pairs per forward (``train.micro_batch_size``)."""
    per_process_batch: int = 1
    """Pairs per optimizer step on one process; more than ``micro_batch`` means gradient accumulation."""
    prompt_tokens: int = 1024
    """``data.max_length``: every sequence is assumed to use its whole budget (worst case)."""
    gen_tokens: int = 0
    """``rollout.max_new_tokens`` for the rollout methods (every thought / completion at full length)."""
    tail_tokens: int = 40
    """BTPO's GPM tail after the thought (rating question + answer head); planner input."""
    n: int = 4
    """``rollout.n``: K thoughts per response (BTPO), the group size G (GRPO)."""
    rollout_batch: int = 256
    gradient_checkpointing: bool = False
    beta: float = 0.0
    temperature: float = 1.0
    shared_prefix: bool = False
    """``train.shared_prefix`` on/auto: a rollout method's prompt is forwarded once per group of
    ``n`` rows (not under gradient checkpointing, where the shared path falls back)."""
    chunked_logprobs: bool = False
    """``train.chunked_logprobs: on``: the thought log-probs come from hidden states through
    chunks (:func:`logprob_chunk`); only the last position's logits are held."""
    packing: bool = False
    """``train.packing`` on/auto. Supervised methods (BT, BT-prefilled, GRAM): a micro-batch's sequences are
    one row of their summed tokens (every sequence at ``prompt_tokens``, the worst case, so as many tokens
    as padded) with attention per sequence: no (N, 1, T, T) mask, and no padding to count. Rollout
    methods: each prompt once with its ``n`` continuations in one packed row
    (btpo_cli/judging/packed_prefix.py): prompt tokens once per group, no per-row K/V copies, a
    (p + n·c)² mask per group; also under gradient checkpointing. Supersedes ``shared_prefix``."""
    engine: str = "auto"
    """``hf``, ``vllm``, or ``auto`` (cpu: hf; cuda: the larger of the two)."""
    prompts_per_batch: int = 16
    gpu_memory_utilization: float = 0.3
    engine_sleep: bool = True
    lora_r: int = 0
    """LoRA rank; 0 = full fine-tuning."""
    lora_targets: tuple[str, ...] = LINEARS
    lora_dropout: float = 0.0
    load_in_4bit: bool = False
    ref_dtype_bytes: float | None = None
    """Bytes per parameter of the reference copy (None: bf16 on cuda, fp32 on cpu)."""
    context_gb: float = 1.0
    """CUDA context, cuBLAS/cuDNN workspaces: per process, GiB."""
    nccl_gb: float = 0.5
    """NCCL communicator buffers when more than one process: GiB."""
    fragmentation: float = 0.10
    """Allocator slack, as a fraction of the transient (activation and working-copy) memory."""

    @property
    def world(self) -> int:
        return self.gpus * self.nodes


@dataclass
class Estimate:
    """Bytes per process, by component, for one strategy."""

    strategy: str
    world: int
    update: dict[str, float] = field(default_factory=dict)
    """Components of the update-phase peak (forward/backward or optimizer step)."""
    rollout: dict[str, float] = field(default_factory=dict)
    """Components of the rollout-phase peak (sampling, no-grad scoring); empty without rollouts."""
    host: float = 0.0
    """Host memory per process for offloaded state (fsdp2-offload)."""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def update_total(self) -> float:
        return sum(self.update.values())

    @property
    def rollout_total(self) -> float:
        return sum(self.rollout.values())

    @property
    def peak(self) -> float:
        return max(self.update_total, self.rollout_total)

    def verdict(self, gpu_memory_gb: float | None) -> str:
        """``fits`` (≤ 90 % of the GPU), ``tight`` (90-100 %), ``no``; ``?`` without a GPU size."""
        if not gpu_memory_gb:
            return "?"
        cap = gpu_memory_gb * GiB
        return "fits" if self.peak <= 0.9 * cap else "tight" if self.peak <= cap else "no"


# ----------------------------------------------------------------------------- method geometry

def geometry(inp: PlanInputs) -> Geometry:
    """Rows, lengths and LM-head positions of a micro-batch: the method's ``MethodSpec.plan_geometry``."""
    spec = get_method(inp.method)
    if spec.plan_geometry is None:
        known = ", ".join(s.name for s in method_specs() if s.plan_geometry is not None)
        raise BtpoError(f"btpo plan: no memory model for method '{inp.method}' (known: {known})")
    geo: Geometry = spec.plan_geometry(inp)
    return geo


# ----------------------------------------------------------------------------- activations

def _dtypes(inp: PlanInputs) -> tuple[int, int, bool]:
    """(compute bytes e, residual-stream bytes r, autocast casts inputs) of the precision."""
    if inp.precision == "fp32":
        return 4, 4, False
    if inp.precision == "amp":
        return 2, 4, True
    return 2, 2, False


def layer_bytes_per_token(inp: PlanInputs) -> float:
    """Bytes autograd saves per token in one decoder layer (docs/plan.md § Activations).

    Two RMSNorms (an fp32 copy of the input + the normalized tensor), the linears' inputs (one
    shared tensor, or under autocast one bf16 copy per linear), q and the repeated k, v saved by
    SDPA with its output and log-sum-exp, o_proj's input, and the SwiGLU's four ``i``-wide tensors.
    """
    s = inp.shape
    e, r, cast = _dtypes(inp)
    h, q, i = s.hidden, s.q_dim, s.intermediate
    norms = 2 * (4 * h + r * h)
    lin_in = (3 * 2 * h + 2 * 2 * h) if cast else 2 * r * h
    attn = e * (q + 2 * q) + e * q + e * q + 4 * s.heads      # q, repeated k/v, sdpa out, o_proj in, lse
    mlp = 4 * e * i
    total = norms + lin_in + attn + mlp
    if inp.lora_r:
        shapes = s.linear_shapes()
        for name in inp.lora_targets:
            fin, _ = shapes.get(name, (0, 0))
            extra_in = 2 * fin if cast else (4 * fin if inp.precision == "bf16" else 0)   # adapter's input copy
            if inp.lora_dropout > 0:
                extra_in += e * fin + fin                                              # dropped copy + mask
            total += extra_in + 4 * inp.lora_r
    return float(total)


CHUNK_BYTES = 1 << 28
"""At most this many bytes of fp32 logits in one chunk of positions under ``train.chunked_logprobs``."""


def logprob_chunk(m: int, vocab: int, hidden: int) -> int:
    """Positions per chunk of ``train.chunked_logprobs`` for M positions: ``lm_head.chunk_rows``'s rule,
    repeated here to keep the planner torch-free (a test holds the two equal)."""
    per = -(-m // -(-vocab // hidden))
    return min(m, max(1, min(max(16, per), CHUNK_BYTES // (4 * vocab))))


def head_bytes(inp: PlanInputs, rows: int, keep: int, backward: bool = True) -> float:
    """Peak of the loss head: logits over ``keep`` positions, their fp32 gather, log-sum-exp workspace.

    ``rows × keep × V × (e_logits + 4 + 8 [+ 4 when T ≠ 1])``; 0 for a scalar head (docs/plan.md).
    With ``chunked_logprobs``: ``rows × V × (…)`` for the last position (p(Yes)) plus one chunk of
    :func:`logprob_chunk` ``(rows · (keep − 1), V, H)`` positions × ``V × 12`` (fp32 logits, their exp,
    the logits' gradient in the recomputing backward) and, in a ``backward``, the ``V × H`` buffer
    (the weight's dtype: fp32 but under ``bf16``) that backward accumulates the head weight's
    gradient in, alive beside the gradient the model's own head gives it (p(Yes)'s position) while
    the activations still are."""
    if keep <= 0:
        return 0.0
    e_logits = 4 if inp.precision == "fp32" else 2
    per = e_logits + 4 + 8 + (4 if inp.temperature != 1.0 else 0)
    v = inp.shape.vocab
    if inp.chunked_logprobs:
        chunk = logprob_chunk(rows * (keep - 1), v, inp.shape.hidden)
        grad_w = (2.0 if inp.precision == "bf16" else 4.0) * v * inp.shape.hidden if backward else 0.0
        return float(rows) * v * per + float(chunk) * v * 12 + grad_w
    return float(rows) * keep * v * per


def shared_tokens(inp: PlanInputs, geo: Geometry, checkpointing: bool) -> tuple[int, int, int] | None:
    """(groups, prompt tokens, continuation tokens) of a micro-batch when ``shared_prefix`` applies."""
    if not (inp.shared_prefix and geo.rollout and not checkpointing and geo.prompts_per_pair < geo.rows_per_pair):
        return None
    p = inp.prompt_tokens
    return inp.micro_batch * geo.prompts_per_pair, p, geo.seq_len - p


def _tokens_and_masks(inp: PlanInputs, geo: Geometry, checkpointing: bool) -> tuple[int, float, float]:
    """Tokens through the layers, the bool mask entries, and the expanded prefix K/V bytes (all layers)."""
    rows = inp.micro_batch * geo.rows_per_pair
    if inp.packing and geo.rollout:            # one packed row per group: the prompt, then its n continuations
        groups, p = inp.micro_batch * geo.prompts_per_pair, inp.prompt_tokens
        c, width = geo.seq_len - p, p + rows // groups * (geo.seq_len - p)
        return groups * p + rows * c, float(groups * width ** 2), 0.0
    if inp.packing and not geo.rollout and not checkpointing:        # packed: tokens summed, no mask
        return rows * geo.seq_len, 0.0, 0.0
    sh = shared_tokens(inp, geo, checkpointing)
    if sh is None:
        return rows * geo.seq_len, float(rows * geo.seq_len ** 2 if rows > 1 else 0), 0.0
    groups, p, c = sh
    e, _, _ = _dtypes(inp)
    # the prefix forward's (G, 1, P, P) mask and the continuations' (R, 1, C, P + C); each row's copy
    # of its prefix's keys and values, repeated to the query heads (SDPA with a mask gets GQA's K/V
    # repeated) and saved by SDPA in every layer; with GQA also the cache itself (R rows of P + C
    # un-repeated keys and values per layer), alive until the continuations' forward returns
    s = inp.shape
    kv = float(s.layers * 2 * rows * p * s.q_dim * e)
    if s.q_dim != s.kv_dim:
        kv += s.layers * 2 * rows * (p + c) * s.kv_dim * e
    return groups * p + rows * c, float(groups * p * p + rows * c * (p + c)), kv


def activations(inp: PlanInputs, geo: Geometry, checkpointing: bool) -> dict[str, float]:
    """Activation memory of one micro-batch: body (layers), final norm + head input, loss head, masks."""
    s = inp.shape
    e, r, cast = _dtypes(inp)
    rows = inp.micro_batch * geo.rows_per_pair
    t, mask_once, kv_rows = _tokens_and_masks(inp, geo, checkpointing)   # mask: bool (N, 1, T, T)
    per_layer = layer_bytes_per_token(inp) * t
    head = head_bytes(inp, rows, geo.keep)
    kept = rows * (geo.keep if geo.keep else geo.seq_len)
    final = (4 * s.hidden + r * s.hidden) * t + (2 * s.hidden * kept if cast else 0)
    mask_layer = e * mask_once                                   # its float copy, saved by SDPA per layer
    if inp.packing and geo.rollout:                        # packed: one additive mask, saved by reference
        mask_once, mask_layer = mask_once * (1 + e), 0.0
    if checkpointing:
        body = s.layers * r * s.hidden * t
        peak = body + final + max(head, per_layer + mask_layer) + mask_once
    else:
        body = s.layers * (per_layer + mask_layer) + kv_rows
        peak = body + final + head + mask_once
    return {"body": float(body), "per_layer": float(per_layer), "head": float(head), "final": float(final),
            "masks": float(mask_once + (mask_layer if checkpointing else s.layers * mask_layer)),
            "peak": float(peak), "tokens": float(t)}


# ----------------------------------------------------------------------------- model state

def _lora_params(inp: PlanInputs) -> int:
    s = inp.shape
    shapes = s.linear_shapes()
    per_layer = sum(inp.lora_r * (shapes[n][0] + shapes[n][1]) for n in inp.lora_targets if n in shapes)
    return per_layer * s.layers


def _share(kind: str, world: int) -> float:
    return {"full": 1.0, "shard": 1.0 / world, "host": 0.0}[kind]


def model_state(inp: PlanInputs, geo: Geometry, strategy: str) -> tuple[dict[str, float], float, float]:
    """(component → bytes on the GPU, host bytes, step transient bytes) for weights, grads, optimizer."""
    s, world = inp.shape, inp.world
    e, _, cast = _dtypes(inp)
    ds = strategy.startswith("zero")
    w_b, g_b, o_b = (DS_STATE_BYTES if ds else STATE_BYTES)[inp.precision]
    if inp.device == "cpu":
        w_b, g_b, o_b = STATE_BYTES["fp32"] if inp.precision == "fp32" else (w_b, g_b, o_b)
    sw, sg, so = (_share(k, world) for k in SHARDED[strategy])
    total = s.params(geo.head)
    out: dict[str, float] = {}
    host = 0.0
    if inp.lora_r:
        lin = s.layers * s.linear_params_per_layer()
        base_b = w_b if not inp.load_in_4bit else NF4_BYTES
        base = lin * base_b + (total - lin) * (2 if inp.load_in_4bit else w_b)
        adapter = _lora_params(inp)
        out["weights"] = base * sw
        out["lora adapter"] = adapter * 4.0          # fp32 adapter (peft upcasts it), replicated
        out["gradients"] = adapter * 4.0
        out["optimizer state"] = adapter * 8.0
        trainable, unit_b = adapter, (w_b if not inp.load_in_4bit else 2)
        host = base if strategy == "fsdp2-offload" else 0.0
    else:
        out["weights"] = total * w_b * sw
        out["gradients"] = total * g_b * sg
        out["optimizer state"] = total * o_b * so
        trainable, unit_b = total, w_b
        if strategy == "fsdp2-offload":
            host = total * (w_b + g_b + o_b) / world
    # working copies the strategy materializes during forward/backward
    work = 0.0
    if strategy == "ddp" and cast and not inp.lora_r:
        work = 2.0 * total                          # autocast's bf16 copy of every trainable weight
    elif strategy in ("fsdp2", "fsdp2-offload"):
        c = 2 if inp.precision != "fp32" else 4     # MixedPrecisionPolicy(param_dtype=bf16) under amp
        root = s.embed_params() + s.head_params(geo.head)
        layer = s.layer_params() if not inp.lora_r else s.layer_params()
        grads_unsharded = 0 if inp.lora_r else c * (root + layer)
        work = c * (root + 2 * layer) + grads_unsharded
    elif strategy == "zero3":
        c = 2 if inp.precision != "fp32" else 4
        work = 3.0 * c * s.largest_unit(geo.head)   # two units gathered (prefetch) + one unit's gradients
    out["working copies"] = float(work)
    if strategy == "ddp" and world > 1:
        out["ddp buckets"] = trainable * g_b        # gradient_as_bucket_view=False: a flat copy of the grads
    # optimizer step transient (the activations are gone by then)
    if inp.device == "cpu":
        biggest = max(s.embed_params(), s.head_params(geo.head), s.intermediate * s.hidden)
        step = 0.0 if inp.lora_r else 2.0 * 4 * biggest   # single-tensor AdamW: sqrt and div temporaries
    elif ds or strategy == "fsdp2-offload":
        step = 4.0 * trainable / world if ds else 0.0      # DeepSpeed: fp32 copy of the grad partition
    else:
        step = 4.0 * trainable * (1.0 / world if strategy == "fsdp2" else 1.0)   # foreach AdamW's sqrt(v)
    _ = unit_b
    return out, host, step


def reference_bytes(inp: PlanInputs, geo: Geometry) -> float:
    """A frozen full copy for the KL term (β > 0), replicated per process; none with LoRA."""
    if inp.beta <= 0 or inp.lora_r:
        return 0.0
    b = inp.ref_dtype_bytes or (2.0 if inp.device == "cuda" else 4.0)
    return inp.shape.params(geo.head) * b


# ----------------------------------------------------------------------------- rollout engine

def _rollout_rows(inp: PlanInputs, geo: Geometry) -> tuple[int, int]:
    """(prompts per engine batch, rows decoded together) on one process."""
    local_prompts = max(1, inp.rollout_batch // inp.world) * geo.prompts_per_pair
    p = min(inp.prompts_per_batch, local_prompts)
    return p, p * inp.n


def hf_engine(inp: PlanInputs, geo: Geometry, strategy: str) -> dict[str, float]:
    """The ``hf`` engine: gathered full weights (sharded strategies), KV cache, prefill/decode transients."""
    s = inp.shape
    e, _, cast = _dtypes(inp)
    p, rows = _rollout_rows(inp, geo)
    length = inp.prompt_tokens + inp.gen_tokens
    k_b, v_b = (4, 2) if cast else (e, e)           # under autocast RoPE promotes k to fp32
    kv = rows * length * s.layers * s.kv_dim * (k_b + v_b)
    full = 0.0
    if strategy in ("fsdp2", "fsdp2-offload", "zero3"):
        full = s.params("causal") * (2 if inp.precision != "fp32" else 4)
    prefill = p * inp.prompt_tokens * (3 * e * s.intermediate) + p * inp.prompt_tokens ** 2 * (1 + e)
    decode = rows * s.vocab * 16
    return {"engine weights": full, "engine KV cache": float(kv), "engine transients": float(prefill + decode)}


def scoring_transient(inp: PlanInputs, geo: Geometry) -> float:
    """No-grad scoring of a micro-batch's rows: one layer's MLP intermediates + the loss head's logits."""
    rows = inp.micro_batch * geo.rows_per_pair
    t, mask_once, kv_rows = _tokens_and_masks(inp, geo, False)
    e, _, _ = _dtypes(inp)
    head = head_bytes(inp, rows, geo.keep, backward=False)
    return float(t * 3 * e * inp.shape.intermediate + head + mask_once * (1 + e) + kv_rows)


# ----------------------------------------------------------------------------- the estimate

def estimate(inp: PlanInputs, strategy: str) -> Estimate:
    """Per-process memory of ``strategy`` for these inputs: update and rollout phases by component."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy '{strategy}' is not one of {', '.join(STRATEGIES)}")
    if inp.precision not in PRECISIONS:
        raise ConfigError(f"precision '{inp.precision}' is not one of {', '.join(PRECISIONS)}")
    geo = geometry(inp)
    state, host, step = model_state(inp, geo, strategy)
    act = activations(inp, geo, inp.gradient_checkpointing)
    act_other = activations(inp, geo, not inp.gradient_checkpointing)
    ref = reference_bytes(inp, geo)
    cuda = inp.device == "cuda"
    fixed = (inp.context_gb + (inp.nccl_gb if inp.world > 1 else 0.0)) * GiB if cuda else 0.0
    grads = state["gradients"]
    accum = inp.per_process_batch > inp.micro_batch
    # gradients present during a micro-batch's backward: all of them when accumulating, else the
    # head's (the first ones backward allocates); under full sharding only the local shard exists.
    head_grads = grads if accum else grads * min(1.0, (inp.shape.embed_params() + inp.shape.head_params(geo.head))
                                                 / max(1, inp.shape.params(geo.head)))
    if inp.lora_r:
        head_grads = grads
    work = state["working copies"]
    body = act["peak"] + work + head_grads
    during_step = grads + step
    # the update peak holds the larger of the two transients; its components are listed below
    frag = inp.fragmentation * (act["peak"] + work) if cuda else 0.0
    upd: dict[str, float] = {k: v for k, v in state.items() if k not in ("gradients", "working copies")}
    if body >= during_step:
        upd.update({"gradients": head_grads, "working copies": work, "activations": act["peak"] - act["head"],
                    "logits (loss head)": act["head"]})
    else:
        upd.update({"gradients": grads, "optimizer step temporaries": step})
    if ref:
        upd["reference model"] = ref
    engines = _engines(inp)
    vllm_share = inp.gpu_memory_utilization * (inp.gpu_memory_gb or 0) * GiB
    if geo.rollout and "vllm" in engines and not inp.engine_sleep:
        upd["engine (vllm, awake)"] = vllm_share
    upd["overhead"] = fixed + frag
    est = Estimate(strategy, inp.world, upd, {}, host)
    if geo.rollout:
        est.rollout = _rollout_phase(inp, geo, strategy, state, ref, fixed, engines, vllm_share)
    est.info = {"params": inp.shape.params(geo.head), "tokens_per_micro_batch": int(act["tokens"]),
                "rows_per_micro_batch": inp.micro_batch * geo.rows_per_pair, "seq_len": geo.seq_len,
                "activations_checkpointing": (act if inp.gradient_checkpointing else act_other)["peak"],
                "activations_no_checkpointing": (act_other if inp.gradient_checkpointing else act)["peak"],
                "phase": "update" if est.update_total >= est.rollout_total else "rollout",
                "engine": "/".join(engines) if geo.rollout else None}
    return est


def _engines(inp: PlanInputs) -> list[str]:
    if inp.engine in ("hf", "vllm"):
        return [inp.engine]
    return ["hf"] if inp.device == "cpu" else ["hf", "vllm"]


def _rollout_phase(inp: PlanInputs, geo: Geometry, strategy: str, state: dict[str, float], ref: float,
                   fixed: float, engines: list[str], vllm_share: float) -> dict[str, float]:
    """Sampling then no-grad scoring; gradients are freed (``zero_grad(set_to_none=True)``)."""
    score = scoring_transient(inp, geo) + state["working copies"] * (0 if strategy == "ddp" else 1)
    best: dict[str, float] = {}
    for eng in engines:
        comp = {k: v for k, v in state.items() if k not in ("gradients", "working copies")}
        if ref:
            comp["reference model"] = ref
        if eng == "hf":
            gen = hf_engine(inp, geo, strategy)
            if sum(gen.values()) >= score:
                comp.update(gen)
            else:
                comp["scoring transients"] = score
        else:
            comp["engine (vllm share)"] = vllm_share
            comp["scoring transients"] = score
        cuda = inp.device == "cuda"
        transient = sum(v for k, v in comp.items() if k.startswith(("engine", "scoring")) and "vllm" not in k)
        comp["overhead"] = fixed + (inp.fragmentation * transient if cuda else 0.0)
        if sum(comp.values()) > sum(best.values()):
            best = comp
    return best


def plan_all(inp: PlanInputs, strategies: list[str] | tuple[str, ...] = STRATEGIES) -> list[Estimate]:
    return [estimate(inp, s) for s in strategies]


# ----------------------------------------------------------------------------- from a run's Config

def precision_of(cfg: Any, device: str) -> str:
    """The planner precision a Config trains in (docs/plan.md § Precision)."""
    if device == "cpu":
        return "amp" if cfg.train.precision == "bf16" else "fp32"
    if cfg.model.dtype == "bfloat16":
        return "bf16"
    if cfg.train.precision == "fp32":
        return "fp32"
    return "amp"


def inputs_from_config(cfg: Any, *, gpus: int | None = None, nodes: int | None = None,
                       gpu_memory_gb: float | None = None, device: str = "cuda", **extra: Any) -> PlanInputs:
    """Planner inputs from a run Config (+ the ``hardware`` section where present); ``extra`` overrides."""
    hw = getattr(cfg, "hardware", None)
    gpus = gpus or (getattr(hw, "gpus", None) if hw else None) or 1
    nodes = nodes or (getattr(hw, "nodes", None) if hw else None) or 1
    if gpu_memory_gb is None and hw is not None:
        gpu_memory_gb = getattr(hw, "gpu_memory_gb", None)
    world = gpus * nodes
    per_proc = max(1, cfg.train.batch_size // world)
    method = cfg.method
    spec = get_method(method)
    own = spec.plan_inputs(cfg) if spec.plan_inputs else {}
    lora = getattr(cfg.model, "lora", None)
    lora_kw: dict[str, Any] = {}
    if lora is not None and getattr(lora, "r", 0) and getattr(lora, "enabled", True):
        targets = getattr(lora, "target_modules", None) or LINEARS
        if isinstance(targets, str):
            targets = LINEARS if targets in ("all-linear", "all") else tuple(t.strip() for t in targets.split(","))
        lora_kw = {"lora_r": int(lora.r), "lora_targets": tuple(targets),
                   "lora_dropout": float(getattr(lora, "dropout", 0.0) or 0.0),
                   "load_in_4bit": bool(getattr(lora, "load_in_4bit", False))}
    inp = PlanInputs(
        method=method, shape=model_shape(cfg.model.name), device=device, precision=precision_of(cfg, device),
        gpus=gpus, nodes=nodes, gpu_memory_gb=gpu_memory_gb,
        micro_batch=min(cfg.train.micro_batch_size, per_proc), per_process_batch=per_proc,
        prompt_tokens=cfg.data.max_length,
        gen_tokens=own.get("gen_tokens", 0),
        n=cfg.rollout.n, rollout_batch=cfg.rollout.batch_size,
        gradient_checkpointing=cfg.model.gradient_checkpointing, beta=own.get("beta", 0.0),
        temperature=cfg.rollout.temperature, engine=cfg.rollout.engine,
        shared_prefix=getattr(cfg.train, "shared_prefix", "off") != "off",
        chunked_logprobs=getattr(cfg.train, "chunked_logprobs", "off") == "on",
        packing=getattr(cfg.train, "packing", "off") != "off",
        prompts_per_batch=cfg.rollout.prompts_per_batch,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, engine_sleep=cfg.rollout.sleep,
        ref_dtype_bytes=4.0 if cfg.model.dtype == "float32" else None, **lora_kw)
    return replace(inp, **extra) if extra else inp
