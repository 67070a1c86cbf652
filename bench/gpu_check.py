"""One-GPU check (< 8 min on one H200): decode speed against the HBM roofline, update-phase MFU,
weight-sync time; Qwen2.5-0.5B shape, bf16, random weights, the ``hf`` engine.

    python bench/gpu_check.py --json gpu_check.json        # on a GPU machine
    python bench/gpu_check.py --smoke                      # anywhere: 2 layers, CPU, fp32, tiny sizes
    python bench/gpu_check.py --scale --json scale.json    # + plan validation, FSDP2 / ZeRO steps (issue 11)
    python bench/gpu_check.py --scale --smoke              # the same on CPU (tiny sizes; ZeRO where deepspeed imports)
    python bench/gpu_check.py --launch --json launch.json  # + btpo train --gpus 1 under fsdp2.yaml, the refusal (issue 27)
    python bench/gpu_check.py --only-packing [--smoke]      # the packing check alone (issue 28; seconds on CPU)

vLLM is not part of it (its wheel cannot be carried to the lent GPU machine); ``bench_engines.py``
compares engines where both are installed.

- decode: ``HFEngine.generate`` of ``--rows`` sequences (``--prompts`` prompts × K) of exactly
  ``--new-tokens`` tokens after ``--prompt-tokens``-token prompts, minus the prefill-only time
  (``max_new_tokens=1``). Roofline: every decode step must read all weights once plus the rows'
  KV cache, so ``tokens/s ≤ rows · bandwidth / (weight bytes + KV bytes at mid-length)``.
- update: forward + backward + AdamW over ``--update-batch`` sequences of ``--update-len`` tokens
  (bf16 autocast weights in bf16); MFU = 6 · params · tokens (+ attention 12 · layers · hidden ·
  len² per sequence) / time / peak bf16 FLOP/s (``--peak-tflops``, H200 dense: 989).
- weight sync: ``HFEngine.update_weights`` of an engine holding its own copy (as under
  FSDP/ZeRO-3 or with a separate rollout copy), from the trainer's parameters, on the device.
- scoring: one BTPO update phase (2·pairs·K rows, prompt 512, thoughts 128, K = 4) per scoring
  path — plain, ``train.shared_prefix``, ``train.chunked_logprobs``, both, ``train.packing`` (the
  prompt once with its K thoughts, dense prompt-sharing mask through SDPA) alone and with chunked
  log-probs — time and allocator peak, as ratios to plain (:func:`scoring_paths`; issues 23, 28),
  and the packed paths' fp32 loss and every gradient against plain (:func:`packed_exactness`).
- packing (issue 28, docs/packing.md): a BT micro-batch of 8 HH-length pairs
  (bench/data/hh_harmless_test_lengths.json) through the scalar head, padded against
  ``train.packing`` — flash-attention varlen (``attn_implementation=flash_attention_2``) where
  ``flash_attn`` imports on CUDA, else the per-sequence SDPA path — forward + backward: loss and
  every gradient's largest difference relative to the gradients' largest element, median seconds
  of both, and the speed-up (:func:`packing_check`).
- ``--scale``: (1) ``bench/plan_memory.py --device cuda`` — ``btpo plan``'s estimate against
  ``torch.cuda.max_memory_allocated`` of real ``bt`` and ``btpo`` runs of random-init Qwen2.5-0.5B
  (4 layers) and SmolLM2-135M shapes (docs/plan.md § Validation); (2) real training steps under
  the shipped ``recipes/accelerate/fsdp2.yaml``, ``zero2.yaml`` and ``zero3.yaml`` (one process,
  ``bt`` on tiny-qwen2, 4 micro-batches per step): each must equal a plain run's losses and its
  ``final/`` must load with plain transformers. ZeRO rows are skipped where ``deepspeed`` does
  not import (install it with ``pip install deepspeed`` first).
- ``--launch`` (issue 27, docs/launching.md): (1) ``btpo train --gpus 1`` of ``bt`` on tiny-qwen2 whose
  config says ``hardware.strategy=fsdp2``: the launcher must start ``recipes/accelerate/fsdp2.yaml``,
  env.json must say fsdp2 / world size 1, ``final/`` must load; (2) the start-up check on the real
  device memory: ``bt/qwen2.5-7b-hh`` (fsdp2, ~161 GiB per process as DDP) started as one plain
  process must be refused before any model loads, in one line naming single/ddp and fsdp2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from btpo_cli.engines import EngineSpec, SamplingParams, build_engine  # noqa: E402

H200 = {"hbm_gbps": 4800.0, "bf16_tflops": 989.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    res = fn()
    sync(device)
    return time.perf_counter() - t0, res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="2 layers, CPU, fp32, tiny sizes: checks the script runs")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--update-batch", type=int, default=16)
    ap.add_argument("--update-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hbm-gbps", type=float, default=H200["hbm_gbps"])
    ap.add_argument("--peak-tflops", type=float, default=H200["bf16_tflops"])
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--scale", action="store_true", help="also: plan validation and FSDP2/ZeRO training steps")
    ap.add_argument("--only-packing", action="store_true", help="run the packing check alone (issue 28)")
    ap.add_argument("--launch", action="store_true", help="also: btpo train --gpus 1 under fsdp2.yaml, and the "
                    "start-up check's refusal (issue 27)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.layers, a.prompts, a.k, a.prompt_tokens, a.new_tokens = 2, 2, 2, 16, 4
        a.update_batch, a.update_len, a.repeats = 2, 32, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.only_packing:
        out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "packing": packing_check(device, a)}
        print(json.dumps(out, indent=2))
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(out, indent=2) + "\n")
        return out
    from transformers import Qwen2ForCausalLM

    from bench.bench_engines import qwen05_config

    cfg = qwen05_config(a.layers)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                           "dtype": str(dtype), "layers": a.layers, "params": n_params, "smoke": a.smoke}
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1000, 150000, (a.prompts, a.prompt_tokens), generator=g).tolist()

    # ---------------------------------------------------------------- decode (engine shares the model)
    eng = build_engine("hf", EngineSpec(model_path="-", pad_token_id=151643, module=model.eval(),
                                        prompts_per_batch=a.prompts))
    full = SamplingParams(temperature=1.0, max_new_tokens=a.new_tokens, stop_token_ids=[])
    pre = SamplingParams(temperature=1.0, max_new_tokens=1, stop_token_ids=[])
    seeds = list(range(a.prompts))
    timed(lambda: eng.generate(prompts, a.k, pre, seeds), device)          # warm-up
    tg = [timed(lambda: eng.generate(prompts, a.k, full, seeds), device)[0] for _ in range(a.repeats)]
    tp = [timed(lambda: eng.generate(prompts, a.k, pre, seeds), device)[0] for _ in range(a.repeats)]
    rows = a.prompts * a.k
    decode_s = statistics.median(tg) - statistics.median(tp)
    decode_tps = rows * (a.new_tokens - 1) / decode_s
    kv_bytes = rows * (a.prompt_tokens + a.new_tokens / 2) * a.layers * 2 * cfg.num_key_value_heads \
        * (cfg.hidden_size // cfg.num_attention_heads) * torch.finfo(dtype).bits // 8
    roof = rows * a.hbm_gbps * 1e9 / (weight_bytes + kv_bytes)
    out["decode"] = {"rows": rows, "new_tokens": a.new_tokens, "prompt_tokens": a.prompt_tokens,
                     "generate_s": statistics.median(tg), "prefill_s": statistics.median(tp),
                     "decode_tokens_per_s": decode_tps, "roofline_tokens_per_s": roof,
                     "fraction_of_roofline": decode_tps / roof, "weight_bytes": weight_bytes, "kv_bytes_mid": kv_bytes}

    # ---------------------------------------------------------------- update phase
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x = torch.randint(1000, 150000, (a.update_batch, a.update_len), generator=g).to(device)

    def step() -> None:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    timed(step, device)                                                      # warm-up (optimizer state)
    tu = statistics.median(timed(step, device)[0] for _ in range(a.repeats))
    tokens = a.update_batch * a.update_len
    flops = 6 * n_params * tokens + 12 * a.layers * cfg.hidden_size * a.update_len ** 2 * a.update_batch
    out["update"] = {"tokens": tokens, "step_s": tu, "tflops": flops / tu / 1e12,
                     "mfu": flops / tu / (a.peak_tflops * 1e12), "peak_tflops": a.peak_tflops}

    # ---------------------------------------------------------------- weight sync into a separate copy
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        copy = build_engine("hf", EngineSpec(model_path=d, pad_token_id=151643, device=str(device),
                                             dtype="bfloat16" if dtype == torch.bfloat16 else "float32"))
        ts = [timed(lambda: copy.update_weights(model.named_parameters()), device)[0] for _ in range(a.repeats)]
        out["weight_sync"] = {"seconds": statistics.median(ts), "bytes": weight_bytes,
                              "gbps": weight_bytes / statistics.median(ts) / 1e9,
                              "copies": copy.stats()["weight_sync_copies"]}
        copy.close()
    out["scoring"] = scoring_paths(model, device, a)
    out["packing"] = packing_check(device, a)
    if a.scale:
        out["scale"] = scale_checks(device, a.smoke)
    if a.launch:
        out["launch"] = launch_checks(device)
    print(json.dumps(out, indent=2))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return out


REPO = Path(__file__).resolve().parents[1]


def scoring_paths(model: Any, device: torch.device, a: argparse.Namespace) -> dict[str, Any]:
    """One BTPO update phase (forward + backward of ``score_thoughts`` over 2·pairs·K rows) per
    scoring path — plain, ``train.shared_prefix``, ``train.chunked_logprobs``, both — interleaved:
    median seconds and the allocator's peak above the model (cuda; None on cpu) and their ratios to
    plain (bench/bench_shared_prefix.py is the CPU version)."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_shared_prefix as bsp

    shape = argparse.Namespace(prompt=32 if a.smoke else 512, thought=8 if a.smoke else 128, tail=24, k=4,
                               pairs=1 if a.smoke else 2, responses=2)
    seqs = bsp.build_seqs(model.config.vocab_size, shape)
    model.train()
    times: dict[str, list[float]] = {v: [] for v in bsp.VARIANTS}
    peak: dict[str, float | None] = {}
    for v in bsp.VARIANTS:                                                   # warm-up + peak memory
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            bsp.update_phase(model, seqs, v)
        peak[v] = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    for _ in range(a.repeats):
        for v in bsp.VARIANTS:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                times[v].append(timed(lambda v=v: bsp.update_phase(model, seqs, v), device)[0])
    model.zero_grad(set_to_none=True)
    med = {v: statistics.median(t) for v, t in times.items()}
    return {"rows": len(seqs), **vars(shape), "median_s": med,
            "time_ratio": {v: med[v] / med["plain"] for v in med}, "peak_mib": peak,
            "peak_ratio": {v: (peak[v] / peak["plain"]) if peak[v] and peak["plain"] else None for v in peak},
            "packed_vs_plain": packed_exactness(model, seqs, bsp)}


