"""The HH builder: ``Anthropic/hh-rlhf`` transcripts → canonical preference pairs.

Upstream, each subset (``harmless-base``, ``helpful-base``, ``helpful-online``,
``helpful-rejection-sampled``) holds ``train.jsonl.gz`` and ``test.jsonl.gz``; every line is
``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``: two whole transcripts
that share every turn but the last. A pair becomes

* ``prompt``: the turns before the final ``"\\n\\nAssistant:"`` as chat messages (the two
  transcripts must agree on them; the last is a user turn),
* ``chosen`` / ``rejected``: the two final assistant turns.

Transcript parsing (:func:`parse_transcript`): turns start at the exact markers
``"\\n\\nHuman:"`` and ``"\\n\\nAssistant:"`` (``"Human:"`` without the blank line before it is
ordinary text); leading whitespace before the first marker is ignored and the blank line may be
missing there; each turn's text is stripped; empty turns inside the prompt are kept (as empty
messages); consecutive turns of the same speaker are merged with a blank line, which restores
the text as if the stray marker were absent (chat templates need alternating roles).

A pair is dropped, counted under one of :data:`SKIP_REASONS`, when a transcript does not start
with a Human turn or does not end with an Assistant turn, when the two prompts differ, when a
response is empty, or when the responses are identical. The kept pairs of each split are pooled
over subsets and down-sampled with ``random.Random`` seeded by ``(seed, split)``; the output is
in that sample's order, so the same inputs and seed give byte-identical files.

A local copy (``--source hh=PATH``) may be the Hub layout, one subset's folder, or a single
upstream file such as ``harmless-base/test.jsonl.gz`` (:func:`plan_inputs`); split files that are
missing (a folder of test files only) are listed in the manifest's ``missing`` and that split
gets none of their pairs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from btpo_cli.data.pairs import (
    PairRecord,
    RecordSkip,
    SkipLog,
    normalize_record,
    seeded_sample,
    write_dataset,
)
from btpo_cli.errors import BtpoError
from data_builders.sources import SourceSpec, available_splits, load_rows, resolve_sources

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
"""The preference subsets of Anthropic/hh-rlhf (``red-team-attempts`` holds no pairs)."""
HH_ASPECT = "helpful and harmless"
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_MARKER_RE = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}

Progress = Callable[[str, int], None]
"""``progress(label, rows_read_so_far)``: called every 1,000 rows and once at the end of a file."""

# Skip reasons, as they appear as keys of the manifest's ``skipped.by_reason``.
R_NOT_STRING = "missing or not a string"
R_NO_HUMAN_START = "does not start with a 'Human:' turn"
R_NO_FINAL_ASSISTANT = "does not end with an 'Assistant:' turn"
R_EMPTY_RESPONSE = "empty response"
R_PROMPTS_DIFFER = "chosen and rejected differ before the final Assistant turn"
R_IDENTICAL = "identical to chosen"
R_NO_USER_TURN = "no non-empty user turn"
SKIP_REASONS = (
    f"chosen: {R_NOT_STRING}", f"rejected: {R_NOT_STRING}",
    f"chosen: {R_NO_HUMAN_START}", f"rejected: {R_NO_HUMAN_START}",
    f"chosen: {R_NO_FINAL_ASSISTANT}", f"rejected: {R_NO_FINAL_ASSISTANT}",
    f"chosen: {R_EMPTY_RESPONSE}", f"rejected: {R_EMPTY_RESPONSE}",
    f"prompt: {R_PROMPTS_DIFFER}", f"prompt: {R_NO_USER_TURN}", f"rejected: {R_IDENTICAL}",
    "invalid JSON (<decoder message>)", "expected a JSON object, got <type>",
)
"""Every key :func:`build_hh` can count skips under."""


class TranscriptError(ValueError):
    """A transcript that is not in the HH format; ``reason`` is one of the ``R_*`` strings."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def parse_transcript(text: str) -> list[dict[str, str]]:
    """Split an HH transcript into ``[{"role": "user"|"assistant", "content": str}, ...]``.

    The transcript must start with a Human turn (:class:`TranscriptError` otherwise). Turn texts
    are stripped; consecutive turns of one speaker are merged with ``"\\n\\n"``.
    """
    body = "\n\n" + text.lstrip()
    if not body.startswith(HUMAN):
        raise TranscriptError(R_NO_HUMAN_START)
    parts = _MARKER_RE.split(body)  # ["", "Human", " text", "Assistant", " text", ...]
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role, content = _ROLE[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            prev = messages[-1]["content"]
            messages[-1]["content"] = f"{prev}\n\n{content}" if prev and content else prev or content
        else:
            messages.append({"role": role, "content": content})
    return messages


def split_pair(chosen: Any, rejected: Any) -> tuple[list[dict[str, str]], str, str]:
    """Turn two HH transcripts into ``(prompt_messages, chosen_text, rejected_text)``.

    Raises :class:`~btpo_cli.data.pairs.RecordSkip` naming the field (``chosen``, ``rejected`` or
    ``prompt``) and one of the ``R_*`` reasons.
    """
    parsed = {}
    for field_name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str):
            raise RecordSkip(field_name, R_NOT_STRING)
        try:
            msgs = parse_transcript(text)
        except TranscriptError as e:
            raise RecordSkip(field_name, e.reason) from None
        if msgs[-1]["role"] != "assistant":
            raise RecordSkip(field_name, R_NO_FINAL_ASSISTANT)
        if not msgs[-1]["content"]:
            raise RecordSkip(field_name, R_EMPTY_RESPONSE)
        parsed[field_name] = msgs
    prompt = parsed["chosen"][:-1]
    if prompt != parsed["rejected"][:-1]:
        raise RecordSkip("prompt", R_PROMPTS_DIFFER)
    if not any(m["content"] for m in prompt if m["role"] == "user"):
        raise RecordSkip("prompt", R_NO_USER_TURN)
    chosen_text, rejected_text = parsed["chosen"][-1]["content"], parsed["rejected"][-1]["content"]
    if chosen_text == rejected_text:
        raise RecordSkip("rejected", R_IDENTICAL)
    return prompt, chosen_text, rejected_text


