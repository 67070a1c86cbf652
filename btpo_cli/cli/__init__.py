"""The ``btpo`` command: one thin module per subcommand, each calling into the library.

Exit codes (:data:`EPILOG`, docs/cli.md): 0 success; 1 runtime error (one line naming the file / record /
field, no traceback unless ``--debug``); 2 bad usage; 130 interrupted; ``btpo status`` adds 3, 4, 5.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
from typing import Any, NoReturn

import click
import typer
import typer.main
import typer.rich_utils
from rich.errors import StyleSyntaxError
from rich.style import Style

from btpo_cli import __version__, cpu_kernels
from btpo_cli.cli import base_model, build_data, compare, demo, models, plan, recipes, score, serve, train
from btpo_cli.cli import eval as eval_cmd
from btpo_cli.cli import status as status_cmd
from btpo_cli.console import console, print_error, quiet_third_party, stop_live
from btpo_cli.errors import BtpoError, FollowerError, UsageError, close_match

EPILOG = ("[bold]Exit codes[/]: 0 done · 1 a named error (one line, no traceback unless --debug) · 2 bad usage · "
          "130 interrupted (Ctrl-C) · btpo status: 3 stopped, 4 running, 5 broken · "
          "btpo train: 75 stopped by SIGTERM/SIGUSR1 with a checkpoint (--resume continues).\n\n"
          "[bold]Output[/]: results on stdout, progress and notes on stderr; every table takes "
          "--format table|json|tsv and is written whole when stdout is not a terminal. "
          "Third-party warnings are hidden unless --verbose (or BTPO_VERBOSE=1).")

app = typer.Typer(
    epilog=EPILOG,
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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show third-party warnings and logs (vLLM, "
                                 "transformers, torch, ...); also BTPO_VERBOSE=1."),
) -> None:
    if debug:
        os.environ["BTPO_DEBUG"] = "1"
    if verbose:
        os.environ["BTPO_VERBOSE"] = "1"
    quiet_third_party()


app.add_typer(build_data.app, name="build-data")
app.command("train", help=train.HELP, epilog=train.EPILOG)(train.train)
app.command("eval", help=eval_cmd.HELP, epilog=eval_cmd.EPILOG)(eval_cmd.evaluate)
app.command("score", help=score.HELP, epilog=score.EPILOG)(score.score)
app.command("serve", help=serve.HELP, epilog=serve.EPILOG)(serve.serve)
app.command("compare", help=compare.HELP, epilog=compare.EPILOG)(compare.compare)
app.command("plan", help=plan.HELP, epilog=plan.EPILOG)(plan.plan)
app.add_typer(recipes.app, name="recipes")
app.command("models", help=models.HELP)(models.models)
app.command("status", help=status_cmd.HELP, epilog=status_cmd.EPILOG)(status_cmd.status)
app.command("demo", help=demo.HELP, epilog=demo.EPILOG)(demo.demo)
app.command("base-model", help=base_model.HELP, epilog=base_model.EPILOG)(base_model.base_model)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: turns errors into one-line messages and exit codes.

    0 done; 1 a runtime error (bad data, a busy run folder, a full disk, ...: one line, no
    traceback unless ``--debug``); 2 bad usage; 130 interrupted (Ctrl-C), quickly: the process
    skips the interpreter's slow teardown of torch once the trackers and files are closed."""
    debug = "--debug" in (argv if argv is not None else sys.argv) or os.environ.get("BTPO_DEBUG") == "1"
    words = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")]
    if words and words[0] in cpu_kernels.PINNED_COMMANDS:
        cpu_kernels.pin()       # before any torch computation: the README's digits on every x86-64 CPU
    if not sys.stdout.isatty() and not os.environ.get("TERMINAL_WIDTH"):
        typer.rich_utils.MAX_WIDTH = max(HELP_WIDTH_PIPED, _int(os.environ.get("COLUMNS")))
    try:
        command = typer.main.get_command(app)
        keep_brackets(command)
        rv = command.main(args=argv, prog_name="btpo", standalone_mode=False)
    except (click.exceptions.Exit, typer.Exit) as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except click.exceptions.Abort as e:
        # click turns an EOFError raised inside a command into Abort as well: that is no Ctrl-C
        if isinstance(e.__context__, EOFError):
            _error(f"unexpected end of input ({e.__context__ or 'EOFError'})", e, debug)
        _interrupted()
    except FollowerError:
        sys.exit(1)   # a non-main process: the main process printed the error
    except UsageError as e:
        _error(str(e), e, debug, code=2)
    except BtpoError as e:
        _error(str(e), e, debug)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e} ({type(e).__name__}, errno {e.errno}; rerun with --debug for the "
               "traceback)", e, debug)
    except Exception as e:  # noqa: BLE001 - last resort: still one line
        if _is_usage_error(e):  # click's (or typer's vendored click's) usage errors: exit 2
            _stop_live()
            _close_options_only(e)
            e.show()  # type: ignore[attr-defined]
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        if type(e).__name__ == "Abort":
            if isinstance(e.__context__, EOFError):
                _error(f"unexpected end of input ({e.__context__ or 'EOFError'})", e, debug)
            _interrupted()
        _error(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)", e, debug)
    if rv == 130:   # typer turns a KeyboardInterrupt inside a command into the return value 130
        _interrupted()
    sys.exit(rv if isinstance(rv, int) else 0)