def packed_exactness(model: Any, seqs: Any, bsp: Any) -> dict[str, Any]:
    """``train.packing`` (alone and with chunked log-probs) against the plain path, fp32 (no autocast),
    on this device: |Δloss| / max(1, |loss|) and the largest |Δgrad| over every parameter relative to
    the largest plain gradient element. float32 reduce-order differences over these ~10⁴ tokens stay
    far below the 1e-4 ``ok`` threshold (tests/judging/test_packed_prefix.py bounds them on CPU)."""
    res: dict[str, Any] = {}
    ref: tuple[float, dict[str, torch.Tensor]] | None = None
    for v in ("plain", "packed", "packed+chunked"):
        model.zero_grad(set_to_none=True)
        sc = bsp.score_thoughts(model, seqs, 5, 6, 0, False, 1.0, bsp.VARIANTS[v])
        loss = sc.logp.sum() + sc.logp_yes.sum()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if ref is None:
            ref = (float(loss), grads)
            continue
        scale = max(float(g.abs().max()) for g in ref[1].values())
        dl = abs(float(loss) - ref[0]) / max(1.0, abs(ref[0]))
        dg = max(float((grads[n] - g).abs().max()) for n, g in ref[1].items()) / scale
        res[v] = {"loss_rel_diff": dl, "grad_rel_diff": dg, "ok": dl <= 1e-4 and dg <= 1e-4}
        del grads
    model.zero_grad(set_to_none=True)
    return res