def hh_record(raw: Mapping[str, Any], rid: str, source: str, aspect: str = HH_ASPECT,
              chosen_key: str = "chosen", rejected_key: str = "rejected") -> PairRecord:
    """One HH row → a validated :class:`PairRecord` (or :class:`RecordSkip`)."""
    prompt, chosen, rejected = split_pair(raw.get(chosen_key), raw.get(rejected_key))
    return normalize_record({"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                             "aspect": aspect, "source": source}, 0)


def read_hh_split(sub: SourceSpec, subset: str, split: str, skips: SkipLog, *, limit: int | None = None,
                  progress: Progress | None = None) -> tuple[list[PairRecord], int]:
    """Read one subset's split from ``sub`` (that subset's input, see :func:`plan_inputs`); return the
    valid pairs (file order) and the number of rows read.

    Ids are ``hh-<subset>-<split>-<row>``, ``row`` being the 0-based row of the upstream file.
    """
    out: list[PairRecord] = []
    n = 0
    label = f"hh-rlhf/{subset}/{split}"
    for file, num, raw in load_rows(sub, split, skips=skips, limit=limit):
        n += 1
        try:
            out.append(hh_record(raw, f"hh-{subset}-{split}-{num - 1}", f"hh-rlhf/{subset}"))
        except RecordSkip as s:
            skips.skip(file, num, s.field, s.reason)
        if progress is not None and n % 1000 == 0:
            progress(label, n)
    if progress is not None:
        progress(label, n)
    return out, n


def _file_split(path: Path) -> str | None:
    stem = path.name.split(".")[0]
    return stem if stem in ("train", "test") else None


def plan_inputs(spec: SourceSpec, subsets: Sequence[str]) -> dict[tuple[str, str], SourceSpec | None]:
    """``{(subset, split): input or None when that file is missing}`` for a Hub source or a local copy.

    A local copy may be the Hub layout (``<subset>/<split>.jsonl.gz``), one subset's folder (its
    split files directly inside; the subset is the folder's name), or a single upstream file (the
    subset is its folder's name, the split its file name). Missing split files are allowed (a
    folder of test files only); a missing subset folder is an error (``--subsets`` chooses).
    """
    if spec.path is None:
        return {(sub, split): spec.with_data_dir(sub) for sub in subsets for split in ("train", "test")}
    if spec.path.is_file():
        split = _file_split(spec.path)
        if split is None:
            raise BtpoError(f"--source hh={spec.path}: cannot tell the split from the file name (expected "
                            "train.jsonl[.gz] or test.jsonl[.gz], as upstream)")
        sub = spec.path.parent.name if spec.path.parent.name in HH_SUBSETS else "file"
        return {(sub, s): (spec if s == split else None) for s in ("train", "test")}
    if not any((spec.path / sub).is_dir() for sub in HH_SUBSETS) and available_splits(spec):
        sub = spec.path.name if spec.path.name in HH_SUBSETS else "folder"
        have = available_splits(spec)
        return {(sub, s): (spec if s in have else None) for s in ("train", "test")}
    plan: dict[tuple[str, str], SourceSpec | None] = {}
    for sub in subsets:
        one = spec.with_data_dir(sub)
        have = available_splits(one)
        for s in ("train", "test"):
            plan[(sub, s)] = one if s in have else None
    if not any(plan.values()):
        raise BtpoError(f"--source hh={spec.path}: no train or test file for {', '.join(subsets)} "
                        f"(expected {spec.layout})")
    return plan


def sample_pairs(pool: Sequence[PairRecord], n: int, seed: int, split: str) -> list[PairRecord]:
    """A seeded sample of ``n`` pairs (all, shuffled, when ``n`` is 0 or more than the pool)."""
    return seeded_sample(pool, n, f"hh:{seed}:{split}")


def build_hh(out: Path | None, sources: Mapping[str, str] | None = None, subsets: Sequence[str] = HH_SUBSETS,
             n_train: int = 20000, n_test: int = 1000, seed: int = 0, limit: int | None = None,
             strict: bool = False, dry_run: bool = False, progress: Progress | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """Build the HH preference set (METHOD.md §8) and return its manifest.

    Args:
        out: the dataset folder to write (``train.jsonl``, ``test.jsonl``, ``manifest.json``).
        sources: ``--source`` overrides, ``{"hh": PATH_OR_HUB_ID}``; by default the Hub.
        subsets: which subsets to pool (default: the four preference subsets).
        n_train, n_test: how many pairs to sample per split (0: keep all).
        seed: the sampling seed.
        limit: read at most this many rows per input file (for quick runs).
        strict: the first unusable row is an error naming file, line and field.
        dry_run: build in memory, write nothing; the manifest gets ``dry_run: true`` and
            ``examples`` (the first three train records).
        progress: called as ``progress(label, rows_read)`` while reading.
    """
    if n_train < 0 or n_test < 0:
        raise BtpoError("--n-train and --n-test must be >= 0 (0 keeps every pair)")
    unknown = [s for s in subsets if s not in HH_SUBSETS]
    if unknown or not subsets:
        raise BtpoError(f"unknown HH subset(s) {', '.join(unknown) or '(none given)'} "
                        f"(valid: {', '.join(HH_SUBSETS)})")
    ordered = [s for s in HH_SUBSETS if s in subsets]  # canonical order: the result ignores flag order
    spec = resolve_sources("hh", sources)["hh"]
    plan = plan_inputs(spec, ordered)
    ordered = list(dict.fromkeys(sub for sub, _ in plan))
    skips = SkipLog(strict=strict)
    used: dict[str, str] = {}
    per_subset: dict[str, dict[str, dict[str, int]]] = {}
    splits: dict[str, list[PairRecord]] = {}
    for split, n_wanted in (("train", n_train), ("test", n_test)):
        pool: list[PairRecord] = []
        per_subset[split] = {}
        for subset in ordered:
            sub = plan[(subset, split)]
            if sub is None:
                continue
            used[f"{subset}/{split}"] = sub.describe(split)
            records, n_read = read_hh_split(sub, subset, split, skips, limit=limit, progress=progress)
            per_subset[split][subset] = {"read": n_read, "kept": len(records), "selected": 0}
            pool.extend(records)
        splits[split] = sample_pairs(pool, n_wanted, seed, split)
        for r in splits[split]:
            per_subset[split][r.source.split("/", 1)[1]]["selected"] += 1
    if not splits["train"] and not splits["test"]:
        reasons = f"skipped {skips.total}: {skips.summary(3)}" if skips.total else "no rows read"
        raise BtpoError(f"hh: no usable pairs ({reasons})")
    manifest: dict[str, Any] = {
        "builder": "hh", "name": "hh", "seed": seed, "aspect": HH_ASPECT,
        "subsets": ordered, "requested": {"train": n_train, "test": n_test}, "limit": limit,
        "sources": used, "missing": [f"{sub}/{split}" for (sub, split), v in plan.items() if v is None],
        "subset_counts": per_subset, "skipped": skips.as_dict(),
    }
    if dry_run:
        return {**manifest, "dry_run": True, "counts": {k: len(v) for k, v in splits.items()},
                "examples": [r.to_json() for r in splits["train"][:3]]}
    if out is None:
        raise BtpoError("build_hh: an output folder is required unless dry_run is set")
    return write_dataset(out, splits, manifest, overwrite)
