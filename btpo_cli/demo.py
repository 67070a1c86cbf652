"""The built-in default pipeline, on CPU: does thinking pay?

1. build the synthetic reasoning-judge set (multi-step arithmetic; ``data_builders/synthetic.py``)
2. say whether this is the locked environment (``requirements/venv.lock``, docs/environment.md), then
   pre-train (or load from the cache) ``tiny-thinker`` for each thinker seed, a base GPM that thinks
   a little, and say whether it is the very thinker the README's table was made with
3. evaluate the untrained base GPM (greedy thought, then p(Yes))
4. train and evaluate each method from that base (BT with a scalar head, BTPO, …) per seed
5. print the comparison table, the seed summary (mean ± std and the worst seed per method, and
   BTPO − BT per seed) and draw the plot

Run folders: ``<out>/runs/<method>-t<thinker seed>-s<seed>``; the summary also goes to
``<out>/summary.json`` and ``<out>/summary.md``.

``--keep`` continues a sweep instead of starting it over: a run that finished with the same
settings is reused (evaluated if it was not yet), one that was stopped part-way is resumed from its
last checkpoint, one made with other settings is an error. So a long sweep can be stopped and
restarted, or run in parts (say one ``--thinker-seeds`` each, side by side) and summarised at the end
by the whole command over the merged ``runs/``.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btpo_cli.compare import collect, to_markdown
from btpo_cli.compare import plot as draw
from btpo_cli.config import build_config, flatten
from btpo_cli.console import console, out
from btpo_cli.envlock import lock_status
from btpo_cli.errors import BtpoError
from btpo_cli.fsio import atomic_write
from btpo_cli.models.aliases import resolve_model
from btpo_cli.runs.folder import Run
from data_builders.synthetic import build_synthetic

COMMON = ["data.max_length=160", "optim.warmup_ratio=0", "train.save_every=0", "eval.batch_size=32",
          "eval.max_new_tokens=64"]
_BTPO = ["train.batch_size=16", "train.micro_batch_size=8", "rollout.n=4", "rollout.batch_size=32",
         "rollout.max_new_tokens=64", "optim.lr=2.5e-4", "optim.scheduler=constant", "btpo.score_floor=0.01"]
BUDGETS: dict[str, dict[str, Any]] = {
    # method: steps (full, quick) and overrides
    "bt": {"steps": (200, 60), "set": ["train.batch_size=32", "train.micro_batch_size=32", "optim.lr=1e-3"]},
    "btpo": {"steps": (100, 40), "set": _BTPO},
    "btpo-no-omega": {"method": "btpo", "tag": "no-omega", "steps": (100, 40),
                      "set": [*_BTPO, "btpo.misalignment_weight=false"]},
    # METHOD's score term as written (no floor on the rejected side's log p(Yes)): the ablation of our fix
    "btpo-no-floor": {"method": "btpo", "tag": "no-floor", "steps": (100, 40),
                      "set": [*_BTPO, "btpo.score_floor=0"]},
}
DEFAULT_METHODS = ["bt", "btpo"]
LABELS = {"base": "untrained base GPM (greedy thought)", "bt": "BT (scalar head)", "btpo": "BTPO",
          "btpo-no-omega": "BTPO without ω̂", "btpo-no-floor": "BTPO without the score floor"}


def thinker_model(thinker_seed: int) -> str:
    """The model alias of the tiny-thinker pre-trained with ``thinker_seed`` (``btpo_cli.models``)."""
    return f"tiny-thinker-s{thinker_seed}"


def demo_config(key: str, data: Path, folder: Path, seed: int, quick: bool, steps: int | None = None,
                thinker_seed: int = 0) -> Any:
    if key not in BUDGETS:
        raise BtpoError(f"demo: no budget for '{key}' (have {', '.join(BUDGETS)})")
    b = BUDGETS[key]
    full, small = b["steps"]
    cfg = build_config(None, COMMON + b["set"], {
        "method": b.get("method", key), "model.name": thinker_model(thinker_seed), "data.path": str(data),
        "train.seed": seed, "train.max_steps": steps or (small if quick else full)})
    cfg.tag = b.get("tag", "")
    cfg.out = str(folder / "runs" / f"{key}-t{thinker_seed}-s{seed}")
    return cfg


def base_run(folder: Path, data: Path, seed: int, thinker_seed: int = 0, keep: bool = False,
             n_test: int | None = None, sha: str | None = None) -> Path:
    """Evaluate the untrained base GPM as it is (``btpo eval --model``: same protocol and judge as the
    trained runs; tag ``base``) into ``runs/base-t<t>-s<seed>``; returns that folder. With ``keep``
    an evaluation already there of the same model on ``n_test`` pairs is reused."""
    from btpo_cli.judging.run_eval import evaluate_model  # heavy: imported on use

    run = folder / "runs" / f"base-t{thinker_seed}-s{seed}"
    if keep:
        for e in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
            s = json.loads(e.read_text(encoding="utf-8"))
            if isinstance(s, dict) and s.get("model") == thinker_model(thinker_seed) and s.get("n") == n_test:
                check_stamp(run, sha)
                console.print(f"{run}: kept (evaluated before)", highlight=False)
                return run
    if run.exists():
        shutil.rmtree(run)
    root, _ = evaluate_model(thinker_model(thinker_seed), "btpo", str(data), out=run,
                             overrides=[*COMMON, f"train.seed={seed}"], tag="base")
    stamp(root, thinker_seed, sha)
    return root


def report_thinker(thinker_seed: int) -> tuple[str, str | None]:
    """Build or load the thinker; print its hashes, build environment and how it compares with the README's.
    Returns the reference status and the weights sha256 (what :data:`STAMP` records in each run)."""
    from btpo_cli.models.thinker import reference_check  # heavy: imported on use

    path = Path(resolve_model(thinker_model(thinker_seed)))
    info = json.loads((path / "btpo_thinker.json").read_text(encoding="utf-8"))
    check = reference_check(info)
    style = {"identical": "green", "different": "yellow", "no-reference": "yellow"}[check.status]
    console.print(f"{path}", highlight=False)
    for i, line in enumerate(check.lines):
        console.print(f"[{style}]{line}[/]" if i >= 2 else line, highlight=False)
    return check.status, info.get("weights_sha256")


def report_environment() -> dict[str, Any]:
    """Print whether this is the locked environment (requirements/*.lock) and whether the reference thinker
    was recorded with the same lock; returns what ``summary.json`` records under ``environment``."""
    from btpo_cli.models.thinker import load_reference  # heavy: imported on use

    st = lock_status()
    ref_lock = load_reference().get("lock") or {}
    same_lock = st.sha256 is not None and ref_lock.get("sha256") == st.sha256
    console.print(st.line(), style="green" if st.status == "locked" else "yellow", highlight=False, soft_wrap=True)
    if st.sha256 is not None and not same_lock:
        console.print(f"  the README's reference thinker was recorded with another lock (sha256 "
                      f"{(ref_lock.get('sha256') or 'not recorded')[:12]}…): bench/thinker_reference.py "
                      "re-records it", style="yellow", highlight=False, soft_wrap=True)
    return {"lock": f"{st.path.parent.name}/{st.path.name}", "status": st.status, "lock_sha256": st.sha256,
            "reference_lock": same_lock, "differences": st.differences}


STAMP = "demo_thinker.json"
"""Written into each demo run folder: which thinker (weights sha256) the run was made from, so that
``--keep`` never mixes runs from different thinkers (parts run on machines that built different ones)."""


def stamp(run: Path, thinker_seed: int, sha: str | None) -> None:
    if sha is not None:
        atomic_write(run / STAMP, json.dumps({"model": thinker_model(thinker_seed), "weights_sha256": sha}) + "\n")


def check_stamp(run: Path, sha: str | None) -> None:
    """Refuse to keep a run made from another thinker than this machine's; note one with no record."""
    f = run / STAMP
    if sha is None:
        return
    if not f.is_file():
        console.print(f"[yellow]note[/]: {run}: no record of the thinker it was made from; kept as it is",
                      highlight=False, soft_wrap=True)
        return
    rec = json.loads(f.read_text(encoding="utf-8"))
    there = rec.get("weights_sha256") or "?"
    if there != sha:
        raise BtpoError(f"{run}: made from another {rec.get('model', 'thinker')} (weights sha256 {there[:12]}… "
                        f"there, {sha[:12]}… here: built on another machine?); pass --overwrite or another --out")


# ----------------------------------------------------------------------------- the seed summary


@dataclass
class SeedSummary:
    """Raw test accuracy (%) per method and (thinker seed, seed)."""

    methods: list[str]
    thinker_seeds: list[int]
    seeds: list[int]
    acc: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    thinkers: dict[int, str] = field(default_factory=dict)
    """Thinker seed → reference status (identical / different / no-reference)."""

    def values(self, method: str, thinker_seed: int | None = None) -> list[float]:
        return [v for (t, _), v in sorted(self.acc.get(method, {}).items()) if thinker_seed in (None, t)]

    def gaps(self, a: str, b: str) -> dict[tuple[int, int], float]:
        """``a − b`` per (thinker seed, seed) where both ran."""
        pa, pb = self.acc.get(a, {}), self.acc.get(b, {})
        return {k: pa[k] - pb[k] for k in sorted(pa) if k in pb}

    def to_json(self) -> dict[str, Any]:
        def ms(xs: list[float]) -> dict[str, Any]:
            return {"mean": statistics.fmean(xs) if xs else None,
                    "std": statistics.stdev(xs) if len(xs) > 1 else None,
                    "min": min(xs) if xs else None, "n": len(xs)}

        out_: dict[str, Any] = {"metric": "raw test accuracy (%)", "thinker_seeds": self.thinker_seeds,
                                "seeds": self.seeds, "thinkers": {str(t): s for t, s in self.thinkers.items()},
                                "methods": {}}
        for m in self.methods:
            out_["methods"][m] = {"all": ms(self.values(m)),
                                  "by_thinker": {str(t): ms(self.values(m, t)) for t in self.thinker_seeds},
                                  "runs": {f"t{t}-s{s}": v for (t, s), v in sorted(self.acc.get(m, {}).items())}}
        for a, b in (("btpo", "bt"), ("btpo", "base")):
            g = self.gaps(a, b)
            if g:
                out_[f"{a}_minus_{b}"] = {**ms(list(g.values())), "runs": {f"t{t}-s{s}": v for (t, s), v in g.items()}}
        return out_


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.fmean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def summary_markdown(s: SeedSummary) -> str:
    """Methods as rows; per thinker seed and overall ``mean ± std`` over seeds, and the worst run."""
    head = ["", *[f"thinker s{t} ({len(s.seeds)} seeds)" for t in s.thinker_seeds], "all runs", "worst run"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def row(label: str, by: dict[tuple[int, int], float]) -> str:
        cols = [_fmt([v for (t, _), v in sorted(by.items()) if t == ts]) for ts in s.thinker_seeds]
        worst = min(by.items(), key=lambda kv: kv[1]) if by else None
        w = f"{worst[1]:.1f} (t{worst[0][0]} s{worst[0][1]})" if worst else "–"
        return "| " + " | ".join([label, *cols, _fmt([by[k] for k in sorted(by)]), w]) + " |"

    for m in s.methods:
        lines.append(row(LABELS.get(m, m), s.acc.get(m, {})))
    for a, b in (("btpo", "bt"), ("btpo", "base")):
        g = s.gaps(a, b)
        if g:
            lines.append(row(f"{LABELS.get(a, a)} − {LABELS.get(b, b).split(' (')[0]} (points)", g))
    return "\n".join(lines)


def _raw_accuracy(run: Path) -> float | None:
    evals = sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []
    for e in evals:
        s = json.loads(e.read_text(encoding="utf-8"))
        if isinstance(s, dict) and s.get("raw_accuracy") is not None:
            return 100.0 * float(s["raw_accuracy"])
    return None


def seed_summary(folder: Path, methods: list[str], seeds: list[int], thinker_seeds: list[int],
                 thinkers: dict[int, str] | None = None) -> SeedSummary:
    """Read ``<folder>/runs/<method>-t<t>-s<s>/eval/*.json`` into a :class:`SeedSummary` (missing runs left out)."""
    s = SeedSummary(["base", *methods], list(thinker_seeds), list(seeds), thinkers=dict(thinkers or {}))
    for m in s.methods:
        for t in thinker_seeds:
            for seed in seeds:
                v = _raw_accuracy(folder / "runs" / f"{m}-t{t}-s{seed}")
                if v is not None:
                    s.acc.setdefault(m, {})[(t, seed)] = v
    return s


# ----------------------------------------------------------------------------- the pipeline

_NOT_SETTINGS = ("out", "name")   # where a run lives, not how it was made (runs may be moved between folders)


def _settings(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    d = {k: v for k, v in cfg_dict.items() if k not in _NOT_SETTINGS}
    d["data"] = {k: v for k, v in d.get("data", {}).items() if k != "path"}   # rebuilt the same every time
    return d


def keep_or_launch(cfg: Any, thinker_seed: int = 0, sha: str | None = None) -> Path:
    """``--keep``: reuse a finished run made with ``cfg``'s settings, resume a stopped one, or start it.

    A folder whose ``config.yaml`` differs from ``cfg`` in anything but its location is refused with
    the first differing key (it would mix budgets in one table), and so is one made from a thinker
    whose weights differ from ``sha`` (this machine's)."""
    from btpo_cli.training.launch import launch  # heavy: imported on use

    root = Path(cfg.out)
    run = Run(root)
    saved = root / "config.yaml"
    if not saved.exists() or run.progress() is None:
        launch(cfg, resume=False, overwrite=False)
        stamp(root, thinker_seed, sha)
        return root
    old = run.load_config()      # a config.yaml that does not load is an error naming it
    a, b = flatten(_settings(old.to_dict())), flatten(_settings(cfg.to_dict()))
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
        k = diff[0]
        raise BtpoError(f"{saved}: made with other settings than this demo ({k}: {a.get(k)!r} there, "
                        f"{b.get(k)!r} here{f'; {len(diff) - 1} more' if len(diff) > 1 else ''}); "
                        "pass --overwrite or another --out")
    check_stamp(root, sha)
    if run.final_dir.exists():
        console.print(f"{root}: kept (finished before with the same settings)", highlight=False)
        return root
    console.print(f"{root}: resuming (stopped before it finished)", highlight=False)
    return launch(cfg, resume=True).root


def run_demo(folder: Path, quick: bool, methods: list[str], seeds: list[int], overwrite: bool,
             plot: Path | None = None, thinker_seeds: list[int] | None = None) -> list[Path]:
    from btpo_cli.judging.run_eval import evaluate_run  # heavy: imported on use
    from btpo_cli.training.launch import launch  # heavy: imported on use

    thinker_seeds = thinker_seeds or [0]
    for m in methods:
        if m not in BUDGETS:
            raise BtpoError(f"demo: no budget for '{m}' (have {', '.join(BUDGETS)})")
    data = folder / "data" / "synthetic"
    n_train, n_test = (1024, 100) if quick else (2000, 200)
    console.rule("[bold]1. data")
    build_synthetic(data, n_train=n_train, n_test=n_test, seed=0, overwrite=overwrite)
    console.print(f"{data}: {n_train} train / {n_test} test pairs (multi-step arithmetic)")
    console.rule("[bold]2. base model")
    environment = report_environment()
    reports = {t: report_thinker(t) for t in thinker_seeds}
    thinkers = {t: status for t, (status, _) in reports.items()}
    shas = {t: sha for t, (_, sha) in reports.items()}
    runs = []
    for t in thinker_seeds:
        for seed in seeds:
            console.rule(f"[bold]3. untrained base GPM (thinker {t}, seed {seed})")
            runs.append(base_run(folder, data, seed, t, keep=not overwrite, n_test=n_test, sha=shas[t]))
            for m in methods:
                console.rule(f"[bold]4. {m} (thinker {t}, seed {seed})")
                cfg = demo_config(m, data, folder, seed, quick, thinker_seed=t)
                if overwrite:
                    root = launch(cfg, resume=False, overwrite=True).root
                    stamp(root, t, shas[t])
                else:
                    root = keep_or_launch(cfg, t, shas[t])
                if overwrite or _raw_accuracy(root) is None:
                    evaluate_run(root)
                runs.append(root)
    console.rule("[bold]5. compare")
    c = collect(runs)
    out.print(to_markdown(c), markup=False, highlight=False)
    summary = seed_summary(folder, methods, seeds, thinker_seeds, thinkers)
    md = summary_markdown(summary)
    atomic_write(folder / "summary.json", json.dumps({**summary.to_json(), "environment": environment}, indent=2)
                 + "\n")
    atomic_write(folder / "summary.md", md + "\n")
    out.print("\nraw test accuracy (%), mean ± std over seeds:\n" + md, markup=False, highlight=False)
    if plot is not None:
        try:
            draw(c, plot)
            console.print(f"plot: {plot}", highlight=False)
        except ImportError:
            console.print("[yellow]plot skipped (matplotlib missing: pip install 'btpo[plot]')[/]")
    return runs
