"""The skeleton shared by the generation-based builders (:mod:`~data_builders.if_builder`,
:mod:`~data_builders.math_builder`): sample responses with a generator → judge or grade each →
pair a better with a worse one → split → write the dataset and its manifest.

The builders supply only what differs, as the stages of a :class:`GeneratedBuilder`: their items
(prompts, questions) and how an item's prompt reads, how a response is judged or graded, how pairs
are split, and their manifest fields. The rest lives here, once:

* **the build**, :func:`run_build`: the options checked, the items read (none usable: one line),
  the manifest's first fields, then the dry run (nothing written) or the generator, the builder's
  resumable stages (a :class:`BuildRun` shared between them), the failures counted and the dataset
  written with its manifest.
* **the generator**, a :class:`Sampler`: texts (or chat messages) in, ``n`` sampled
  ``(text, finished)`` out per prompt. :class:`HFSampler` is a local model behind a rollout engine
  of :mod:`btpo_cli.engines` (``--engine``); :class:`URLSampler` an OpenAI-compatible server
  (``--generator-url``); the tests pass fakes.
* **the HTTP client**, :class:`OpenAIClient`, once for :class:`URLSampler` and :class:`URLJudge`:
  timeout, retries with exponential backoff, errors naming the URL, a :class:`ReplyCache` of answered
  requests (a re-run asks only what is missing), concurrent requests per batch. A request that still
  fails comes back as :class:`Failed`; the stages leave that item uncached and the builders count it
  in the manifest's ``failed`` (:func:`failure_summary`); an unreachable server is
  :class:`EndpointDown`, one line.
* **the judge**, a :class:`Judge`: chat prompts in, one reply text out per prompt.
  :class:`URLJudge` posts to an OpenAI-compatible endpoint; :class:`LocalJudge` asks a
  :class:`Sampler` greedily; :func:`make_judge` picks one from the command-line settings.
* **the shared options**, :class:`GenOptions` (the generator, sampling, sizes, seed, device,
  engine, ``strict``, ``dry_run``): ``build_math`` / ``build_if`` take them as keyword arguments
  over their own defaults, and ``btpo build-data math|if`` declares their flags once.
* **the resumable stages**: :func:`run_cached_stage` runs items batch by batch through a
  function and appends each batch's rows to a :class:`JsonlCache` (append-only JSONL, ``fsync``
  per batch, lines reused when their settings match); :func:`sample_stage` is the sampling stage
  on it; ``BTPO_FAULT_AFTER_BATCHES=K`` exits (code 75) after the K-th batch (tests: a killed
  build). Batch ``b`` is sampled with a seed derived from ``(seed, tag, b)``, so a resumed build
  draws what an uninterrupted one draws.
* **pairs and output**: :func:`pick_pair` (a seeded choice among the better and the worse
  responses → a :class:`~btpo_cli.data.pairs.PairRecord`), :func:`split_by_fraction`,
  :func:`base_manifest` (the fields every generated manifest starts with) and :func:`finish`
  (writes with :func:`~btpo_cli.data.pairs.write_dataset`; the run's statistics are returned,
  not written).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from btpo_cli.config import ModelConfig
from btpo_cli.data.pairs import PairRecord, RecordSkip, SkipLog, normalize_record, write_dataset
from btpo_cli.engines import EngineSpec, SamplingParams, build_engine, resolve_engine_name
from btpo_cli.errors import BtpoError
from btpo_cli.models.aliases import resolve_model

FAULT_ENV = "BTPO_FAULT_AFTER_BATCHES"
FAULT_EXIT_CODE = 75

Progress = Callable[..., None]
"""``progress(label, done, total)``: called after each batch (``total`` may be ``None``)."""

Messages = list[dict[str, str]]
T = TypeVar("T")


# ----------------------------------------------------------------------------- settings and checks


@dataclass(frozen=True)
class GenSettings:
    """The generator and its sampling settings (stored with every cached line and in the manifest)."""

    generator: str
    n_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


S = TypeVar("S", bound=GenSettings)


JUDGE_TIMEOUT = 120.0
"""Seconds a judge's reply (a few tokens) may take; the base of a generator's default timeout."""
SLOWEST_SERVER = 20.0
"""Generated tokens per second below which a generator server's default timeout expires."""


