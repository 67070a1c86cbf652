"""Shared-prefix, packed prompt+K and chunked-logprob scoring against the plain path: one BTPO update phase.

One update phase = forward + backward of :func:`~btpo_cli.judging.logprobs.score_thoughts` over the
``2 · pairs · K`` sequences of a rollout (prompt ``--prompt`` tokens, thoughts ``--thought``,
tail ``--tail``), loss = Σ thought log-probs + Σ log p(Yes). Random-init weights of a shipped
shape (``btpo_cli/plan/shapes``), optionally cut to ``--layers``; CPU, fp32, ``torch.set_num_threads``
(default 1).

- time: the variants run in the same process, interleaved, ``--repeats`` times each (after one
  untimed warm-up of the first); the median and its ratio to ``plain``.
- memory: one subprocess per variant (``--one``) builds the model, resets the peak RSS
  (``/proc/self/clear_refs`` ← 5), runs one update phase and reports ``VmHWM − VmRSS before``
  (tracemalloc does not see torch's CPU allocations). At the peak (the start of the backward) the
  one gradient already allocated is the LM head weight's (``head_grad_mib``, fp32 ``V × H``, the same
  in every variant); ``act_ratio`` is the peak ratio without it, ``plan_over_measured`` the planner's
  activation peak plus that gradient over the measured peak.
- planned: ``btpo plan``'s activation peak of the same micro-batch (``plan/estimate.activations``:
  fp32, no checkpointing, ``train.shared_prefix`` / ``train.chunked_logprobs`` as the variant) and
  its loss-head (logits) term, beside the measured peak.
- variants: ``plain``, ``shared`` (``train.shared_prefix``: KV cache), ``packed`` (``train.packing``:
  the prompt once with its K continuations in one row, dense prompt-sharing mask through SDPA),
  each also ``+chunked`` (``train.chunked_logprobs``).
- saved (``--saved``, in-process, forward only): the MiB of the distinct storages autograd saves for
  the backward by the end of the forward (``saved_tensors_hooks``; parameters left out) — the
  activations the peak is made of, counted from tensors, without the allocator's and RSS's noise.
- FLOP ratio: forward FLOPs of the shared path over the plain one (linear layers 2·params per
  token, attention 4·layers·hidden·context per token, the LM head 2·hidden·vocab per kept position —
  the same positions in both paths), what the time ratio would be if time followed FLOPs.

    python bench/bench_shared_prefix.py --shape smollm2-135m --repeats 2
    python bench/bench_shared_prefix.py --shape qwen2.5-0.5b --layers 4
    python bench/bench_shared_prefix.py --variants plain,shared,packed,packed+chunked --repeats 2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peak_rss import peak_growth_mib  # noqa: E402
from btpo_cli.judging.logprobs import ScorePath, SeqBatch, ThoughtSeq, score_thoughts  # noqa: E402
from btpo_cli.plan.estimate import GiB, PlanInputs, activations, geometry  # noqa: E402
from btpo_cli.plan.shapes import from_config, known_shapes  # noqa: E402

VARIANTS = {"plain": ScorePath(), "shared": ScorePath("on"), "chunked": ScorePath("off", True),
            "shared+chunked": ScorePath("on", True), "packed": ScorePath(packing="on"),
            "packed+chunked": ScorePath(packing="on", chunked_logprobs=True)}


def build_model(shape: str, layers: int | None, attn: str = "sdpa") -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = {k: v for k, v in json.loads(known_shapes()[shape].read_text()).items()
            if not k.startswith("_") and k != "architectures"}
    if layers:
        conf["num_hidden_layers"] = layers
        conf.pop("layer_types", None)
    conf["attn_implementation"] = attn
    cfg = AutoConfig.for_model(**conf)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.train()
    return model


def build_seqs(vocab: int, args: argparse.Namespace) -> SeqBatch:
    g = torch.Generator().manual_seed(1)
    seqs = []
    for _ in range(args.responses * args.pairs):
        prefix = torch.randint(10, vocab, (args.prompt,), generator=g).tolist()
        tail = torch.randint(10, vocab, (args.tail,), generator=g).tolist()
        for _ in range(args.k):
            th = torch.randint(10, vocab, (args.thought,), generator=g).tolist()
            seqs.append(ThoughtSeq(prefix + th + tail, args.thought, args.tail))
    return SeqBatch.from_seqs(seqs, 0)


def update_phase(model: Any, seqs: SeqBatch, variant: str) -> None:
    model.zero_grad(set_to_none=True)
    sc = score_thoughts(model, seqs, 5, 6, 0, False, 1.0, VARIANTS[variant])
    (sc.logp.sum() + sc.logp_yes.sum()).backward()


def saved_mib(model: Any, seqs: SeqBatch, variant: str) -> float:
    """MiB of the distinct non-parameter storages saved for the backward by one update phase's forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sc = score_thoughts(model, seqs, 5, 6, 0, False, 1.0, VARIANTS[variant])
        loss = sc.logp.sum() + sc.logp_yes.sum()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del sc, loss
    return sum(n for ptr, n in seen.items() if ptr not in params) / 2**20


