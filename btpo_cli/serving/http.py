"""``btpo serve``: a trained judge over HTTP (FastAPI + uvicorn, the optional ``serve`` extra).

Endpoints (JSON in, JSON out; ``docs/judge.md`` has examples)::

    POST /v1/score    {"prompt": P, "responses": [str, ...] | "response": str, "aspect"?, "thoughts"?}
                      → {"scores": [...], "errors": [...], "best": i, "thoughts"?: [...]}   (pointwise judges)
    POST /v1/compare  {"prompt": P, "a": str, "b": str, "aspect"?, "thoughts"?}
                      → {"prob_a": p, "verdict": "a" | "b" | "tie" | null, ...}
    POST /v1/rewards  {"items": [{"prompt": P, "response": str, "aspect"?}, ...]}
                      → {"rewards": [...], "errors": [...]}                 (batch; verl's reward loop)
    POST /get_reward  {"query": [str, ...], "prompts"?: [str, ...], "labels"?: [...]}
                      → {"rewards": [...], "scores": [...], "extra_logs": {"btpo_error": [...]}}  (OpenRLHF)
    GET  /health      → {"status": "ok", "method", "protocol", "stats": {...}}

Rewards: a pointwise judge's score; a pairwise judge's mean win probability among the responses of the
same prompt in the request (a prompt with one response gets ``on_error``, 0.0). ``/get_reward`` splits
each rendered query into conversation and response (:mod:`btpo_cli.serving.rewards`).

``P`` is a string (one user turn) or a list of ``{"role", "content"}`` messages ending with a user turn.

Dynamic batching: requests wait in one queue; a single worker takes the first, keeps collecting
for up to ``max_wait_ms`` or until ``max_batch`` items, then runs ONE batched judge call per
kind (score / compare) on a dedicated thread and hands each request its slice. ``/health``
counts requests, items, batches and the judge's forward calls, so batching is measurable.

Limits and errors: bodies over ``max_body_bytes`` → 413; more than ``max_items`` responses →
413; bad JSON or non-UTF-8 → 400; missing fields, wrong types, extra fields, unpaired
surrogates → 422 naming the field; a missing or wrong bearer token → 401; more than
``max_queue`` items waiting → 503. Every error body is ``{"error": {"type", "message"}}`` and
is logged as one line, never as a traceback. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from btpo_cli import __version__
from btpo_cli.judging.judge import Judge, to_prompt
from btpo_cli.serving.rewards import split_query

log = logging.getLogger("btpo.serve")

DRAIN_CAP = 64 << 20
"""An oversized body is read and dropped up to this many bytes before the 413 (then the connection closes)."""


@dataclass
class Limits:
    """What one request and the queue may hold, and how long a batch waits for company."""

    max_body_bytes: int = 1 << 20
    max_items: int = 64
    """Responses per /v1/score request."""
    max_batch: int = 32
    """Items (responses or pairs) per batched judge call; a bigger single request runs alone."""
    max_wait_ms: float = 10.0
    max_queue: int = 4096
    """Items waiting or running before new requests get 503."""


# ----------------------------------------------------------------------------- request schemas

def _valid_unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an unpaired surrogate (not valid Unicode)") from None
    return s


Text = Annotated[str, AfterValidator(_valid_unicode)]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: Text


class ScoreRequest(BaseModel):
    """Score one response (``response``) or several (``responses``) to the same prompt."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: Text | list[Message]
    response: Text | None = None
    responses: list[Text] | None = None
    aspect: Text | None = None
    thoughts: bool = False


class CompareRequest(BaseModel):
    """Is ``a`` better than ``b`` as the answer to ``prompt``?"""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: Text | list[Message]
    a: Text
    b: Text
    aspect: Text | None = None
    thoughts: bool = False


class RewardItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: Text | list[Message]
    response: Text
    aspect: Text | None = None


class RewardsRequest(BaseModel):
    """A batch of (prompt, response) pairs to reward (verl's reward loop, any batch client)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    items: list[RewardItem]


class OpenRLHFRequest(BaseModel):
    """OpenRLHF's remote reward request (``openrlhf/utils/remote_rm_utils.py``); other keys are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    query: list[Text]
    prompts: list[Text] | None = None
    labels: list[Any] | None = None


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        self.status, self.kind, self.message = status, kind, message
        super().__init__(message)


def _validation_message(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("list[", "str", "function-")))
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{loc or 'body'}: {msg}{more}"


