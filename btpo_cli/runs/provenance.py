"""What a result measured, and whether it still holds (torch-free; docs/provenance.md).

- :func:`weights_digest`: the sha256 of a model folder's weight files, kept beside them in
  ``weights.sha256.json`` (per-file digests, sizes and mtimes, one combined digest, the step the model
  was saved at). ``btpo train`` writes it into ``final/`` and ``best/`` at save time
  (:func:`write_weights_digest`); an older folder gets it the first time it is asked for (stored when the
  folder is writable), so a 15 GB ``final/`` is read once, not at every eval or ``btpo status``.
- :func:`data_digest`: the sha256 of the file a split is read from (a dataset folder's ``<split>.jsonl``,
  a file, a saved ``datasets`` folder as a whole), or the Hub id and the revision cached locally.
- :func:`training_data`: the digests of a run's splits, recorded in ``env.json`` at each start.
- :func:`eval_provenance`: the ``provenance`` entry of every eval JSON.
- :func:`staleness`: the one rule that says whether an eval still describes the run's model and data.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.markup import escape

from btpo_cli.console import console
from btpo_cli.data.files import atomic_json, looks_like_hub_id, sha256_file

WEIGHTS_FILE = "weights.sha256.json"
WEIGHTS_FORMAT = "btpo-weights/1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
MODEL_CHANGED = "model changed since eval"
DATA_CHANGED = "data changed since eval"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
"""Of ``evaluated_at`` here and of ``env.json``'s ``starts[].time``."""
_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_path(path: Path) -> str:
    """The sha256 of a file (memoized per path, size and mtime within this process). A file of the Hugging
    Face cache (a link to ``blobs/<sha256>``) is not read: the blob's name is its digest."""
    real = Path(os.path.realpath(path))
    if path.is_symlink() and real.parent.name == "blobs" and len(real.name) == 64 \
            and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        _MEMO[key] = sha256_file(path)
    return _MEMO[key]


def _combined(files: dict[str, str]) -> str:
    """One digest for several files: sha256 over ``relative path NUL digest LF``, sorted by path."""
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def _files_under(folder: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != WEIGHTS_FILE
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and (suffixes is None or p.name.endswith(suffixes)))


# ----------------------------------------------------------------------------- model weights

def _stat(folder: Path, files: list[Path]) -> dict[str, list[int]]:
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def write_weights_digest(model_dir: str | Path, step: int | None) -> dict[str, Any] | None:
    """Hash ``model_dir``'s weight files and write ``weights.sha256.json`` (``btpo train``, at save time)."""
    d = Path(model_dir)
    files = _files_under(d, WEIGHT_SUFFIXES)
    if not files:
        return None
    digests = {p.relative_to(d).as_posix(): sha256_path(p) for p in files}
    rec = {"format": WEIGHTS_FORMAT, "sha256": _combined(digests), "step": step, "files": digests,
           "stat": _stat(d, files)}
    atomic_json(d / WEIGHTS_FILE, rec)
    return rec


