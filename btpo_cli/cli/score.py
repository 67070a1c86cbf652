"""``btpo score``: JSONL in (file or stdin), one JSON result per input line on stdout, progress on stderr."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from btpo_cli.console import console
from btpo_cli.data.pairs import open_text
from btpo_cli.engines import check_engine_choice
from btpo_cli.errors import BtpoError, check_choice
from btpo_cli.judging.judge import PACKING_HELP, load_judge
from btpo_cli.progress import PhaseProgress
from btpo_cli.serving.scoring import score_lines

HELP = "Score responses with a trained judge: JSONL in, JSONL out (scores, thoughts, best of N, pair accuracy)."
EPILOG = """[bold]Input lines[/] (JSON objects; `prompt` is a string or a list of chat messages)

  {"prompt": "What is 2 + 3?", "response": "5"}                  → {"line": 1, "score": 0.93}

  {"prompt": "What is 2 + 3?", "candidates": ["6", "5", "4"]}    → {"line": 2, "best": 1, "scores": [...]}

  {"prompt": ..., "chosen": ..., "rejected": ...}                → {"line": 3, "id": ..., "credit": 1.0, ...}
  (a canonical pair: the row `btpo eval` writes, and the accuracy at the end)

Optional on every line: "aspect", "id" (copied to the output).

One output line per input line, in order (so `paste` lines them up): a bad or blank line gives
{"line": N, "error": "field: reason"} and is counted on stderr; --strict stops there (exit 1).

[bold]Examples[/]

  btpo score --judge runs/btpo data/synthetic/test.jsonl > scored.jsonl

  echo '{"prompt": "What is 7 + 2?", "candidates": ["8", "9"]}' | btpo score -j runs/btpo - --thoughts

  btpo score -j runs/bt candidates.jsonl | jq .best
"""


def score(
    input_path: str = typer.Argument("-", metavar="INPUT", help="JSONL file, or - for stdin."),
    judge_path: Path = typer.Option(..., "--judge", "--checkpoint", "-j", "-c",
                                     help="Run folder or its final/ (a trained judge); --checkpoint is the same flag, as in `btpo eval`."),
    thoughts: bool = typer.Option(False, "--thoughts", help="Include the thoughts / rationales the judge wrote."),
    detail: bool = typer.Option(False, "--detail", help="Include per-response details (thought length, Yes+No mass, …)."),
    aspect: str | None = typer.Option(None, "--aspect", help="Aspect for lines without one (default: the judge's)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Pairs per forward (2x responses)."),
    samples: int | None = typer.Option(None, "--samples", min=0,
                                       help="BTPO: score by the mean p(Yes) over K sampled thoughts."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the sampled thoughts (with --samples)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="Thought / rationale budget."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Judge only the first N valid lines."),
    strict: bool = typer.Option(False, "--strict",
                                help='Stop at the first bad line (exit 1) instead of writing {"line": N, "error": …} '
                                     "for it."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No progress or summary on stderr (the count of bad lines is still printed)."),
    packing: str | None = typer.Option(None, "--packing", help=PACKING_HELP),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if present)."),
    engine: str | None = typer.Option(None, "--engine", help="Engine for thoughts/rationales: auto, hf, vllm."),
) -> None:
    if engine is not None:
        check_engine_choice(engine)
    check_choice("--packing", packing, ("off", "on", "auto"))
    if input_path != "-" and not Path(input_path).is_file():
        raise BtpoError(f"{input_path}: no such file (give a JSONL file or - for stdin)")
    judge = load_judge(judge_path, device=device, engine=engine, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       samples=samples, seed=seed, aspect=aspect, packing=packing)
    source = "<stdin>" if input_path == "-" else input_path
    skipped_shown = 0

    def warn(msg: str) -> None:
        nonlocal skipped_shown
        skipped_shown += 1
        if not quiet and skipped_shown <= 20:
            console.print(f"bad line: {msg}", style="yellow", highlight=False, markup=False, soft_wrap=True)

    stream = sys.stdin if input_path == "-" else open_text(Path(input_path))
    try:
        with PhaseProgress(None, f"score {source} with {judge.method}", unit="line", enabled=not quiet) as bar:
            summary = score_lines(judge, stream, source, sys.stdout, thoughts=thoughts, detail=detail, strict=strict,
                                  limit=limit, warn=warn, progress=bar.advance)
    except BrokenPipeError:                 # `btpo score … | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
    finally:
        if stream is not sys.stdin:
            stream.close()
        judge.close()
    if summary.errors:                      # even with --quiet: the output holds error rows
        console.print(f"btpo score: {summary.errors} of {summary.lines} line(s) had errors "
                      f"(first: {summary.first_error})", style="yellow", highlight=False, markup=False,
                      soft_wrap=True)
    if quiet:
        return
    kinds = ", ".join(f"{n} {k}{'s' if n != 1 and k != 'candidates' else ''}" for k, n in summary.by_kind.items())
    judged = sum(summary.by_kind.values())
    console.print(f"[btpo] scored {judged} of {summary.lines} line(s){': ' + kinds if kinds else ''}", highlight=False,
                  markup=False)
    s = summary.pairs()
    if s:
        console.print(f"[btpo] pairs: n={s['n']} accuracy {100 * s['accuracy']:.1f}% (raw {100 * s['raw_accuracy']:.1f}%)"
                      f", ties {100 * s['tie_rate']:.1f}%, format errors {100 * s['format_error_rate']:.1f}%",
                      highlight=False, markup=False)
