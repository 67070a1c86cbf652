"""``btpo base-model``: pre-train the tiny base GPM used by the demo (``tiny-thinker``)."""

from __future__ import annotations

import json
from dataclasses import replace

import typer

from btpo_cli.console import console, out
from btpo_cli.envlock import lock_status

HELP = "Pre-train tiny-thinker, a tiny base GPM that can think a little (CPU, minutes; cached)."
EPILOG = """[bold]Examples[/]

  btpo base-model                       (builds once into the cache, prints its folder)

  btpo base-model --seed 1              (the second base model of the README's table: tiny-thinker-s1)

  btpo base-model --force --steps 1200  (rebuild with a different pre-training length)
"""


def base_model(
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimizer steps (default 2000)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data mix and the initial weights."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if cached."),
) -> None:
    from btpo_cli.models.thinker import ThinkerSpec, ensure_thinker, reference_check  # heavy: imported on use

    spec = ThinkerSpec(seed=seed)
    if steps:
        spec = replace(spec, steps=steps)
    path = ensure_thinker(spec, force=force)
    info = json.loads((path / "btpo_thinker.json").read_text())
    console.print(f"tiny-thinker: {info['parameters']:,} parameters, final pre-training loss "
                  f"{info['final_loss']:.3f}", highlight=False)
    for line in [*reference_check(info).lines, lock_status().line()]:
        console.print(line, highlight=False, soft_wrap=True)
    out.print(str(path), markup=False, highlight=False)
