"""``btpo status RUN``: finished, stopped (resumable), running or broken — as an exit code scripts branch on."""

from __future__ import annotations

from pathlib import Path

import typer

from btpo_cli.console import check_format, print_records, write_json
from btpo_cli.runs.status import EXIT_CODES, run_status

HELP = ("Say whether a run is finished, stopped (resumable, from which step), running (locked by a live "
        "process) or broken, with its eval results; the exit code tells scripts which.")
EPILOG = """[bold]Exit codes[/]: 0 finished · 3 stopped (resume it: btpo train --out RUN --resume) · 4 running ·
5 broken (no or unreadable config.yaml) · 1 no such folder · 2 bad usage

[bold]Examples[/]

  btpo status runs/bt

  btpo status runs/bt --format json | jq .step

  btpo status runs/bt >/dev/null; case $? in 0) echo done;; 3) btpo train --out runs/bt --resume;; esac
"""

COLUMNS = (("run", "run"), ("state", "state"), ("step", "step"), ("method", "method"), ("model", "model"),
           ("reason", "reason"))


def status(
    run: Path = typer.Argument(..., help="Run folder (or its final/)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | json | tsv."),
) -> None:
    check_format(fmt)
    st = run_status(run)
    if fmt == "json":
        write_json(st.to_json())
    else:
        rec = st.to_json()
        print_records(fmt, COLUMNS, [rec], title="run status")
        if fmt == "table":
            evals = [{"eval": k, **v, "accuracy": _pct(v.get("accuracy")), "raw_accuracy": _pct(v.get("raw_accuracy"))}
                     for k, v in st.evals.items()]
            if evals:       # percent, as `btpo eval` and `btpo compare` print them (JSON: fractions)
                print_records(fmt, (("eval", "eval"), ("split", "split"), ("n", "n"), ("accuracy", "accuracy (%)"),
                                    ("raw_accuracy", "raw accuracy (%)"), ("stale", "stale")), evals,
                              title="eval results")
    if st.exit_code:
        raise typer.Exit(EXIT_CODES[st.state])


def _pct(x: object) -> str | None:
    return f"{100 * x:.1f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else None
