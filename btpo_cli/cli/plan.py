"""``btpo plan``: estimated per-GPU memory of a training run, by component, and which strategies fit."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from btpo_cli.config import build_config
from btpo_cli.console import check_format, out, to_tsv, write_text
from btpo_cli.errors import UsageError, check_choice
from btpo_cli.plan.estimate import PRECISIONS, STRATEGIES, GiB, geometry, inputs_from_config, plan_all

HELP = ("Estimate per-GPU memory of a training run by component (weights, gradients, optimizer state, "
        "activations with and without gradient checkpointing, logits, reference model, rollout engine, "
        "LoRA, overhead) for each strategy (ddp, fsdp2, fsdp2-offload, zero2, zero3), and say which fit. "
        "Formulas and assumptions: docs/plan.md.")
EPILOG = """[bold]Examples[/]

  btpo plan --recipe btpo/qwen2.5-7b-hh --gpus 8 --gpu-memory 80

  btpo plan --model llama3.1-8b --method bt --set data.max_length=4096 --gpus 8 --gpu-memory 80 --strategy zero3

  btpo plan --recipe btpo/qwen2.5-7b-hh --gpus 1 --gpu-memory 80 --lora-r 16 --format json

  btpo plan --model runs/my-model/final --method btpo --device cpu      (fp32 on the CPU, GiB of RAM)
