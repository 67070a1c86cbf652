"""The built-in default pipeline: synthetic data → train each method on tiny-qwen2 → eval → compare."""

from __future__ import annotations

from pathlib import Path

from btpo_cli.config import build_config
from btpo_cli.console import console, out

BUDGETS = {
    # method: (steps full, steps quick, overrides)
    "bt": (60, 10, ["train.batch_size=16", "train.micro_batch_size=16", "optim.lr=1e-3",
                    "optim.warmup_ratio=0.05", "data.max_length=128"]),
    "btpo": (20, 4, ["btpo.rollout_batch_size=16", "train.batch_size=8", "train.micro_batch_size=4", "btpo.k=4",
                     "btpo.max_thought_tokens=16", "optim.lr=1e-3", "optim.warmup_ratio=0",
                     "data.max_length=128", "eval.max_new_tokens=16"]),
}


def run_demo(folder: Path, quick: bool, methods: list[str], seed: int, overwrite: bool) -> None:
    from btpo_cli.compare import collect, to_markdown
    from btpo_cli.evaluate_run import evaluate_run
    from btpo_cli.trainer import launch
    from data_builders.synthetic import build_synthetic

    data = folder / "data" / "synthetic"
    n_train, n_test = (256, 64) if quick else (2000, 200)
    console.rule("[bold]1. build data")
    build_synthetic(data, n_train=n_train, n_test=n_test, seed=seed)
    console.print(f"{data}: {n_train} train / {n_test} test pairs")
    runs = []
    for m in methods:
        if m not in BUDGETS:
            from btpo_cli.errors import BtpoError

            raise BtpoError(f"demo: no budget for method '{m}' (have {', '.join(BUDGETS)})")
        full, small, sets = BUDGETS[m]
        console.rule(f"[bold]2. train {m}")
        cfg = build_config(None, sets, {"method": m, "model.name": "tiny-qwen2", "data.path": str(data),
                                        "train.seed": seed, "train.max_steps": small if quick else full,
                                        "train.save_every": 0})
        cfg.out = str(folder / "runs" / m)
        run = launch(cfg, resume=False, overwrite=overwrite)
        console.rule(f"[bold]3. eval {m}")
        evaluate_run(run.root)
        runs.append(run.root)
    console.rule("[bold]4. compare")
    out.print(to_markdown(collect(runs)), markup=False, highlight=False)
