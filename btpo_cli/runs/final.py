"""Self-describing checkpoints: what ``final/btpo.json`` holds, how it is read back, the model card.

A ``final/`` folder written by ``btpo train`` carries everything a judge needs without the run
folder (``docs/judge.md`` lists every key)::

    format        "btpo-checkpoint/1"
    method, protocol, model_class, base_model
    aspect        the aspect most training pairs were judged for (the default when scoring)
    aspects       {aspect: training pairs}
    template      {"version", "strings": the instruction strings, "rendered": the method's prompt
                   through the chat template with {prompt}/{response}/{thought} placeholders}
    token_ids     what the method reads or stops on: yes / no / end_of_turn / A / B / pad
    settings      the judge's settings in the config's own shape: model.*, data.max_length,
                  eval.* (batch size, thought budget: null = the training one, samples),
                  rollout.temperature / top_p / engine / max_new_tokens (the training budget),
                  train.seed, and the method's own section (btpo.*, prefilled.*, …)
    training      data, pairs, steps, batch, lr, seed, ``data_sha256`` (the digest of every split file the
                  run read, as in ``env.json``); rollout budget and K for generative methods;
                  ``early_stop`` when ``train.early_stop_patience`` ended the run
    eval          {"<dataset>/<split>": accuracy, raw accuracy, ties, format errors, n}: filled by ``btpo eval``
    selected      ``best/`` only: the step and eval result it was kept for (``train.eval_every``)

plus method extras (``thought_writer`` and ``max_thought_tokens`` for bt-prefilled,
``label_token_ids`` for gram). ``final/README.md`` is the model card rendered from it.

Older ``final/`` folders hold only ``method`` / ``base_model`` / ``model_class``:
:func:`read_checkpoint` then takes the settings from the run's ``config.yaml`` beside ``final/``
(and the aspects from its training data), or the defaults with a warning when there is none.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from btpo_cli import __version__
from btpo_cli.config import Config, config_from_dict
from btpo_cli.data.files import atomic_json, atomic_write
from btpo_cli.data.pairs import DEFAULT_ASPECT, read_pairs
from btpo_cli.errors import BtpoError
from btpo_cli.fsio import model_folder
from btpo_cli.judging.templates import TEMPLATE_VERSION
from btpo_cli.methods.spec import Card, get_method, method_specs
from btpo_cli.runs.folder import Run

META_FORMAT = "btpo-checkpoint/1"
META_FILE = "btpo.json"
CARD_FILE = "README.md"


def judge_settings(cfg: Config) -> dict[str, Any]:
    """The part of a run's config a judge reads, in the config's own shape (``config_from_dict`` takes it)."""
    out: dict[str, Any] = {
        "method": cfg.method,
        "model": asdict(cfg.model),
        "data": {"max_length": cfg.data.max_length},
        "eval": {"batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens,
                 "samples": cfg.eval.samples},
        "rollout": {"engine": cfg.rollout.engine, "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                    "prompts_per_batch": cfg.rollout.prompts_per_batch,
                    "max_new_tokens": cfg.rollout.max_new_tokens},    # eval.max_new_tokens null: this budget
        "train": {"seed": cfg.train.seed},
    }
    section = get_method(cfg.method).config_section
    if section and section not in ("rollout",):
        out[section] = asdict(getattr(cfg, section))
    return out


def describe(cfg: Config, records: Sequence[Any], *, templates: dict[str, Any], token_ids: dict[str, int],
             **extra: Any) -> dict[str, Any]:
    """The ``btpo.json`` of a training run that ends now (``records``: its training pairs)."""
    spec = get_method(cfg.method)
    aspects = Counter(getattr(r, "aspect", DEFAULT_ASPECT) for r in records)
    training: dict[str, Any] = {
        "run": cfg.name or Path(cfg.out).name, "data": cfg.data.path, "train_split": cfg.data.train_split,
        "train_pairs": len(records), "max_steps": cfg.train.max_steps, "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size, "lr": cfg.optim.lr, "scheduler": cfg.optim.scheduler,
        "seed": cfg.train.seed, "tag": cfg.tag, "data_sha256": _data_record(cfg)}
    if spec.rollouts:
        training["rollout"] = {"n": cfg.rollout.n, "max_new_tokens": cfg.rollout.max_new_tokens,
                               "temperature": cfg.rollout.temperature, "batch_size": cfg.rollout.batch_size}
    return {
        "format": META_FORMAT, "btpo_version": __version__,
        "method": cfg.method, "protocol": spec.protocol, "model_class": spec.model_class,
        "base_model": cfg.model.name,
        "aspect": aspects.most_common(1)[0][0] if aspects else DEFAULT_ASPECT,
        "aspects": dict(aspects.most_common()),
        "template": {"version": TEMPLATE_VERSION, **templates},
        "token_ids": token_ids,
        "settings": judge_settings(cfg),
        "training": training,
        "eval": {},
        **extra,
    }


def _data_record(cfg: Config) -> dict[str, Any]:
    """The digests of the run's data at its last start (``env.json``'s ``data``; {} when not recorded)."""
    try:
        env = json.loads((Path(cfg.out) / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return env.get("data") if isinstance(env, dict) and isinstance(env.get("data"), dict) else {}


# ----------------------------------------------------------------------------- reading

@dataclass
class Checkpoint:
    """A ``final/`` folder read back: where the weights are, its ``btpo.json`` and the judge's config."""

    model_dir: Path
    meta: dict[str, Any]
    cfg: Config
    source: str
    """Where the settings came from: ``btpo.json``, ``config.yaml`` (older checkpoints) or ``defaults``."""