def packing_check(device: torch.device, a: argparse.Namespace) -> dict[str, Any]:
    """BT's loss over 8 HH-length pairs, padded against packed (flash-attention varlen on CUDA when
    ``flash_attn`` imports, else per-sequence SDPA): differences and times (docs/packing.md)."""
    import importlib.util
    import random

    from transformers import Qwen2ForSequenceClassification

    from bench.bench_engines import qwen05_config
    from btpo_cli.losses import bt_loss
    from btpo_cli.methods.bt import rewards

    fa = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    cfg = qwen05_config(2 if a.smoke else a.layers)
    cfg.num_labels, cfg.pad_token_id = 1, 0
    if a.smoke:                 # seconds on CPU: the 152k-row embedding's gradient would dominate
        cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size = 2048, 128, 256
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 32
    cfg._attn_implementation = "flash_attention_2" if fa else "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(cfg).to(device=device, dtype=dtype).train()
    pairs = json.loads((REPO / "bench" / "data" / "hh_harmless_test_lengths.json").read_text())["pairs"]
    pick = random.Random(0).sample(pairs, 8)
    lens = [min(n, 48 if a.smoke else n) for n in [c for c, _ in pick] + [r for _, r in pick]]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(10, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]

    def run(packed: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        r = rewards(model, seqs, 0, device, packed)
        loss = bt_loss(r[:8], r[8:])
        loss.backward()
        return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    (l0, g0), (l1, g1) = run(False), run(True)
    scale = max(float(v.abs().max()) for v in g0.values())
    grad_rel = max(float((g0[k] - g1[k]).abs().max()) for k in g0) / scale
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for _ in range(a.repeats):
        for v in times:
            times[v].append(timed(lambda v=v: run(v == "packed"), device)[0])
    med = {v: statistics.median(t) for v, t in times.items()}
    real, padded = sum(lens), len(lens) * max(lens)
    return {"attn": "flash_attention_2 varlen" if fa else "per-sequence sdpa", "dtype": str(dtype),
            "layers": cfg.num_hidden_layers, "sequences": len(seqs), "real_tokens": real, "padded_tokens": padded,
            "loss_padded": l0, "loss_packed": l1, "loss_abs_diff": abs(l0 - l1), "grad_rel_max_diff": grad_rel,
            "median_s": med, "speedup": med["padded"] / med["packed"],
            "tokens_per_s": {v: real / t for v, t in med.items()}}


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def scale_checks(device: torch.device, smoke: bool) -> dict[str, Any]:
    """Plan validation on this device, and one real step sequence per shipped sharding config."""
    import importlib.util

    sys.path.insert(0, str(REPO / "bench"))
    import plan_memory

    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        sizes = ["tiny"] if smoke else ["qwen2.5-0.5b-4l", "smollm2-135m"]
        rows = plan_memory.main(["--device", device.type, "--sizes", *sizes, "--methods", "bt", "btpo",
                                 "--workdir", str(root / "plan"), "--quiet"])
        res["plan"] = [{k: r[k] for k in ("size", "method", "measured", "planned", "ratio", "phase")} for r in rows]
        from data_builders.synthetic import build_synthetic

        data = root / "syn"
        build_synthetic(data, n_train=96, n_test=24, seed=0)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   OMP_NUM_THREADS="1")
        common = ["train", "--method", "bt", "--data", str(data), "--max-steps", "3", "--set", "train.batch_size=8",
                  "--set", "train.micro_batch_size=2", "--set", "optim.lr=1e-3", "--set", "optim.warmup_ratio=0",
                  "--set", "train.precision=fp32"]
        plain = root / "plain"
        subprocess.run([sys.executable, "-m", "btpo_cli", *common, "--out", str(plain)], check=True, env=env,
                       capture_output=True, text=True)
        ref = _losses(plain)
        for config in ("fsdp2", "zero2", "zero3"):
            if config.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
                res[config] = {"skipped": "deepspeed does not import"}
                continue
            if config == "fsdp2" and device.type == "cpu":
                res[config] = {"skipped": "one CPU process runs without FSDP (tests/invariants/test_scale.py runs 2 on gloo)"}
                continue
            run = root / config
            p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                str(REPO / "recipes" / "accelerate" / f"{config}.yaml"), "--num_processes", "1",
                                "--mixed_precision", "no", "-m", "btpo_cli", *common, "--out", str(run)],
                               env=env, capture_output=True, text=True)
            if p.returncode:
                res[config] = {"ok": False, "error": (p.stderr or p.stdout)[-1500:]}
                continue
            got = _losses(run)
            from transformers import AutoModelForSequenceClassification

            AutoModelForSequenceClassification.from_pretrained(str(run / "final"))
            diff = max(abs(x - y) for x, y in zip(got, ref, strict=True))
            res[config] = {"ok": diff <= 1e-4, "losses": got, "plain": ref, "max_abs_diff": diff}
    return res


