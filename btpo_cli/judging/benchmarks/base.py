"""The benchmark registry's core: items, outcomes, the reader, the judging loop (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from btpo_cli.data.files import looks_like_hub_id, probe
from btpo_cli.data.pairs import RecordSkip, SkipLog, iter_file, iter_hub, to_messages
from btpo_cli.errors import BtpoError, DataError, UsageError, did_you_mean
from btpo_cli.judging.judge import Item
from btpo_cli.judging.protocol import order_bias

Messages = list[dict[str, str]]


@dataclass
class BenchItem:
    """One benchmark example: candidates are ``chosen + rejected`` (chosen first)."""

    id: str
    prompt: Messages
    chosen: list[str]
    rejected: list[str]
    subset: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def candidates(self) -> list[str]:
        return self.chosen + self.rejected


@dataclass
class Outcome:
    """What the judge said about one item."""

    scores: list[float | None] | None = None
    """Pointwise judges, or a pairwise judge's ranking: one score per candidate (None: not judged)."""
    orders: dict[tuple[int, int], tuple[str | None, str | None]] = field(default_factory=dict)
    """Pairwise judges: (chosen i, rejected j) → the verdict letters with chosen shown as A, then as B."""
    errors: list[str] = field(default_factory=list)
    """Error kinds of the candidates or judgements that gave no answer (``too_long``, parser kinds)."""
    detail: dict[str, list[float]] = field(default_factory=dict)
    """Generative judges, one value per thought or rationale: ``thought_tokens``, ``thought_cut`` (1: cut at
    the budget), ``yes_no_mass`` (BTPO) — what :func:`~btpo_cli.judging.protocol.thought_stats` reads."""

    def judged(self) -> bool:
        """Whether the judge said anything about this item (a score or a verdict)."""
        return any(s is not None for s in self.scores or []) or \
            any(v is not None for vs in self.orders.values() for v in vs)

    def win(self, i: int, j: int, n_chosen: int) -> float | None:
        """Chosen ``i`` against rejected ``j``: 1 won, ½ tie (or the two orders disagree), 0 lost; None
        when neither score nor verdict exists. Pairwise: JudgeBench's rule — +1 for each order that picks
        the chosen response, −1 for each that picks the other; the sign decides."""
        if self.scores is not None:
            a, b = self.scores[i], self.scores[n_chosen + j]
            if a is None or b is None:
                return None if a is None and b is None else float(b is None)
            return 1.0 if a > b else 0.5 if a == b else 0.0
        v1, v2 = self.orders.get((i, j), (None, None))
        if v1 is None and v2 is None:
            return None
        counter = (v1 == "A") - (v1 == "B") + (v2 == "B") - (v2 == "A")
        return 1.0 if counter > 0 else 0.0 if counter < 0 else 0.5


@dataclass
class Benchmark:
    """A registered benchmark."""

    name: str
    title: str
    fields: tuple[str, ...]
    """Fields every record of the published schema has: a file whose first record lacks them is in another
    schema (a named error, not a pile of skips)."""
    parse: Callable[[dict[str, Any], int], BenchItem]
    """One raw record (and its number) → an item; raises :class:`RecordSkip`."""
    aggregate: Callable[[list[BenchItem], list[Outcome]], dict[str, Any]]
    """Items and outcomes → ``{"aggregate": float, "scores": {...}, "subsets": {...}}``."""
    mode: Literal["pairs", "ranking"] = "pairs"
    hub_id: str | None = None
    hub_split: str = "train"
    pairs: Callable[[BenchItem], list[tuple[int, int]]] | None = None
    """Pairwise judges: the (chosen i, rejected j) pairs the aggregate reads (default: all)."""
    how: str = ""
    """One line: what the aggregate is."""
    file_glob: str = "*.json*"


_REGISTRY: dict[str, Benchmark] = {}


def register_benchmark(b: Benchmark) -> Benchmark:
    _REGISTRY[b.name] = b
    return b


def get_benchmark(name: str) -> Benchmark:
    if name not in _REGISTRY:
        raise UsageError(f"unknown benchmark '{name}' (--benchmark: one of {', '.join(benchmark_names())})"
                         f"{did_you_mean(name, benchmark_names())}")
    return _REGISTRY[name]


def benchmark_names() -> list[str]:
    return sorted(_REGISTRY)


# ----------------------------------------------------------------------------- reading