def model_dir_of(path: str | Path, which: str = "final") -> Path:
    """The model a path names: a run folder's ``final/`` (or ``best/`` with ``which="best"``, kept by
    ``train.eval_every``), or a ``final/`` folder itself."""
    p = Path(path)
    if which not in ("final", "best"):
        raise BtpoError(f"--which {which}: expected final or best")
    found = model_folder(p, which)
    if found is not None:
        return found
    if which == "best":
        raise BtpoError(f"{p}: no best/ model (it is kept when training with train.eval_every > 0)")
    if (p / "config.yaml").exists():
        raise BtpoError(f"{p}: no final/ model yet (did training finish? `btpo train --out {p} --resume` completes it)")
    raise BtpoError(f"{p}: not a btpo run folder or final/ folder (no btpo.json, config.json or final/)")


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """``btpo.json`` of a ``final/`` folder ({} when it has none)."""
    p = Path(model_dir) / META_FILE
    if not p.exists():
        return {}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BtpoError(f"{p}: invalid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(meta, dict):
        raise BtpoError(f"{p}: expected a JSON object")
    return meta


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Find ``final/``, read its ``btpo.json`` and build the judge's :class:`Config` (see the module docstring)."""
    model_dir = model_dir_of(path)
    meta = read_meta(model_dir)
    if "settings" in meta:
        cfg = config_from_dict(meta["settings"], str(model_dir / META_FILE))
        return Checkpoint(model_dir, meta, cfg, META_FILE)
    run_cfg = model_dir.parent / "config.yaml"
    if run_cfg.exists():
        cfg = Run(model_dir.parent).load_config()
        source = "config.yaml"
    else:
        if not meta.get("method"):
            raise BtpoError(f"{model_dir}: no btpo.json naming the method, and no config.yaml beside it")
        warnings.warn(f"{model_dir}: btpo.json predates self-describing checkpoints and there is no config.yaml "
                      "beside it; using the default settings (max_length, thought budget, aspect)", stacklevel=2)
        cfg = config_from_dict({"method": meta["method"], "model": {"name": meta.get("base_model", "tiny-qwen2")}})
        source = "defaults"
    meta = dict(meta)
    meta.setdefault("method", cfg.method)
    meta.setdefault("base_model", cfg.model.name)
    if "aspect" not in meta:
        aspects = _training_aspects(cfg) if source == "config.yaml" else Counter()
        meta["aspects"] = dict(aspects.most_common())
        meta["aspect"] = aspects.most_common(1)[0][0] if aspects else DEFAULT_ASPECT
    return Checkpoint(model_dir, meta, cfg, source)


def _training_aspects(cfg: Config) -> Counter:
    """Aspects of an old run's training pairs, when its data is still where it was (else empty)."""
    try:
        records, _ = read_pairs(cfg.data.path, cfg.data.train_split)
    except Exception:  # noqa: BLE001 - the data may be gone; the aspect then falls back to the default
        return Counter()
    return Counter(r.aspect for r in records)


def check_templates(meta: dict[str, Any], where: str) -> None:
    """Warn when the checkpoint was trained with other prompt wording than this btpo renders."""
    version = (meta.get("template") or {}).get("version")
    if version and version != TEMPLATE_VERSION:
        warnings.warn(f"{where}: trained with templates {version}, this btpo renders {TEMPLATE_VERSION}; "
                      "its scores may be off", stacklevel=2)


# ----------------------------------------------------------------------------- writing

def write_meta(model_dir: str | Path, meta: dict[str, Any]) -> None:
    """Write ``btpo.json`` and the model card atomically (used after training and by ``btpo eval``)."""
    d = Path(model_dir)
    atomic_json(d / META_FILE, meta)
    atomic_write(d / CARD_FILE, model_card(meta))


def record_eval(model_dir: str | Path, summary: dict[str, Any]) -> None:
    """Put an eval summary into ``btpo.json`` (``eval["<dataset>/<split>"]``) and re-render the card."""
    meta = read_meta(model_dir)
    if not meta:
        return
    keep = ("n", "accuracy", "raw_accuracy", "tie_rate", "format_error_rate", "protocol", "engine", "data_path")
    entry = {k: summary.get(k) for k in keep}
    if summary.get("engine"):                        # generative: the thought / rationale budget it ran with
        entry["max_new_tokens"] = (summary.get("eval_settings") or {}).get(
            "thought_budget", (summary.get("eval_config") or {}).get("max_new_tokens"))
    if "sampled" in summary:
        entry["sampled"] = {k: summary["sampled"].get(k) for k in ("samples", "accuracy", "raw_accuracy")}
    meta.setdefault("eval", {})[f"{summary['dataset']}/{summary['split']}"] = entry
    write_meta(model_dir, meta)




# ----------------------------------------------------------------------------- the model card

def model_card(meta: dict[str, Any]) -> str:
    """``final/README.md``: what the model is, how it was trained, its eval table and how to use it."""
    m = meta.get("method", "?")
    card = _method_card(meta)
    tr = meta.get("training") or {}
    run = tr.get("run") or "btpo judge"
    aspect = meta.get("aspect", DEFAULT_ASPECT)
    base = meta.get("base_model", "?")
    lines = ["---", "library_name: transformers", f"tags: [btpo, reward-model, {m}]"]
    if "/" in str(base) and not str(base).startswith((".", "/")):
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {run}: a `{m}` judge", "",
              f"This is {card.what.format(aspect=aspect)}", "",
              f"- protocol: **{meta.get('protocol', '?')}**; model class `{meta.get('model_class', '?')}`; "
              f"base model `{base}`",
              f"- aspect: **{aspect}**" + (f" (training aspects: {_fmt_aspects(meta['aspects'])})"
                                          if len(meta.get("aspects") or {}) > 1 else ""),
              f"- templates: `{(meta.get('template') or {}).get('version', '?')}`; written by btpo "
              f"{meta.get('btpo_version', '?')}"]
    sel = meta.get("selected")
    if isinstance(sel, dict):
        lines.append(f"- selected: the weights of step {sel.get('step')}, the best evaluation during training "
                     f"(accuracy {_pct(sel.get('accuracy'))}, raw {_pct(sel.get('raw_accuracy'))} on "
                     f"{sel.get('n')} pairs of {sel.get('split')})")
    lines += ["", "## Training", "", "| | |", "|---|---|"]
    rows = [("data", tr.get("data")), ("training pairs", tr.get("train_pairs")),
            ("steps", tr.get("max_steps") or f"{tr.get('epochs')} epoch(s)"), ("batch (pairs)", tr.get("batch_size")),
            ("learning rate", tr.get("lr")), ("seed", tr.get("seed"))]
    ro = tr.get("rollout")
    if ro:
        rows += [("samples per response (K / G)", ro.get("n")), ("training thought budget", ro.get("max_new_tokens")),
                 ("sampling temperature", ro.get("temperature"))]
    rows += card.rows
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    lines += ["", "## Evaluation", ""]
    ev = meta.get("eval") or {}
    if ev:
        lines += ["| dataset/split | n | accuracy | raw | ties | format errors |", "|---|---:|---:|---:|---:|---:|"]
        for name, e in ev.items():
            lines.append(f"| {name} | {e.get('n')} | {_pct(e.get('accuracy'))} | {_pct(e.get('raw_accuracy'))} | "
                         f"{_pct(e.get('tie_rate'))} | {_pct(e.get('format_error_rate'))} |")
        lines += ["", "Accuracy is METHOD §7's: pointwise methods compare the two scores, pairwise ones average "
                  "both orders; below 50% it is clipped to 50% (raw beside it)."]
    else:
        lines.append("Not evaluated yet: `btpo eval --checkpoint <run folder>` fills this table.")
    lines += ["", "## Use it with btpo", "", "```bash",
              "echo '{\"prompt\": \"What is 2 + 3?\", \"candidates\": [\"5\", \"6\"]}' | btpo score --judge . -",
              "btpo serve --judge .          # POST /v1/score, /v1/compare on 127.0.0.1:8000", "```", "",
              "```python", "from btpo_cli import load_judge", "", "judge = load_judge(\".\")"]
    if meta.get("protocol") == "pairwise":
        lines.append("judge.compare(\"What is 2 + 3?\", \"5\", \"6\")   # P(a better than b), both orders")
    else:
        lines.append("judge.score([\"What is 2 + 3?\"], [\"5\"])        # one Score per response")
    lines += ["judge.best_of_n(\"What is 2 + 3?\", [\"6\", \"5\", \"4\"])", "```", "",
              "## Use it with plain transformers", "", _plain_usage(card.usage), "",
              "Every setting the judge uses (thought budget, sampling, token ids, template strings) is in "
              "`btpo.json`.", ""]
    return "\n".join(lines)


def _fmt_aspects(aspects: dict[str, int]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in list(aspects.items())[:8])


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}" if isinstance(x, (int, float)) else "–"


def _method_card(meta: dict[str, Any]) -> Card:
    """The card of the method that trained ``meta``'s model (``MethodSpec.card``); a generic one otherwise."""
    m = meta.get("method")
    spec = next((sp for sp in method_specs() if sp.name == m), None)
    if spec is not None and spec.card is not None:
        return spec.card(meta)
    cls = meta.get("model_class") or "AutoModelForCausalLM"
    return Card("a judge trained with btpo.", usage=[f"model = {cls}.from_pretrained(\".\").eval()",
                                                    "# how it judges: its method's code; every setting is in btpo.json"])


def _plain_usage(body: list[str]) -> str:
    head = ["```python", "from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, "
            "AutoTokenizer", "", "tok = AutoTokenizer.from_pretrained(\".\")",
            "prompt = [{\"role\": \"user\", \"content\": \"What is 2 + 3?\"}]",
            "chat = lambda msgs, gen=False: tok(tok.apply_chat_template(msgs, tokenize=False, "
            "add_generation_prompt=gen), add_special_tokens=False, return_tensors=\"pt\")"]
    return "\n".join(head + body + ["```"])
