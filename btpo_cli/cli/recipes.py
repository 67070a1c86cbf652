"""``btpo recipes``: list, show and validate the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import typer

from btpo_cli.config import dump_yaml, find, recipes_dir, shipped
from btpo_cli.console import check_format, console, out, print_records
from btpo_cli.errors import BtpoError
from btpo_cli.recipes import check_fit, description, validate_recipe

app = typer.Typer(help="List, show and validate recipes (YAML configs for `btpo train --recipe`).",
                  no_args_is_help=True)


@app.command("list", help="List shipped recipes.")
def list_recipes(method: str | None = typer.Option(None, "--method", help="Only this method's recipes."),
                 fmt: str = typer.Option("table", "--format", "-f", help="table | json | tsv.")) -> None:
    check_format(fmt)
    root = recipes_dir()
    records = []
    for p in shipped():
        name = str(p.relative_to(root).with_suffix(""))
        if method and not name.startswith(method + "/"):
            continue
        records.append({"name": name, "description": description(p), "path": str(p)})
    print_records(fmt, (("name", "name"), ("description", "description"), ("path", "path")), records,
                  title=f"recipes in {root}")


@app.command("show", help="Print a recipe resolved into the full config (every key).")
def show(name: str = typer.Argument(..., help="Recipe name (bt/qwen2.5-7b-hh) or path.")) -> None:
    out.print(dump_yaml(validate_recipe(find(name))), markup=False, highlight=False, end="")


@app.command("validate", help="Validate recipes (default: every shipped one): keys, values, and — for a recipe "
             "with a hardware: block — the memory planner's estimate against its GPUs (`btpo plan`). "
             "Exit 1 if any is invalid or cannot fit.")
def validate(files: list[Path] = typer.Argument(None, help="Recipe files (default: all shipped).")) -> None:
    paths = files or shipped()
    bad = 0
    for p in paths:
        try:
            cfg = validate_recipe(p)
        except BtpoError as e:
            bad += 1
            console.print(f"[red]bad[/]  {e}", highlight=False)
            continue
        fit = check_fit(cfg, p)
        hw = cfg.hardware
        where = f"{fit.strategy} on {hw.nodes * hw.gpus}×{hw.gpu_memory_gb:g} GiB" if hw.gpu_memory_gb else ""
        if fit.verdict == "no":
            bad += 1
            console.print(f"[red]bad[/]  {p}: does not fit its hardware: {where} needs ~{fit.peak_gib:.0f} GiB per "
                          f"GPU (see `btpo plan --recipe {p}`)", highlight=False)
            continue
        plan = f"; {where}: ~{fit.peak_gib:.0f} GiB per GPU, {fit.verdict}" if fit.peak_gib is not None else \
            (f"; {fit.note}" if fit.note.startswith("not planned") else "")
        console.print(f"[green]ok[/]   {p}  ({cfg.method}, {cfg.model.name}{plan})", highlight=False)
    if bad:
        raise BtpoError(f"{bad} of {len(paths)} recipe(s) invalid or too big for their hardware")
    console.print(f"{len(paths)} recipe(s) valid")
