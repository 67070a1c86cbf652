"""``btpo eval``: evaluate a run folder by the shared protocol (METHOD.md §7)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.table import Table

from btpo_cli.console import console

HELP = "Evaluate a trained run: order-swapped / pointwise accuracy, clipped at 50%."
EPILOG = """[bold]Examples[/]

  btpo eval --checkpoint runs/bt

  btpo eval --checkpoint runs/btpo --data data/hh --split test --limit 200

  btpo eval --checkpoint runs/bt --which best      # best/, kept by train.eval_every

Writes runs/<run>/eval/<dataset>.json and <dataset>.predictions.jsonl and prints their paths on
stdout, one per line (--json: the summary instead); the table goes to stderr.
"""


def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Run folder (its final/ model is evaluated)."),
    which: str = typer.Option("final", "--which", help="final, or best: the model kept by train.eval_every "
                              "(results under RUN/eval/best/)."),
    data: str | None = typer.Option(None, "--data", "-d", help="Dataset (default: the one it trained on)."),
    split: str | None = typer.Option(None, "--split", help="Split to evaluate (default: data.eval_split)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Pairs per batch."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate only the first N pairs."),
    eval_samples: int | None = typer.Option(None, "--eval-samples", min=0,
                                            help="BTPO: also the mean p(Yes) over K sampled thoughts."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="Thought budget."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if present)."),
    engine: str | None = typer.Option(None, "--engine", help="Engine for greedy thoughts/rationales: auto, hf, "
                                      "vllm (default: the run's rollout.engine)."),
    as_json: bool = typer.Option(False, "--json", help="Print the eval summary as JSON on stdout (not the paths)."),
) -> None:
    from btpo_cli.evaluate_run import eval_paths, evaluate_run

    s = evaluate_run(checkpoint, data, split, batch_size, limit, eval_samples, max_new_tokens, device, engine, which)
    if int(os.environ.get("RANK", "0")) != 0:     # under accelerate launch: the main process reports
        return
    t = Table(title=f"{s['run']} on {s['dataset']}/{s['split']}")
    for col in ("method", "model", "n", "accuracy", "raw", "ties", "format errors"):
        t.add_column(col, justify="right" if col not in ("method", "model") else "left")
    t.add_row(s["method"], s["model"], str(s["n"]), f"{100 * s['accuracy']:.1f}",
              f"{100 * s['raw_accuracy']:.1f}", f"{100 * s['tie_rate']:.1f}%",
              f"{100 * s['format_error_rate']:.1f}%")
    console.print(t)
    skipped = s.get("data_skips", {}).get("total", 0)
    if skipped:
        console.print(f"[yellow]{skipped} record(s) of {s['dataset']}/{s['split']} skipped[/] (data_skips in the "
                      "eval JSON)", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(s, indent=2, ensure_ascii=False) + "\n")
    else:
        for path in eval_paths(checkpoint, s):
            sys.stdout.write(f"{path}\n")
    sys.stdout.flush()
