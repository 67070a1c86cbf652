"""``btpo demo``: the whole pipeline on the built-in default, on CPU, in minutes."""

from __future__ import annotations

from pathlib import Path

import typer

from btpo_cli.demo import BUDGETS, run_demo
from btpo_cli.errors import check_choice

HELP = ("Does thinking pay? Synthetic multi-step arithmetic pairs → tiny-thinker base GPM → "
        "train BT and BTPO → evaluate (base GPM too) → table and plot. CPU, minutes.")
EPILOG = """[bold]Examples[/]

  btpo demo                                   (the README's main job)

  btpo demo --quick                           (smaller budget; what the integration test runs)

  btpo demo --methods bt,btpo,btpo-no-omega,btpo-no-floor --seeds 0,1,2,3,4 --thinker-seeds 0,1
                                              (the README's table: 5 seeds × 2 base models)

  btpo demo --methods bt,btpo,btpo-no-omega,btpo-no-floor --seeds 0,1,2,3,4 --thinker-seeds 0,1 --keep
                                              (the same, continued after a stop: finished runs are kept)
"""


def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Folder for data/, runs/ and the plot."),
    quick: bool = typer.Option(False, "--quick", help="A smaller budget (smoke tests, CI)."),
    methods: str = typer.Option("bt,btpo", "--methods", help="Comma-separated: bt, btpo, btpo-no-omega, btpo-no-floor."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated training seeds."),
    thinker_seeds: str = typer.Option("0", "--thinker-seeds",
                                      help="Comma-separated pre-training seeds of the base model (tiny-thinker-s<N>)."),
    overwrite: bool = typer.Option(
        True, "--overwrite/--keep",
        help="--overwrite: start the runs over. --keep: continue a sweep (reuse finished runs with the same "
             "settings, resume stopped ones)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write <out>/compare.png."),
) -> None:
    method_list = [check_choice("--methods", m.strip(), list(BUDGETS)) for m in methods.split(",") if m.strip()]
    seed_list = _ints("--seeds", seeds)
    thinker_list = _ints("--thinker-seeds", thinker_seeds)
    run_demo(out, quick=quick, methods=method_list, seeds=seed_list,
             overwrite=overwrite, plot=out / "compare.png" if plot else None, thinker_seeds=thinker_list)


def _ints(flag: str, text: str) -> list[int]:
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"{flag} {text!r}: expected non-negative integers like 0,1,2") from e
    if not vals or any(v < 0 for v in vals):
        raise typer.BadParameter(f"{flag} {text!r}: expected non-negative integers like 0,1,2")
    return vals
