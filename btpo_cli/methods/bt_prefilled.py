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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btpo_cli.config import Config, ModelConfig, check_positive, register_section
from btpo_cli.console import console
from btpo_cli.data.pairs import DEFAULT_ASPECT, PairRecord, load_split
from btpo_cli.engines import SamplingParams, engine_for, resolve_engine_name
from btpo_cli.errors import BtpoError
from btpo_cli.judging.judge import Item, judge_for_eval
from btpo_cli.judging.protocol import PairResult
from btpo_cli.judging.templates import (
    EVAL_INSTRUCTION,
    PLACEHOLDER_PROMPT,
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
from btpo_cli.methods import Card, MethodSpec, bt, register_method
from btpo_cli.models.aliases import resolve_model
from btpo_cli.runs.final import read_meta
from btpo_cli.runs.folder import Run


@dataclass
class PrefilledConfig:
    """BT with a prefilled thought: the base model writes one greedy thought per response offline."""

    max_thought_tokens: int = 1000
    batch_size: int = 16
    """Responses per generation batch when writing the thoughts."""


register_section("prefilled", PrefilledConfig,
                 validate=lambda cfg: check_positive(cfg, ["prefilled.max_thought_tokens", "prefilled.batch_size"]))

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
        from btpo_cli.models.loading import load_causal_lm, load_tokenizer  # heavy: imported on use

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
        got = self.write_texts([(r.prompt, text, r.aspect) for r in records
                                for text in (r.chosen_text, r.rejected_text)])
        return [{"id": r.id, "digest": self.spec.digest(r), "thought_chosen": got[2 * i][0],
                 "thought_rejected": got[2 * i + 1][0], "tokens": [got[2 * i][1], got[2 * i + 1][1]]}
                for i, r in enumerate(records)]

    def write_texts(self, items: list[tuple[Messages, str, str]]) -> list[tuple[str | None, int]]:
        """A greedy thought per (prompt, response, aspect), in one batch: (text, tokens) where tokens is
        negative for a thought cut at the budget; (None, 0) when the response is too long to judge."""
        prompts: list[list[int] | None] = []
        for prompt, text, aspect in items:
            try:
                prompts.append(encode_gpm(self.tok, prompt, text, aspect, self.spec.max_prefix).prefix)
            except TooLong:
                prompts.append(None)
        todo = [p for p in prompts if p is not None]
        params = SamplingParams(0.0, 1.0, self.spec.max_thought_tokens, [self.eot_id])
        samples = iter(self.engine.generate(todo, 1, params) if todo else [])
        out: list[tuple[str | None, int]] = []
        for p in prompts:
            if p is None:
                out.append((None, 0))
                continue
            s = next(samples)[0]
            out.append((self.tok.decode(s.token_ids, skip_special_tokens=True).strip(),
                        len(s.token_ids) if s.finished else -len(s.token_ids)))   # negative: cut at the budget
        return out


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
    import torch  # heavy: imported on use

    from btpo_cli.training.steps import chunks  # heavy: imported on use

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
                    from accelerate.utils import gather_object  # heavy: imported on use

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
    from accelerate import PartialState  # heavy: imported on use

    state = PartialState()
    spec = _spec(cfg)
    split = cfg.data.train_split
    records = load_split(cfg, split, state, record_skips=run.record_skips)
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
    aspect = Counter(r.aspect for r in records).most_common(1)[0][0]
    bt.train(cfg, run, resume,
             encode=lambda tok, recs: encode_prefilled(tok, recs, thoughts, cfg.data.max_length),
             meta={"thought_writer": spec.model.name, "max_thought_tokens": spec.max_thought_tokens},
             templates_of=lambda tok: templates(tok, aspect))


class PrefilledJudge(bt.RewardJudge):
    """BT-prefilled's judge: the frozen base model (``thought_writer`` in ``btpo.json``) writes a greedy
    thought after each response (``max_thought_tokens``, the training budget), then the trained
    reward model scores ``prefilled_messages(x, y, aspect, thought)``; the thought is returned."""

    def __init__(self, model_dir: str, cfg: Config, device: Any, meta: dict[str, Any], module: Any = None):
        super().__init__(model_dir, cfg, device, meta, module)
        self.spec = _spec(cfg, meta.get("thought_writer"), meta.get("max_thought_tokens"))
        self.given_thoughts: dict[str, dict[str, Any]] | None = None
        """Evaluation: the test pairs' thoughts, read from or written to the cache beforehand (id → row)."""
        self._writer: ThoughtWriter | None = None
        self._given: dict[str, dict[str, Any]] = {}

    def writer(self) -> ThoughtWriter:
        """The base model's thought writer, loaded on first use and kept."""
        if self._writer is None:
            self._writer = ThoughtWriter(self.spec, self.device)
        return self._writer

    def encode(self, items: list[Item]) -> list[tuple[list[int] | None, str | None]]:
        todo = [i for i, it in enumerate(items) if "thought" not in it.extra]
        written = dict(zip(todo, self.writer().write_texts([(items[i].prompt, items[i].response, items[i].aspect)
                                                            for i in todo]), strict=True)) if todo else {}
        out: list[tuple[list[int] | None, str | None]] = []
        for i, it in enumerate(items):
            thought = written[i][0] if i in written else it.extra["thought"]
            if thought is None:
                out.append((None, None))
                continue
            try:
                enc = encode_dialog(self.tok, it.prompt, prefilled_messages(it.prompt, it.response, it.aspect, thought),
                                    self.cfg.data.max_length)
                out.append((enc.input_ids, thought))
            except TooLong:
                out.append((None, thought))
        return out

    def judge_pairs(self, records: Any, progress: Any = None, sink: Any = None) -> list[PairResult | None]:
        """Every pair's thoughts first (:attr:`given_thoughts`, or written now in chunks of
        ``prefilled.batch_size`` pairs, as training and evaluation write them), then BT scores."""
        thoughts = self.given_thoughts
        if thoughts is None:      # thoughts written earlier by this judge are kept (the writer is frozen)
            todo = [r for r in records if r.id not in self._given]
            written, _ = ensure_thoughts(todo, None, self.spec, self.device,
                                         make_writer=lambda spec, device: _Borrowed(self.writer())) if todo else ({}, {})
            thoughts = {**self._given, **written}
        self._given = thoughts
        return super().judge_pairs(records, progress, sink)

    def pair_items(self, rec: Any) -> tuple[Item, Item]:
        a, b = super().pair_items(rec)
        row = self._given.get(rec.id) or {"thought_chosen": None, "thought_rejected": None}
        a.extra["thought"], b.extra["thought"] = row["thought_chosen"], row["thought_rejected"]
        return a, b

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        super().close()


@dataclass
class _Borrowed:
    """The judge's writer lent to ``ensure_thoughts`` (which closes writers it is given; this one stays)."""

    inner: ThoughtWriter

    def write(self, records: list[PairRecord]) -> list[dict[str, Any]]:
        return self.inner.write(records)


def evaluate(cfg: Config, model_dir: str, records: list[PairRecord], device: Any,
             progress: Any = None, artifacts: Path | None = None) -> list[PairResult]:
    """Greedy thoughts from the base model (cached beside the eval JSON; the writer is freed before the
    reward model loads), then :class:`PrefilledJudge` scores (pointwise)."""
    meta = read_meta(model_dir)
    spec = _spec(cfg, meta.get("thought_writer"), meta.get("max_thought_tokens"))
    path = artifacts.parent / f"{artifacts.name}.prefilled_thoughts.jsonl" if artifacts else None
    thoughts, counts = ensure_thoughts(records, path, spec, device)
    console.print(f"[btpo] prefilled thoughts (eval): {counts['cached']} cached, {counts['generated']} generated",
                  highlight=False, markup=False)
    with judge_for_eval(PrefilledJudge, cfg, model_dir, device) as judge:
        judge.given_thoughts = thoughts
        return judge.evaluate_pairs(records, progress)


def templates(tok: Any, aspect: str) -> dict[str, Any]:
    """What ``btpo.json`` records of BT-prefilled's input: the instruction and the rendered dialog."""
    return {"strings": {"eval_instruction": EVAL_INSTRUCTION},
            "rendered": render(tok, prefilled_messages(PLACEHOLDER_PROMPT, "{response}", aspect, "{thought}"))}


def check_model(model: str, meta: dict[str, Any]) -> None:
    if not meta.get("thought_writer"):
        raise BtpoError(f"{model}: bt-prefilled needs the model that writes its thoughts (thought_writer in "
                        "btpo.json); only a bt-prefilled checkpoint has one")


def eval_settings(cfg: Config, meta: dict[str, Any] | None) -> dict[str, Any]:
    """The thought budget is the writer's training one (``btpo.json``), never ``eval.max_new_tokens`` nor
    ``--max-new-tokens``; unknown for older evals."""
    if meta is None:
        return {"thought_budget": None, "thought_budget_from": None}
    return {"thought_budget": int(meta.get("max_thought_tokens") or cfg.prefilled.max_thought_tokens),
            "thought_budget_from": "training"}


def card(meta: dict[str, Any]) -> Card:
    strings = (meta.get("template") or {}).get("strings") or {}
    ev = strings.get("eval_instruction", "").format(aspect=meta.get("aspect", DEFAULT_ASPECT))
    thought = [f"# the base model ({meta.get('thought_writer')}) first writes a greedy evaluation "
               f"(<= {meta.get('max_thought_tokens')} tokens) after:",
               f"msgs += [{{\"role\": \"user\", \"content\": {ev!r}}}, "
               "{\"role\": \"assistant\", \"content\": thought}]"]
    return Card("a Bradley–Terry reward model that reads the response followed by an evaluation written "
                "by the frozen base model (greedy, one per response); the scalar head outputs the reward.",
                rows=[("thought writer", meta.get("thought_writer")),
                      ("thought budget", meta.get("max_thought_tokens"))],
                usage=bt.reward_usage(meta, thought))


METHOD = register_method(MethodSpec(
    name="bt-prefilled", help="BT on the base model's greedy thought, written offline and appended to the dialog.",
    train=train, evaluate=evaluate, protocol="pointwise", model_class="AutoModelForSequenceClassification",
    config_section="prefilled", generative=True, order=10, judge=PrefilledJudge,
    plan_geometry=bt.plan_geometry, eval_settings=eval_settings, card=card, check_model=check_model))