# ----------------------------------------------------------------------------- the batcher

@dataclass
class _Job:
    kind: Literal["score", "compare"]
    payload: list[Any]
    future: asyncio.Future


@dataclass
class Batcher:
    """Collects concurrent requests into batched judge calls (see the module docstring)."""

    judge: Judge
    limits: Limits
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "items": 0, "batches": 0,
                                                           "max_batch_items": 0, "busy": 0, "errors": 0})
    pending: int = 0

    def __post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="btpo-judge")
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, kind: Literal["score", "compare"], payload: list[Any]) -> list[Any]:
        """Queue ``payload`` (items or item pairs) and wait for its results."""
        assert self._queue is not None
        if self.pending + len(payload) > self.limits.max_queue:
            self.stats["busy"] += 1
            raise ApiError(503, "busy", f"{self.pending} items waiting; try again shortly")
        fut = asyncio.get_running_loop().create_future()
        self.pending += len(payload)
        self.stats["requests"] += 1
        await self._queue.put(_Job(kind, payload, fut))
        return await fut

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            n = len(jobs[0].payload)
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while n < self.limits.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                n += len(job.payload)
            for kind in ("score", "compare"):
                group = [j for j in jobs if j.kind == kind]
                if group:
                    await self._run(kind, group)

    async def _run(self, kind: str, group: list[_Job]) -> None:
        fn: Callable[[list[Any]], list[Any]] = self.judge.score_items if kind == "score" else self.judge.compare_items
        flat = [x for j in group for x in j.payload]
        loop = asyncio.get_running_loop()
        try:
            try:
                results = await loop.run_in_executor(self._executor, fn, flat)
            except Exception as e:  # noqa: BLE001 - isolate the request that broke the batch
                if len(group) == 1:
                    self.stats["errors"] += 1
                    log.error("judge failed on a %s request: %s: %s", kind, type(e).__name__, str(e)[:200])
                    _settle(group[0], exc=ApiError(500, "judge_failed", f"{type(e).__name__}: {str(e)[:200]}"))
                    return
                for j in group:
                    self.pending += len(j.payload)
                    await self._run(kind, [j])
                return
            self.stats["batches"] += 1
            self.stats["items"] += len(flat)
            self.stats["max_batch_items"] = max(self.stats["max_batch_items"], len(flat))
            k = 0
            for j in group:
                _settle(j, result=results[k:k + len(j.payload)])
                k += len(j.payload)
        finally:
            self.pending -= len(flat)


def _settle(job: _Job, result: Any = None, exc: BaseException | None = None) -> None:
    if job.future.done():                 # the client went away
        return
    if exc is not None:
        job.future.set_exception(exc)
    else:
        job.future.set_result(result)


# ----------------------------------------------------------------------------- the app

def create_app(judge: Judge, limits: Limits | None = None, token: str | None = None) -> FastAPI:
    """The FastAPI application serving ``judge`` (see the module docstring): the routes of
    :data:`ROUTES`, each a method of :class:`Service`, and one JSON error body for every failure."""
    service = Service(judge, limits or Limits(), token)

    @asynccontextmanager
    async def lifespan(app: Any):  # noqa: ANN202
        await service.batcher.start()
        yield
        await service.batcher.stop()

    app = FastAPI(title=f"btpo judge ({judge.method})", version=__version__, lifespan=lifespan)
    app.state.batcher = service.batcher
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    for method, path, name, body in ROUTES:
        app.add_api_route(path, getattr(service, name), methods=[method],
                          openapi_extra=_schema(body) if body is not None else None)
    return app


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    if e.status >= 500:
        log.warning("%s %s → %d %s", request.method, request.url.path, e.status, e.message)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse({"error": {"type": e.kind, "message": e.message}}, status_code=e.status, headers=headers)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return JSONResponse({"error": {"type": kind, "message": f"{request.method} {request.url.path}: {e.detail}"}},
                        status_code=e.status_code)


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": {"type": "invalid_request", "message": str(e.errors()[:1])[:300]}},
                        status_code=422)


