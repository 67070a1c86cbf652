"""Check ``btpo plan`` against measured peak memory of real training steps (random-init models).

Run (see bench/README.md)::

    python bench/plan_memory.py                                  # CPU, fp32: tiny / ~30M / ~120M, bt + btpo
    python bench/plan_memory.py --sizes 30m --methods btpo --ckpt both
    python bench/plan_memory.py --device cuda --sizes qwen2.5-0.5b smollm2-135m --methods bt btpo --ckpt both

Each row is one real ``btpo train`` run (``btpo_cli/plan/measure.py``: a fresh process, the
method's own loop, two optimizer steps with gradient accumulation, the rollout engine for BTPO)
of a random-init model of the named architecture on a generated data set whose prompts are cut
to exactly ``--max-length`` tokens. ``measured`` is the peak resident set size over the process's
baseline (cpu) or ``max_memory_allocated`` (cuda); ``planned`` is the planner's estimate for the
same config with no CUDA context/fragmentation allowance (cpu) or without its fixed overhead
(cuda, compared with the allocator's peak). Prints a markdown table (and ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from btpo_cli.plan.estimate import GiB, estimate, inputs_from_config  # noqa: E402
from btpo_cli.plan.measure import (  # noqa: E402
    WARMUP_CONFIG,
    build_random_model,
    gpm_tail_tokens,
    measure,
    write_long_pairs,
)
from btpo_cli.plan.shapes import from_config, known_shapes  # noqa: E402

# Random-init Qwen2-shaped models small enough for a CPU (config.json fields).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(model_type="qwen2", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=352, vocab_size=4096, tie_word_embeddings=True,
                 max_position_embeddings=4096),
    "30m": dict(model_type="qwen2", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, intermediate_size=1408, vocab_size=16384, tie_word_embeddings=True,
                max_position_embeddings=4096),
    # Qwen2.5-0.5B's own shape (hidden 896, 14/2 heads, MLP 4864, 151 936-token vocabulary), 4 of its 24 layers
    "qwen2.5-0.5b-4l": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=4, num_attention_heads=14,
                            num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                            tie_word_embeddings=True, max_position_embeddings=4096),
    "120m": dict(model_type="qwen2", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=2048, vocab_size=32768, tie_word_embeddings=False,
                 max_position_embeddings=4096),
}


def size_config(name: str) -> dict[str, Any]:
    if name in SIZES:
        return dict(SIZES[name])
    shipped = known_shapes()
    if name in shipped:
        return {k: v for k, v in json.loads(shipped[name].read_text()).items()
                if not k.startswith("_") and k != "architectures"}
    raise SystemExit(f"unknown size {name!r} (have {', '.join([*SIZES, *shipped])})")


def run_config(method: str, model_dir: Path, data_dir: Path, out: Path, ckpt: bool, args: argparse.Namespace) -> dict[str, Any]:
    """The run: 2 optimizer steps, 2 micro-batches each (so gradients exist during a backward)."""
    cfg: dict[str, Any] = {
        "method": method, "out": str(out),
        "model": {"name": str(model_dir), "gradient_checkpointing": ckpt},
        "data": {"path": str(data_dir), "max_length": args.max_length},
        "optim": {"lr": 1e-4, "warmup_ratio": 0.0, "scheduler": "constant"},
        "train": {"max_steps": 2, "batch_size": 2 * args.micro, "micro_batch_size": args.micro,
                  "save_every": 0, "keep_checkpoints": 1, "seed": 0},
    }
    if method in ("btpo", "grpo-pair", "grpo-point"):
        cfg["rollout"] = {"engine": "hf", "n": args.k, "max_new_tokens": args.gen, "batch_size": 4 * args.micro,
                          "prompts_per_batch": args.prompts_per_batch, "temperature": 1.0}
    return cfg


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "30m", "120m"])
    ap.add_argument("--methods", nargs="+", default=["bt", "btpo"])
    ap.add_argument("--ckpt", choices=["off", "on", "both"], default="off")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64, help="rollout.max_new_tokens (BTPO thought budget)")
    ap.add_argument("--k", type=int, default=4, help="rollout.n")
    ap.add_argument("--micro", type=int, default=1, help="train.micro_batch_size (pairs)")
    ap.add_argument("--prompts-per-batch", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="print nothing; return the rows (tests)")
    args = ap.parse_args(argv)

    from btpo_cli.config import config_from_dict

    root = Path(args.workdir or tempfile.mkdtemp(prefix="btpo-planmem-"))
    data_dir = write_long_pairs(root / "data", 32)
    rows = []
    for size in args.sizes:
        conf = size_config(size)
        model_dir = build_random_model(root / "models" / size, conf)
        warm_dir = build_random_model(root / "models" / f"warmup-{conf['model_type']}",
                                      {"model_type": conf["model_type"], **WARMUP_CONFIG})
        shape = from_config(size, conf)
        for method in args.methods:
            for ckpt in {"off": [False], "on": [True], "both": [False, True]}[args.ckpt]:
                cfg_dict = run_config(method, model_dir, data_dir, root / "runs" / f"{size}-{method}-{int(ckpt)}",
                                      ckpt, args)
                got = measure(cfg_dict, root / "work" / f"{size}-{method}-{int(ckpt)}", args.device,
                              warmup_model=warm_dir)
                cfg = config_from_dict(cfg_dict)
                tail = gpm_tail_tokens(str(model_dir), args.max_length)
                inp = inputs_from_config(cfg, gpus=1, device=args.device, tail_tokens=tail, context_gb=0.0,
                                         nccl_gb=0.0, fragmentation=0.0)
                est = estimate(inp, "ddp")
                measured = got.get("train_peak_rss_over_baseline", got["peak_rss_over_baseline"]) \
                    if args.device == "cpu" else got["max_allocated"]
                rows.append({"size": size, "params": shape.params("reward" if method.startswith("bt") and method != "btpo"
                                                                  else "causal"),
                             "method": method, "ckpt": ckpt, "measured": measured, "planned": est.peak,
                             "phase": est.info["phase"], "ratio": est.peak / measured, "raw": got})
                print(f"{size:>6} {method:>5} ckpt={int(ckpt)} measured {measured / GiB:7.3f} GiB  planned "
                      f"{est.peak / GiB:7.3f} GiB  ratio {est.peak / measured:5.2f}  ({est.info['phase']})",
                      file=sys.stderr, flush=True)
    if args.quiet:
        return rows
    if args.json:
        print(json.dumps(rows, indent=2))
        return rows
    print("| model | params | method | ckpt | measured (GiB) | planned (GiB) | planned / measured | peak phase |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['params'] / 1e6:.1f} M | {r['method']} | {'on' if r['ckpt'] else 'off'} | "
              f"{r['measured'] / GiB:.3f} | {r['planned'] / GiB:.3f} | {r['ratio']:.2f} | {r['phase']} |")
    return rows


if __name__ == "__main__":
    main()
