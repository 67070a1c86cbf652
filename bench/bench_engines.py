"""The same BTPO-shaped rollout through every rollout engine, side by side in one run.

Run (see bench/README.md; needs .venv-vllm for the vllm engine)::

    .venv-vllm/bin/python bench/bench_engines.py                       # CPU, Qwen2.5-0.5B shape cut to 4 layers
    .venv-vllm/bin/python bench/bench_engines.py --layers 6 --pairs 4 --k 4 --thought-tokens 64 --json out.json

The rollout: ``pairs`` preference pairs, two GPM prompts per pair (chosen, rejected) that share
the pair's dialog and differ from the response on (as BTPO's prefixes do), ``K`` sampled thoughts
of exactly ``--thought-tokens`` tokens each (no stop token; vLLM with ``ignore_eos``), so every
engine generates ``2·pairs·K·thought_tokens`` tokens. The model is a randomly initialised
Qwen2ForCausalLM with Qwen2.5-0.5B's widths (hidden 896, 14 heads of 64, 2 KV heads, MLP 4864,
vocabulary 151,936, tied embeddings) and ``--layers`` layers, saved once to a folder both engines
load (fp32 on CPU); prompt token ids are drawn at random (content does not change the cost).

Each repeat runs every engine once on the full rollout and once with ``max_new_tokens=1``
(prefill, plus one sampled token), in alternating order; times are medians, the speed-up is the
median of per-repeat ratios (the engines run back to back, so a noisy shared machine hits both).
Before timing, both engines decode greedily and the outputs are compared (same weights, fp32).
Besides wall time each call's process CPU time is recorded (``generate_cpu``; both engines run in
this process): on a machine shared with other jobs, run with ``OMP_NUM_THREADS=1`` and read the
CPU-time ratio, which waiting for a core does not inflate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from btpo_cli.console import quiet_third_party  # noqa: E402
from btpo_cli.engines import EngineSpec, SamplingParams, build_engine, request_seed  # noqa: E402

quiet_third_party()     # as the CLI: vLLM's warnings (its chat-template warmup traceback) unless BTPO_VERBOSE=1


def qwen05_config(layers: int) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=896, num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643,
                       eos_token_id=151645, pad_token_id=151643, use_sliding_window=False,
                       max_window_layers=layers, architectures=["Qwen2ForCausalLM"])


def make_model(folder: Path, layers: int, seed: int) -> int:
    """Save a random Qwen2.5-0.5B-shaped model (``layers`` layers, fp32) to ``folder``; its parameter count."""
    from transformers import Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(qwen05_config(layers)).float()
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def btpo_prompts(pairs: int, prompt_tokens: int, response_tokens: int, seed: int) -> list[list[int]]:
    """2·pairs GPM-like prompts: [dialog | response | evaluation request]; chosen and rejected share the dialog."""
    rng = random.Random(seed)
    tail = [rng.randrange(1000, 150000) for _ in range(16)]             # the same instruction everywhere
    dialog_len = prompt_tokens - response_tokens - len(tail)
    out = []
    for _ in range(pairs):
        dialog = [rng.randrange(1000, 150000) for _ in range(dialog_len)]
        for _side in range(2):
            out.append(dialog + [rng.randrange(1000, 150000) for _ in range(response_tokens)] + tail)
    return out


def gemm_floor(folder: Path, rows: int, repeats: int = 3) -> float:
    """Seconds of one decode step's matrix products alone for ``rows`` sequences: every 2-D weight
    (the tied embedding once more, as the LM head) times a (rows, in) activation, fp32. What any
    engine must spend per step on this CPU; attention, sampling and bookkeeping come on top."""
    shapes = [s for n, s in _shapes(folder).items() if len(s) == 2 and "embed_tokens" not in n]
    shapes.append(qwen05_shape_lm_head(folder))
    ws = [torch.randn(s) for s in shapes]
    xs = [torch.randn(rows, s[1]) for s in shapes]
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w, x in zip(ws, xs, strict=True):
            x @ w.T
        best.append(time.perf_counter() - t0)
    return statistics.median(best)


def qwen05_shape_lm_head(folder: Path) -> tuple[int, int]:
    cfg = json.loads((folder / "config.json").read_text())
    return (cfg["vocab_size"], cfg["hidden_size"])


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def cpu_timed(fn: Any) -> tuple[float, float, Any]:
    """(wall seconds, this process's CPU seconds over all its threads, result). Both engines run in
    this process (vLLM in-process), so CPU seconds are each engine's own work: on a machine shared
    with other jobs they move far less than wall time (with one thread, not at all from waiting)."""
    c0 = time.process_time()
    dt, res = timed(fn)
    return dt, time.process_time() - c0, res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--layers", type=int, default=4, help="Qwen2.5-0.5B layers kept (24 in the real model)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--k", type=int, default=4, help="thoughts per prompt")
    ap.add_argument("--thought-tokens", type=int, default=64, help="generated tokens per thought (fixed)")
    ap.add_argument("--prompt-tokens", type=int, default=384)
    ap.add_argument("--response-tokens", type=int, default=96, help="the part where chosen/rejected prompts differ")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-batch", type=int, default=64, help="hf: prompts per prefill")
    ap.add_argument("--model-dir", default=None, help="reuse / keep the random model here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]

    tmp = None
    if args.model_dir:
        folder = Path(args.model_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_engines_")
        folder = Path(tmp.name)
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        n_params = make_model(folder, args.layers, args.seed)
    else:
        n_params = sum(int(torch.tensor(s).prod()) for s in _shapes(folder).values())
    prompts = btpo_prompts(args.pairs, args.prompt_tokens, args.response_tokens, args.seed)
    seeds = [request_seed(args.seed, 0, i) for i in range(len(prompts))]
    max_len = args.prompt_tokens + args.thought_tokens + 8
    built: dict[str, Any] = {}
    build_s: dict[str, float] = {}
    for name in engines:
        spec = EngineSpec(model_path=str(folder), pad_token_id=151643, dtype="float32", max_model_len=max_len,
                          max_num_seqs=max(len(prompts) * args.k, 8), prompts_per_batch=args.hf_batch, seed=args.seed)
        build_s[name], built[name] = timed(lambda spec=spec, name=name: build_engine(name, spec))
        print(f"built {name} in {build_s[name]:.1f}s", flush=True)

    # correctness first: greedy on the same weights
    greedy = {n: e.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=8)) for n, e in built.items()}
    same_greedy = None
    if len(built) > 1:
        a, b = (greedy[n] for n in engines[:2])
        same_greedy = sum(x[0].token_ids == y[0].token_ids for x, y in zip(a, b, strict=True))

    full = SamplingParams(temperature=1.0, max_new_tokens=args.thought_tokens, stop_token_ids=[])
    prefill = SamplingParams(temperature=1.0, max_new_tokens=1, stop_token_ids=[])
    times: dict[str, dict[str, list[float]]] = {n: {"generate": [], "prefill": [], "generate_cpu": [],
                                                    "prefill_cpu": []} for n in engines}
    tokens: dict[str, int] = {}
    for r in range(args.repeats):
        order = engines if r % 2 == 0 else engines[::-1]
        for name in order:
            eng = built[name]
            dt, cpu, res = cpu_timed(lambda eng=eng: eng.generate(prompts, args.k, full, seeds))
            tokens[name] = sum(len(s.token_ids) for g in res for s in g)
            times[name]["generate"].append(dt)
            times[name]["generate_cpu"].append(cpu)
            dt, cpu, _ = cpu_timed(lambda eng=eng: eng.generate(prompts, args.k, prefill, seeds))
            times[name]["prefill"].append(dt)
            times[name]["prefill_cpu"].append(cpu)
            print(f"repeat {r} {name}: generate {times[name]['generate'][-1]:.2f}s "
                  f"(cpu {times[name]['generate_cpu'][-1]:.2f}s) prefill {dt:.2f}s (cpu {cpu:.2f}s)", flush=True)
    expected = len(prompts) * args.k * args.thought_tokens
    assert all(t == expected for t in tokens.values()), (tokens, expected)
    floor = gemm_floor(folder, len(prompts) * args.k)
    out: dict[str, Any] = {
        "model": f"qwen2.5-0.5b-shape, {args.layers} layers, fp32, random init", "params": n_params,
        "prompts": len(prompts), "k": args.k, "thought_tokens": args.thought_tokens, "prompt_tokens": args.prompt_tokens,
        "generated_tokens": expected, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "greedy_identical": same_greedy, "build_seconds": build_s, "engines": {},
        "gemm_floor_step_s": floor, "gemm_floor_decode_tokens_per_s": len(prompts) * args.k / floor}
    for name in engines:
        g, p = statistics.median(times[name]["generate"]), statistics.median(times[name]["prefill"])
        out["engines"][name] = {"generate_s": g, "prefill_s": p, "decode_s": g - p, "tokens_per_s": expected / g,
                                "decode_tokens_per_s": expected / max(g - p, 1e-9), "all_generate_s": times[name]["generate"],
                                "generate_cpu_s": statistics.median(times[name]["generate_cpu"]),
                                "prefill_cpu_s": statistics.median(times[name]["prefill_cpu"]),
                                "tokens_per_cpu_s": expected / statistics.median(times[name]["generate_cpu"]),
                                "all_generate_cpu_s": times[name]["generate_cpu"]}
    if len(engines) > 1:
        base, other = engines[0], engines[1]
        ratios = [a / b for a, b in zip(times[base]["generate"], times[other]["generate"], strict=True)]
        pratios = [a / b for a, b in zip(times[base]["prefill"], times[other]["prefill"], strict=True)]
        cratios = [a / b for a, b in zip(times[base]["generate_cpu"], times[other]["generate_cpu"], strict=True)]
        out["speedup"] = {"of": other, "over": base, "generate": statistics.median(ratios),
                          "prefill": statistics.median(pratios), "per_repeat": ratios,
                          "generate_cpu": statistics.median(cratios), "per_repeat_cpu": cratios}
    for e in built.values():
        if hasattr(e, "stats"):
            out["engines"][e.name]["stats"] = e.stats()
        e.close()
    print(json.dumps(out, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return out


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from btpo_cli.engines.vllm import checkpoint_shapes

    return checkpoint_shapes(folder) or {}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