@dataclass(frozen=True)
class GenOptions:
    """The options every generated build takes besides its own (the flags ``build-data math`` and
    ``if`` share), passed to ``build_math`` / ``build_if`` as keyword arguments; a builder fills in
    its defaults with :meth:`with_defaults`. An unknown keyword is a ``TypeError``."""

    generator: str
    n_samples: int
    max_new_tokens: int
    batch_size: int
    n_train: int
    n_test: int
    temperature: float = 0.8
    top_p: float = 1.0
    seed: int = 0
    limit: int | None = None
    strict: bool = False
    dry_run: bool = False
    device: str | None = None
    engine: str = "auto"
    generator_url: str | None = None
    retries: int = 3
    timeout: float | None = None
    """Seconds per server reply; ``None``: :meth:`timeout_for` picks one per role."""
    backoff: float = 1.0
    overwrite: bool = False
    """Replace a different dataset already in the output folder (``write_dataset``)."""

    @classmethod
    def with_defaults(cls, defaults: Mapping[str, Any], given: Mapping[str, Any]) -> GenOptions:
        """``given`` (keyword arguments of a ``build_*``) over the builder's ``defaults``."""
        return cls(**{**defaults, **given})

    def check(self, pair_needs: str, test_fraction: float | None = None) -> None:
        """The checks every generated build makes before reading anything (``pair_needs``: why 2 samples)."""
        if self.n_samples < 2:
            raise BtpoError(f"--n-samples must be at least 2 (a pair needs {pair_needs})")
        if self.n_train < 0 or self.n_test < 0:
            raise BtpoError("--n-train and --n-test must be >= 0 (0 keeps every pair)")
        if test_fraction is not None and not 0.0 <= test_fraction < 1.0:
            raise BtpoError("--test-fraction must be in [0, 1)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise BtpoError("--batch-size and --max-new-tokens must be >= 1")
        if self.retries < 0 or (self.timeout is not None and self.timeout <= 0) or self.backoff < 0:
            raise BtpoError("--retries and --backoff must be >= 0 and --timeout > 0")

    def settings(self, cls: type[S] = GenSettings) -> S:  # type: ignore[assignment]
        """The generator settings (cached with every line; the manifest's ``generator``)."""
        return cls(self.generator, self.n_samples, float(self.temperature), float(self.top_p),
                   self.max_new_tokens, self.seed)

    def timeout_for(self, role: str) -> float:
        """``--timeout``, else :data:`JUDGE_TIMEOUT` for a judge and, for a generator, that plus the
        tokens one batch asks for (``batch_size`` concurrent requests × ``n`` × ``max_new_tokens``) at
        :data:`SLOWEST_SERVER` tokens/s: a slow but working server (a CPU one) is not timed out and
        sent the same request again while it is still generating the first."""
        if self.timeout is not None:
            return self.timeout
        if role != "generator":
            return JUDGE_TIMEOUT
        return JUDGE_TIMEOUT + self.batch_size * self.n_samples * self.max_new_tokens / SLOWEST_SERVER

    def client(self, url: str, model: str, role: str, cache_dir: Path | None) -> OpenAIClient:
        """An :class:`OpenAIClient` for ``url`` with these retry settings; its replies are cached in
        ``cache_dir/http-<role>.jsonl`` (``None``: not cached)."""
        cache = None if cache_dir is None else ReplyCache(cache_dir / f"http-{role}.jsonl")
        return OpenAIClient(url, model, role=role, timeout=self.timeout_for(role), retries=self.retries,
                            backoff=self.backoff, cache=cache, concurrency=self.batch_size)

    def sampler(self, given: Sampler | None = None, cache_dir: Path | None = None) -> Sampler:
        """``given`` (a test's fake, another generator), else the generator behind ``generator_url``
        (:class:`URLSampler`), else the local generator model."""
        if given is not None:
            return given
        if self.generator_url:
            return URLSampler(self.client(self.generator_url, self.generator, "generator", cache_dir))
        return HFSampler(self.generator, self.device, self.batch_size, self.engine)

    def describe_generator(self) -> dict[str, Any]:
        """The manifest's ``generator_endpoint``: where the generator ran."""
        if self.generator_url:
            return {"url": self.generator_url, "retries": self.retries, "timeout": self.timeout_for("generator")}
        return {"engine": self.engine, "device": self.device}


def require_items(items: Sequence[Any], builder: str, what: str, skips: SkipLog) -> None:
    """A one-line error naming the commonest skip reasons when no item was read."""
    if not items:
        reasons = "; ".join(f"{k} ({v})" for k, v in skips.counts.most_common(3)) or "no rows read"
        raise BtpoError(f"{builder}: no usable {what} ({reasons})")


# ----------------------------------------------------------------------------- the resumable cache


def batch_seed(seed: int, *parts: Any) -> int:
    """A stable 63-bit seed derived from ``seed`` and ``parts``."""
    h = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


class JsonlCache:
    """An append-only JSONL cache keyed by ``key``; lines whose ``settings_key`` differ are ignored."""

    def __init__(self, path: Path, key: str, settings_key: str, settings: Mapping[str, Any]):
        self.path, self.key, self.settings_key, self.settings = path, key, settings_key, dict(settings)

    def load(self) -> dict[str, dict[str, Any]]:
        """The usable lines, ``{key: line}`` (the last line of a key wins)."""
        return load_cache_file(self.path, self.key, self.settings_key, self.settings)

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append rows and ``fsync``: they survive a crash right after this returns."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = (
            self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        )
        with open(self.path, "a", encoding="utf-8") as f:
            if needs_newline:  # a line cut by a crash: start a fresh one
                f.write("\n")
            for row in rows:
                f.write(json.dumps({**row, self.settings_key: self.settings}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def load_cache_file(
    path: Path, key: str, settings_key: str, settings: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if isinstance(row, dict) and row.get(settings_key) == dict(settings) and key in row:
                out[str(row[key])] = row
    return out


def run_cached_stage(items: Sequence[Any], key: Callable[[Any], str], cache: JsonlCache, done: dict[str, Any],
                     batch_size: int, make_rows: Callable[[list[Any], int], list[dict[str, Any]]], label: str,
                     progress: Progress | None, stats: dict[str, int],
                     failed: dict[str, str] | None = None) -> int:
    """Run one resumable stage: batch by batch, the items whose ``key`` is not in ``done`` go through
    ``make_rows(todo, batch_index)``; the rows are appended to ``cache`` (fsync) and to ``done``.

    A row with an ``"error"`` field (a request that failed after its retries) is neither cached nor
    done: it goes into ``failed`` (``{key: reason}``), and a re-run computes it again. Counts
    ``stats["batches"]``; returns how many items were computed now. A killed stage resumes where its
    cache ends (the batch index, hence each batch's seed, does not depend on what is cached)."""
    n_done = sum(1 for it in items if key(it) in done)
    made = 0
    if progress is not None:
        progress(label, n_done, len(items))
    for b in range(0, len(items), batch_size):
        todo = [it for it in items[b : b + batch_size] if key(it) not in done]
        if not todo:
            continue
        rows = make_rows(todo, b // batch_size)
        good = [r for r in rows if "error" not in r]
        if failed is not None:
            failed.update({str(r[cache.key]): str(r["error"]) for r in rows if "error" in r})
        if good:
            cache.append(good)
        done.update({str(r[cache.key]): r for r in good})
        stats["batches"] = stats.get("batches", 0) + 1
        n_done += len(todo)
        made += len(todo)
        if progress is not None:
            progress(label, n_done, len(items))
        maybe_fault(stats["batches"])
    return made


def maybe_fault(batches_done: int) -> None:
    """Exit abruptly after the K-th batch when ``BTPO_FAULT_AFTER_BATCHES=K`` (tests: a killed build)."""
    k = os.environ.get(FAULT_ENV)
    if k and k.isdigit() and batches_done >= int(k):
        os._exit(FAULT_EXIT_CODE)


# ----------------------------------------------------------------------------- the generator


class Sampler(Protocol):
    """What the builders need from a generator: texts in, ``n`` sampled texts out per prompt (or a
    :class:`Failed` for a prompt whose request failed after its retries)."""

    calls: int

    def sample(self, prompts: list[Any], n: int, *, temperature: float, top_p: float, max_new_tokens: int,
               seed: int | None, chat: bool) -> list[list[tuple[str, bool]] | Failed]: ...


def sample_stage(
    items: Sequence[T],
    key: Callable[[T], str],
    prompt_of: Callable[[T], Any],
    *,
    chat: bool,
    tag: str,
    sampler: Sampler,
    settings: GenSettings,
    cache: JsonlCache,
    done: dict[str, Any],
    batch_size: int,
    label: str,
    progress: Progress | None,
    stats: dict[str, int],
    failed: dict[str, str] | None = None,
) -> int:
    """Sample ``settings.n_samples`` responses for every item not in ``done``; one cached line per item,
    ``{cache.key: key(item), "samples": [...], "finished": [...]}``; an item whose request failed
    (:class:`Failed`) goes into ``failed`` instead. Returns how many were sampled now."""

    def rows(todo: list[T], batch: int) -> list[dict[str, Any]]:
        groups = sampler.sample([prompt_of(it) for it in todo], settings.n_samples,
                                temperature=settings.temperature, top_p=settings.top_p,
                                max_new_tokens=settings.max_new_tokens,
                                seed=batch_seed(settings.seed, tag, batch), chat=chat)
        return [{cache.key: key(it), "error": g.reason} if isinstance(g, Failed) else
                {cache.key: key(it), "samples": [t for t, _ in g], "finished": [f for _, f in g]}
                for it, g in zip(todo, groups, strict=True)]

    return run_cached_stage(items, key, cache, done, batch_size, rows, label, progress, stats, failed)


def default_device(device: str | None = None) -> str:
    """``--device`` checked (:func:`~btpo_cli.models.device.resolve_device`), or cuda where present, else cpu."""
    from btpo_cli.models.device import resolve_device  # heavy: imported on use

    return str(resolve_device(device))


_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}


def _generation_eos(path: str) -> Any:
    """The model's generation stop id(s), read without loading its weights."""
    from transformers import AutoConfig, GenerationConfig  # heavy: imported on use

    try:
        return GenerationConfig.from_pretrained(path).eos_token_id
    except (OSError, ValueError):
        return getattr(AutoConfig.from_pretrained(path), "eos_token_id", None)


class HFSampler:
    """A local model behind a rollout engine (``--engine``: hf, vllm, auto), by name.

    ``prompts`` are plain strings (``chat=False``: tokenized with ``add_special_tokens=True``) or
    message lists (``chat=True``: ``apply_chat_template(..., add_generation_prompt=True)``).
    Returns ``(text, finished)`` per sample; the text is decoded without special tokens.
    """

    def __init__(self, name: str, device: str | None = None, batch_size: int = 16, engine: str = "auto"):
        self.name, self.device, self.batch_size = name, default_device(device), batch_size
        self.engine_name = engine
        self.calls = 0
        self._tok: Any = None
        self._engine: Any = None

    def _load(self) -> None:
        if self._engine is not None:
            return
        from btpo_cli.models.loading import load_causal_lm, load_tokenizer  # heavy: imported on use

        engine = resolve_engine_name(self.engine_name)
        key = (self.name, self.device)
        model = None
        if engine == "hf":
            if key not in _MODELS:  # generator and judge may be the same model: load it once
                tok = load_tokenizer(self.name, padding_side="left")
                m = load_causal_lm(ModelConfig(name=self.name), self.device.split(":")[0], inference=True)
                _MODELS[key] = (tok, m.to(self.device).eval())
            self._tok, model = _MODELS[key]
        else:
            self._tok = load_tokenizer(self.name, padding_side="left")
        path = resolve_model(self.name)
        self._engine = build_engine(engine, EngineSpec(model_path=path, pad_token_id=self._tok.pad_token_id,
                                                       device=self.device, module=model,
                                                       prompts_per_batch=self.batch_size))
        stops = {self._tok.eos_token_id} if self._tok.eos_token_id is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) if model is not None \
            else _generation_eos(path)
        stops |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.stop_ids = sorted(stops)

    def encode(self, prompt: Any, chat: bool) -> list[int]:
        if not chat:
            return list(self._tok(prompt, add_special_tokens=True)["input_ids"])
        if not getattr(self._tok, "chat_template", None):
            raise BtpoError(f"model '{self.name}' has no chat template; pick an instruction-tuned model")
        text = self._tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def sample(
        self,
        prompts: list[Any],
        n: int,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None,
        chat: bool,
    ) -> list[list[tuple[str, bool]]]:
        self._load()
        self.calls += 1
        ids = [self.encode(p, chat) for p in prompts]
        params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop_token_ids=self.stop_ids,
            seed=seed,
        )
        groups = self._engine.generate(ids, n, params)
        return [
            [(self._tok.decode(s.token_ids, skip_special_tokens=True).strip(), bool(s.finished)) for s in g]
            for g in groups
        ]


# ----------------------------------------------------------------------------- OpenAI-compatible endpoints


@dataclass(frozen=True)
class Failed:
    """A prompt whose request failed after every retry (``reason``: one line naming the URL); the stage
    leaves it uncached and counts it, and a re-run asks for it again."""

    reason: str


class EndpointError(BtpoError):
    """A request that failed after every retry (an HTTP error, a timeout, a reply that is not what an
    OpenAI-compatible server sends): the one prompt is skipped and counted."""


class EndpointDown(BtpoError):
    """The server cannot be reached at all (connection refused, unknown host): the build stops."""


class ReplyCache:
    """The parsed replies of one endpoint, keyed by a hash of the request body (append-only JSONL,
    ``fsync`` per reply): a re-run asks the server only what it has not answered yet."""

    def __init__(self, path: Path):
        self.path = path
        self._cache = JsonlCache(path, "request", "format", {"v": 1})
        self.replies = {k: row["reply"] for k, row in self._cache.load().items() if "reply" in row}
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        return self.replies.get(key)

    def put(self, key: str, reply: Any) -> None:
        with self._lock:  # requests run in threads (OpenAIClient.map)
            self._cache.append([{"request": key, "reply": reply}])
            self.replies[key] = reply


def _is_down(e: BaseException) -> bool:
    reason = getattr(e, "reason", None)
    return isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError) and isinstance(
        reason, (ConnectionRefusedError, socket.gaierror, FileNotFoundError))


