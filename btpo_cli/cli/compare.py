"""``btpo compare``: the results table from run folders."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from btpo_cli.console import console, out
from btpo_cli.errors import BtpoError

HELP = "Compare evaluated runs: rows = backbone × method, columns = datasets."
EPILOG = """[bold]Examples[/]

  btpo compare runs/*

  btpo compare runs/* --format markdown > results.md
"""


def compare(
    runs: list[Path] = typer.Argument(..., help="Run folders (each with eval/*.json)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | markdown | csv | json."),
) -> None:
    from btpo_cli.compare import collect, table_rows, to_csv, to_markdown

    if fmt not in ("table", "markdown", "csv", "json"):
        raise typer.BadParameter(f"--format {fmt!r}: expected table, markdown, csv or json")
    c = collect([p for p in runs if p.is_dir()])
    if not c.rows:
        raise BtpoError("no evaluated runs among the given folders (run `btpo eval --checkpoint RUN` first)"
                        + (f"; not evaluated: {', '.join(c.missing_eval)}" if c.missing_eval else ""))
    if fmt == "csv":
        out.print(to_csv(c), end="", markup=False, highlight=False)
    elif fmt == "markdown":
        out.print(to_markdown(c), end="", markup=False, highlight=False)
    elif fmt == "json":
        out.print(json.dumps({"datasets": c.datasets, "rows": table_rows(c), "missing_eval": c.missing_eval},
                             indent=2), markup=False, highlight=False)
    else:
        t = Table(title="accuracy (%) — clipped at 50; raw in brackets when clipped")
        t.add_column("model")
        t.add_column("method")
        for ds in c.datasets:
            t.add_column(ds, justify="right")
        for r in c.rows:
            cells = []
            for ds in c.datasets:
                s = r.results.get(ds)
                if s is None:
                    cells.append("–")
                else:
                    cell = f"{100 * s['accuracy']:.1f}"
                    cells.append(cell + (f" ({100 * s['raw_accuracy']:.1f})" if s["clipped"] else ""))
            t.add_row(r.model, r.method, *cells)
        out.print(t)
    for m in c.missing_eval:
        console.print(f"[yellow]not evaluated:[/] {m}", highlight=False)
    for m in c.skipped:
        console.print(f"[yellow]skipped:[/] {m}", highlight=False)
