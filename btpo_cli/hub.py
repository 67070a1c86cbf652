"""The Hugging Face Hub when it does not answer: one quick probe, then the local caches only.

huggingface_hub retries a request that cannot connect five times with backoff (1+2+4+8+8 s, per file,
with a log line each), so a machine without the Hub waited 25-60 s before the one-line error. Before
btpo has a library fetch a model or dataset by Hub id, :func:`hub_down` opens one TCP connection to the
Hub (or the HTTPS proxy the environment names) with a few seconds' timeout, once per process. When that
fails the libraries are put in offline mode (``HF_HUB_OFFLINE=1``, also for the processes btpo starts):
a copy in the local cache is used, anything else fails at once, and btpo's error says the Hub did not
answer. ``HF_HUB_OFFLINE=1`` set by the user skips the probe; ``BTPO_HUB_PROBE=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request

from rich.markup import escape

from btpo_cli.console import console
from btpo_cli.errors import BtpoError

PROBE_TIMEOUT_S = 4.0
"""Seconds the probe waits for name resolution and the TCP handshake together."""

_OFFLINE_VALUES = ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_mode() -> bool:
    """The user (or btpo, after a failed probe) asked the libraries not to use the network."""
    return any(os.environ.get(k, "").strip().lower() in _OFFLINE_VALUES for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.cache
def hub_down() -> str | None:
    """Why the Hub does not answer (``None``: it answers, or the probe does not apply: offline mode set
    by the user, ``BTPO_HUB_PROBE=0``). The first call probes and, on failure, switches the libraries to
    offline mode (:func:`_go_offline`); later calls return the same answer."""
    if offline_mode() or os.environ.get("BTPO_HUB_PROBE", "1") == "0":
        return None
    url = urllib.parse.urlsplit(endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    target = f"{host}:{port}"
    proxy = urllib.request.getproxies_environment().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass_environment(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port, target = p.hostname or host, p.port or 8080, f"proxy {p.hostname}:{p.port or 8080}"
    why = _connect(host, port, PROBE_TIMEOUT_S)
    if why is None:
        return None
    _go_offline()
    return f"{endpoint()} does not answer ({target}: {why})"


def _connect(host: str, port: int, timeout: float) -> str | None:
    """``None`` when a TCP connection to ``host:port`` opens within ``timeout`` s, else why not. Name
    resolution has no timeout of its own, so the attempt runs in a daemon thread that is waited for."""
    result: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(e.strerror or str(e) or type(e).__name__)

    t = threading.Thread(target=attempt, name="btpo-hub-probe", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer in {timeout:g} s"


def _go_offline() -> None:
    """Offline mode for huggingface_hub, transformers and datasets, whether imported yet or not, and for
    every process started from here on."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        cfg = sys.modules["datasets.config"]
        cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True


def require_model(name: str, repo_id: str) -> None:
    """Before a model is loaded by Hub id: when the Hub does not answer, the cached copy is used (one
    note), and without one this is the one-line error, at once."""
    why = hub_down()
    if why is None:
        return
    from huggingface_hub import try_to_load_from_cache  # heavy: imported on use

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        _note_once(f"the Hub {why}: using the cached copy of {repo_id}")
        return
    shown = f"'{name}'" if name == repo_id else f"'{name}' ({repo_id})"
    raise BtpoError(f"could not load model {shown}: the Hub {why}, and it is not in the local cache; "
                    "connect, or pass a local model folder")


@functools.cache
def _note_once(text: str) -> None:
    console.print(f"[yellow]note[/]: {escape(text)}", highlight=False, soft_wrap=True)
