"""Packed (``train.packing``) against padded batches: a BT training step and a BT judge's eval, on the
length distribution of the real HH harmless-base test file (bench/data/hh_harmless_test_lengths.json).

Random-init weights of a shipped shape (``btpo_cli/plan/shapes``, default SmolLM2-135M) with a one-label
scalar head, optionally cut to ``--layers`` (every layer is the same, so the packed/padded ratios are
those of the full depth; the absolute rates scale by about layers / full depth); CPU, fp32,
``torch.set_num_threads`` (default 1). Token ids are random (the lengths are what matters).

- (a) **train**: one BT micro-batch = ``--pairs`` pairs (2 × pairs sequences) drawn at random from
  the HH pairs, forward + backward of ``bt_loss`` over ``--micro`` micro-batches; variants
  ``padded`` (today's path: right-padded to the micro-batch's longest), ``packed`` (one row per
  micro-batch, per-sequence causal SDPA: btpo_cli/models/packing.py), ``packed-mask`` (the same row
  through transformers' own packed-position detection with SDPA: a dense (T × T) block mask).
  (``flex_attention`` is not a variant: torch 2.13 raises "FlexAttention does not support backward
  on CPU".)
  Real tokens per second (padding not counted) and the ratio to ``padded``.
- memory: one subprocess per variant runs one micro-batch and reports the peak RSS growth
  (``VmHWM − VmRSS`` before, after ``clear_refs``), as bench/bench_shared_prefix.py does.
- (b) **eval**: ``bt.rewards`` without gradients over ``--eval-pairs`` HH pairs in file order,
  ``--eval-batch`` pairs (2× sequences) per forward — what ``btpo eval`` / ``btpo score`` run —
  padded against packed.

The variants run in the same process, interleaved, ``--repeats`` times (after one untimed warm-up);
medians of the process's CPU time (``time.process_time``: with one thread it is the compute time, and
other jobs on a shared machine do not inflate it as they do wall time). Prints a table and the JSON (``--json OUT``).

    python bench/bench_packing.py --layers 4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peak_rss import peak_growth_mib  # noqa: E402
from btpo_cli.losses import bt_loss  # noqa: E402
from btpo_cli.methods.bt import rewards  # noqa: E402
from btpo_cli.models import packing  # noqa: E402
from btpo_cli.plan.shapes import known_shapes  # noqa: E402

LENGTHS = Path(__file__).parent / "data" / "hh_harmless_test_lengths.json"
TRAIN_VARIANTS = ("padded", "packed", "packed-mask")


def build_model(shape: str, layers: int | None) -> Any:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    conf = {k: v for k, v in json.loads(known_shapes()[shape].read_text()).items()
            if not k.startswith("_") and k != "architectures"}
    if layers:
        conf["num_hidden_layers"] = layers
        conf.pop("layer_types", None)
    conf.update(attn_implementation="sdpa", num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**conf), dtype=torch.float32)


def hh_pairs() -> list[list[int]]:
    return json.loads(LENGTHS.read_text())["pairs"]


def micro_batches(args: argparse.Namespace, vocab: int) -> list[list[list[int]]]:
    """``--micro`` micro-batches of ``--pairs`` random HH pairs: chosen sequences first, then rejected."""
    rng, g = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    pairs = hh_pairs()
    out = []
    for _ in range(args.micro):
        pick = rng.sample(pairs, args.pairs)
        lens = [c for c, _ in pick] + [r for _, r in pick]
        out.append([torch.randint(10, vocab, (n,), generator=g).tolist() for n in lens])
    return out


def _mask_rewards(model: Any, seqs: list[list[int]]) -> torch.Tensor:
    """One packed row through transformers' packed-position detection (attention_mask=None)."""
    row, got = packing.pack(seqs, "cpu")[0], []
    hook = model.score.register_forward_hook(lambda _m, _i, o: got.append(o))
    try:
        model(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False)
    finally:
        hook.remove()
    return got[0][0, row.last, 0].float()


def reward_fn(variant: str) -> Any:
    if variant == "padded":
        return lambda model, seqs: rewards(model, seqs, 0, "cpu")
    if variant == "packed":
        return lambda model, seqs: rewards(model, seqs, 0, "cpu", packed=True)
    return _mask_rewards                                    # packed-mask: the model's own attention


def train_step(model: Any, micro: list[list[list[int]]], variant: str) -> None:
    model.zero_grad(set_to_none=True)
    fn = reward_fn(variant)
    for seqs in micro:
        r = fn(model, seqs)
        m = len(seqs) // 2
        (bt_loss(r[:m], r[m:]) * m).backward()