class OpenAIClient:
    """POSTs to one OpenAI-compatible server (``url`` = its ``/v1`` base), shared by :class:`URLJudge`
    and :class:`URLSampler`: a ``timeout`` per request, up to ``retries`` retries with exponential
    backoff (``backoff`` × 1, 2, 4, … seconds, at most 30 s each) on an HTTP error, a timeout or an
    unparseable reply; every error names the URL. An API key is taken from ``BTPO_<ROLE>_API_KEY``
    (``BTPO_JUDGE_API_KEY``, ``BTPO_GENERATOR_API_KEY``) or ``OPENAI_API_KEY`` when set. Parsed
    replies go to ``cache`` (a :class:`ReplyCache`) and are read back from it before asking. :meth:`map`
    sends up to ``concurrency`` requests at once (the builders pass their ``--batch-size``)."""

    MAX_BACKOFF = 30.0

    def __init__(self, url: str, model: str, *, role: str = "judge", timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0, cache: ReplyCache | None = None, concurrency: int = 1,
                 sleep: Callable[[float], None] = time.sleep):
        if not str(url).startswith(("http://", "https://")) or len(str(url)) <= len("https://"):
            raise BtpoError(f"--{role}-url {url!r}: expected an http(s) base URL, e.g. http://127.0.0.1:8000/v1")
        self.base, self.model, self.role = url.rstrip("/"), model, role
        self.timeout, self.retries, self.backoff, self.cache, self.sleep = timeout, retries, backoff, cache, sleep
        self.concurrency = max(1, concurrency)
        self.calls = 0      # HTTP requests sent (retries included)
        self.cached = 0     # replies read from the cache
        self._count = threading.Lock()

    def map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """``[fn(x) for x in items]``, up to ``concurrency`` at a time, in order."""
        if self.concurrency == 1 or len(items) < 2:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(f"BTPO_{self.role.upper()}_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def post(self, path: str, body: dict[str, Any], parse: Callable[[Any], T]) -> T:
        """``parse(reply JSON)`` of ``POST {url}{path}``; raises :class:`EndpointError` (or
        :class:`EndpointDown`) naming the URL once every try failed."""
        url = self.base + path
        payload = json.dumps({"model": self.model, **body}, sort_keys=True, ensure_ascii=False)
        key = hashlib.sha256(f"{url}\n{payload}".encode()).hexdigest()
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            with self._count:
                self.cached += 1
            return hit
        why = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(min(self.backoff * 2 ** (attempt - 1), self.MAX_BACKOFF))
            with self._count:
                self.calls += 1
            req = urllib.request.Request(url, data=payload.encode(), headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code} {e.reason}"
                if e.code in (400, 401, 403, 404, 422):  # the request itself is wrong: retrying cannot help
                    detail = e.read()[:200].decode("utf-8", "replace")
                    raise EndpointDown(f"{self.role} endpoint {url}: {why}: {detail}") from e
                continue
            except TimeoutError as e:
                why = f"no reply within {self.timeout:g}s ({type(e).__name__})"
                continue
            except (urllib.error.URLError, OSError) as e:
                if _is_down(e):
                    raise EndpointDown(f"{self.role} endpoint {url} failed: {type(e).__name__}: "
                                       f"{str(e)[:200]} (is the server running?)") from e
                why = f"{type(e).__name__}: {str(e)[:200]}"
                if isinstance(getattr(e, "reason", None), TimeoutError):
                    why = f"no reply within {self.timeout:g}s (timeout)"
                continue
            try:
                out = parse(json.loads(raw.decode("utf-8")))
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                why = f"unparseable reply ({type(e).__name__}: {str(e)[:80]})"
                continue
            if self.cache is not None:
                self.cache.put(key, out)
            return out
        raise EndpointError(f"{self.role} endpoint {url}: {why} after {self.retries + 1} tries")

    def describe(self) -> dict[str, Any]:
        return {"url": self.base, "model": self.model, "retries": self.retries, "timeout": self.timeout}


def _chat_texts(data: Any) -> list[tuple[str, bool]]:
    return [(str(c["message"]["content"] or "").strip(), c.get("finish_reason") == "stop")
            for c in sorted(data["choices"], key=lambda c: c.get("index", 0))]


def _completion_texts(data: Any) -> list[tuple[str, bool]]:
    return [(str(c["text"] or "").strip(), c.get("finish_reason") == "stop")
            for c in sorted(data["choices"], key=lambda c: c.get("index", 0))]


class URLSampler:
    """A generator behind an OpenAI-compatible server (``--generator-url``): ``chat=True`` prompts
    (message lists) go to ``/chat/completions`` (the server applies the model's chat template),
    plain-text prompts to ``/completions``; ``n`` samples per request with the temperature, top_p,
    max_tokens and a per-prompt seed derived from the batch's. One request per prompt, retried and
    cached by :class:`OpenAIClient`; a prompt whose request failed comes back as :class:`Failed`."""

    def __init__(self, client: OpenAIClient):
        self.client = client
        self.calls = 0

    def sample(self, prompts: list[Any], n: int, *, temperature: float, top_p: float, max_new_tokens: int,
               seed: int | None, chat: bool) -> list[list[tuple[str, bool]] | Failed]:
        self.calls += 1

        def one(ip: tuple[int, Any]) -> list[tuple[str, bool]] | Failed:
            i, prompt = ip
            body: dict[str, Any] = {"n": n, "temperature": temperature, "top_p": top_p, "max_tokens": max_new_tokens}
            if seed is not None:
                body["seed"] = batch_seed(seed, i) % 2**31
            body["messages" if chat else "prompt"] = prompt
            try:
                got = self.client.post("/chat/completions" if chat else "/completions", body,
                                       _chat_texts if chat else _completion_texts)
            except EndpointError as e:
                return Failed(str(e))
            if len(got) != n:
                return Failed(f"generator endpoint {self.client.base}: {len(got)} of {n} samples came back")
            return [(t, bool(f)) for t, f in got]

        return self.client.map(one, list(enumerate(prompts)))


# ----------------------------------------------------------------------------- the judge


class Judge(Protocol):
    """What a judging builder needs from a judge: chat prompts in, one reply text out per prompt (or a
    :class:`Failed` for a prompt whose request failed after its retries)."""

    def judge(self, prompts: list[Messages]) -> list[str | Failed]: ...


class URLJudge:
    """An OpenAI-compatible chat-completions endpoint as a judge (greedy, a few tokens), through an
    :class:`OpenAIClient` (retries, backoff, timeout, reply cache). :meth:`ask` raises on a failed
    request; :meth:`judge` returns a :class:`Failed` for it instead."""

    def __init__(self, url: str, model: str, timeout: float = 120.0, *, retries: int = 3, backoff: float = 1.0,
                 client: OpenAIClient | None = None):
        self.client = client or OpenAIClient(url, model, role="judge", timeout=timeout, retries=retries,
                                             backoff=backoff)
        self.url = self.client.base + "/chat/completions"
        self.model = model

    @property
    def calls(self) -> int:
        return self.client.calls

    def ask(self, messages: Messages) -> str:
        return self.client.post("/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 8},
                                lambda d: str(d["choices"][0]["message"]["content"] or ""))

    def judge(self, prompts: list[Messages]) -> list[str | Failed]:
        def one(p: Messages) -> str | Failed:
            try:
                return self.ask(p)
            except EndpointError as e:
                return Failed(str(e))

        return self.client.map(one, prompts)


class LocalJudge:
    """A local judge model (greedy, 4 new tokens, chat template)."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def judge(self, prompts: list[Messages]) -> list[str | Failed]:
        groups = self.sampler.sample(
            prompts, 1, temperature=0.0, top_p=1.0, max_new_tokens=4, seed=None, chat=True
        )
        return [g if isinstance(g, Failed) else g[0][0] for g in groups]


def make_judge(judge: str, judge_url: str | None, options: GenOptions, sampler: Sampler,
               cache_dir: Path | None = None) -> Judge:
    """``judge`` behind ``judge_url`` when given (with ``options``' retries and timeout, replies cached
    in ``cache_dir``), else the local model ``judge`` run like the generator (``options``): the
    generator's own ``sampler`` when it is the same local model, so it loads once."""
    if judge_url:
        return URLJudge(judge_url, judge, client=options.client(judge_url, judge, "judge", cache_dir))
    if judge == options.generator and isinstance(sampler, HFSampler):
        return LocalJudge(sampler)
    return LocalJudge(HFSampler(judge, options.device, options.batch_size, options.engine))


# ----------------------------------------------------------------------------- pairs and output


def failure_summary(failed: Mapping[str, str], what: str) -> dict[str, Any]:
    """The manifest's ``failed``: how many ``what`` (prompts, questions) were left out because a request
    failed after its retries, by reason (the URL and the last error), with a few of their ids."""
    reasons: dict[str, int] = {}
    for r in failed.values():
        reasons[r] = reasons.get(r, 0) + 1
    return {"total": len(failed), "what": what, "reasons": reasons, "examples": sorted(failed)[:5],
            "note": "not cached: a re-run asks only for these" if failed else ""}


def require_some(items: Sequence[Any], failed: Mapping[str, str], stage: str) -> None:
    """A one-line error when every item of ``stage`` failed (nothing to build from)."""
    if items and len(failed) >= len(items):
        first = next(iter(failed.values()))
        raise BtpoError(f"{stage}: every request failed ({len(failed)}), e.g. {first}")


def pick_pair(
    rng_key: str, better: Sequence[T], worse: Sequence[T], record: Callable[[T, T], dict[str, Any]]
) -> PairRecord | None:
    """One of ``better`` as chosen and one of ``worse`` as rejected (seeded by ``rng_key``), made into a
    record by ``record(chosen, rejected)``; ``None`` when the record is not a usable pair."""
    rng = random.Random(rng_key)
    chosen = rng.choice(better)
    rejected = rng.choice(worse)
    try:
        return normalize_record(record(chosen, rejected), 0)
    except RecordSkip:
        return None


def split_by_fraction(
    pairs: Sequence[PairRecord], test_fraction: float, n_train: int, n_test: int, rng_key: str
) -> dict[str, list[PairRecord]]:
    """Shuffle (seeded by ``rng_key``); the first ``ceil(test_fraction * pairs)`` (at most ``n_test``
    unless 0) are the test split, the rest (at most ``n_train`` unless 0) the train split."""
    pool = list(pairs)
    random.Random(rng_key).shuffle(pool)
    n_te = math.ceil(test_fraction * len(pool))
    if n_test:
        n_te = min(n_test, n_te)
    test, train = pool[:n_te], pool[n_te:]
    if n_train:
        train = train[:n_train]
    return {"train": train, "test": test}


def base_manifest(
    builder: str,
    *,
    seed: int,
    aspect: str,
    limit: int | None,
    sources: Mapping[str, str],
    settings: GenSettings,
    requested: Mapping[str, Any],
    license: str | None = None,
    **scoring: Any,
) -> dict[str, Any]:
    """The fields every generated manifest starts with; ``scoring`` (the judge or the grader) comes
    after the generator."""
    return {
        "builder": builder,
        "name": builder,
        "seed": seed,
        "aspect": aspect,
        **({"license": license} if license is not None else {}),
        "limit": limit,
        "sources": dict(sources),
        "generator": asdict(settings),
        **scoring,
        "requested": dict(requested),
    }


def finish(
    out: Path, splits: Mapping[str, list[PairRecord]], manifest: dict[str, Any], stats: dict[str, int],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the dataset; the run's statistics go with the returned manifest, not into the file (they
    differ between a fresh and a resumed build)."""
    result = write_dataset(out, dict(splits), manifest, overwrite)
    result["generation_run"] = stats
    return result


# ----------------------------------------------------------------------------- the skeleton

DryRun = tuple[dict[str, Any], list[dict[str, Any]]]
"""A dry run's counts (the report's fields before ``skipped``) and its ``examples``."""
Assembled = tuple[dict[str, list[PairRecord]], dict[str, Any], dict[str, Any]]
"""The splits, the manifest's counts (its fields before ``failed``) and its scoring (after ``failed``)."""


