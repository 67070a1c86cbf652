"""Benchmark one BTPO rollout batch: generate, score, update; and shared vs naive K-fold prefill.

Run (see bench/README.md)::

    python bench/bench_btpo.py                                  # tiny-qwen2 on CPU
    python bench/bench_btpo.py --model qwen2.5-0.5b-shape --device cuda --pairs 8 --k 4 \\
        --max-thought-tokens 256 --prompt-tokens 1024

Every repeat runs, on the same weights and in alternating order, the shared-prefill generation
and the naive (prompts repeated K times before the prefill) generation with the same seed and a
fixed number of decoded tokens (no stop token), then the prefill alone (``max_new_tokens=1``)
both ways, then scores the shared-prefill thoughts (no grad) and does one optimizer step of the
BTPO surrogate on them. Times are medians over repeats; ratios are medians of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from btpo_cli.config import Config, ModelConfig  # noqa: E402
from btpo_cli.data.synthetic import make_pair  # noqa: E402
from btpo_cli.engines import SamplingParams
from btpo_cli.engines.hf import HFEngine  # noqa: E402
from btpo_cli.judging.logprobs import SeqBatch, thought_sequence  # noqa: E402
from btpo_cli.methods.btpo import GPMTokens, Rollout, encode_pairs, micro_loss, score_chunked  # noqa: E402
from btpo_cli.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from btpo_cli.training.steps import chunks  # noqa: E402

MODELS = ("tiny-qwen2", "qwen2.5-0.5b-shape")
TOKENIZER = "tiny-qwen2"


def qwen05_shape(tok: Any, dtype: torch.dtype) -> Any:
    """A randomly initialised Qwen2ForCausalLM with Qwen2.5-0.5B's shapes (nothing downloaded)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                      max_position_embeddings=32768, rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(dtype)


def long_records(tok: Any, n_pairs: int, prompt_tokens: int, seed: int) -> list:
    """Synthetic arithmetic pairs whose prompt is preceded by a long multi-turn dialog."""
    rng = random.Random(seed)
    out = []
    for i in range(n_pairs):
        rec = make_pair(rng, i, "bench", 2)
        history: list[dict[str, str]] = []
        # each filler exchange is ~25 tokens; overshoot, encode_pairs cuts it to prompt_tokens from the left
        while len(history) < 2 * (prompt_tokens // 10 + 4):
            f = make_pair(rng, -1, "filler", 3)
            history += [f.prompt[0], f.chosen[0]]
        rec.prompt = history + rec.prompt
        out.append(rec)
    return out


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Any) -> tuple[float, Any]:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, res