def launch_checks(device: torch.device) -> dict[str, Any]:
    """``btpo train --gpus 1`` under the recipe's fsdp2 config, and the refusal of a 7B fsdp2 recipe run as
    one plain process, checked against this device's memory (host RAM on a CPU)."""
    res: dict[str, Any] = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    env.pop(_MEMORY_ENV, None)
    with tempfile.TemporaryDirectory() as d:
        from data_builders.synthetic import build_synthetic

        data = Path(d) / "syn"
        build_synthetic(data, n_train=32, n_test=8, seed=0)
        run = Path(d) / "fsdp2"
        btpo = [sys.executable, "-m", "btpo_cli", "train"]
        if device.type == "cpu":
            res["gpus_1_fsdp2"] = {"skipped": "one CPU process runs without FSDP (tests/launching runs 2 on gloo)"}
        else:
            p = subprocess.run([*btpo, "--method", "bt", "--model", "tiny-qwen2", "--data", str(data), "--out", str(run),
                                "--max-steps", "2", "--set", "train.batch_size=8", "--set", "train.micro_batch_size=4",
                                "--set", "hardware.strategy=fsdp2", "--gpus", "1"], env=env, capture_output=True, text=True)
            launch = json.loads((run / "env.json").read_text()).get("launch", {}) if (run / "env.json").exists() else {}
            ok = p.returncode == 0 and (run / "final" / "model.safetensors").exists()
            res["gpus_1_fsdp2"] = {"ok": ok and launch.get("strategy") == "fsdp2" and launch.get("world_size") == 1
                                   and "accelerate/fsdp2.yaml" in p.stderr, "rc": p.returncode, "launch": launch,
                                   "tail": (p.stderr or p.stdout)[-1500:]}
        t0 = time.perf_counter()
        p = subprocess.run([*btpo, "--recipe", "bt/qwen2.5-7b-hh", "--data", str(data), "--out", str(Path(d) / "7b")],
                           env=env, capture_output=True, text=True)
        line = next((ln for ln in p.stderr.splitlines() if "launched as" in ln), "")
        res["refusal"] = {"ok": p.returncode == 1 and "fsdp2" in line and "--force" in line
                          and not (Path(d) / "7b").exists(), "rc": p.returncode, "line": line,
                          "seconds": round(time.perf_counter() - t0, 1), "tail": p.stderr[-800:]}
    return res


_MEMORY_ENV = "BTPO_MEMORY_GIB"      # the check must see the device's own memory here


if __name__ == "__main__":
    main()