def _iter_source(source: str, bench: Benchmark, skips: SkipLog) -> Iterator[tuple[str, int, Any]]:
    path = Path(source).expanduser()
    if probe(path) is None:
        if source.startswith(("hub:", "hf:")) or looks_like_hub_id(source):
            yield from iter_hub(source.split(":", 1)[-1] if source.startswith(("hub:", "hf:")) else source,
                                 bench.hub_split)
            return
        raise BtpoError(f"{source}: no such file or folder")
    files = sorted(p for p in path.rglob(bench.file_glob) if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise BtpoError(f"{path}: no {bench.file_glob} files in this folder")
    for f in files:
        for num, obj in iter_file(f, skips):
            yield str(f), num, obj


def read_benchmark(name: str, source: str | Path, limit: int | None = None,
                   strict: bool = False) -> tuple[list[BenchItem], SkipLog, int]:
    """Read a benchmark from its published layout (a file, a folder of them, or a Hub id) → (items, skips,
    records read). Every record is either an item or a counted skip; a file whose first record lacks the
    schema's fields is a :class:`DataError` naming the file, the record and the field."""
    bench = get_benchmark(name)
    skips = SkipLog(strict=strict)
    items: list[BenchItem] = []
    seen: set[str] = set()
    checked: set[str] = set()
    records = 0
    for file, num, raw in _iter_source(str(source), bench, skips):
        if limit is not None and len(items) >= limit:
            break
        records += 1
        if file not in checked:
            checked.add(file)
            if not isinstance(raw, dict):
                raise DataError(file, num, None, f"expected a JSON object, got {type(raw).__name__}: not a "
                                                 f"{bench.title} file")
            missing = [f for f in bench.fields if f not in raw]
            if missing:
                raise DataError(file, num, missing[0], f"missing: not a {bench.title} file (its records have "
                                                       f"{', '.join(bench.fields)}; this one has "
                                                       f"{', '.join(sorted(map(str, raw))[:8])})")
        if not isinstance(raw, dict):
            skips.skip(file, num, None, f"expected a JSON object, got {type(raw).__name__}")
            continue
        try:
            item = bench.parse(raw, num)
        except RecordSkip as e:
            skips.skip(file, num, e.field, e.reason)
            continue
        if item.id in seen:
            skips.skip(file, num, "id", "duplicate id")
            continue
        seen.add(item.id)
        items.append(item)
    return items, skips, records


# ----------------------------------------------------------------------------- field helpers for readers

def need(raw: dict[str, Any], key: str) -> Any:
    if key not in raw or raw[key] is None:
        raise RecordSkip(key, "missing")
    return raw[key]


def text(raw: dict[str, Any], key: str) -> str:
    v = need(raw, key)
    if not isinstance(v, str):
        raise RecordSkip(key, f"expected a string, got {type(v).__name__}")
    if not v.strip():
        raise RecordSkip(key, "empty")
    return v


def texts(raw: dict[str, Any], key: str, n: int | None = None) -> list[str]:
    v = need(raw, key)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise RecordSkip(key, "expected a list of strings")
    if not v:
        raise RecordSkip(key, "empty")
    if n is not None and len(v) != n:
        raise RecordSkip(key, f"expected {n} responses, got {len(v)}")
    return list(v)


def prompt_of(value: Any, key: str) -> Messages:
    """A string (one user turn) or a list of messages ending with a user turn."""
    msgs = to_messages(value, key, "user")
    if not msgs:
        raise RecordSkip(key, "empty")
    if msgs[-1]["role"] != "user":
        raise RecordSkip(key, "does not end with a user turn")
    return msgs


def record_id(raw: dict[str, Any], key: str, num: int) -> str:
    v = raw.get(key)
    return str(v) if isinstance(v, (str, int)) and str(v) else f"record-{num}"


# ----------------------------------------------------------------------------- judging

def judge_items(judge: Any, bench: Benchmark, items: Sequence[BenchItem],
                progress: Callable[[int], None] | None = None) -> list[Outcome]:
    """One :class:`Outcome` per item, batched through the judge's ``score_items`` / ``compare_items``."""
    def mk(it: BenchItem, k: int, resp: str) -> Item:
        return Item(it.prompt, resp, judge.aspect, ("bench", judge.seed, bench.name, it.id, k))

    out: list[Outcome] = []
    step = max(1, judge.batch_size)
    for lo in range(0, len(items), step):
        part = items[lo:lo + step]
        if judge.protocol == "pointwise":
            flat = [mk(it, k, r) for it in part for k, r in enumerate(it.candidates)]
            scores = judge.score_items(flat)
            pos = 0
            for it in part:
                got = scores[pos:pos + len(it.candidates)]
                pos += len(it.candidates)
                out.append(Outcome([s.score for s in got], errors=[s.error for s in got if s.error],
                                   detail=_thought_detail([s.detail for s in got])))
        elif bench.mode == "ranking":
            for it in part:
                ranked = judge.rank([mk(it, k, r) for k, r in enumerate(it.candidates)])
                out.append(Outcome(list(ranked.scores)))
        else:
            wanted = [(it, ij) for it in part
                      for ij in (bench.pairs(it) if bench.pairs else
                                 [(i, j) for i in range(len(it.chosen)) for j in range(len(it.rejected))])]
            comps = judge.compare_items([(mk(it, i, it.chosen[i]), mk(it, len(it.chosen) + j, it.rejected[j]))
                                         for it, (i, j) in wanted])
            by_item: dict[str, Outcome] = {it.id: Outcome() for it in part}
            for (it, ij), c in zip(wanted, comps, strict=True):
                o = by_item[it.id]
                o.orders[ij] = (c.orders[0], c.orders[1])
                if c.error:
                    o.errors.append(c.error)
                for k, v in _thought_detail([{"finished": f} for f in c.detail.get("finished") or []]).items():
                    o.detail.setdefault(k, []).extend(v)
            out.extend(by_item[it.id] for it in part)
        if progress:
            progress(len(part))
    return out


def _thought_detail(details: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-judgement details (BTPO's ``thought_tokens`` / ``thought_cut`` / ``yes_no_mass``, a GRPO
    rationale's ``finished``) → the lists :func:`~btpo_cli.judging.protocol.thought_stats` reads."""
    out: dict[str, list[float]] = {}
    for d in details:
        cut = d.get("thought_cut", None if "finished" not in d else not d["finished"])
        for key, v in (("thought_tokens", d.get("thought_tokens")), ("thought_cut", cut),
                       ("yes_no_mass", d.get("yes_no_mass"))):
            if isinstance(v, (bool, int, float)):
                out.setdefault(key, []).append(float(v))
    return out


def position_bias(outcomes: Sequence[Outcome]) -> dict[str, Any] | None:
    """Pairwise judgements only: how often the two orders disagree, and how often the first slot wins."""
    pairs = [v for o in outcomes for v in o.orders.values()]
    return order_bias(pairs)


def accuracy_table(groups: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {k: {"n": len(v), "accuracy": sum(v) / len(v) if v else None} for k, v in sorted(groups.items())}


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The 95% Wilson interval of a proportion ``k / n``."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))