def tok_lists(samples: list) -> list[list[int]]:
    return [s.token_ids for group in samples for s in group]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="tiny-qwen2")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=8, help="pairs in the rollout batch (2·pairs prompts)")
    ap.add_argument("--k", type=int, default=4, help="thoughts per response")
    ap.add_argument("--max-thought-tokens", type=int, default=64, help="decoded tokens per thought (fixed)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="GPM prefix length (prompt tokens)")
    ap.add_argument("--micro-batch", type=int, default=0, help="pairs per forward in score/update (0: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    timer = Timer(device)

    tok = load_tokenizer(TOKENIZER, padding_side="left")
    judge = GPMTokens.from_tokenizer(tok)
    if args.model == "tiny-qwen2":
        model = load_causal_lm(ModelConfig(name="tiny-qwen2", dtype="float32"), device.type)
    else:
        model = qwen05_shape(tok, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.to(device)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    n_params = sum(p.numel() for p in model.parameters())

    cfg = Config(method="btpo")
    cfg.rollout.n, cfg.rollout.max_new_tokens = args.k, args.max_thought_tokens
    cfg.train.micro_batch_size = args.micro_batch or args.pairs
    records = long_records(tok, args.pairs, args.prompt_tokens, args.seed)
    pairs, enc = encode_pairs(judge, records, args.prompt_tokens)
    if len(pairs) != args.pairs:
        raise SystemExit(f"only {len(pairs)} of {args.pairs} pairs fit in --prompt-tokens {args.prompt_tokens}")
    prompts = [p for _, w, lo in pairs for p in (w, lo)]                         # (2·pairs,)
    prefixes = [p.prefix for p in prompts]
    k, m = args.k, args.max_thought_tokens
    shared = HFEngine(model, judge.pad_id, batch_size=len(prefixes), shared_prefill=True)
    naive = HFEngine(model, judge.pad_id, batch_size=len(prefixes), shared_prefill=False)
    engines = {"shared": shared, "naive": naive}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))

    # ---- greedy outputs must not depend on the prefill strategy (also warms generation up)
    model.eval()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=m, stop_token_ids=[])
    g_out = {name: tok_lists(e.generate(prefixes, k, greedy)) for name, e in engines.items()}
    greedy_diff = sum(a != b for a, b in zip(g_out["shared"], g_out["naive"], strict=True))

    times: dict[str, list[float]] = {x: [] for x in ("generate", "generate_naive", "prefill", "prefill_naive",
                                                    "score", "update")}
    gen_tokens, sampled_diff = 0, 0
    for rep in range(args.warmup + args.repeats):
        keep = rep >= args.warmup
        model.eval()
        order = ("shared", "naive") if rep % 2 == 0 else ("naive", "shared")
        sample = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=m, stop_token_ids=[], seed=args.seed + rep)
        one = SamplingParams(temperature=1.0, max_new_tokens=1, stop_token_ids=[], seed=args.seed + rep)
        res, rt = {}, {}
        for name in order:
            before = engines[name].stats()["generated_tokens"]
            rt[name], res[name] = timer(lambda e=engines[name], sp=sample: e.generate(prefixes, k, sp))
            if name == "shared":
                gen_tokens = engines[name].stats()["generated_tokens"] - before
        pt = {name: timer(lambda e=engines[name], sp=one: e.generate(prefixes, k, sp))[0] for name in order}
        sampled_diff += sum(a != b for a, b in zip(tok_lists(res["shared"]), tok_lists(res["naive"]), strict=True))
        seqs = SeqBatch.from_seqs([thought_sequence(p, s, judge.eot_id) for p, g in zip(prompts, res["shared"], strict=True)
                                   for s in g], judge.pad_id)

        def score(seqs=seqs):
            return score_chunked(model, seqs, judge, cfg, cfg.train.micro_batch_size * 2 * k)

        t_score, (old_logp, old_yes) = timer(score)
        ro = Rollout(seqs, old_logp, old_yes.view(len(pairs), 2, k), None)

        def update(ro=ro):
            model.train()
            for ids in chunks(list(range(len(pairs))), cfg.train.micro_batch_size):
                loss, _ = micro_loss(model, ro, ids, judge, cfg, device)
                (loss * len(ids) / len(pairs)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)

        t_update, _ = timer(update)
        if keep:
            times["generate"].append(rt["shared"])
            times["generate_naive"].append(rt["naive"])
            times["prefill"].append(pt["shared"])
            times["prefill_naive"].append(pt["naive"])
            times["score"].append(t_score)
            times["update"].append(t_update)
        seq_tokens = int(seqs.mask.sum())
        print(f"[{'rep' if keep else 'warmup'} {rep}] gen shared {rt['shared']:.3f}s naive {rt['naive']:.3f}s | "
              f"prefill shared {pt['shared']:.3f}s naive {pt['naive']:.3f}s | score {t_score:.3f}s | "
              f"update {t_update:.3f}s", flush=True)

    med = {x: statistics.median(v) for x, v in times.items()}
    ratio = {"generate": statistics.median(n / s for n, s in zip(times["generate_naive"], times["generate"],
                                                                 strict=True)),
             "prefill": statistics.median(n / s for n, s in zip(times["prefill_naive"], times["prefill"],
                                                                strict=True))}
    n_prompts = len(prefixes)
    prompt_tokens = sum(len(p) for p in prefixes)
    tokens = {"generate": gen_tokens, "generate_naive": gen_tokens,
              "prefill": prompt_tokens, "prefill_naive": prompt_tokens * k,
              "score": seq_tokens, "update": seq_tokens}
    what = {"generate": "generated tokens", "generate_naive": "generated tokens",
            "prefill": "prompt tokens prefilled", "prefill_naive": "prompt tokens prefilled",
            "score": "sequence tokens (no grad)", "update": "sequence tokens (fwd+bwd) + AdamW step"}
    result = {
        "date": time.strftime("%Y-%m-%d"), "model": args.model, "device": args.device, "dtype": dtype,
        "params": n_params, "torch_threads": torch.get_num_threads(),
        "settings": {"pairs": args.pairs, "k": k, "max_thought_tokens": m, "prompt_tokens": args.prompt_tokens,
                     "micro_batch": cfg.train.micro_batch_size, "repeats": args.repeats, "warmup": args.warmup,
                     "prompts": n_prompts, "sequences": n_prompts * k, "truncated_prompts": enc["truncated"]},
        "phases": {x: {"median_s": med[x], "times_s": times[x], "tokens": tokens[x],
                       "tokens_per_s": tokens[x] / med[x], "counts": what[x]} for x in times},
        "rollout_plus_update_s": med["generate"] + med["score"] + med["update"],
        "shared_prefill_speedup": ratio,
        "greedy_identical": greedy_diff == 0, "greedy_differing_sequences": greedy_diff,
        "sampled_identical": sampled_diff == 0,
    }
    report(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(r: dict[str, Any]) -> None:
    s = r["settings"]
    title = (f"{r['model']} ({r['params'] / 1e6:.1f}M params, {r['dtype']}) on {r['device']}: {s['pairs']} pairs × 2 × "
             f"K={s['k']} = {s['sequences']} thoughts of {s['max_thought_tokens']} tokens, "
             f"prompts {s['prompt_tokens']} tokens, median of {s['repeats']}")
    rows = [("generate (shared prefill)", "generate"), ("generate (naive K-fold prefill)", "generate_naive"),
            ("prefill only (shared)", "prefill"), ("prefill only (naive K-fold)", "prefill_naive"),
            ("score (no grad)", "score"), ("update (fwd+bwd+AdamW)", "update")]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for c in ("phase", "seconds (median)", "tokens", "tokens/s"):
            t.add_column(c, justify="left" if c == "phase" else "right")
        for label, key in rows:
            p = r["phases"][key]
            t.add_row(label, f"{p['median_s']:.4f}", str(p["tokens"]), f"{p['tokens_per_s']:.1f}")
        t.add_row("rollout + update (generate+score+update)", f"{r['rollout_plus_update_s']:.4f}", "", "")
        Console(width=140).print(t)
    except ImportError:
        print(title)
        for label, key in rows:
            p = r["phases"][key]
            print(f"  {label:34s} {p['median_s']:10.4f} s {p['tokens']:8d} tok {p['tokens_per_s']:10.1f} tok/s")
    sp = r["shared_prefill_speedup"]
    print(f"shared-prefill speed-up (naive / shared): generate ×{sp['generate']:.2f}, prefill only "
          f"×{sp['prefill']:.2f}")
    print(f"greedy outputs identical: {r['greedy_identical']} ({r['greedy_differing_sequences']} differing); "
          f"sampled outputs (same seed) identical: {r['sampled_identical']}")


if __name__ == "__main__":
    main()