@dataclass
class BuildRun:
    """One generated build past its dry-run check: what its stages share (:func:`run_build` makes it)."""

    options: GenOptions
    items: list[Any]
    """What the builder read (questions, prompts)."""
    skips: SkipLog
    base: dict[str, Any]
    """The manifest's first fields (:meth:`GeneratedBuilder.base_manifest`)."""
    progress: Progress | None
    cache_dir: Path
    """``<out>/.cache``: the stages' caches."""
    sampler: Sampler
    """The generator."""
    stats: dict[str, int] = field(default_factory=dict)
    """The run's statistics (the result's ``generation_run``, not written into the manifest file)."""
    failed: dict[str, str] = field(default_factory=dict)
    """``{item id: reason}``: the items left out because a request failed (the manifest's ``failed``)."""


class GeneratedBuilder(Protocol):
    """One generated build's stages (an object per build: the stages may keep what they found on it).
    :func:`run_build` runs them in the skeleton's order: check the options, :meth:`read` the items,
    :meth:`base_manifest`, then either :meth:`dry_run` (nothing written) or :meth:`generate` (the
    resumable stages: sample, judge) and :meth:`assemble` (grade or count → pairs → splits), and
    writes the dataset with its manifest."""

    name: str
    """``math``, ``if``: the builder in errors and manifests."""
    what: str
    """What the items are (``questions``, ``prompts``) in errors and the manifest's ``failed``."""
    defaults: Mapping[str, Any]
    """The builder's :class:`GenOptions` defaults."""
    pair_needs: str
    """Why a pair needs 2 samples (the ``--n-samples`` error)."""

    @property
    def test_fraction(self) -> float | None:
        """``--test-fraction`` where the builder splits by a fraction (checked with the options)."""
        ...

    def read(self, o: GenOptions, skips: SkipLog) -> list[Any]: ...

    def base_manifest(self, o: GenOptions) -> dict[str, Any]: ...

    def dry_run(self, items: list[Any], cache_dir: Path | None) -> DryRun:
        """What a build would do: nothing is written (``cache_dir`` may not exist, or be ``None``)."""
        ...

    def generate(self, run: BuildRun) -> dict[str, Any] | None:
        """The resumable stages; a summary returned ends the build there (a shard's sampling run)."""
        ...

    def assemble(self, run: BuildRun) -> Assembled:
        """Pairs from what :meth:`generate` cached, split."""
        ...