"""


def plan(
    recipe: Path | None = typer.Option(None, "--recipe", "-r", help="Recipe name or file (its hardware: block "
                                       "gives the defaults of --gpus/--gpu-memory/--nodes/--strategy)."),
    model: str | None = typer.Option(None, "--model", help="Model alias, Hub id of a known backbone, or a local "
                                     "folder with config.json."),
    method: str | None = typer.Option(None, "--method", "-m", help="Training method."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Override any config key: --set rollout.n=8."),
    gpus: int | None = typer.Option(None, "--gpus", min=1, help="GPUs (processes) per node."),
    nodes: int | None = typer.Option(None, "--nodes", min=1, help="Nodes."),
    gpu_memory: float | None = typer.Option(None, "--gpu-memory", min=0.1, help="Memory of one GPU, GiB."),
    strategy: str = typer.Option("all", "--strategy", help="ddp | fsdp2 | fsdp2-offload | zero2 | zero3 | all."),
    device: str = typer.Option("cuda", "--device", help="cuda, or cpu (fp32 on the CPU; no CUDA overhead)."),
    precision: str | None = typer.Option(None, "--precision", help="fp32 | amp (fp32 weights + bf16 autocast) | "
                                         "bf16 (bf16 weights, fp32 optimizer state); default: from the config."),
    engine: str | None = typer.Option(None, "--engine", help="Rollout engine: hf | vllm (default: rollout.engine; "
                                      "auto = the larger of the two on cuda)."),
    lora_r: int | None = typer.Option(None, "--lora-r", min=0, help="LoRA rank (0 = full fine-tune; default: "
                                      "model.lora.r where the config has it)."),
    lora_targets: str | None = typer.Option(None, "--lora-targets", help="Comma-separated module names "
                                            "(default: all seven linears)."),
    load_in_4bit: bool | None = typer.Option(None, "--load-in-4bit/--no-load-in-4bit", help="QLoRA: 4-bit base."),
    tail_tokens: int | None = typer.Option(None, "--tail-tokens", min=0, help="BTPO's GPM tail after the thought "
                                           "(default 40)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json | tsv (component × strategy, GiB)."),
) -> None:
    check_format(fmt)
    check_choice("--strategy", strategy, (*STRATEGIES, "all"))
    check_choice("--device", device, ("cuda", "cpu"))
    check_choice("--precision", precision, PRECISIONS)
    check_choice("--engine", engine, ("hf", "vllm"))
    if recipe is None and (model is None or method is None):
        raise UsageError("btpo plan needs --recipe, or --model and --method")
    cfg = build_config(recipe, overrides, {"method": method, "model.name": model})
    hw = cfg.hardware
    chosen = list(STRATEGIES) if strategy == "all" else [strategy]
    extra: dict[str, Any] = {}
    if precision:
        extra["precision"] = precision
    if engine:
        extra["engine"] = engine
    if lora_r is not None:
        extra["lora_r"] = lora_r
    if lora_targets:
        extra["lora_targets"] = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    if load_in_4bit is not None:
        extra["load_in_4bit"] = load_in_4bit
    if tail_tokens is not None:
        extra["tail_tokens"] = tail_tokens
    inp = inputs_from_config(cfg, gpus=gpus or hw.gpus, nodes=nodes or hw.nodes,
                             gpu_memory_gb=gpu_memory if gpu_memory is not None else hw.gpu_memory_gb,
                             device=device, **extra)
    ests = plan_all(inp, chosen)
    if fmt == "json":
        out.print_json(json.dumps(plan_json(inp, ests, hw.strategy)))
        return
    if fmt == "tsv":
        write_text(plan_tsv(inp, ests))
        return
    out.print(plan_table(inp, ests, hw.strategy))
    for line in plan_notes(inp, ests):
        out.print(line, highlight=False)


def _gb(x: float) -> str:
    return f"{x / GiB:.1f}" if x else "-"


ROWS = ("weights", "gradients", "optimizer state", "working copies", "ddp buckets", "lora adapter",
        "reference model", "activations", "logits (loss head)", "optimizer step temporaries",
        "engine (vllm, awake)", "overhead")
ROLLOUT_ROWS = ("engine weights", "engine KV cache", "engine transients", "engine (vllm share)",
                "scoring transients")


def plan_table(inp: Any, ests: list[Any], recipe_strategy: str | None = None) -> Table:
    """Components (GiB) × strategies, the two phases, the peak and the verdict."""
    geo = geometry(inp)
    title = (f"{inp.method} · {inp.shape.name} ({inp.shape.params(geo.head) / 1e9:.2f} B params) · "
             f"{inp.gpus}×{inp.nodes} {inp.device} · {inp.precision}"
             + (f" · LoRA r={inp.lora_r}{' 4-bit' if inp.load_in_4bit else ''}" if inp.lora_r else "")
             + f" · checkpointing {'on' if inp.gradient_checkpointing else 'off'}")
    t = Table(title=title, caption="GiB per GPU" if inp.device == "cuda" else "GiB of RAM (cpu, fp32)")
    t.add_column("component")
    for e in ests:
        t.add_column(e.strategy + (" *" if e.strategy == recipe_strategy else ""), justify="right")
    for row in ROWS:
        vals = [e.update.get(row, 0.0) for e in ests]
        if any(vals):
            t.add_row(row, *(_gb(v) for v in vals))
    t.add_row("[bold]update phase[/]", *(f"[bold]{e.update_total / GiB:.1f}[/]" for e in ests))
    if any(e.rollout for e in ests):
        for row in ROLLOUT_ROWS:
            vals = [e.rollout.get(row, 0.0) for e in ests]
            if any(vals):
                t.add_row("  " + row, *(_gb(v) for v in vals))
        t.add_row("[bold]rollout phase[/]", *(f"[bold]{e.rollout_total / GiB:.1f}[/]" for e in ests))
    t.add_row("[bold]peak[/]", *(f"[bold]{e.peak / GiB:.1f}[/]" for e in ests))
    if any(e.host for e in ests):
        t.add_row("host RAM (offloaded)", *(_gb(e.host) for e in ests))
    colors = {"fits": "green", "tight": "yellow", "no": "red", "?": "dim"}
    t.add_row("fits", *(f"[{colors[v]}]{v}[/]" for v in (e.verdict(inp.gpu_memory_gb) for e in ests)))
    return t


def plan_tsv(inp: Any, ests: list[Any]) -> str:
    """``--format tsv``: one line per component and phase total (GiB), one column per strategy, then the verdict."""
    rows: list[list[Any]] = []
    for row in ROWS:
        vals = [e.update.get(row, 0.0) for e in ests]
        if any(vals):
            rows.append([row, *(round(v / GiB, 3) for v in vals)])
    rows.append(["update phase", *(round(e.update_total / GiB, 3) for e in ests)])
    if any(e.rollout for e in ests):
        for row in ROLLOUT_ROWS:
            vals = [e.rollout.get(row, 0.0) for e in ests]
            if any(vals):
                rows.append([row, *(round(v / GiB, 3) for v in vals)])
        rows.append(["rollout phase", *(round(e.rollout_total / GiB, 3) for e in ests)])
    rows.append(["peak", *(round(e.peak / GiB, 3) for e in ests)])
    rows.append(["fits", *(e.verdict(inp.gpu_memory_gb) for e in ests)])
    return to_tsv(["component", *(e.strategy for e in ests)], rows)


def plan_notes(inp: Any, ests: list[Any]) -> list[str]:
    geo = geometry(inp)
    e = ests[0]
    lines = [f"micro-batch: {e.info['rows_per_micro_batch']} sequences × {geo.seq_len} tokens "
             f"= {e.info['tokens_per_micro_batch']} tokens; activations {e.info['activations_no_checkpointing'] / GiB:.1f}"
             f" GiB without gradient checkpointing, {e.info['activations_checkpointing'] / GiB:.1f} GiB with it"]
    if inp.gpu_memory_gb:
        fit = [x.strategy for x in ests if x.verdict(inp.gpu_memory_gb) in ("fits", "tight")]
        lines.append(f"fits {inp.gpu_memory_gb:g} GiB: {', '.join(fit) if fit else 'none of these'}"
                     "  (fits ≤ 90 % of the GPU, tight ≤ 100 %; formulas: docs/plan.md)")
    return lines


def plan_json(inp: Any, ests: list[Any], recipe_strategy: str | None = None) -> dict[str, Any]:
    geo = geometry(inp)

    def gib(d: dict[str, float]) -> dict[str, float]:
        return {k: round(v / GiB, 3) for k, v in d.items()}

    fields = {k: v for k, v in asdict(inp).items() if k != "shape"}
    fields["lora_targets"] = list(inp.lora_targets)
    return {
        "model": asdict(inp.shape), "params": inp.shape.params(geo.head), "inputs": fields,
        "geometry": asdict(geo), "recipe_strategy": recipe_strategy, "unit": "GiB",
        "strategies": {e.strategy: {
            "update": gib(e.update), "update_total": round(e.update_total / GiB, 3),
            "rollout": gib(e.rollout), "rollout_total": round(e.rollout_total / GiB, 3),
            "peak": round(e.peak / GiB, 3), "peak_phase": e.info["phase"], "host": round(e.host / GiB, 3),
            "activations_checkpointing": round(e.info["activations_checkpointing"] / GiB, 3),
            "activations_no_checkpointing": round(e.info["activations_no_checkpointing"] / GiB, 3),
            "verdict": e.verdict(inp.gpu_memory_gb)} for e in ests},
    }