def _stop_live() -> None:
    stop_live()


def _error(message: str, e: BaseException, debug: bool, code: int = 1) -> NoReturn:
    _stop_live()
    if debug:
        raise e
    print_error(message)
    sys.exit(code)


def _interrupted() -> NoReturn:
    """Ctrl-C: one line, exit 130 at once. atexit handlers run (tracker and file flushes); the
    interpreter's own teardown (seconds with torch loaded) is skipped."""
    _stop_live()
    console.print("[red]interrupted[/]", highlight=False)
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(130)


def _is_usage_error(e: Exception) -> bool:
    return any(c.__name__ == "ClickException" for c in type(e).__mro__) and hasattr(e, "show")


def _close_options_only(e: Exception) -> None:
    """An unknown option: offer only a close one (click offers any that difflib ranks ≥ 0.6 *with* the
    leading dashes, so ``--bogus`` got ``--out``)."""
    if type(e).__name__ != "NoSuchOption" or getattr(e, "ctx", None) is None:
        return
    given = str(getattr(e, "option_name", ""))
    if not given.startswith("--"):
        return
    longs = [o for p in e.ctx.command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]  # type: ignore[attr-defined]
    match = close_match(given, longs)
    e.possibilities = [match] if match else None  # type: ignore[attr-defined]


HELP_WIDTH_PIPED = 160
"""Help drawn into a pipe or file (``btpo train --help | less``) is this wide (or $COLUMNS if wider;
$TERMINAL_WIDTH sets it exactly), not rich's 80: at 80 columns the option table cut flag names
(``--no-load-in-4b…``). Every flag name of every command fits (tests/cli/test_usage.py)."""

_TAG = re.compile(r"(?<!\\)\[([a-z#/@][^\[\]]*?)\]")


def _escape_non_markup(text: str | None) -> str | None:
    """``[brackets]`` in a help text that are not rich markup (``[bold]``, ``[/]``, ``[red]``) stay as
    written instead of vanishing (rich takes any ``[word]`` for a style)."""
    if not text:
        return text

    def one(m: re.Match[str]) -> str:
        tag = m.group(1)
        if tag.startswith(("/", "@", "link")):
            return m.group(0)
        try:
            Style.parse(tag)
        except StyleSyntaxError:
            return "\\" + m.group(0)
        return m.group(0)

    return _TAG.sub(one, text)


def keep_brackets(command: Any) -> None:
    """Every help text, epilog and option help of ``command`` and its subcommands, with the brackets
    that are not rich markup escaped (:func:`_escape_non_markup`)."""
    command.help = _escape_non_markup(command.help)
    command.epilog = _escape_non_markup(command.epilog)
    for p in command.params:
        if getattr(p, "help", None):
            p.help = _escape_non_markup(p.help)
    for sub in getattr(command, "commands", {}).values():
        keep_brackets(sub)


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0
