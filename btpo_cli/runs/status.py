"""``btpo status RUN``: what state a run folder is in, for scripts that branch on it (torch-free).

finished  ``final/`` with its ``btpo.json``                     exit 0
stopped   ``config.yaml``, no final model: ``--resume`` goes on  exit 3
          (from ``step``: the latest complete checkpoint, 0 when it has none)
running   ``RUN/.lock`` held by a live process                  exit 4
broken    no ``config.yaml``, or one that cannot be read        exit 5

Every state carries the eval summaries found in ``RUN/eval/*.json`` (``RUN/eval/best/*.json``
under ``best``), each with ``stale``: why it no longer describes the run's model or data, or ``None``
(:func:`btpo_cli.runs.provenance.staleness`)."""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from btpo_cli.errors import BtpoError
from btpo_cli.fsio import list_checkpoints, lock_state, run_model
from btpo_cli.runs.lock import LOCK_FILE, pid_alive
from btpo_cli.runs.provenance import staleness

EXIT_CODES = {"finished": 0, "stopped": 3, "running": 4, "broken": 5}
"""The exit code of ``btpo status`` per state (docs/cli.md)."""

EVAL_KEYS = ("dataset", "split", "n", "accuracy", "raw_accuracy", "tie_rate", "format_error_rate", "method", "model")


@dataclass
class RunStatus:
    """The JSON of ``btpo status --format json`` (keys documented in docs/cli.md)."""

    run: str
    state: str
    """``finished``, ``stopped``, ``running`` or ``broken`` (the exit code follows it)."""
    reason: str
    """One line: why the run is in that state."""
    method: str | None = None
    model: str | None = None
    step: int | None = None
    """The last complete checkpoint's optimizer step (a stopped run resumes from it)."""
    checkpoint: str | None = None
    final: str | None = None
    holder: dict[str, Any] | None = None
    """Who holds ``RUN/.lock`` (pid, host, since) while the run is running."""
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.state]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code}


def _lock_holder(root: Path) -> dict[str, Any] | None:
    """The record of a live process holding ``RUN/.lock``, else ``None``. Probes with a shared
    ``flock`` (released at once); where flock is unsupported, checks the recorded pid on this host."""
    path = root / LOCK_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        holder = json.loads(text) if text.strip() else {}
    except ValueError:
        holder = {}
    state = lock_state(path)
    if state in ("free", "missing"):
        return None                       # nobody holds it: a crashed run's leftover
    if state == "held":
        return holder or {"pid": None}
    if holder.get("host") != socket.gethostname():   # no flock here: the recorded pid decides
        return holder or None
    pid = holder.get("pid")
    return holder if isinstance(pid, int) and pid_alive(pid, holder.get("proc_start")) else None


def _evals(root: Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for sub, prefix in ((root / "eval", ""), (root / "eval" / "best", "best/")):
        if not sub.is_dir():
            continue
        for p in sorted(sub.glob("*.json")):
            try:
                s = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(s, dict) and "accuracy" in s:
                stale, detail = staleness(s, p)
                found[prefix + p.stem] = {**{k: s.get(k) for k in EVAL_KEYS}, "stale": stale, "stale_detail": detail,
                                          "provenance": "recorded" if isinstance(s.get("provenance"), dict)
                                          else "unknown"}
    return found


def run_status(path: str | Path) -> RunStatus:
    """The state of the run folder ``path`` (``RUN`` or ``RUN/final``). A path that does not exist
    or is not a folder is an error (exit 1), not a state."""
    root = Path(path)
    if root.name == "final" and (root.parent / "config.yaml").exists():
        root = root.parent
    if not root.exists():
        raise BtpoError(f"{root}: no such run folder")
    if not root.is_dir():
        raise BtpoError(f"{root}: not a folder")
    st = RunStatus(run=str(root), state="broken", reason="", evals=_evals(root))
    holder = _lock_holder(root)
    cfg_path = root / "config.yaml"
    cfg: Any = None
    if cfg_path.exists():
        try:
            cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            cfg, st.reason = None, f"config.yaml unreadable ({type(e).__name__})"
        if cfg is not None and not isinstance(cfg, dict):
            cfg, st.reason = None, "config.yaml is not a mapping"
    if isinstance(cfg, dict):
        st.method = cfg.get("method")
        st.model = (cfg.get("model") or {}).get("name") if isinstance(cfg.get("model"), dict) else None
    ckpts = list_checkpoints(root)
    if ckpts:
        st.checkpoint, st.step = str(ckpts[-1][1]), ckpts[-1][0]
    final = run_model(root) or root / "final"
    if holder is not None:
        st.state, st.holder = "running", holder
        st.reason = f"locked by pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    elif cfg is None:                      # broken
        st.reason = st.reason or "no config.yaml (not a run folder, or its training never started)"
    elif (final / "btpo.json").exists():
        st.state, st.final, st.reason = "finished", str(final), "final/ with btpo.json"
    else:
        st.state = "stopped"
        if st.step is None:
            st.step = 0
        st.reason = (f"resumable from step {st.step} ({st.checkpoint})" if st.checkpoint
                     else "no checkpoint yet: --resume starts from step 0")
    return st
