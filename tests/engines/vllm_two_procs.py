"""Run by tests/engines/test_engine_vllm.py under `accelerate launch --multi_gpu --num_processes 2` (gloo, CPU).

Each process builds its own colocated VLLMEngine inside accelerate's world (external_launcher),
samples its slice of the prompts, syncs perturbed weights, closes the engine, builds a second one,
and checks that accelerate's process group still works. Writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import AutoModelForCausalLM

from btpo_cli.engines import EngineSpec, SamplingParams, build_engine


def main() -> None:
    folder, out, prompts_file = sys.argv[1:4]
    state = PartialState(cpu=True)                          # MULTI_CPU: a gloo group, as btpo forms it
    rank, world = state.process_index, state.num_processes
    prompts = json.loads(Path(prompts_file).read_text())
    mine = list(range(rank, len(prompts), world))
    spec = EngineSpec(model_path=folder, pad_token_id=0, max_model_len=512, max_num_seqs=16)
    eng = build_engine("vllm", spec)
    sp = SamplingParams(temperature=1.0, max_new_tokens=8)
    sampled = eng.generate([prompts[i] for i in mine], 2, sp, seeds=[1000 + i for i in mine])
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    eng.update_weights(list(ref.named_parameters()))
    greedy = eng.generate([prompts[i] for i in mine], 1, SamplingParams(temperature=0, max_new_tokens=8))
    external = eng.external_launcher
    eng.close()
    eng2 = build_engine("vllm", spec)                       # a second engine in the same world
    again = eng2.generate([prompts[i] for i in mine], 2, sp, seeds=[1000 + i for i in mine])
    eng2.close()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)                                      # accelerate's group survived both closes
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": world, "mine": mine, "external_launcher": external,
                   "sampled": [[s.token_ids for s in g] for g in sampled],
                   "again": [[s.token_ids for s in g] for g in again],
                   "greedy": [g[0].token_ids for g in greedy], "allreduce": t.item()}, f)
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