def eval_pass(model: Any, args: argparse.Namespace, variant: str, vocab: int) -> None:
    g = torch.Generator().manual_seed(args.seed)
    pairs = hh_pairs()[:args.eval_pairs]
    fn = reward_fn(variant)
    with torch.inference_mode():
        for i in range(0, len(pairs), args.eval_batch):
            chunk = pairs[i:i + args.eval_batch]
            fn(model, [torch.randint(10, vocab, (n,), generator=g).tolist() for p in chunk for n in p])


def one(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = build_model(args.shape, args.layers).train()
    micro = micro_batches(args, model.config.vocab_size)[:1]
    print(json.dumps({"variant": args.one, "peak_mib": peak_growth_mib(lambda: train_step(model, micro, args.one))}))


def timed(fn: Any) -> float:
    """CPU seconds of this process (one thread: robust to other jobs on a shared machine, unlike wall time)."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per training micro-batch")
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per timed training step")
    ap.add_argument("--eval-pairs", type=int, default=64)
    ap.add_argument("--eval-batch", type=int, default=16, help="pairs per eval forward (eval.batch_size)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="padded,packed,packed-mask", help=f"of {','.join(TRAIN_VARIANTS)}")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.one:
        return one(args)
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    model = build_model(args.shape, args.layers).train()
    vocab = model.config.vocab_size
    micro = micro_batches(args, vocab)
    real = sum(len(s) for mb in micro for s in mb)
    padded_tokens = sum(len(mb) * max(len(s) for s in mb) for mb in micro)
    times: dict[str, list[float]] = {v: [] for v in variants}
    train_step(model, micro, variants[0])                 # warm-up (untimed)
    for _ in range(args.repeats):
        for v in variants:
            times[v].append(timed(lambda v=v: train_step(model, micro, v)))
            print(f"  train {v}: {times[v][-1]:.2f} s", file=sys.stderr, flush=True)
    med = {v: statistics.median(t) for v, t in times.items()}
    ev: dict[str, list[float]] = {"padded": [], "packed": []}
    if not args.no_eval:
        model.eval()
        eval_pass(model, args, "padded", vocab)                                # warm-up (untimed)
        for _ in range(args.repeats):
            for v in ev:
                ev[v].append(timed(lambda v=v: eval_pass(model, args, v, vocab)))
                print(f"  eval {v}: {ev[v][-1]:.2f} s", file=sys.stderr, flush=True)
    ev_med = {v: statistics.median(t) for v, t in ev.items() if t}
    layers = model.config.num_hidden_layers
    model = None                                          # give its memory back before the subprocesses
    peak: dict[str, float] = {}
    if not args.no_memory:
        for v in variants:
            cmd = [sys.executable, __file__, "--one", v, "--shape", args.shape, "--pairs", str(args.pairs),
                   "--seed", str(args.seed), "--threads", str(args.threads)] \
                + (["--layers", str(args.layers)] if args.layers else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            peak[v] = json.loads(out)["peak_mib"]
    eval_tokens = sum(sum(p) for p in hh_pairs()[:args.eval_pairs])
    res = {"shape": args.shape, "layers": layers, "pairs": args.pairs, "micro": args.micro, "repeats": args.repeats,
           "threads": args.threads, "train_real_tokens": real, "train_padded_tokens": padded_tokens,
           "padding_fraction": round(1 - real / padded_tokens, 3),
           "train_median_cpu_s": {v: round(t, 3) for v, t in med.items()},
           "train_tokens_per_s": {v: round(real / t, 1) for v, t in med.items()},
           "train_speedup": {v: round(med["padded"] / t, 3) for v, t in med.items()} if "padded" in med else {},
           "peak_mib": {v: round(x, 1) for v, x in peak.items()},
           "peak_ratio": {v: round(x / peak["padded"], 3) for v, x in peak.items()} if "padded" in peak else {},
           "eval_pairs": args.eval_pairs, "eval_batch": args.eval_batch, "eval_real_tokens": eval_tokens,
           "eval_median_cpu_s": {v: round(t, 3) for v, t in ev_med.items()},
           "eval_tokens_per_s": {v: round(eval_tokens / t, 1) for v, t in ev_med.items()},
           "eval_speedup": round(ev_med["padded"] / ev_med["packed"], 3) if len(ev_med) == 2 else None}
    print(f"{'variant':<12} {'train CPU s':>8} {'tok/s':>8} {'speedup':>8} {'peak MiB':>9}")
    for v in variants:
        print(f"{v:<12} {med[v]:>8.2f} {res['train_tokens_per_s'][v]:>8.1f} "
              f"{res['train_speedup'].get(v, float('nan')):>8.2f} {peak.get(v, float('nan')):>9.1f}")
    if ev_med:
        print(f"eval: padded {ev_med['padded']:.2f} s, packed {ev_med['packed']:.2f} s, "
              f"speedup {res['eval_speedup']:.2f}x")
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