def flop_ratio(model: Any, args: argparse.Namespace) -> float:
    c = model.config
    h, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    p, cont, rows = args.prompt, args.thought + args.tail, args.responses * args.pairs * args.k

    def attn(start: int, n: int) -> float:          # Σ context over n tokens starting at position start
        return n * start + n * (n + 1) / 2

    head = 2 * h * vocab * rows * (cont + 1)
    plain = rows * (2 * body * (p + cont) + 4 * layers * h * attn(0, p + cont)) + head
    groups = args.responses * args.pairs
    shared = groups * (2 * body * p + 4 * layers * h * attn(0, p)) \
        + rows * (2 * body * cont + 4 * layers * h * attn(p, cont)) + head
    return shared / plain


def planned_mib(model: Any, args: argparse.Namespace, variant: str) -> dict[str, float]:
    """The planner's activation peak and loss-head term (MiB) for this micro-batch and variant."""
    path = VARIANTS[variant]
    inp = PlanInputs(method="btpo", shape=from_config(args.shape, model.config.to_dict()), device="cpu",
                     precision="fp32", micro_batch=args.pairs, prompt_tokens=args.prompt, gen_tokens=args.thought,
                     tail_tokens=args.tail, n=args.k, shared_prefix=path.shared_prefix != "off",
                     chunked_logprobs=path.chunked_logprobs, packing=path.packing != "off")
    act = activations(inp, geometry(inp), False)
    scale = args.responses / 2 * 1024 / GiB          # every term is linear in the rows; BTPO's pair has 2
    return {"peak": act["peak"] * scale, "head": act["head"] * scale}


def head_grad_mib(model: Any) -> float:
    """The fp32 gradient of the LM head weight (tied to the embedding in these shapes)."""
    return model.get_output_embeddings().weight.numel() * 4 / 2**20


def one(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = build_model(args.shape, args.layers, args.attn)
    seqs = build_seqs(model.config.vocab_size, args)
    print(json.dumps({"variant": args.one, "peak_mib": peak_growth_mib(lambda: update_phase(model, seqs, args.one))}))


SIZES = {"prompt": 512, "thought": 128, "tail": 24, "k": 4, "pairs": 1, "responses": 2, "repeats": 2, "threads": 1}
"""The integer flags (``--prompt`` …); all but ``repeats`` are handed on to the memory subprocesses."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    for name, default in SIZES.items():          # the paper's shape, one pair, one thread
        ap.add_argument(f"--{name}", type=int, default=default,
                        help="responses per pair (1 halves the rows and the memory: same ratios)"
                        if name == "responses" else None)
    ap.add_argument("--variants", default="plain,shared,chunked,shared+chunked,packed,packed+chunked")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa or eager)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--saved", action="store_true", help="also count the tensors saved for the backward")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.one:
        return one(args)
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    model = build_model(args.shape, args.layers, args.attn)
    seqs = build_seqs(model.config.vocab_size, args)
    times: dict[str, list[float]] = {v: [] for v in variants}
    if args.repeats:
        update_phase(model, seqs, variants[0])         # warm-up (untimed); --repeats 0: memory only
    for _ in range(args.repeats):
        for v in variants:
            t0 = time.perf_counter()
            update_phase(model, seqs, v)
            times[v].append(time.perf_counter() - t0)
            print(f"  {v}: {times[v][-1]:.2f} s", file=sys.stderr, flush=True)
    med = {v: statistics.median(t) for v, t in times.items() if t}
    saved = {v: saved_mib(model, seqs, v) for v in variants} if args.saved else {}
    planned = {v: planned_mib(model, args, v) for v in variants}
    head_grad, layers, flops = head_grad_mib(model), model.config.num_hidden_layers, flop_ratio(model, args)
    del model                                          # give the timing run's memory back before the
    gc.collect()                                       # memory subprocesses run beside this process
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    peak: dict[str, float] = {}
    if not args.no_memory:
        for v in variants:
            sizes = [x for name in SIZES if name != "repeats" for x in (f"--{name}", str(getattr(args, name)))]
            cmd = [sys.executable, __file__, "--one", v, "--shape", args.shape, "--attn", args.attn, *sizes] \
                + (["--layers", str(args.layers)] if args.layers else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            peak[v] = json.loads(out)["peak_mib"]
    res = {"shape": args.shape, "layers": layers, "attn": args.attn, "prompt": args.prompt,
           "thought": args.thought, "tail": args.tail, "k": args.k, "pairs": args.pairs, "repeats": args.repeats,
           "threads": args.threads, "rows": len(seqs), "flop_ratio_shared": round(flops, 3),
           "median_s": {v: round(t, 3) for v, t in med.items()},
           "time_ratio": {v: round(med[v] / med["plain"], 3) for v in variants} if "plain" in med else {},
           "peak_mib": {v: round(m, 1) for v, m in peak.items()},
           "peak_ratio": {v: round(peak[v] / peak["plain"], 3) for v in peak} if "plain" in peak else {},
           "head_grad_mib": round(head_grad, 1),
           "act_ratio": {v: round((peak[v] - head_grad) / (peak["plain"] - head_grad), 3)
                         for v in peak} if "plain" in peak else {},
           "saved_mib": {v: round(m, 1) for v, m in saved.items()},
           "saved_ratio": {v: round(saved[v] / saved["plain"], 3) for v in saved} if "plain" in saved else {},
           "planned_mib": {v: {k: round(x, 1) for k, x in planned[v].items()} for v in variants},
           "plan_over_measured": {v: round((planned[v]["peak"] + head_grad) / peak[v], 3) for v in peak}}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
