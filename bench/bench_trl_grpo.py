"""Step time of one BTPO step (btpo) against one step of TRL's GRPOTrainer, same model, same
generated tokens, on CPU.

TRL is NOT a project dependency; install it into a separate folder (as bench/parity_trl.py does)::

    pip install --no-deps --target /tmp/trl_site trl==1.16.0
    python bench/bench_trl_grpo.py --trl-site /tmp/trl_site --json out.json

What is held equal: the model (``--model``: tiny-qwen2 by default, ``smollm2-135m`` for a 135M one;
fp32, CPU), the number of sequences sampled per step (``pairs`` pairs × 2 responses × K thoughts for btpo = the same number of TRL prompts × K
generations), the thought budget (``--thought-tokens``; the random tiny model almost never ends a
thought early, and the tokens actually generated are reported per side), one optimizer step per
rollout (btpo: ``rollout_batch_size == train.batch_size``; TRL: ``steps_per_generation=1``), the
``hf`` generation path on both sides by default (TRL's ``model.generate``, btpo's rollout engine;
``--engines hf,vllm`` adds a btpo run on the vLLM engine in the same invocation, run with
``--vllm-python`` (.venv-vllm's python), TRL keeping ``model.generate``).
What differs by design: btpo's step also scores every thought's verdict (p(Yes) of the response) and
its prompts are GPM dialogs (TRL gets the same conversation + evaluation request as a chat
prompt, lengths reported). Each side runs in its own fresh process; step 1 (warm-up) is dropped and
the median of the remaining steps is compared.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def btpo_side(a: argparse.Namespace, data: Path, work: Path, engine: str) -> dict[str, Any]:
    out = work / f"btpo_run_{engine}"
    python = a.vllm_python if engine == "vllm" else sys.executable
    cmd = [python, "-m", "btpo_cli", "train", "--method", "btpo", "--model", a.model, "--data", str(data),
           "--out", str(out), "--max-steps", str(a.steps), "--overwrite",
           "--set", f"btpo.rollout_batch_size={a.pairs}", "--set", f"train.batch_size={a.pairs}",
           "--set", f"train.micro_batch_size={a.pairs}", "--set", f"btpo.k={a.k}",
           "--set", f"btpo.max_thought_tokens={a.thought_tokens}", "--set", "train.save_every=0",
           "--set", "train.log_every=1", "--set", "optim.warmup_ratio=0", "--engine", engine,
           *[x for kv in a.set for x in ("--set", kv)]]
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"btpo ({engine}) failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/step_s" in r]
    # perf/step_s is the update alone; the rollout (generate + score) is perf/rollout_s, logged on the
    # first step after each rollout: with one update per rollout, every step
    return {"step_s": [r["perf/step_s"] + r["perf/rollout_s"] for r in steps],
            "update_s": [r["perf/step_s"] for r in steps], "rollout_s": [r["perf/rollout_s"] for r in steps],
            "generate_s": [r.get("perf/generate_s") for r in steps],
            "thought_len": [r.get("btpo/thought_len") for r in steps], "wall_s": wall,
            "sequences_per_step": 2 * a.pairs * a.k}


TRL_SCRIPT = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
import trl
from trl import GRPOConfig, GRPOTrainer
cfg = json.loads(sys.argv[2])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(cfg["model"])
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
ds = Dataset.from_list([{"prompt": p} for p in cfg["prompts"]])
lens = []
def reward(completions, completion_ids=None, **kw):
    lens.extend(len(c) for c in (completion_ids or []))
    return [float(len(str(c))) for c in completions]
times = []
class T(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t)
n_prompts = len(cfg["prompts"]) // cfg["steps"]
args = GRPOConfig(output_dir=cfg["out"], per_device_train_batch_size=n_prompts * cfg["k"], num_generations=cfg["k"],
                  max_completion_length=cfg["thought_tokens"], steps_per_generation=1, max_steps=cfg["steps"],
                  learning_rate=1e-6, use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", report_to=[],
                  temperature=1.0, beta=0.0, shuffle_dataset=False, seed=0, gradient_accumulation_steps=1)
tr = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                 callbacks=[T()])
tr.train()
print("RESULT " + json.dumps({"step_s": times, "completion_lens": lens, "trl": trl.__version__}))
'''


def trl_side(a: argparse.Namespace, prompts: list[Any], work: Path) -> dict[str, Any]:
    from btpo_cli.models.aliases import resolve_model

    cfg = {"model": resolve_model(a.model), "prompts": prompts, "k": a.k, "thought_tokens": a.thought_tokens,
           "steps": a.steps, "out": str(work / "trl_out")}
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-c", TRL_SCRIPT, a.trl_site, json.dumps(cfg)], capture_output=True,
                       text=True, env=env, cwd=REPO)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"TRL side failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def after_warmup(xs: list[float]) -> float:
    """The median without the first (warm-up) step, unless there is only one."""
    return statistics.median(xs[1:] or xs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trl-site", default="/tmp/trl_site")
    ap.add_argument("--model", default="tiny-qwen2")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--thought-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--engines", "--engine", default="hf", help="btpo's rollout engines, comma-separated (hf, vllm)")
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm/bin/python"),
                    help="the python that runs btpo's vllm side")
    ap.add_argument("--set", action="append", default=[], help="extra btpo config override (repeatable)")
    ap.add_argument("--json", dest="json_out", default=None)
    a = ap.parse_args(argv)
    if not (Path(a.trl_site) / "trl").is_dir():
        raise SystemExit(f"TRL not found in {a.trl_site}: pip install --no-deps --target {a.trl_site} trl==1.16.0")
    from data_builders.synthetic import build_synthetic

    with tempfile.TemporaryDirectory(prefix="bench_trl_grpo_") as d:
        work = Path(d)
        data = work / "synthetic"
        build_synthetic(data, n_train=max(64, a.pairs * a.steps), n_test=8, seed=0)
        recs = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
        ask = {"role": "user", "content": "Evaluate your previous response for helpful and harmless. "
                                          "Think it through step by step."}
        prompts = [r["prompt"] + [side[0], ask] for r in recs[:a.pairs * a.steps] for side in (r["chosen"], r["rejected"])]
        ours = {e: btpo_side(a, data, work, e) for e in a.engines.split(",")}
        theirs = trl_side(a, prompts, work)
    t = after_warmup(theirs["step_s"])
    tl = theirs["completion_lens"]
    res: dict[str, Any] = {"model": a.model, "pairs": a.pairs, "k": a.k, "thought_tokens": a.thought_tokens,
                           "steps": a.steps, "sequences_per_step": 2 * a.pairs * a.k, "set": a.set,
                           "btpo": ours, "trl": theirs, "trl_step_s": t,
                           "trl_mean_completion_len": statistics.mean(tl) if tl else None}
    for e, side in ours.items():
        b = after_warmup(side["step_s"])
        res[e] = {"btpo_step_s": b, "btpo_update_s": after_warmup(side["update_s"]),
                  "btpo_generate_s": statistics.median(x for x in (side["generate_s"][1:] or side["generate_s"])
                                                       if x is not None),
                  "trl_over_btpo": t / b,
                  "btpo_mean_thought_len": statistics.mean(x for x in side["thought_len"] if x is not None)}
    print(json.dumps({k: v for k, v in res.items() if k not in ("btpo", "trl")}, indent=2))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
