"""``btpo train``: resolve the config, prepare the run folder, hand over to the method's loop."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from btpo_cli.config import build_config
from btpo_cli.methods import method_specs
from btpo_cli.runs import Run


def _help() -> str:
    lines = "\n\n".join(f"[bold]{m.name}[/]: {m.help}" for m in method_specs())
    return f"Train a preference model.\n\nMethods:\n\n{lines}"


HELP = _help()
EPILOG = """[bold]Examples[/]

  btpo train --method bt --model tiny-qwen2 --data data/synthetic --out runs/bt --max-steps 20

  btpo train --recipe recipes/btpo/qwen2.5-7b-hh.yaml --set rollout.n=8 --set optim.lr=5e-7

  accelerate launch --num_processes 8 -m btpo_cli train --recipe recipes/bt/qwen2.5-7b-hh.yaml

  btpo train --out runs/bt --resume          (continue a killed run exactly)
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
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run folder first."),
) -> None:
    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other")
    flags = {"method": method, "model.name": model, "data.path": data, "train.seed": seed,
             "train.max_steps": max_steps, "train.report_to": report_to, "rollout.engine": engine}
    if resume:
        if out is None:
            raise typer.BadParameter("--resume needs --out RUN_FOLDER")
        run = Run(out)
        saved = run.load_config()
        # A resumed run keeps its config; only the step budget (and explicit --set) may change.
        flat = _flatten(saved.to_dict())
        if max_steps is not None:
            flat["train.max_steps"] = max_steps
        if engine is not None:      # the engine changes speed, not the samples (derived seeds)
            flat["rollout.engine"] = engine
        cfg = build_config(None, overrides, flat)
    else:
        cfg = build_config(recipe, overrides, flags)
        cfg.out = out or (cfg.out if recipe and cfg.out != "runs/default" else _default_out(cfg.method, cfg.model.name))
    from btpo_cli.trainer import launch

    launch(cfg, resume, overwrite)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