def _read_sidecar(d: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((d / WEIGHTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == WEIGHTS_FORMAT else None


def weights_digest(model_dir: str | Path, store: bool = True) -> dict[str, Any] | None:
    """``{"sha256", "step", "files", ...}`` of a local model folder, ``None`` when it holds no weights.

    Read from ``weights.sha256.json`` while its files' sizes and mtimes are those recorded; otherwise
    computed (and stored, for a btpo model folder — one with ``btpo.json`` — that is writable). The step
    of an older folder: ``best/``'s ``selected.step``, else unknown."""
    d = Path(model_dir)
    if not d.is_dir():
        return None
    files = _files_under(d, WEIGHT_SUFFIXES)
    if not files:
        return None
    rec = _read_sidecar(d)
    if rec is not None and rec.get("stat") == _stat(d, files):
        return rec
    step = rec.get("step") if rec else _selected_step(d)
    if store and (d / "btpo.json").exists() and os.access(d, os.W_OK):
        try:
            return write_weights_digest(d, step)
        except OSError:
            pass
    digests = {p.relative_to(d).as_posix(): sha256_path(p) for p in files}
    return {"format": WEIGHTS_FORMAT, "sha256": _combined(digests), "step": step, "files": digests}


def _selected_step(d: Path) -> int | None:
    try:
        sel = json.loads((d / "btpo.json").read_text(encoding="utf-8")).get("selected")
    except (OSError, ValueError, AttributeError):
        return None
    return sel.get("step") if isinstance(sel, dict) and isinstance(sel.get("step"), int) else None


def model_provenance(model_dir: str | Path, which: str | None, store: bool = True) -> dict[str, Any]:
    """The ``provenance.model`` of an eval: folder, ``final``/``best`` (``None`` for a model judged as it is),
    the step it was saved at and the sha256 of its weights (``None`` when unknown: a Hub id not on disk)."""
    rec = weights_digest(model_dir, store) if Path(model_dir).is_dir() else None
    return {"dir": str(Path(model_dir).resolve()) if Path(model_dir).exists() else str(model_dir), "which": which,
            "step": rec.get("step") if rec else None, "weights_sha256": rec.get("sha256") if rec else None}


# ----------------------------------------------------------------------------- data

def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def hub_revision(repo_id: str) -> str | None:
    """The commit of ``main`` in the local Hub cache (what ``datasets`` read last), ``None`` if not cached."""
    owner_name = repo_id.split(":", 1)[0]
    ref = _hub_cache() / f"datasets--{owner_name.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def data_file(source: str | Path, split: str | None) -> Path | None:
    """The local file (or folder) a split is read from, as ``btpo_cli.data.pairs`` resolves it; ``None`` for
    the Hub or a path that does not exist."""
    text = str(source)
    if text.startswith(("hub:", "hf:")):
        return None
    p = Path(text).expanduser()
    if not p.exists():
        return None
    if p.is_dir() and split:
        for name in (f"{split}.jsonl", f"{split}.jsonl.gz", f"{split}.parquet"):
            if (p / name).is_file():
                return (p / name).resolve()
    return p.resolve()


def data_digest(source: str | Path, split: str | None) -> dict[str, Any]:
    """``{"path", "split", "file", "sha256"}`` of a local split (a folder: one digest over its files), or
    ``{"path", "split", "hub_id", "revision"}`` for a Hub dataset; ``sha256`` is ``None`` when nothing
    is there."""
    text = str(source)
    out: dict[str, Any] = {"path": text, "split": split}
    f = data_file(source, split)
    if f is None:
        hub = text.split(":", 1)[1] if text.startswith(("hub:", "hf:")) else text
        if text.startswith(("hub:", "hf:")) or looks_like_hub_id(text):
            return {**out, "hub_id": hub, "revision": hub_revision(hub)}
        return {**out, "file": None, "sha256": None}
    if f.is_dir():
        files = {p.relative_to(f).as_posix(): sha256_path(p) for p in _files_under(f, None)}
        return {**out, "file": str(f), "sha256": _combined(files)}
    return {**out, "file": str(f), "sha256": sha256_path(f)}


def training_data(cfg: Any) -> dict[str, Any]:
    """``env.json``'s ``data``: the digest of every split the run reads that is there (train, eval, a named
    validation split, a folder's ``validation`` file under ``data.valid_split=auto``)."""
    vs = cfg.data.valid_split
    splits = [cfg.data.train_split, cfg.data.eval_split, "validation" if vs == "auto" else vs]
    out: dict[str, Any] = {}
    for s in dict.fromkeys(x for x in splits if x and x != "heldout"):
        f = data_file(cfg.data.path, s)
        if f is not None and f.is_dir() and not any((f / n).exists() for n in SAVED_MARKERS):
            continue             # a folder without this split's file
        d = data_digest(cfg.data.path, s)
        if d.get("hub_id") and s == "validation" and vs == "auto":
            continue
        if d.get("sha256") or d.get("hub_id"):
            out[s] = d
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether two data records name the same content (``None``: cannot tell)."""
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    if a.get("revision") and b.get("revision"):
        return a["revision"] == b["revision"]
    return None


def trained_on(data: dict[str, Any], model_dir: str | Path, run_root: str | Path | None) -> dict[str, Any] | None:
    """The record of the same data file in what the model was trained on (``btpo.json``'s
    ``training.data_sha256``, else the run's ``env.json``), or ``None``."""
    recs: list[Any] = []
    for path, key in ((Path(model_dir) / "btpo.json", "training"), (Path(run_root or model_dir) / "env.json", None)):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        section = (doc.get(key) or {}) if key else doc
        got = section.get("data_sha256" if key else "data") if isinstance(section, dict) else None
        if isinstance(got, dict):
            recs.extend(v for v in got.values() if isinstance(v, dict))
            break
    for r in recs:
        if (data.get("file") and r.get("file") == data["file"]) or (data.get("hub_id") and
                                                                   r.get("hub_id") == data["hub_id"]):
            return r
    return None


# ----------------------------------------------------------------------------- eval provenance

def eval_provenance(cfg: Any, model_dir: str | Path, which: str, split: str | None, as_is: bool,
                    run_root: str | Path, settings: dict[str, Any], benchmark: bool = False,
                    quiet: bool = False) -> dict[str, Any]:
    """The ``provenance`` of an eval JSON: the model (dir, which, step, weights sha256), the data (path, split,
    file sha256 or Hub id + revision; a benchmark folder as a whole; ``trained_sha256`` and
    ``changed_since_training`` when the run trained on the same file) and the effective eval settings.
    When the data changed since training, one line says so on stderr (unless ``quiet``)."""
    data = {**data_digest(cfg.data.path, None if benchmark else split), "split": split}
    if not as_is and not benchmark:
        then = trained_on(data, model_dir, run_root)
        if then is not None:
            same = _same(data, then)
            data["trained_sha256"] = then.get("sha256") or then.get("revision")
            data["changed_since_training"] = None if same is None else not same
    prov = {"model": model_provenance(model_dir, None if as_is else which, store=not quiet), "data": data,
            "eval": {**dict(vars(cfg.eval)), **settings}, "evaluated_at": time.strftime(TIME_FORMAT)}
    line = None if quiet else data_change_line(Path(run_root).name, prov)
    if line:
        console.print(f"[yellow]warning[/]: {escape(line)}", highlight=False, soft_wrap=True)
    return prov


def data_change_line(run: str, prov: dict[str, Any]) -> str | None:
    """The one stderr line of ``btpo eval`` when the data differs from what the run trained on."""
    d = prov.get("data") or {}
    if not d.get("changed_since_training"):
        return None
    now = d.get("sha256") or d.get("revision") or "?"
    return (f"{d.get('file') or d.get('hub_id')} changed since run {run} was trained (sha256 "
            f"{str(d.get('trained_sha256'))[:12]}… recorded then, {now[:12]}… now): this eval is not on the data "
            "the run was made with")


# ----------------------------------------------------------------------------- staleness

def staleness(summary: dict[str, Any], eval_path: str | Path) -> tuple[str | None, str]:
    """``(reason, detail)``: ``reason`` is :data:`MODEL_CHANGED`, :data:`DATA_CHANGED` or ``None`` (current).

    With ``provenance``: the model of the run folder the eval file is in (``final/`` or ``best/`` by
    ``which``) must still have the recorded weights sha256, and the data file its sha256 (a Hub dataset:
    its cached revision); what cannot be checked now (a missing data file, a model judged as it is that is
    not on disk) counts as unchanged. Without it (an eval written before provenance): stale when the
    model's ``btpo.json`` no longer holds this result under ``eval`` (``btpo train`` rewrites it on resume
    or ``--overwrite``); otherwise current, of unknown provenance. Either way, a model folder that is gone
    makes the eval stale only when the run was (re)started after the eval (``env.json``'s ``starts``):
    a model deleted to save space leaves its results standing."""
    p = Path(eval_path)
    root = p.parent.parent if p.parent.name == "eval" else p.parent.parent.parent
    which = summary.get("which") if summary.get("which") in ("final", "best") else "final"
    prov = summary.get("provenance")
    if not isinstance(prov, dict):
        return _legacy(summary, root, which, p)
    model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
    if not summary.get("as_is"):
        now = weights_digest(root / which)
        if now is None:
            return _gone(root, which, prov.get("evaluated_at"), p)
        if model.get("weights_sha256") and now.get("sha256") != model["weights_sha256"]:
            return MODEL_CHANGED, (f"{which}/ step {model.get('step')} → {now.get('step')}, weights "
                                   f"{model['weights_sha256'][:12]}… → {now['sha256'][:12]}…")
    elif model.get("weights_sha256") and (Path(str(model.get("dir"))) / WEIGHTS_FILE).exists():
        now = weights_digest(str(model["dir"]), store=False)
        if now is not None and now.get("sha256") != model["weights_sha256"]:
            return MODEL_CHANGED, f"{model['dir']}: weights {model['weights_sha256'][:12]}… → {now['sha256'][:12]}…"
    data = prov.get("data") if isinstance(prov.get("data"), dict) else {}
    if data.get("file") and data.get("sha256") and Path(data["file"]).exists():
        now_d = data_digest(data["file"], None)
        if now_d.get("sha256") != data["sha256"]:
            return DATA_CHANGED, f"{data['file']}: sha256 {data['sha256'][:12]}… → {str(now_d['sha256'])[:12]}…"
    elif data.get("hub_id") and data.get("revision"):
        rev = hub_revision(str(data["hub_id"]))
        if rev and rev != data["revision"]:
            return DATA_CHANGED, f"{data['hub_id']}: revision {data['revision'][:12]}… → {rev[:12]}…"
    return None, ""


UNKNOWN = "unknown provenance (written before btpo recorded it)"


def _legacy(summary: dict[str, Any], root: Path, which: str, eval_path: Path) -> tuple[str | None, str]:
    if summary.get("as_is"):
        return None, UNKNOWN
    try:
        meta = json.loads((root / which / "btpo.json").read_text(encoding="utf-8"))
    except OSError:
        return _gone(root, which, None, eval_path)
    except ValueError:
        return None, UNKNOWN
    evals = meta.get("eval") if isinstance(meta, dict) else None
    if not isinstance(evals, dict):
        return None, UNKNOWN
    entry = evals.get(f"{summary.get('dataset')}/{summary.get('split')}")
    if isinstance(entry, dict) and all(entry.get(k) == summary.get(k) for k in ("n", "accuracy", "raw_accuracy")):
        return None, UNKNOWN + "; still the result its model's btpo.json records"
    return MODEL_CHANGED, (f"{which}/btpo.json no longer holds this result (the model was retrained, resumed or "
                           "replaced after this eval)")


def _parse(t: Any) -> float | None:
    try:
        return datetime.strptime(str(t), TIME_FORMAT).timestamp()
    except ValueError:
        return None


def _gone(root: Path, which: str, evaluated_at: Any, eval_path: Path) -> tuple[str | None, str]:
    """The model an eval measured is no longer there: stale when the run was (re)started after the eval."""
    when = _parse(evaluated_at) if evaluated_at else None
    if when is None:
        try:
            when = eval_path.stat().st_mtime
        except OSError:
            return None, f"{which}/ is gone"
    try:
        starts = json.loads((root / "env.json").read_text(encoding="utf-8")).get("starts") or []
    except (OSError, ValueError, AttributeError):
        starts = []
    later = [t for t in (_parse(s.get("time")) for s in starts if isinstance(s, dict)) if t is not None and t > when]
    if later:
        return MODEL_CHANGED, f"{which}/ is gone: the run was started again after this eval"
    return None, f"{which}/ is gone (deleted?); the result stands as recorded"
