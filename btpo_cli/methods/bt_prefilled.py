"""BT-prefilled — the Bradley–Terry reward model reading a thought written offline (METHOD.md §6).

Objective. Before training, the frozen BASE model (``model.name``, as a causal LM) writes ONE
greedy thought per response in the GPM dialog (METHOD.md §2, turns 1–4: prompt, response, the
evaluation instruction, the thought; ``prefilled.max_thought_tokens``, stop at end-of-turn). Then
plain BT (``methods/bt.py``, the same loop) trains a scalar-head model on the chat-rendered
``templates.prefilled_messages(x, y, aspect, z)``:

    L = −log σ(r(x, y_w, z_w) − r(x, y_l, z_l)).

Thought cache. Thoughts are written to ``runs/NAME/prefilled_thoughts.<split>.jsonl`` (one line per
pair: ``id``, ``digest``, ``thought_chosen``, ``thought_rejected``, token counts) as they are made,
so a resumed run, or one killed while writing them, regenerates nothing it already has. A line is
reused only when its ``digest`` (writer model, ``max_thought_tokens``, ``data.max_length`` and the
pair's text) matches. With several processes each writes a shard; the main process appends.

Evaluation. The thought writer is never trained, so test thoughts come from the same BASE model
(its name and budget are stored in ``final/btpo.json`` as ``thought_writer`` and
``max_thought_tokens``), greedy, cached under ``runs/NAME/eval/<dataset>.prefilled_thoughts.jsonl``;
then the trained reward model scores ``(x, y, z)`` pointwise as BT does. The budget at evaluation is
the training one (``prefilled.max_thought_tokens``), not ``eval.max_new_tokens``, so the scored
inputs come from the training distribution.

Truncation. The writer's prompt is cut like BTPO's (``encode_gpm``, ``data.max_length`` tokens: only
the prompt turns lose tokens). The BT input loses prompt tokens from the left; the response, the
evaluation instruction and the thought are never cut. A pair whose thought could not be written
(response too long) or whose kept part exceeds ``data.max_length`` is dropped (training) or counted
as a format failure (evaluation).

Differences from the paper: the paper does not give the writer's decoding or budget; greedy and
the GPM's 1000-token budget are our choices, and so are BT's optimizer settings
(``recipes/bt-prefilled/``).

Run it::

    btpo train --method bt-prefilled --model tiny-qwen2 --data data/synthetic --out runs/btp --max-steps 20 \\
        --set prefilled.max_thought_tokens=16
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from btpo_cli.config import Config, ModelConfig
from btpo_cli.data import PairRecord
from btpo_cli.engines import SamplingParams, engine_for, resolve_engine_name
from btpo_cli.evaluation import PairResult
from btpo_cli.methods import MethodSpec, bt, register_method
from btpo_cli.models import load_causal_lm, load_tokenizer, resolve_model
from btpo_cli.runs import Run
from btpo_cli.templates import (
    Encoded,
    Messages,
    TooLong,
    common_prefix_len,
    encode_gpm,
    encode_split,
    end_of_turn_id,
    prefilled_messages,
    render,
)
from btpo_cli.trainer import chunks, load_split

# ----------------------------------------------------------------------------- the thought writer

@dataclass
class WriterSpec:
    """Who writes the thoughts and how; part of every cache line's digest."""

    model: ModelConfig
    max_thought_tokens: int
    max_prefix: int
    """``data.max_length``: the budget of the writer's prompt (``encode_gpm``)."""
    batch_size: int
    run_cfg: Any = None
    """The run's config: which rollout engine writes (``rollout.engine``). Not part of the digest."""

    def digest(self, r: PairRecord) -> str:
        key = [self.model.name, self.max_thought_tokens, self.max_prefix, r.prompt, r.chosen_text,
               r.rejected_text, r.aspect]
        return hashlib.sha1(json.dumps(key, ensure_ascii=False).encode()).hexdigest()[:16]


