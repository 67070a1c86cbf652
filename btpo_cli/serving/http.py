"""``btpo serve``: a trained judge over HTTP (FastAPI + uvicorn, the optional ``serve`` extra).

Endpoints (JSON in, JSON out; ``docs/judge.md`` has examples)::

    POST /v1/score    {"prompt": P, "responses": [str, ...] | "response": str, "aspect"?, "thoughts"?}
                      → {"scores": [...], "errors": [...], "best": i, "thoughts"?: [...]}   (pointwise judges)
    POST /v1/compare  {"prompt": P, "a": str, "b": str, "aspect"?, "thoughts"?}
                      → {"prob_a": p, "verdict": "a" | "b" | "tie" | null, ...}
    GET  /health      → {"status": "ok", "method", "protocol", "stats": {...}}

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
    """The FastAPI application serving ``judge`` (see the module docstring)."""
    limits = limits or Limits()
    batcher = Batcher(judge, limits)

    @asynccontextmanager
    async def lifespan(app: Any):  # noqa: ANN202
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"btpo judge ({judge.method})", version=__version__, lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        if e.status >= 500:
            log.warning("%s %s → %d %s", request.method, request.url.path, e.status, e.message)
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"error": {"type": e.kind, "message": e.message}}, status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse({"error": {"type": kind, "message": f"{request.method} {request.url.path}: {e.detail}"}},
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": {"type": "invalid_request", "message": str(e.errors()[:1])[:300]}},
                            status_code=422)

    async def authorize(request: Request) -> None:
        if not token:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            await drain(request)
            raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer …)")

    async def drain(request: Request) -> None:
        """Read and drop the body (up to a cap): a refused request's unread body would reset the connection
        before the client reads the refusal."""
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DRAIN_CAP:
                break

    async def read_json(request: Request) -> Any:
        cl = request.headers.get("content-length")
        if cl is not None and not cl.isdigit():
            raise ApiError(400, "bad_request", "invalid Content-Length")
        body = bytearray()
        seen = 0
        too_large = cl is not None and int(cl) > limits.max_body_bytes
        async for chunk in request.stream():    # an oversized body is drained (up to a cap), not kept, so
            seen += len(chunk)                   # that the client reads the 413 instead of a reset
            too_large = too_large or seen > limits.max_body_bytes
            if too_large:
                body.clear()
                if seen > DRAIN_CAP:
                    break
            else:
                body += chunk
        if too_large:
            raise ApiError(413, "too_large", f"body is over the limit of {limits.max_body_bytes} bytes")
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

    def parse(model: type[BaseModel], obj: Any) -> Any:
        if not isinstance(obj, dict):
            raise ApiError(422, "invalid_request", f"body: expected a JSON object, got {type(obj).__name__}")
        try:
            req = model.model_validate(obj)
        except ValidationError as e:
            raise ApiError(422, "invalid_request", _validation_message(e)) from None
        try:
            req.prompt = to_prompt([m.model_dump() for m in req.prompt] if isinstance(req.prompt, list) else req.prompt)
        except ValueError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        return req

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "method": judge.method, "protocol": judge.protocol, "aspect": judge.aspect,
                "base_model": judge.meta.get("base_model"),
                "stats": {**batcher.stats, "forward_calls": judge.forward_calls, "pending": batcher.pending}}

    @app.post("/v1/score", openapi_extra=_schema(ScoreRequest))
    async def score(request: Request) -> dict[str, Any]:
        await authorize(request)
        req = parse(ScoreRequest, await read_json(request))
        if (req.response is None) == (req.responses is None):
            raise ApiError(422, "invalid_request", "give exactly one of 'response' (a string) or 'responses' (a list)")
        texts = [req.response] if req.response is not None else req.responses
        if not texts:
            raise ApiError(422, "invalid_request", "responses: empty list")
        if len(texts) > limits.max_items:
            raise ApiError(413, "too_many_items", f"responses: {len(texts)} items, over the limit of {limits.max_items}")
        if judge.protocol == "pairwise":
            raise ApiError(400, "pairwise_judge", f"{judge.method} is a pairwise judge: use POST /v1/compare")
        items = [judge.item(req.prompt, t, req.aspect) for t in texts]
        scores = await batcher.submit("score", items)
        ranked = judge.rank_scores(scores)
        out: dict[str, Any] = {"scores": ranked.scores, "errors": ranked.errors, "best": ranked.best}
        if req.thoughts:
            out["thoughts"] = ranked.thoughts
        return out

    @app.post("/v1/compare", openapi_extra=_schema(CompareRequest))
    async def compare(request: Request) -> dict[str, Any]:
        await authorize(request)
        req = parse(CompareRequest, await read_json(request))
        pair = (judge.item(req.prompt, req.a, req.aspect), judge.item(req.prompt, req.b, req.aspect))
        (comp,) = await batcher.submit("compare", [pair])
        return comp.to_json(thoughts=req.thoughts)

    return app


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
    uvicorn.Server(config).run(sockets=[sock])
