"""The built-in default pipeline, on CPU: does thinking pay?

1. build the synthetic reasoning-judge set (multi-step arithmetic; ``data_builders/synthetic.py``)
2. pre-train (or load from the cache) ``tiny-thinker``, a base GPM that thinks a little
3. evaluate the untrained base GPM (greedy thought, then p(Yes))
4. train and evaluate each method from that base (BT with a scalar head, BTPO, …)
5. print the comparison table and draw the plot
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from btpo_cli.config import build_config, dump_yaml
from btpo_cli.console import console, out
from btpo_cli.errors import BtpoError

COMMON = ["data.max_length=160", "optim.warmup_ratio=0", "train.save_every=0", "eval.batch_size=32",
          "eval.max_new_tokens=64"]
BUDGETS: dict[str, dict[str, Any]] = {
    # method: steps (full, quick) and overrides
    "bt": {"steps": (200, 60), "set": ["train.batch_size=32", "train.micro_batch_size=32", "optim.lr=1e-3"]},
    "btpo": {"steps": (100, 40), "set": ["train.batch_size=16", "train.micro_batch_size=8", "btpo.k=4",
                                        "btpo.rollout_batch_size=32", "btpo.max_thought_tokens=64",
                                        "optim.lr=2.5e-4", "optim.scheduler=constant"]},
    "btpo-no-omega": {"method": "btpo", "tag": "no-omega", "steps": (100, 40),
                      "set": ["train.batch_size=16", "train.micro_batch_size=8", "btpo.k=4",
                              "btpo.rollout_batch_size=32", "btpo.max_thought_tokens=64", "optim.lr=2.5e-4",
                              "optim.scheduler=constant", "btpo.misalignment_weight=false"]},
}
DEFAULT_METHODS = ["bt", "btpo"]


def demo_config(key: str, data: Path, folder: Path, seed: int, quick: bool, steps: int | None = None) -> Any:
    if key not in BUDGETS:
        raise BtpoError(f"demo: no budget for '{key}' (have {', '.join(BUDGETS)})")
    b = BUDGETS[key]
    full, small = b["steps"]
    cfg = build_config(None, COMMON + b["set"], {
        "method": b.get("method", key), "model.name": "tiny-thinker", "data.path": str(data),
        "train.seed": seed, "train.max_steps": steps or (small if quick else full)})
    cfg.tag = b.get("tag", "")
    cfg.out = str(folder / "runs" / f"{key}-s{seed}")
    return cfg


def base_run(folder: Path, data: Path, seed: int) -> Path:
    """A run folder for the untrained base GPM, so that ``btpo eval`` treats it like any other."""
    from btpo_cli.models import resolve_model

    cfg = build_config(None, COMMON, {"method": "btpo", "model.name": "tiny-thinker", "data.path": str(data),
                                      "train.seed": seed})
    cfg.tag = "base"
    run = folder / "runs" / f"base-s{seed}"
    if run.exists():
        shutil.rmtree(run)
    (run / "final").parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(resolve_model("tiny-thinker"), run / "final")
    (run / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    return run


def run_demo(folder: Path, quick: bool, methods: list[str], seeds: list[int], overwrite: bool,
             plot: Path | None = None) -> list[Path]:
    from btpo_cli.compare import collect, to_markdown
    from btpo_cli.evaluate_run import evaluate_run
    from btpo_cli.models import resolve_model
    from btpo_cli.trainer import launch
    from data_builders.synthetic import build_synthetic

    data = folder / "data" / "synthetic"
    n_train, n_test = (1024, 100) if quick else (2000, 200)
    console.rule("[bold]1. data")
    build_synthetic(data, n_train=n_train, n_test=n_test, seed=0)
    console.print(f"{data}: {n_train} train / {n_test} test pairs (multi-step arithmetic)")
    console.rule("[bold]2. base model")
    console.print(f"tiny-thinker: {resolve_model('tiny-thinker')}", highlight=False)
    runs = []
    for seed in seeds:
        console.rule(f"[bold]3. untrained base GPM (seed {seed})")
        base = base_run(folder, data, seed)
        evaluate_run(base)
        runs.append(base)
        for m in methods:
            console.rule(f"[bold]4. {m} (seed {seed})")
            run = launch(demo_config(m, data, folder, seed, quick), resume=False, overwrite=overwrite)
            evaluate_run(run.root)
            runs.append(run.root)
    console.rule("[bold]5. compare")
    c = collect(runs)
    out.print(to_markdown(c), markup=False, highlight=False)
    if plot is not None:
        try:
            from btpo_cli.compare import plot as draw

            draw(c, plot)
            console.print(f"plot: {plot}", highlight=False)
        except ImportError:
            console.print("[yellow]plot skipped (matplotlib missing: pip install 'btpo[plot]')[/]")
    return runs