class ThoughtWriter:
    """The frozen base model writing one greedy thought per response (GPM dialog turns 1–4)."""

    def __init__(self, spec: WriterSpec, device: Any):
        from btpo_cli.config import Config

        self.spec = spec
        cfg = spec.run_cfg or Config()
        self.tok = load_tokenizer(spec.model.name, padding_side="left")
        model = None
        if resolve_engine_name(cfg.rollout.engine) == "hf":
            model = load_causal_lm(spec.model, device.type, inference=True).to(device).eval()
        self.engine = engine_for(cfg, resolve_model(spec.model.name), self.tok.pad_token_id, device, module=model,
                                 prompts_per_batch=spec.batch_size, max_new_tokens=spec.max_thought_tokens)
        self.eot_id = end_of_turn_id(self.tok)

    def close(self) -> None:
        self.engine.close()

    def write(self, records: list[PairRecord]) -> list[dict[str, Any]]:
        """One cache row per record: both thoughts (None when the response is too long to judge)."""
        prompts: list[list[int] | None] = []
        for r in records:
            for text in (r.chosen_text, r.rejected_text):
                try:
                    prompts.append(encode_gpm(self.tok, r.prompt, text, r.aspect, self.spec.max_prefix).prefix)
                except TooLong:
                    prompts.append(None)
        todo = [p for p in prompts if p is not None]
        params = SamplingParams(0.0, 1.0, self.spec.max_thought_tokens, [self.eot_id])
        samples = iter(self.engine.generate(todo, 1, params) if todo else [])
        texts: list[str | None] = []
        lens: list[int] = []
        for p in prompts:
            if p is None:
                texts.append(None)
                lens.append(0)
                continue
            s = next(samples)[0]
            texts.append(self.tok.decode(s.token_ids, skip_special_tokens=True).strip())
            lens.append(len(s.token_ids) if s.finished else -len(s.token_ids))   # negative: cut at the budget
        return [{"id": r.id, "digest": self.spec.digest(r), "thought_chosen": texts[2 * i],
                 "thought_rejected": texts[2 * i + 1], "tokens": [lens[2 * i], lens[2 * i + 1]]}
                for i, r in enumerate(records)]


def read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """id → row; a line cut by a kill is skipped; a later line for an id wins."""
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row:
            out[row["id"]] = row
    return out


