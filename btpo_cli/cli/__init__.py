"""The ``btpo`` command: one thin module per subcommand, each calling into the library.

Exit codes: 0 success; 1 runtime error (one line, no traceback unless ``--debug``);
2 bad usage; 130 interrupted.
"""

from __future__ import annotations

import os
import sys

import click
import typer
from rich.markup import escape

from btpo_cli import __version__
from btpo_cli.cli import base_model, build_data, compare, demo, models, recipes, train
from btpo_cli.cli import eval as eval_cmd
from btpo_cli.console import console
from btpo_cli.errors import BtpoError

app = typer.Typer(
    name="btpo",
    help="Train generative preference models (LLM judges that think before they score) with "
         "Bradley-Terry Policy Optimization and its baselines.\n\n"
         "Pipeline: btpo build-data synthetic --out data/synthetic && "
         "btpo train --method bt --data data/synthetic --out runs/bt && btpo eval --checkpoint runs/bt",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"btpo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    if debug:
        os.environ["BTPO_DEBUG"] = "1"


app.add_typer(build_data.app, name="build-data")
app.command("train", help=train.HELP, epilog=train.EPILOG)(train.train)
app.command("eval", help=eval_cmd.HELP, epilog=eval_cmd.EPILOG)(eval_cmd.evaluate)
app.command("compare", help=compare.HELP, epilog=compare.EPILOG)(compare.compare)
app.add_typer(recipes.app, name="recipes")
app.command("models", help=models.HELP)(models.models)
app.command("demo", help=demo.HELP, epilog=demo.EPILOG)(demo.demo)
app.command("base-model", help=base_model.HELP, epilog=base_model.EPILOG)(base_model.base_model)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: turns errors into one-line messages and exit codes."""
    debug = "--debug" in (argv if argv is not None else sys.argv) or os.environ.get("BTPO_DEBUG") == "1"
    try:
        rv = app(args=argv, prog_name="btpo", standalone_mode=False)
    except (click.exceptions.Exit, typer.Exit) as e:
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.print("[red]interrupted[/]")
        sys.exit(130)
    except BtpoError as e:
        if debug:
            raise
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - last resort: still one line
        if _is_usage_error(e):  # click's (or typer's vendored click's) usage errors: exit 2
            e.show()  # type: ignore[attr-defined]
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        if type(e).__name__ == "Abort":
            console.print("[red]interrupted[/]")
            sys.exit(130)
        if debug:
            raise
        console.print(f"[red]error:[/] {type(e).__name__}: {escape(str(e))} (rerun with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


def _is_usage_error(e: Exception) -> bool:
    return any(c.__name__ == "ClickException" for c in type(e).__mro__) and hasattr(e, "show")
