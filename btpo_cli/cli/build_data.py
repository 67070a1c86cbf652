"""``btpo build-data``: build preference-pair datasets in the canonical format (METHOD.md §8)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from btpo_cli.console import console, out

app = typer.Typer(help="Build preference-pair datasets: train.jsonl, test.jsonl and manifest.json in a folder.",
                  no_args_is_help=True)


def _done(manifest: dict, folder: Path) -> None:
    counts = ", ".join(f"{k}={v}" for k, v in manifest.get("counts", {}).items())
    skipped = manifest.get("skipped", {}).get("total", 0)
    console.print(f"[green]wrote[/] {folder}  ({counts}; skipped {skipped})", highlight=False)
    out.print(str(folder), markup=False, highlight=False)


@app.command("synthetic", epilog="[bold]Example[/]\n\n  btpo build-data synthetic --out data/synthetic --n-train 2000 --n-test 200")
def synthetic(
    out_dir: Path = typer.Option(Path("data/synthetic"), "--out", "-o", help="Output folder."),
    n_train: int = typer.Option(2000, "--n-train", min=1, help="Training pairs."),
    n_test: int = typer.Option(200, "--n-test", min=1, help="Test pairs."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    digits: int = typer.Option(2, "--digits", min=1, max=9, help="Digits per operand (difficulty)."),
) -> None:
    """A small arithmetic preference set (right result vs near miss); needs no Hub."""
    from data_builders.synthetic import build_synthetic

    _done(build_synthetic(out_dir, n_train, n_test, seed, digits), out_dir)


def print_manifest(manifest: dict) -> None:
    out.print(json.dumps(manifest, indent=2, ensure_ascii=False), markup=False, highlight=False)