async def drain(request: Request) -> None:
    """Read and drop the body (up to a cap): a refused request's unread body would reset the connection
    before the client reads the refusal."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > DRAIN_CAP:
            break


async def read_json(request: Request, max_body_bytes: int) -> Any:
    """The request's JSON body; 413 over ``max_body_bytes`` (drained up to a cap, not kept, so that the
    client reads the 413 instead of a reset), 400 for an empty, non-UTF-8 or invalid body."""
    cl = request.headers.get("content-length")
    if cl is not None and not cl.isdigit():
        raise ApiError(400, "bad_request", "invalid Content-Length")
    body = bytearray()
    seen = 0
    too_large = cl is not None and int(cl) > max_body_bytes
    async for chunk in request.stream():
        seen += len(chunk)
        too_large = too_large or seen > max_body_bytes
        if too_large:
            body.clear()
            if seen > DRAIN_CAP:
                break
        else:
            body += chunk
    if too_large:
        raise ApiError(413, "too_large", f"body is over the limit of {max_body_bytes} bytes")
    if not body.strip():
        raise ApiError(400, "bad_json", "empty body: send a JSON object")
    try:
        return json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, "bad_json", f"body is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, "bad_json", f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "JSON nested too deeply") from None


def validate(model: type[BaseModel], obj: Any) -> Any:
    """``obj`` as a ``model`` request; 422 naming the field."""
    if not isinstance(obj, dict):
        raise ApiError(422, "invalid_request", f"body: expected a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise ApiError(422, "invalid_request", _validation_message(e)) from None


def parse(model: type[BaseModel], obj: Any) -> Any:
    """A request with one ``prompt`` (score, compare): validated, its prompt made the judge's."""
    req = validate(model, obj)
    try:
        req.prompt = to_prompt([m.model_dump() for m in req.prompt] if isinstance(req.prompt, list) else req.prompt)
    except ValueError as e:
        raise ApiError(422, "invalid_request", str(e)) from None
    return req


ROUTES: tuple[tuple[str, str, str, type[BaseModel] | None], ...] = (
    ("GET", "/health", "health", None),
    ("POST", "/v1/score", "score", ScoreRequest),
    ("POST", "/v1/rewards", "rewards_batch", RewardsRequest),
    ("POST", "/get_reward", "get_reward", OpenRLHFRequest),
    ("POST", "/v1/compare", "compare", CompareRequest),
)
"""(HTTP method, path, :class:`Service` method, documented request body) of every endpoint."""


