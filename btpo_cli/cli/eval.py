"""``btpo eval``: evaluate a run folder by the shared protocol (METHOD.md §7)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from btpo_cli.console import check_format, console, to_tsv, write_json, write_text
from btpo_cli.engines import check_engine_choice
from btpo_cli.errors import check_choice
from btpo_cli.judging.benchmarks import get_benchmark
from btpo_cli.judging.judge import PACKING_HELP
from btpo_cli.methods import method_names

TSV_COLUMNS = ("run", "method", "model", "dataset", "split", "n", "accuracy", "raw_accuracy", "tie_rate",
               "format_error_rate")
"""``--format tsv``: the summary's scalar keys (fractions, not percent; docs/cli.md)."""

HELP = ("Evaluate a trained run (--checkpoint), or any model as it is (--model, --method): order-swapped / "
        "pointwise accuracy, clipped at 50%.")
EPILOG = """[bold]Examples[/]

  btpo eval --checkpoint runs/bt

  btpo eval --checkpoint runs/btpo --data data/hh --split test --limit 200

  btpo eval --checkpoint runs/bt --which best      # best/, kept by train.eval_every

  btpo eval --model smollm2-135m --method btpo --data data/hh --out runs/btpo-base

  btpo eval --checkpoint runs/bt --benchmark judgebench --data JudgeBench/data

  btpo eval --model smollm2-135m --method btpo --benchmark rewardbench     # the Hub's allenai/reward-bench

Writes runs/<run>/eval/<dataset>.json and <dataset>.predictions.jsonl and prints their paths on
stdout, one per line (--format json: the summary instead, --format tsv: one row); the table goes to stderr.

--model evaluates a model as it is (an untrained base as a BTPO/GRPO/GRAM judge, an off-the-shelf
reward model as BT, a folder trained elsewhere) by the same protocol and judge code: the eval JSON
("as_is": true) goes to a run folder of its own (--out, default runs/<method>-<tag>-<model>) that
`btpo compare` shows as the "<method> (base)" row (--tag to name it otherwise).

--benchmark NAME judges one of the field's benchmarks (rewardbench, rewardbench2, rmbench, judgebench,
rmb) from its published file or folder (--data; default: its Hub id where it has one) and writes
RUN/eval/<NAME>.json with the official aggregate (a `btpo compare` column); see docs/benchmarks.md.
"""


