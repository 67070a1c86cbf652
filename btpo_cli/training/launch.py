"""``btpo train``'s lifecycle: lock the run folder, run the method's training, release."""

from __future__ import annotations

import os
from pathlib import Path

from rich.markup import escape

from btpo_cli import progress as progress_settings
from btpo_cli.config import Config
from btpo_cli.console import console, out
from btpo_cli.errors import BtpoError
from btpo_cli.methods.spec import get_method
from btpo_cli.runs.folder import Run, disk_full, disk_full_error, free_bytes
from btpo_cli.training import preempt, preflight
from btpo_cli.training.accelerator import use_cpu
from btpo_cli.training.tracking import check_tracker, finish_tracking


def launch(cfg: Config, resume: bool = False, overwrite: bool = False, log_every: str | None = None,
           force: bool = False) -> Run:
    """Lock and prepare the run folder, then run the method's training loop (every process calls this).

    The main process takes the folder's lock (refused, naming the holder, while another run uses
    it), checks the folder and writes config.yaml / env.json; the other processes wait for it.
    On the way out — finished, failed or interrupted — the trackers are ended and the lock
    released. Before any of it, every process checks what it was launched under against the recipe
    and the plan (:func:`~btpo_cli.training.preflight.check`; ``force`` turns a refusal into a warning).
    SIGTERM / SIGUSR1 stop every rank at the next step boundary with a checkpoint
    (:mod:`~btpo_cli.training.preempt`): :class:`Preempted` goes on to the caller after the resume line.
    Prints the run folder on stdout when done."""
    from accelerate import PartialState  # heavy: imported on use
    if log_every is not None:        # exported: eval and the spawned processes keep the cadence
        progress_settings.EVERY = progress_settings.ProgressEvery.parse(log_every)
        os.environ["BTPO_LOG_EVERY"] = str(log_every)
    cfg.name = cfg.name or Path(cfg.out).name
    impl = get_method(cfg.method)
    check_tracker(cfg.train.report_to)
    state = PartialState(cpu=use_cpu())
    handlers = preempt.install()
    try:
        launched = preflight.check(cfg, state, force)
        run = Run(cfg.out, is_main=state.is_main_process)
        lock = run.begin(cfg, state, resume, overwrite)
    except BaseException:
        preempt.restore(handlers)
        raise
    try:
        preflight.record(run, launched)
        if state.is_main_process:
            console.print(f"[bold]btpo train[/] method={cfg.method} model={escape(cfg.model.name)} "
                          f"data={escape(str(cfg.data.path))} → {escape(str(run.root))}  ({state.num_processes} "
                          f"process(es), {state.device})", highlight=False, soft_wrap=True)
        impl.train(cfg, run, resume)
    except preempt.Preempted as p:
        finish_tracking()
        preempt.report(p, run.root, state.is_main_process)
        raise
    except KeyboardInterrupt:
        finish_tracking()
        if state.is_main_process:
            console.print(f"continue with: btpo train --out {escape(str(run.root))} --resume", highlight=False,
                          soft_wrap=True)
        raise
    except Exception as e:
        finish_tracking()
        free = free_bytes(run.root)
        if not isinstance(e, BtpoError) and disk_full(e, free):
            raise disk_full_error(run.root, "training", e, free) from e
        raise
    finally:
        lock.release()
        preempt.restore(handlers)
    finish_tracking(ended=True)
    if state.is_main_process:
        console.print(f"[green]done[/]: {escape(str(run.final_dir))}", highlight=False, soft_wrap=True)
        out.print(str(run.root), markup=False, highlight=False, soft_wrap=True)
    return run