@dataclass
class Service:
    """The endpoints of one judge: each route a method (:data:`ROUTES`), behind one :class:`Batcher`."""

    judge: Judge
    limits: Limits
    token: str | None = None
    batcher: Batcher = field(init=False)

    def __post_init__(self) -> None:
        self.batcher = Batcher(self.judge, self.limits)

    async def authorize(self, request: Request) -> None:
        if not self.token:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            await drain(request)
            raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer …)")

    async def body(self, request: Request) -> Any:
        """The authorized request's JSON body."""
        await self.authorize(request)
        return await read_json(request, self.limits.max_body_bytes)

    async def health(self) -> dict[str, Any]:
        judge, batcher = self.judge, self.batcher
        return {"status": "ok", "method": judge.method, "protocol": judge.protocol, "aspect": judge.aspect,
                "base_model": judge.meta.get("base_model"),
                "stats": {**batcher.stats, "forward_calls": judge.forward_calls, "pending": batcher.pending}}

    async def score(self, request: Request) -> dict[str, Any]:
        req = parse(ScoreRequest, await self.body(request))
        if (req.response is None) == (req.responses is None):
            raise ApiError(422, "invalid_request", "give exactly one of 'response' (a string) or 'responses' (a list)")
        texts = [req.response] if req.response is not None else req.responses
        if not texts:
            raise ApiError(422, "invalid_request", "responses: empty list")
        if len(texts) > self.limits.max_items:
            raise ApiError(413, "too_many_items",
                           f"responses: {len(texts)} items, over the limit of {self.limits.max_items}")
        if self.judge.protocol == "pairwise":
            raise ApiError(400, "pairwise_judge", f"{self.judge.method} is a pairwise judge: use POST /v1/compare")
        items = [self.judge.item(req.prompt, t, req.aspect) for t in texts]
        ranked = self.judge.rank_scores(await self.batcher.submit("score", items))
        out: dict[str, Any] = {"scores": ranked.scores, "errors": ranked.errors, "best": ranked.best}
        if req.thoughts:
            out["thoughts"] = ranked.thoughts
        return out

    async def compare(self, request: Request) -> dict[str, Any]:
        req = parse(CompareRequest, await self.body(request))
        pair = (self.judge.item(req.prompt, req.a, req.aspect), self.judge.item(req.prompt, req.b, req.aspect))
        (comp,) = await self.batcher.submit("compare", [pair])
        return comp.to_json(thoughts=req.thoughts)

    async def rewards_batch(self, request: Request) -> dict[str, Any]:
        req = validate(RewardsRequest, await self.body(request))
        items = []
        for k, it in enumerate(req.items):
            try:
                items.append(self.judge.item([m.model_dump() for m in it.prompt] if isinstance(it.prompt, list)
                                             else it.prompt, it.response, it.aspect))
            except ValueError as e:
                raise ApiError(422, "invalid_request", f"items.{k}.{e}") from None
        got, errors = await self.rewards(items)
        return {"rewards": got, "errors": errors}

    async def get_reward(self, request: Request) -> dict[str, Any]:
        req = validate(OpenRLHFRequest, await self.body(request))
        if req.prompts is not None and len(req.prompts) != len(req.query):
            raise ApiError(422, "invalid_request", f"prompts: {len(req.prompts)} for {len(req.query)} queries")
        items: list[Any] = []
        for k, q in enumerate(req.query):
            got = split_query(q, req.prompts[k] if req.prompts else None)
            if isinstance(got, str):
                self.batcher.stats["unsplittable"] = self.batcher.stats.get("unsplittable", 0) + 1
                items.append(None)
                continue
            try:
                items.append(self.judge.item(got[0], got[1]))
            except ValueError:
                items.append(None)
        got_rewards, errors = await self.rewards(items)
        return {"rewards": got_rewards, "scores": got_rewards,
                "extra_logs": {"btpo_error": [float(e is not None) for e in errors]}, "errors": errors}

    async def rewards(self, items: list[Any]) -> tuple[list[float], list[str | None]]:
        """Rewards of prepared items (None: could not be made) → (rewards, errors)."""
        live = [i for i, it in enumerate(items) if it is not None]
        rewards, errors = [0.0] * len(items), ["unsplittable" if it is None else None for it in items]
        if len(live) > self.limits.max_queue:
            raise ApiError(413, "too_many_items", f"{len(live)} items, over the limit of {self.limits.max_queue}")
        if self.judge.protocol == "pointwise":
            got = await self.batcher.submit("score", [items[i] for i in live]) if live else []
            for i, s in zip(live, got, strict=True):
                rewards[i] = 0.0 if s.score is None else float(s.score)
                errors[i] = s.error
            return rewards, errors
        await self._pairwise_rewards(items, live, rewards, errors)
        return rewards, errors

    async def _pairwise_rewards(self, items: list[Any], live: list[int], rewards: list[float],
                                errors: list[str | None]) -> None:
        """A pairwise judge's reward: the mean win probability among the responses of the same prompt
        (and aspect) in the request; a prompt with one response gets the error ``alone``."""
        groups: dict[str, list[int]] = {}
        for i in live:
            groups.setdefault(json.dumps([items[i].prompt, items[i].aspect], ensure_ascii=False), []).append(i)
        for idx in groups.values():
            if len(idx) < 2:
                errors[idx[0]] = "alone"
                continue
            pairs = [(a, b) for x, a in enumerate(idx) for b in idx[x + 1:]]
            comps = await self.batcher.submit("compare", [(items[a], items[b]) for a, b in pairs])
            wins = dict.fromkeys(idx, 0.0)
            for (a, b), c in zip(pairs, comps, strict=True):
                p = 0.5 if c.prob_a is None else c.prob_a
                wins[a] += p
                wins[b] += 1 - p
            for i in idx:
                rewards[i] = wins[i] / (len(idx) - 1)


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """Document a request body that the endpoint parses itself (for exact limits and error messages)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port); connections wait in its backlog
    until the server accepts them, so the port can be announced before the app has started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(judge: Judge, sock: socket.socket, limits: Limits, token: str | None, access_log: bool) -> None:
    """Serve until SIGINT / SIGTERM on an already bound socket."""
    import uvicorn  # optional extra: imported on use

    config = uvicorn.Config(create_app(judge, limits, token), log_config=None, access_log=access_log,
                            lifespan="on", timeout_graceful_shutdown=5)
    _server_log("uvicorn.error")          # start-up and shutdown lines: what an operator watches for
    if access_log:
        _server_log("uvicorn.access")
    uvicorn.Server(config).run(sockets=[sock])


def _server_log(name: str) -> None:
    """uvicorn's own lines on stderr at INFO, whatever the third-party quieting did to the root logger."""
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler()          # stderr
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
