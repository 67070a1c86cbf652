"""``btpo demo``: the whole pipeline on the built-in default, on CPU, in minutes."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = "Run the pipeline on the built-in default: build synthetic data, train, evaluate, compare."
EPILOG = """[bold]Examples[/]

  btpo demo                 (tiny-qwen2 on the synthetic arithmetic set, CPU)

  btpo demo --quick --out demo_out
"""


def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Folder for data/ and runs/."),
    quick: bool = typer.Option(False, "--quick", help="A smaller budget (for smoke tests)."),
    methods: str = typer.Option("bt,btpo", "--methods", help="Comma-separated methods to train."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    overwrite: bool = typer.Option(True, "--overwrite/--keep", help="Start the runs over if they exist."),
) -> None:
    from btpo_cli.demo import run_demo

    run_demo(out, quick=quick, methods=[m.strip() for m in methods.split(",") if m.strip()], seed=seed,
             overwrite=overwrite)
