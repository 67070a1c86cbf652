"""``btpo compare``: the results table (the paper's Appendix B layout) and an optional figure."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from btpo_cli.compare import (
    build_table,
    collect,
    collect_skips,
    format_skips,
    legend,
    to_csv,
    to_json,
    to_markdown,
    to_rich,
)
from btpo_cli.compare import plot as make_plot
from btpo_cli.console import FORMATS, check_format, console, out, write_text
from btpo_cli.errors import BtpoError, check_choice

COMPARE_FORMATS = (*FORMATS, "markdown", "csv")

HELP = """Compare evaluated runs: rows = backbone × method, columns = datasets + avg.

Figures are test accuracies (%), clipped at 50 with the raw figure in [brackets] where clipped
(--show raw shows raw accuracies instead). Runs with the same model, method and dataset (seeds)
are averaged: mean ± sample std, n = number of runs. avg = mean over the datasets every row of
that backbone has. The best figure of each column within each backbone block is marked (bold in
markdown, * in the table, best flags in csv/json). (+x) = difference to the BT row of the same
backbone, in points. Eval files of another eval_version, or with a field of the wrong type, are
skipped and listed by name; run folders without an eval are listed as not evaluated. Stale evals
(the model or data changed since they ran: a resumed or overwritten run, a replaced dataset) are
left out and listed with the reason; --include-stale shows them, marked ‡. A folder of
run folders (runs/) is expanded.

--show skips lists the records skipped as unusable instead: per run, training
(RUN/data_skips.json) and each eval, by reason, with file:line of the first few."""

EPILOG = """[bold]Examples[/]

  btpo compare runs/*

  btpo compare runs/ --format markdown > results.md

  btpo compare runs/* --format csv --show raw

  btpo compare runs/* --plot results.png     [dim](needs matplotlib: pip install 'btpo\\[plot]')[/]

  btpo compare runs/ --show skips            (records skipped in training and eval, by reason)
"""


def compare(
    runs: list[Path] = typer.Argument(..., help="Run folders (each with eval/*.json), or folders of run folders."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json | tsv | markdown | csv."),
    show: str = typer.Option("clipped", "--show", help="clipped (default, raw in brackets when clipped) | raw | "
                             "skips (the skipped-record reports instead of accuracies)."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write a figure (PNG): accuracy bars and "
                                     "training curves (train/loss and each method's, e.g. btpo/omega_mean). Needs matplotlib."),
    include_stale: bool = typer.Option(False, "--include-stale", help="Also show evals whose model or data "
                                       "changed since they ran (stale), marked ‡; by default they are left out "
                                       "and listed under the table."),
) -> None:
    check_format(fmt, COMPARE_FORMATS)
    check_choice("--show", show, ("clipped", "raw", "skips"))
    if show == "skips":
        _show_skips(runs, fmt)
        return
    c = collect(runs, include_stale)
    if not c.runs and not c.stale:
        raise BtpoError("no evaluated runs among the given folders (run `btpo eval --checkpoint RUN` first)"
                        + (f"; not evaluated: {', '.join(c.missing_eval)}" if c.missing_eval else "")
                        + (f"; skipped: {'; '.join(c.skipped)}" if c.skipped else ""))
    t = build_table(c, show)
    if fmt in ("csv", "tsv"):
        write_text(to_csv(t, delimiter="\t" if fmt == "tsv" else ","))
    elif fmt == "markdown":
        write_text(to_markdown(t))
    elif fmt == "json":
        write_text(to_json(t))
    elif not t.rows:
        console.print("no current evals among the given folders (the stale ones are listed below; "
                      "--include-stale shows them)", highlight=False, soft_wrap=True)
    else:
        out.print(to_rich(t))
        for line in legend(t)[1:]:
            out.print(line, style="dim", highlight=False)
    if plot is not None:
        console.print(f"figure: {make_plot(t, plot)}", highlight=False)

    for x in c.stale:
        what = "shown, marked ‡" if include_stale else "left out"
        console.print(f"[yellow]stale ({what}):[/] {escape(x['path'])}: {escape(x['reason'])} ({escape(x['detail'])})",
                      highlight=False, soft_wrap=True)
    for m in c.missing_eval:
        console.print(f"[yellow]not evaluated:[/] {escape(m)}", highlight=False, soft_wrap=True)
    for m in c.skipped:
        console.print(f"[yellow]skipped:[/] {escape(m)}", highlight=False, soft_wrap=True)
    for m in t.warnings:
        console.print(f"[yellow]warning:[/] {escape(m)}", highlight=False, soft_wrap=True)


def _show_skips(runs: list[Path], fmt: str) -> None:
    rows, problems = collect_skips(runs)
    shown = format_skips(rows, fmt)
    if isinstance(shown, str):
        write_text(shown)
    else:
        out.print(shown)
    for m in problems:
        console.print(f"[yellow]note:[/] {escape(m)}", highlight=False, soft_wrap=True)
