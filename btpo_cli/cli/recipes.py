"""``btpo recipes``: list, show and validate the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import typer

from btpo_cli.config import dump_yaml, find_recipe, recipes_dir, shipped
from btpo_cli.console import check_format, console, out, print_records
from btpo_cli.errors import BtpoError, check_choice
from btpo_cli.methods import method_names
from btpo_cli.recipes import check_fit, description, validate_recipe

app = typer.Typer(help="List, show and validate recipes (YAML configs for `btpo train --recipe`).",
                  no_args_is_help=True)


@app.command("list", help="List shipped recipes.")
def list_recipes(method: str | None = typer.Option(None, "--method", help="Only this method's recipes."),
                 fmt: str = typer.Option("table", "--format", "-f", help="table | json | tsv.")) -> None:
    check_format(fmt)
    check_choice("--method", method, method_names())
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
    out.print(dump_yaml(validate_recipe(find_recipe(name))), markup=False, highlight=False, end="")


@app.command("validate", help="Validate recipes (default: every shipped one): keys, values, and — for a recipe "
             "with a hardware: block — the memory planner's estimate against its GPUs (`btpo plan`). "
             "One row per recipe on stdout (whole in a pipe: `btpo recipes validate | grep qwen`); "
             "exit 1 if any is invalid or cannot fit.")
def validate(files: list[Path] = typer.Argument(None, help="Recipe files (default: all shipped)."),
             fmt: str = typer.Option("table", "--format", "-f", help="table | json | tsv.")) -> None:
    check_format(fmt)
    paths = files or shipped()
    rows = [_check(p) for p in paths]
    print_records(fmt, VALIDATE_COLUMNS, rows, title="recipes")
    bad = sum(r["status"] == "bad" for r in rows)
    if bad:
        raise BtpoError(f"{bad} of {len(paths)} recipe(s) invalid or too big for their hardware")
    console.print(f"{len(paths)} recipe(s) valid", highlight=False)


VALIDATE_COLUMNS = (("recipe", "recipe"), ("status", "status"), ("method", "method"), ("model", "model"),
                    ("note", "note"))
"""``btpo recipes validate``: one row per recipe; ``status`` ok | bad, ``note`` the plan or what is wrong."""


def _check(p: Path) -> dict[str, str | None]:
    try:
        cfg = validate_recipe(p)
    except BtpoError as e:
        return {"recipe": str(p), "status": "bad", "method": None, "model": None, "note": str(e)}
    row = {"recipe": str(p), "status": "ok", "method": cfg.method, "model": cfg.model.name}
    fit = check_fit(cfg, p)
    hw = cfg.hardware
    where = f"{fit.strategy} on {hw.nodes * hw.gpus}×{hw.gpu_memory_gb:g} GiB" if hw.gpu_memory_gb else ""
    if fit.verdict == "no":
        return {**row, "status": "bad", "note": f"does not fit its hardware: {where} needs ~{fit.peak_gib:.0f} GiB "
                f"per GPU (see `btpo plan --recipe {p}`)"}
    note = f"{where}: ~{fit.peak_gib:.0f} GiB per GPU, {fit.verdict}" if fit.peak_gib is not None else \
        (fit.note if fit.note.startswith("not planned") else "")
    return {**row, "note": note}
