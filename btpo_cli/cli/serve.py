"""``btpo serve``: a trained judge behind an HTTP API (needs the ``serve`` extra: fastapi + uvicorn)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import typer

from btpo_cli.console import console
from btpo_cli.engines import check_engine_choice
from btpo_cli.errors import BtpoError, check_choice
from btpo_cli.fsio import atomic_write
from btpo_cli.judging.judge import PACKING_HELP, load_judge

HELP = "Serve a trained judge over HTTP: POST /v1/score, POST /v1/compare, GET /health (dynamic batching)."
EPILOG = """[bold]Examples[/]

  btpo serve --judge runs/btpo                       (http://127.0.0.1:8000)

  BTPO_SERVE_TOKEN=secret btpo serve --judge runs/bt --port 9000 --max-wait-ms 20

  curl -s localhost:8000/v1/score -d '{"prompt": "What is 2 + 3?", "responses": ["5", "6"]}'

  curl -s localhost:8000/v1/compare -d '{"prompt": "What is 2 + 3?", "a": "5", "b": "6"}'

Binds to 127.0.0.1 unless --host says otherwise; with --token (or BTPO_SERVE_TOKEN) every /v1/
request needs `Authorization: Bearer <token>`.
"""


def serve(
    judge_path: Path = typer.Option(..., "--judge", "--checkpoint", "-j", "-c",
                                     help="Run folder or its final/ (a trained judge); --checkpoint is the same flag, as in `btpo eval`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free port; see --port-file)."),
    port_file: Path | None = typer.Option(None, "--port-file", help="Write the bound port here once listening."),
    token: str | None = typer.Option(None, "--token", envvar="BTPO_SERVE_TOKEN",
                                     help="Require 'Authorization: Bearer TOKEN' (env BTPO_SERVE_TOKEN)."),
    max_batch: int | None = typer.Option(None, "--max-batch", min=1,
                                         help="Items per batched forward (default: 2 x the judge's batch size)."),
    max_wait_ms: float = typer.Option(10.0, "--max-wait-ms", min=0, help="How long a batch waits for more requests."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=64, help="Largest request body."),
    max_items: int = typer.Option(64, "--max-items", min=1, help="Most responses in one /v1/score request."),
    max_queue: int = typer.Option(4096, "--max-queue", min=1, help="Items waiting before requests get 503."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Judge's pairs per forward."),
    samples: int | None = typer.Option(None, "--samples", min=0, help="BTPO: mean p(Yes) over K sampled thoughts."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="Thought / rationale budget."),
    packing: str | None = typer.Option(None, "--packing", help=PACKING_HELP),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if present)."),
    engine: str | None = typer.Option(None, "--engine", help="Engine for thoughts/rationales: auto, hf, vllm."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request (one line each)."),
) -> None:
    if engine is not None:
        check_engine_choice(engine)
    check_choice("--packing", packing, ("off", "on", "auto"))
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise BtpoError("btpo serve needs fastapi and uvicorn: pip install 'btpo[serve]'")
    from btpo_cli.serving.http import Limits, bind, run_server  # optional extra: imported on use

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    judge = load_judge(judge_path, device=device, engine=engine, batch_size=batch_size, samples=samples,
                       max_new_tokens=max_new_tokens, packing=packing)
    limits = Limits(max_body_bytes=max_body_bytes, max_items=max_items, max_batch=max_batch or 2 * judge.batch_size,
                    max_wait_ms=max_wait_ms, max_queue=max_queue)
    try:
        sock = bind(host, port)
    except OSError as e:
        raise BtpoError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    bound = sock.getsockname()[1]
    if port_file:
        atomic_write(port_file, f"{bound}\n")     # a script polling it never reads half a number
    console.print(f"[btpo] serving the {judge.method} judge from {judge.model_dir} on http://{host}:{bound} "
                  f"(batches of ≤{limits.max_batch} items, ≤{limits.max_wait_ms:g} ms wait"
                  f"{', bearer token required' if token else ''})", highlight=False, markup=False)
    try:
        run_server(judge, sock, limits, token, access_log)
    finally:
        judge.close()
        sock.close()