def ensure_thoughts(records: list[PairRecord], path: Path | None, spec: WriterSpec, device: Any,
                    rank: int = 0, world: int = 1, is_main: bool = True,
                    make_writer: Callable[[WriterSpec, Any], Any] = ThoughtWriter) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Thoughts for every record: reuse the cache at ``path``, write the missing ones and append them.

    Every process calls this with the same records; process ``rank`` writes every ``world``-th
    missing pair of each chunk and the rows are gathered, so all processes return the full map.
    The writer model is loaded only when something is missing, and freed afterwards.
    """
    cache = read_cache(path) if path else {}
    have = {r.id: cache[r.id] for r in records if r.id in cache and cache[r.id].get("digest") == spec.digest(r)}
    missing = [r for r in records if r.id not in have]
    if missing:
        writer = make_writer(spec, device)
        f = open(path, "a", encoding="utf-8") if path and is_main else None  # noqa: SIM115
        try:
            for part in chunks(missing, spec.batch_size * world):
                rows = writer.write(part[rank::world])
                if world > 1:
                    from accelerate.utils import gather_object

                    rows = gather_object(rows)
                for row in rows:
                    have[row["id"]] = row
                if f:
                    f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
                    f.flush()
        finally:
            if f:
                f.close()
        if hasattr(writer, "close"):
            writer.close()
        del writer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return have, {"cached": len(records) - len(missing), "generated": len(missing)}


def thought_stats(rows: list[dict[str, Any]], max_thought_tokens: int) -> dict[str, float]:
    """``prefilled/*`` metrics: mean thought length, share cut at the budget, share not written."""
    lens = [n for row in rows for n in row.get("tokens", []) if n != 0]
    missing = sum(t is None for row in rows for t in (row["thought_chosen"], row["thought_rejected"]))
    total = max(1, 2 * len(rows))
    return {"prefilled/thought_len": sum(abs(n) for n in lens) / max(1, len(lens)),
            "prefilled/thought_cut_fraction": sum(n < 0 for n in lens) / total,
            "prefilled/thought_missing_fraction": missing / total}


# ----------------------------------------------------------------------------- the BT input

def encode_dialog(tokenizer: Any, prompt: Messages, messages: Messages, max_length: int) -> Encoded:
    """Chat-render ``messages`` (which start with ``prompt``); only the prompt turns are cut, from the left.

    ``templates.encode_response`` generalized to several turns after the prompt.
    """
    head = render(tokenizer, prompt, add_generation_prompt=True)
    full = render(tokenizer, messages)
    if not full.startswith(head):
        head = head[:common_prefix_len(list(head), list(full))]
    return encode_split(tokenizer, head, full, max_length)


def encode_prefilled(tokenizer: Any, records: list[PairRecord], thoughts: dict[str, dict[str, Any]],
                     max_length: int) -> tuple[list[bt.EncodedPair], dict[str, int]]:
    """BT pairs over ``prefilled_messages(x, y, aspect, z)``; the ``bt.Encoder`` of this method."""
    out, stats = [], {"truncated": 0, "too_long": 0}
    for k, r in enumerate(records):
        row = thoughts.get(r.id)
        if row is None or row["thought_chosen"] is None or row["thought_rejected"] is None:
            stats["too_long"] += 1
            continue
        try:
            sides = []
            for text, thought in ((r.chosen_text, row["thought_chosen"]), (r.rejected_text, row["thought_rejected"])):
                enc = encode_dialog(tokenizer, r.prompt, prefilled_messages(r.prompt, text, r.aspect, thought),
                                    max_length)
                stats["truncated"] += int(enc.truncated)
                sides.append(enc.input_ids)
        except TooLong:
            stats["too_long"] += 1
            continue
        out.append(bt.EncodedPair(k, *sides))
    return out, stats


# ----------------------------------------------------------------------------- train and evaluate

def _spec(cfg: Config, writer: str | None = None, max_thought_tokens: int | None = None) -> WriterSpec:
    return WriterSpec(dataclasses.replace(cfg.model, name=writer or cfg.model.name),
                      max_thought_tokens or cfg.prefilled.max_thought_tokens, cfg.data.max_length,
                      cfg.prefilled.batch_size, run_cfg=cfg)


def train(cfg: Config, run: Run, resume: bool) -> None:
    from accelerate import PartialState

    from btpo_cli.console import console

    state = PartialState()
    spec = _spec(cfg)
    split = cfg.data.train_split
    records = load_split(cfg, split, state)
    t0 = time.perf_counter()
    thoughts, counts = ensure_thoughts(records, run.root / f"prefilled_thoughts.{split}.jsonl", spec, state.device,
                                       state.process_index, state.num_processes, state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        console.print(f"[btpo] prefilled thoughts ({split}): {counts['cached']} cached, "
                      f"{counts['generated']} generated", highlight=False, markup=False)
    if not resume:
        run.log({"step": 0, **thought_stats(list(thoughts.values()), spec.max_thought_tokens),
                 "prefilled/generated": counts["generated"], "prefilled/cached": counts["cached"],
                 "perf/thoughts_s": round(time.perf_counter() - t0, 4)})
    bt.train(cfg, run, resume,
             encode=lambda tok, recs: encode_prefilled(tok, recs, thoughts, cfg.data.max_length),
             meta={"thought_writer": spec.model.name, "max_thought_tokens": spec.max_thought_tokens})


def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any,
             progress: Any = None, artifacts: Path | None = None) -> list[PairResult]:
    """Greedy thoughts from the base model (cached beside the eval JSON), then BT scores (pointwise)."""
    from btpo_cli.console import console

    meta_path = Path(model_dir) / "btpo.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    spec = _spec(cfg, meta.get("thought_writer"), meta.get("max_thought_tokens"))
    path = artifacts.parent / f"{artifacts.name}.prefilled_thoughts.jsonl" if artifacts else None
    thoughts, counts = ensure_thoughts(records, path, spec, device)
    console.print(f"[btpo] prefilled thoughts (eval): {counts['cached']} cached, {counts['generated']} generated",
                  highlight=False, markup=False)
    return bt.evaluate(cfg, model_dir, records, device, progress, artifacts,
                       encode=lambda tok, recs: encode_prefilled(tok, recs, thoughts, cfg.data.max_length))


METHOD = register_method(MethodSpec(
    name="bt-prefilled", help="BT on the base model's greedy thought, written offline and appended to the dialog.",
    train=train, evaluate=evaluate, protocol="pointwise", model_class="AutoModelForSequenceClassification",
    config_section="prefilled", generative=True, order=10))