def evaluate(
    checkpoint: Path | None = typer.Option(None, "--checkpoint", "-c", help="Run folder (its final/ model is evaluated)."),
    which: str = typer.Option("final", "--which", help="With --checkpoint: final, or best: the model kept by "
                              "train.eval_every (results under RUN/eval/best/)."),
    model: str | None = typer.Option(None, "--model", help="Instead of --checkpoint: evaluate this model as it is "
                                     "(alias, Hub id or folder) as --method's judge."),
    method: str | None = typer.Option(None, "--method", "-m", help="With --model: the judge it is asked as (default: "
                                      "the method in the folder's btpo.json)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="With --model: run folder for the result "
                                    "(default runs/<method>-<tag>-<model>)."),
    tag: str = typer.Option("base", "--tag", help="With --model: the row's tag in `btpo compare` (method (tag))."),
    recipe: Path | None = typer.Option(None, "--recipe", "-r", help="With --model: YAML recipe for the judge's settings."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="With --model: override a setting "
                                        "(--set data.max_length=512)."),
    data: str | None = typer.Option(None, "--data", "-d", help="Dataset (default: the one it trained on; "
                                    "required with --model)."),
    split: str | None = typer.Option(None, "--split", help="Split to evaluate (default: data.eval_split)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Pairs per batch."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate only the first N pairs."),
    eval_samples: int | None = typer.Option(None, "--eval-samples", min=0,
                                            help="BTPO: also the mean p(Yes) over K sampled thoughts."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="Thought / rationale "
                                              "budget (default: eval.max_new_tokens, else the training one)."),
    packing: str | None = typer.Option(None, "--packing", help=PACKING_HELP),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if present)."),
    engine: str | None = typer.Option(None, "--engine", help="Engine for greedy thoughts/rationales: auto, hf, "
                                      "vllm (default: the run's rollout.engine)."),
    benchmark: str | None = typer.Option(None, "--benchmark", "-b", help="Judge this benchmark instead of a split: "
                                         "rewardbench, rewardbench2, rmbench, judgebench, rmb (--data: its files)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table (the table on stderr, the eval JSON paths on "
                            "stdout) | json (the summary on stdout) | tsv (one header line + one row on stdout)."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json (kept for scripts)."),
) -> None:
    from btpo_cli.judging.run_eval import eval_paths, evaluate_model, evaluate_run  # heavy: imported on use
    from btpo_cli.models.device import resolve_device  # heavy: imported on use

    check_format(fmt)
    check_choice("--which", which, ("final", "best"))
    check_choice("--packing", packing, ("off", "on", "auto"))
    if benchmark is not None:
        get_benchmark(benchmark)    # an unknown name: usage (exit 2), the names and a close one
    check_choice("--method", method, method_names())
    if engine is not None:
        check_engine_choice(engine)
    resolve_device(device)          # a bad --device is usage (2), cuda without CUDA a named error (1)
    if as_json:
        fmt = "json"
    if (checkpoint is None) == (model is None):
        raise typer.BadParameter("give either --checkpoint RUN or --model NAME (with --method and --data)")
    if model is not None and which != "final":
        raise typer.BadParameter("--which: only with --checkpoint (a model as it is has no best/)")
    if checkpoint is not None:
        as_model = [f for f, v in (("--method", method), ("--out", out), ("--recipe", recipe), ("--set", overrides),
                                    ("--tag", tag != "base")) if v]
        if as_model:
            raise typer.BadParameter(f"{', '.join(as_model)}: only with --model (a run keeps its own settings)")
        s = evaluate_run(checkpoint, data, split, batch_size, limit, eval_samples, max_new_tokens, device, engine,
                         which, benchmark, packing=packing)
        folder = checkpoint
    else:
        folder, s = evaluate_model(model, method, data, out, split, batch_size, limit, eval_samples, max_new_tokens,
                                   device, engine, str(recipe) if recipe else None, overrides, tag, benchmark)
    if int(os.environ.get("RANK", "0")) != 0:     # under accelerate launch: the main process reports
        return
    if benchmark:
        _print_benchmark(s)
    else:
        _print_protocol(s)
    _print_warnings(s)
    if fmt == "json":
        write_json(s)
    elif fmt == "tsv":
        write_text(to_tsv(TSV_COLUMNS, [[s.get(k) for k in TSV_COLUMNS]]))
    else:
        write_text("".join(f"{path}\n" for path in eval_paths(folder, s)))


def _print_warnings(s: dict) -> None:
    """The summary's ``warnings`` (thoughts cut at the budget, little Yes/No mass), one line each."""
    for w in s.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {escape(str(w))}", highlight=False, soft_wrap=True)


def _pct(x: object) -> str:
    return f"{100 * x:.1f}" if isinstance(x, (int, float)) else "–"


def _print_benchmark(s: dict) -> None:
    b = s["benchmark"]
    t = Table(title=f"{s['run']} on {b['title']} ({s['n']} items): {_pct(b['aggregate'])}")
    t.add_column("score")
    t.add_column("value", justify="right")
    for k, v in b.get("scores", {}).items():
        t.add_row(k, _pct(v))
    pb = s.get("position_bias") or {}
    if pb:
        t.add_row("orders disagree", _pct(pb.get("order_disagreement")))
        t.add_row("first slot wins", _pct(pb.get("first_slot_wins")))
    t.add_row("format errors", _pct(s.get("format_error_rate")))
    console.print(t)
    skipped = s.get("data_skips", {}).get("total", 0)
    if skipped:
        console.print(f"[yellow]{skipped} record(s) skipped[/] (data_skips in the eval JSON)", highlight=False)


def _print_protocol(s: dict) -> None:
    t = Table(title=f"{s['run']} on {s['dataset']}/{s['split']}")
    for col in ("method", "model", "n", "accuracy (%)", "raw (%)", "ties", "format errors"):
        t.add_column(col, justify="right" if col not in ("method", "model") else "left")
    t.add_row(s["method"], s["model"], str(s["n"]), f"{100 * s['accuracy']:.1f}",
              f"{100 * s['raw_accuracy']:.1f}", f"{100 * s['tie_rate']:.1f}%",
              f"{100 * s['format_error_rate']:.1f}%")
    console.print(t)
    skipped = s.get("data_skips", {}).get("total", 0)
    if skipped:
        console.print(f"[yellow]{skipped} record(s) of {s['dataset']}/{s['split']} skipped[/] (data_skips in the "
                      "eval JSON)", highlight=False)