def run_build(
    builder: GeneratedBuilder, out: Path | None, options: Mapping[str, Any], progress: Progress | None,
    sampler: Sampler | None,
) -> dict[str, Any]:
    """The generated-build skeleton: the dry run, the caches, the failures and the manifest, once; the
    ``builder``'s stages (:class:`GeneratedBuilder`) in between. ``options`` are :class:`GenOptions`
    over the builder's defaults, ``sampler`` replaces the generator. Returns the manifest (with
    ``generation_run``), the dry run's report or the summary :meth:`~GeneratedBuilder.generate` ended on."""
    o = GenOptions.with_defaults(builder.defaults, options)
    o.check(builder.pair_needs, builder.test_fraction)
    skips = SkipLog(strict=o.strict)
    items = builder.read(o, skips)
    require_items(items, builder.name, builder.what, skips)
    base = builder.base_manifest(o)
    cache_dir = out / ".cache" if out is not None else None
    if o.dry_run:
        counts, examples = builder.dry_run(items, cache_dir)
        return {**base, "dry_run": True, **counts, "skipped": skips.as_dict(), "examples": examples}
    if out is None or cache_dir is None:
        raise BtpoError(f"build_{builder.name}: an output folder is required unless dry_run is set")
    run = BuildRun(o, items, skips, base, progress, cache_dir, o.sampler(sampler, cache_dir))
    summary = builder.generate(run)
    if summary is not None:
        return summary
    splits, counts, scoring = builder.assemble(run)
    manifest = {**base, **counts, "failed": failure_summary(run.failed, builder.what), **scoring,
                "skipped": skips.as_dict()}
    return finish(out, splits, manifest, run.stats, overwrite=o.overwrite)
