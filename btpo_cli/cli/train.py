"""``btpo train``: resolve the config, prepare the run folder, hand over to the method's loop."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import typer
from rich.markup import escape

from btpo_cli.config import Config, build_config
from btpo_cli.console import console
from btpo_cli.console import out as stdout
from btpo_cli.data.pairs import preload_split
from btpo_cli.errors import BtpoError
from btpo_cli.methods import method_specs
from btpo_cli.progress import check_log_every
from btpo_cli.runs.folder import Run
from btpo_cli.training import launcher, preempt
from btpo_cli.training.tracking import check_tracker


def _help() -> str:
    lines = "\n\n".join(f"[bold]{m.name}[/]: {m.help}" for m in method_specs())
    return f"Train a preference model.\n\nMethods:\n\n{lines}"


HELP = _help()
EPILOG = """[bold]Examples[/]

  btpo train --method bt --model tiny-qwen2 --data data/synthetic --out runs/bt --max-steps 20

  btpo train --recipe recipes/btpo/qwen2.5-7b-hh.yaml --set rollout.n=8 --set optim.lr=5e-7

  btpo train --recipe bt/qwen2.5-7b-hh --gpus 8          (8 processes under the recipe's hardware.strategy)

  btpo train --recipe btpo/qwen2.5-7b-hh --gpus 8 --nodes 2 --node-rank 0 --main-address 10.0.0.1

  btpo train --out runs/bt --resume          (continue a killed run exactly; also a copy of a run folder)

  nohup btpo train ... --log-every 50 > log 2>&1 &     (a plain progress line every 50 steps)

Prints the run folder on stdout when done (progress and messages go to stderr). A run folder is
locked while a run trains in it.

Before step 1 every process checks what it was launched under against the recipe's hardware block and btpo plan: a mismatch that does not fit is refused (--force goes on; BTPO_MEMORY_GIB states the memory per process). SIGTERM / SIGUSR1 (Slurm --signal=USR1@120): every process stops at the next step boundary with a checkpoint and exits 75; continue with --resume. See docs/launching.md.
"""


def _default_out(method: str, model: str) -> str:
    return "runs/" + re.sub(r"[^A-Za-z0-9._-]+", "_", f"{method}-{Path(model).name}")


def train(
    recipe: Path | None = typer.Option(None, "--recipe", "-r", help="YAML recipe (see `btpo recipes list`)."),
    method: str | None = typer.Option(None, "--method", "-m",
                                      help=f"One of: {', '.join(m.name for m in method_specs())}."),
    model: str | None = typer.Option(None, "--model", help="Model alias (`btpo models`), Hub id or path."),
    data: str | None = typer.Option(None, "--data", "-d", help="Dataset folder, file or Hub id."),
    out: str | None = typer.Option(None, "--out", "-o", help="Run folder (default runs/<method>-<model>)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (train.seed)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    report_to: str | None = typer.Option(None, "--report-to", help="none | tensorboard | wandb."),
    engine: str | None = typer.Option(None, "--engine", help="Rollout engine for sampled thoughts/rationales: "
                                      "auto (vllm on a GPU where it imports, else hf), hf, vllm (rollout.engine)."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Override any key: --set train.batch_size=16."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint "
                                "(a run stopped before it started is started, given its options)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run folder first."),
    gpus: int | None = typer.Option(None, "--gpus", min=1, help="Launch N processes per node with "
                                    "accelerate launch under recipes/accelerate/<hardware.strategy>.yaml."),
    nodes: int | None = typer.Option(None, "--nodes", min=1, help="Machines (with --gpus; default 1)."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This machine's rank (with --nodes)."),
    main_address: str | None = typer.Option(None, "--main-address", help="Node 0's address (with --nodes)."),
    main_port: int | None = typer.Option(None, "--main-port", help="Node 0's port (default: 29500 on several "
                                         "nodes, a free one on one)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --gpus: print the accelerate launch line and exit."),
    force: bool = typer.Option(False, "--force", help="Train even where the start-up check says the launch "
                               "does not fit the recipe's plan."),
    log_every: str | None = typer.Option(None, "--log-every", help="When stderr is not a terminal (a log file): "
                                         "a progress line every N steps ('50') or T seconds ('30s'; default)."),
) -> None:
    from btpo_cli.training.launch import launch  # heavy: imported on use

    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other")

    check_log_every(log_every)
    flags = {"method": method, "model.name": model, "data.path": data, "train.seed": seed,
             "train.max_steps": max_steps, "train.report_to": report_to, "rollout.engine": engine}
    if resume:
        if out is None:
            raise typer.BadParameter("--resume needs --out RUN_FOLDER")
        cfg, resume = _resumed_config(out, recipe, method, overrides, flags, max_steps, engine)
    else:
        cfg = build_config(recipe, overrides, flags)
        cfg.out = out or (cfg.out if recipe and cfg.out != "runs/default" else _default_out(cfg.method, cfg.model.name))
    if dry_run:
        if gpus is None and nodes is None:
            raise typer.BadParameter("--dry-run shows the launch of --gpus N; pass --gpus")
        args = launcher.worker_args(_train_args())
        stdout.print(shlex.join(launcher.command(cfg.hardware.strategy, gpus or 1, nodes or 1, node_rank, main_address,
                                              main_port, args, cpu=launcher.cpu_only())), markup=False, highlight=False)
        return
    # cheap checks first (no torch yet): a tracker that is not installed, data that cannot be used

    check_tracker(cfg.train.report_to)
    preload_split(cfg.data.path, cfg.data.train_split, strict=cfg.data.strict)

    if gpus is not None or nodes is not None:
        if launcher.inside_launch():
            console.print("[yellow]note[/]: --gpus/--nodes ignored: already one process of a launched run",
                          highlight=False)
        else:
            args = launcher.worker_args(_train_args())
            raise typer.Exit(launcher.run(cfg.hardware.strategy, gpus or 1, nodes or 1, node_rank, main_address,
                                          main_port, args))
    try:
        launch(cfg, resume, overwrite, log_every, force)
    except preempt.Preempted:
        raise typer.Exit(preempt.exit_code()) from None


def _train_args() -> list[str]:
    """This command's arguments after ``train`` (what each launched process is given)."""
    argv = sys.argv[1:]
    return argv[argv.index("train") + 1:] if "train" in argv else []


def _resumed_config(out: str, recipe: Path | None, method: str | None, overrides: list[str], flags: dict,
                    max_steps: int | None, engine: str | None = None) -> tuple[Config, bool]:
    """The config to continue ``out`` with, and whether it is a resume (``False``: start it afresh).

    A resumed run keeps its saved config; only the step budget (and explicit ``--set``) may change,
    and ``out`` is the folder given, not the one named inside config.yaml (a copied run continues in
    the copy). A folder without config.yaml (stopped before it started, or not there yet) is started
    from step 0 with the options given, if there are options and no checkpoint."""
    run = Run(out)
    if not (run.root / "config.yaml").exists():
        if run.latest_checkpoint() is not None:
            raise BtpoError(f"{out}: has checkpoints but no config.yaml; cannot tell how it was configured")
        if recipe is None and method is None:
            raise BtpoError(f"{out}: nothing to resume (no config.yaml: the run never started); pass the run's "
                            "options (--recipe, or --method/--model/--data ...) with --resume to start it")
        console.print(f"[yellow]note[/]: {escape(out)} has no config.yaml (the run never started); starting it "
                      "from step 0", highlight=False, soft_wrap=True)
        cfg = build_config(recipe, overrides, flags)
        cfg.out = out
        return cfg, False
    saved = run.load_config()
    if Path(saved.out) != Path(out):
        console.print(f"[yellow]note[/]: {escape(out)}/config.yaml names out={escape(saved.out)}; continuing in "
                      f"{escape(out)} (the folder given)", highlight=False, soft_wrap=True)
        if saved.name == Path(saved.out).name:
            saved.name = Path(out).name
    saved.out = out
    # the saved config is the base (a bad value in it is the file's error, exit 1); the flags on top are
    # the command line's (exit 2); the engine changes speed, not the samples (derived seeds)
    return build_config(None, overrides, {"train.max_steps": max_steps, "rollout.engine": engine}, base=saved), True


