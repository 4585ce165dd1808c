"""The FastAPI application: OpenAI's endpoints over one ``pyllama.Llama``, a queue in front of it."""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import _core
from ..errors import (
    CancelledError,
    ContextLengthError,
    GrammarError,
    InvalidRequestError,
    RequestTooComplexError,
    TemplateError,
)
from ..llama import AsyncStream, Llama
from ..streams import PREPARE_DEADLINE, Deadline
from . import params
from .params import APIError

__all__ = [
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_STORED_RESPONSES",
    "DEFAULT_PREPARE_TIMEOUT",
    "create_app",
]

logger = logging.getLogger("pyllama.server")

DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
MIN_TOKENIZE_LIMIT = 65536  # tokens one /tokenize or /detokenize takes at least (else 4x n_ctx_train)
DEFAULT_PREPARE_TIMEOUT = 10.0  # seconds to render, convert schemas, compile grammars, build the sampler
DEFAULT_MAX_STORED_RESPONSES = 1024  # responses /v1/responses keeps for previous_response_id
RETRY_AFTER_S = 1
PUBLIC_PATHS = frozenset({"/health"})  # answered without an API key

T = TypeVar("T")


# --- responses -----------------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class JSONBody(Response):
    """A JSON response (UTF-8, compact)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _dumps(content)


def error_response(error: APIError) -> Response:
    return JSONBody(error.body(), status_code=error.status, headers=error.headers)


def _status_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


# --- the guard: API keys and the request size, before the body is parsed --------------------------


class Guard:
    """ASGI middleware: 401 without a valid key (when keys are set) as ``Authorization: Bearer KEY``
    or ``x-api-key: KEY`` (Anthropic's header), 413 for a body over ``max_bytes`` (from
    Content-Length, or counted as it arrives), before any parsing. ``shaped(path, error)`` gives an
    error in the shape of the API that the path belongs to."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Sequence[str],
        max_bytes: int,
        shaped: Callable[[str, APIError], APIError] | None = None,
    ) -> None:
        self.app = app
        self.keys = [k.encode("utf-8") for k in keys]
        self.max_bytes = max_bytes
        self.shaped = shaped or (lambda _, error: error)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        tokens = [token.strip()] if scheme.lower() == b"bearer" else []
        if b"x-api-key" in headers:
            tokens.append(headers[b"x-api-key"].strip())
        ok = False
        for token in tokens:
            for key in self.keys:
                ok |= hmac.compare_digest(token, key)  # no early exit: every key is compared
        return ok

    def respond(self, path: str, error: APIError) -> Response:
        return error_response(self.shaped(path, error))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path = scope["path"]
        refused = None
        if self.keys and path not in PUBLIC_PATHS and not self._authorized(headers):
            refused = APIError(
                401,
                "invalid or missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        too_large = APIError(
            413,
            f"the request body is larger than {self.max_bytes} bytes",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        length = headers.get(b"content-length")
        if length is not None and refused is None:
            try:
                declared = int(length)
            except ValueError:
                await self.respond(path, APIError(400, "invalid Content-Length header"))(scope, receive, send)
                return
            if declared > self.max_bytes:
                await self.respond(path, too_large)(scope, receive, send)
                return
        # The body is read before any answer, a refusal too (up to the limit): closing the connection
        # with a body unread makes the kernel reset it, and the client can lose the answer.
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.max_bytes:
                await self.respond(path, refused or too_large)(scope, receive, send)
                return
        if refused is not None:
            await self.respond(path, refused)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# --- the queue -----------------------------------------------------------------------------------


class QueueFull(Exception):
    pass


class Slots:
    """At most ``n`` holders at once; the others wait first in, first out, at most ``max_queue`` of
    them (one more raises QueueFull at once)."""

    def __init__(self, n: int, max_queue: int) -> None:
        if n < 1:
            raise ValueError("n_parallel must be >= 1")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.n = n
        self.free = n
        self.max_queue = max_queue
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return sum(1 for w in self.waiters if not w.done())

    async def acquire(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        if self.queued >= self.max_queue:
            raise QueueFull
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over as this request went away: pass it on
            else:
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


# --- helpers -----------------------------------------------------------------------------------


async def _disconnected(receive: Receive) -> None:
    """Returns when the client goes away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _while_connected(request: Request, work: Awaitable[T]) -> asyncio.Future[T] | None:
    """Runs ``work`` until it ends, or until the client goes away (then it is cancelled): the
    finished task, or None."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    return None if task.cancelled() else task


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _json_body(request: Request, *, array: bool = False) -> Any:
    """The request's JSON body: an object (or with ``array``, an array); 400 otherwise."""
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply to be read", code="invalid_json") from None
    if array and not isinstance(body, list):
        raise APIError(400, "the request body must be a JSON array", code="invalid_json")
    if not array and not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


# Error types and what the client gets for them, most derived first: (status, OpenAI type, code).
# The caller's mistakes (InvalidRequestError, which the C++ core raises for bad arguments too, and
# TypeError) are 400 naming the field; anything else is the server's fault: 500, details logged.
_STATUS: tuple[tuple[type[BaseException], int, str, str | None], ...] = (
    (ContextLengthError, 400, "invalid_request_error", "context_length_exceeded"),
    (RequestTooComplexError, 400, "invalid_request_error", "request_too_complex"),
    (TemplateError, 400, "invalid_request_error", "template_error"),
    (GrammarError, 400, "invalid_request_error", "invalid_grammar"),
    (InvalidRequestError, 400, "invalid_request_error", None),
    (TypeError, 400, "invalid_request_error", None),
    (CancelledError, 503, "server_error", "cancelled"),
)


def translate(error: BaseException, fields: Iterable[str]) -> APIError:
    """An exception of pyllama as the client's error, by its type (see ``_STATUS``)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFull):
        return APIError(
            503,
            "the server is busy: every slot is generating and the queue is full; retry later",
            type="server_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    known = set(fields)
    for kind, status, type_, code in _STATUS:
        if not isinstance(error, kind):
            continue
        param = getattr(error, "param", None)
        if param is not None and re.split(r"[.\[]", param, maxsplit=1)[0] not in known:
            param = None  # a name of the Python API that is no field of this request
        if param is None and isinstance(error, (ContextLengthError, TemplateError)):
            param = "messages" if "messages" in known else "prompt" if "prompt" in known else None
        if param is None and isinstance(error, GrammarError):  # e.g. a grammar that rejects every token
            param = next((f for f in ("grammar", "json_schema", "response_format", "tools") if f in known), None)
        return APIError(status, str(error), type=type_, param=param, code=code)
    logger.error("request failed", exc_info=error)
    return APIError(500, "internal error: the server could not complete the request", type="server_error")


class TimedStream(AsyncStream):
    """An AsyncStream that notes when it was first read (``started``), when its first text came
    (``first``), when it ended, and its usage (handed to ``on_usage`` as it comes)."""

    def __init__(self, inner: AsyncStream, on_usage: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__(inner._stream)
        self.on_usage = on_usage
        self.started: float | None = None
        self.first: float | None = None
        self.ended: float | None = None
        self.usage: dict[str, Any] | None = None

    async def __anext__(self) -> dict[str, Any]:
        if self.started is None:
            self.started = time.perf_counter()
        try:
            chunk = await super().__anext__()
        except StopAsyncIteration:
            if self.ended is None:
                self.ended = time.perf_counter()
            raise
        if self.first is None and any(_has_text(c) for c in chunk.get("choices", ())):
            self.first = time.perf_counter()
        usage = chunk.get("usage")
        if usage is not None:
            self.ended = time.perf_counter()
            self.usage = usage
            if self.on_usage is not None:
                self.on_usage(usage)
        return chunk


def _has_text(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls"))
    return bool(choice.get("text"))


class _Server:
    """What the routes share: the Llama, the model's id, the slots and the time limit on preparing."""

    def __init__(self, llm: Llama, model_id: str, slots: Slots, prepare_timeout: float) -> None:
        self.llm = llm
        self.model_id = model_id
        self.slots = slots
        self.prepare_timeout = prepare_timeout
        self.created = int(time.time())
        # the routes of another API whose errors take that API's shape: path -> the error in it
        self.error_shapes: dict[str, Callable[[APIError], APIError]] = {}
        # counts the tokens of every generation (create_app(metrics=True)): usage -> None
        self.on_usage: Callable[[dict[str, Any]], None] | None = None

    async def achat(self, messages: list[Any], **kwargs: Any) -> Any:
        """``llm.achat``, its usage counted (a stream's when its last chunk comes)."""
        return self._observed(await self.llm.achat(messages, **kwargs))

    async def acomplete(self, prompt: Any, **kwargs: Any) -> Any:
        """``llm.acomplete``, its usage counted (a stream's when its last chunk comes)."""
        return self._observed(await self.llm.acomplete(prompt, **kwargs))

    def _observed(self, result: Any) -> Any:
        if self.on_usage is None:
            return result
        if isinstance(result, AsyncStream):
            return TimedStream(result, self.on_usage)
        self.on_usage(result["usage"])
        return result

    def shaped(self, path: str, error: APIError) -> APIError:
        """``error`` in the shape of the API that ``path`` belongs to (OpenAI's unless a route says)."""
        shape = self.error_shapes.get(path)
        return error if shape is None else shape(error)

    def deadline(self) -> None:
        """Bound the preparation of this request (the calls it makes from here inherit the limit)."""
        PREPARE_DEADLINE.set(Deadline(self.prepare_timeout))

    async def stream(self, fields: Iterable[str], call: Awaitable[Any]) -> AsyncStream:
        """The AsyncStream of ``achat``/``acomplete(stream=True)``, prepared off the event loop within the
        time limit: its errors come back as a status before any event. A preparation that overruns is
        answered at once; its thread finishes in the background (the input bounds keep that short)."""
        try:
            chunks = await asyncio.wait_for(call, self.prepare_timeout)
        except asyncio.TimeoutError:
            error = RequestTooComplexError(f"preparing the request took longer than {self.prepare_timeout:g} s")
            raise translate(error, fields) from None
        except Exception as e:
            raise translate(e, fields) from e
        assert isinstance(chunks, AsyncStream)
        return chunks

    async def run(self, request: Request, fields: Iterable[str], work: Callable[[], Awaitable[T]]) -> T | None:
        """``work()`` in a slot (waiting in the queue for one); cancelled, with None returned, when
        the client goes away first."""

        async def job() -> T:
            await self.slots.acquire()
            try:
                return await work()
            finally:
                self.slots.release()

        task = await _while_connected(request, job())
        if task is None:
            return None
        error = task.exception()
        if error is not None:
            raise translate(error, fields) from error
        return task.result()

    def model_card(self) -> dict[str, Any]:
        llm = self.llm
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "pyllama",
            "meta": {
                "n_ctx": llm.n_ctx(),
                "n_ctx_train": int(llm.model.n_ctx_train),
                "n_embd": int(llm.model.n_embd),
                "n_params": int(llm.model.n_params),
                "n_vocab": int(llm.model.n_vocab),
                "size": int(llm.model.size),
                "n_parallel": llm.n_parallel,
            },
            # llama-server's /props shape: what the messages may hold
            "modalities": {"vision": llm.supports_vision, "audio": llm.supports_audio},
            "capabilities": ["completion", "multimodal"] if llm.projector is not None else ["completion"],
        }


class EventStream(Response):
    """A chunk stream as server-sent events (``data: {...}`` then ``data: [DONE]``).

    It waits for a slot before its first byte (a full queue is a 503 then), closes the stream (which
    stops the generation) when the client goes away, and gives the slot back when done.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        server: _Server,
        chunks: AsyncStream,
        *,
        include_usage: bool,
        fields: Iterable[str],
    ) -> None:
        self.server = server
        self.chunks = chunks
        self.include_usage = include_usage
        self.fields = frozenset(fields)
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def events(self, chunk: dict[str, Any]) -> list[bytes]:
        usage = chunk.pop("usage", None)
        chunk["model"] = self.server.model_id
        if self.include_usage:
            chunk["usage"] = None
        out = [b"data: " + _dumps(chunk) + b"\n\n"]
        if usage is not None and self.include_usage:
            out.append(b"data: " + _dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n")
        return out

    def last(self) -> bytes:
        """What ends a stream that went well."""
        return b"data: [DONE]\n\n"

    def client_error(self, error: BaseException) -> APIError:
        """The client's error for an exception of the stream."""
        return translate(error, self.fields)

    def error_event(self, error: APIError) -> bytes:
        """What ends a stream that an error stopped after its status was sent."""
        return b"data: " + _dumps(error.body()) + b"\n\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._serve(scope, receive, send))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()  # the client went away: stop generating for it
            await asyncio.gather(work, watch, return_exceptions=True)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        acquired = False
        try:
            try:
                await self.server.slots.acquire()
                acquired = True
            except QueueFull as e:
                await error_response(self.client_error(e))(scope, receive, send)
                return
            started = False

            async def start() -> None:
                nonlocal started
                if not started:
                    started = True
                    await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

            try:
                async for chunk in self.chunks:
                    for event in self.events(chunk):
                        await start()
                        await send({"type": "http.response.body", "body": event, "more_body": True})
                await start()
                await send({"type": "http.response.body", "body": self.last(), "more_body": False})
            except Exception as e:
                error = self.client_error(e)
                if not started:
                    await error_response(error)(scope, receive, send)
                else:  # the status is sent: the error is the last event, as OpenAI's streams do
                    await send({"type": "http.response.body", "body": self.error_event(error), "more_body": False})
        finally:
            try:
                await self.chunks.aclose()  # the generation stops and the Llama is free again
            finally:
                if acquired:
                    self.server.slots.release()


def _disconnected_response() -> Response:
    return Response(status_code=499)  # nobody reads it: the client went away


# --- the app -------------------------------------------------------------------------------------


def create_app(
    llm: Llama,
    *,
    api_key: str | Sequence[str] | None = None,
    alias: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    prepare_timeout: float = DEFAULT_PREPARE_TIMEOUT,
    slot_save_path: str | os.PathLike[str] | None = None,
    allow_media_urls: bool = False,
    max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES,
    metrics: bool = False,
    spm_infill: bool = False,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app over ``llm`` (which the caller keeps and closes), which also
    speaks Anthropic's Messages API (``/v1/messages``).

    ``api_key``: one key or several; requests must send one as ``Authorization: Bearer KEY`` or
    ``x-api-key: KEY`` (``/health`` excepted). ``alias``: the model id clients see (default: the file's stem).
    At most ``llm.n_parallel`` requests generate at once; up to ``max_queue`` more wait in order,
    and past that the answer is 503 with ``Retry-After``. Bodies over ``max_request_bytes`` are 413.
    Preparing a request (template, schemas, grammar, sampler) happens off the event loop; one that takes
    longer than ``prepare_timeout`` seconds is answered 400 (``request_too_complex``).
    ``slot_save_path``: the directory of ``POST /slots/{id}?action=save|restore`` (else 501).
    Images and audio in messages (a Llama with ``mmproj=``) come as ``data:`` URIs; ``http(s)`` URLs
    are fetched only with ``allow_media_urls``; the server never reads its own files for a client
    (this sets ``llm.media``). ``max_stored_responses``: the responses of ``/v1/responses`` kept in
    memory for ``previous_response_id`` (the least recently used dropped first; 0: none).
    ``metrics``: Prometheus metrics at ``GET /metrics`` (needs ``prometheus-client``: the ``metrics``
    extra), in a registry of this app's own; else that path is 501, as llama-server's without
    ``--metrics``. ``spm_infill``: ``/infill`` puts the suffix before the prefix (llama-server's
    ``--spm-infill``), as some models were trained.
    """
    llm.media = dataclasses.replace(llm.media, files=False, urls=allow_media_urls)
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    if any(not k for k in keys):
        raise ValueError("an API key must not be empty")
    if max_request_bytes < 1:
        raise ValueError("max_request_bytes must be >= 1")
    if not prepare_timeout > 0:
        raise ValueError("prepare_timeout must be > 0")
    if max_stored_responses < 0:
        raise ValueError("max_stored_responses must be >= 0")
    server = _Server(llm, alias or llm.model_name, Slots(llm.n_parallel, max_queue), prepare_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # With n_parallel=1, a stream takes its steps in a worker thread (asyncio.to_thread), and so
        # does every call that is not a stream (engine streams wait on the loop, threadless). The
        # default executor has min(32, CPUs + 4) threads: on a small machine fewer than the slots.
        # One thread per slot, and some more.
        executor = concurrent.futures.ThreadPoolExecutor(llm.n_parallel + 8, thread_name_prefix="pyllama-server")
        asyncio.get_running_loop().set_default_executor(executor)
        yield

    app = FastAPI(
        lifespan=lifespan,
        title="pyllama",
        version=_core.__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.pyllama = server

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(server.shaped(request.url.path, exc))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = APIError(exc.status_code, str(exc.detail), type=_status_type(exc.status_code), code=code)
        return error_response(server.shaped(request.url.path, error))

    async def on_error(request: Request, exc: Exception) -> Response:
        return error_response(server.shaped(request.url.path, translate(exc, ())))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_error)
    app.add_middleware(Guard, keys=keys, max_bytes=max_request_bytes, shaped=server.shaped)
    counting = None
    if metrics:
        try:
            from .metrics import Metrics
        except ModuleNotFoundError as e:
            if e.name != "prometheus_client":
                raise
            raise ModuleNotFoundError(
                "metrics need prometheus-client: pip install 'pyllama[metrics]'", name=e.name
            ) from None
        counting = Metrics(server, app.router.routes)
        server.on_usage = counting.observe_usage
        app.add_middleware(counting.middleware)  # the outermost: the guard's answers are counted too

    def named(result: dict[str, Any]) -> dict[str, Any]:
        result["model"] = server.model_id
        return result

    @app.get("/health")
    async def health() -> Response:
        slots = server.slots
        busy = slots.n - slots.free
        return JSONBody(
            {"status": "ok", "slots_idle": slots.n - busy, "slots_processing": busy, "requests_queued": slots.queued}
        )

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONBody({"object": "list", "data": [server.model_card()]})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Response:
        if model != server.model_id:
            raise APIError(404, f"the model {model!r} does not exist here", param="model", code="model_not_found")
        return JSONBody(server.model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _json_body(request)
        messages, kwargs, stream, include_usage = params.chat_kwargs(body)
        if "lora" in kwargs:
            kwargs["lora"] = request_lora(llm, kwargs["lora"])
        server.deadline()
        if stream:
            chunks = await server.stream(body, server.achat(messages, stream=True, **kwargs))
            return EventStream(server, chunks, include_usage=include_usage, fields=body)
        result = await server.run(request, body, lambda: server.achat(messages, **kwargs))
        return _disconnected_response() if result is None else JSONBody(named(result))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _json_body(request)
        prompt, kwargs, stream, include_usage = params.completion_kwargs(body)
        if "lora" in kwargs:
            kwargs["lora"] = request_lora(llm, kwargs["lora"])
        server.deadline()
        if stream:
            chunks = await server.stream(body, server.acomplete(prompt, stream=True, **kwargs))
            return EventStream(server, chunks, include_usage=include_usage, fields=body)
        result = await server.run(request, body, lambda: server.acomplete(prompt, **kwargs))
        return _disconnected_response() if result is None else JSONBody(named(result))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await _json_body(request)
        texts, encoding, dimensions = params.embedding_inputs(body)
        n_embd = int(llm.model.n_embd)
        if dimensions is not None and dimensions != n_embd:
            raise params.invalid("dimensions", f"this model's embeddings have {n_embd} dimensions", "unsupported_value")
        vectors = await server.run(request, body, lambda: asyncio.to_thread(llm.embed, texts))
        if vectors is None:
            return _disconnected_response()
        n_tokens = sum(len(llm.tokenize(t)) for t in texts)
        data = []
        for i, vector in enumerate(vectors):
            value: Any
            if encoding == "base64":
                value = base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
            else:
                value = [float(x) for x in vector]
            data.append({"object": "embedding", "index": i, "embedding": value})
        usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        return JSONBody({"object": "list", "data": data, "model": server.model_id, "usage": usage})

    # --- llama-server's extras ---

    def token_limit() -> int:
        return max(4 * int(llm.model.n_ctx_train), MIN_TOKENIZE_LIMIT)

    def too_many(n: int, what: str) -> APIError:
        return APIError(
            413,
            f"{what} {n} tokens; one request takes at most {token_limit()}",
            param="content" if what == "the content has" else "tokens",
            code="too_many_tokens",
        )

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await _json_body(request)
        content = params.string("content", body.get("content"))
        add_special = _flag(body, "add_special", False)
        parse_special = _flag(body, "parse_special", True)
        with_pieces = _flag(body, "with_pieces", False)

        def work() -> list[Any] | APIError:
            tokens = llm.tokenize(content, add_special, parse_special)
            if len(tokens) > token_limit():
                return too_many(len(tokens), "the content has")
            if not with_pieces:
                return tokens
            return [{"id": t, "piece": _piece(llm.model.token_to_piece(t, special=True))} for t in tokens]

        result = await server.run(request, body, lambda: asyncio.to_thread(work))
        if result is None:
            return _disconnected_response()
        if isinstance(result, APIError):
            raise result
        return JSONBody({"tokens": result})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = await _json_body(request)
        raw = params.array("tokens", body.get("tokens"))
        if len(raw) > token_limit():
            raise too_many(len(raw), "tokens has")
        tokens = [params.integer(0, params.TOKEN_MAX)(f"tokens[{i}]", t) for i, t in enumerate(raw)]
        special = _flag(body, "special", True)
        content = await server.run(request, body, lambda: asyncio.to_thread(llm.detokenize, tokens, special))
        return _disconnected_response() if content is None else JSONBody({"content": content})

    @app.post("/apply-template")
    async def apply_template(request: Request) -> Response:
        body = await _json_body(request)
        if body.get("messages") is None:
            raise params.invalid("messages", "is required", "missing_required_parameter")
        messages = params.array("messages", body["messages"])
        tools = body.get("tools")
        if tools is not None:
            params.array("tools", tools)
        choice = body.get("tool_choice")
        kwargs: dict[str, Any] = {
            "tools": tools,
            "tool_choice": None if choice is None else params.tool_choice("tool_choice", choice),
            "add_generation_prompt": _flag(body, "add_generation_prompt", True),
        }
        for name, check in (
            ("chat_template_kwargs", params.obj),
            ("enable_thinking", params.boolean),
            ("parallel_tool_calls", params.boolean),
        ):
            if body.get(name) is not None:
                kwargs[name] = check(name, body[name])
        try:
            result = await asyncio.wait_for(
                asyncio.to_thread(llm.chat_template.apply, messages, **kwargs), server.prepare_timeout
            )
        except asyncio.TimeoutError:
            error = RequestTooComplexError(f"rendering took longer than {server.prepare_timeout:g} s")
            raise translate(error, body) from None
        except Exception as e:
            raise translate(e, body) from e
        return JSONBody({"prompt": result.prompt})

    from .lora import add_lora_routes, request_lora  # they use this module's helpers
    from .slots import add_slot_routes

    add_slot_routes(app, llm, slot_save_path)
    add_lora_routes(app, llm)
    from .responses import add_responses_routes  # it uses this module's helpers

    add_responses_routes(app, server, max_stored_responses)
    from .anthropic import add_anthropic_routes  # it uses this module's helpers

    add_anthropic_routes(app, server)
    from .extras import add_extra_routes  # they use this module's helpers
    from .infill import add_infill_route

    add_infill_route(app, server, spm_infill)
    add_extra_routes(app, server, counting)
    return app


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    return default if value is None else params.boolean(name, value)


def _piece(raw: bytes) -> str | list[int]:
    """A token's text, or its bytes where they are not whole UTF-8 (as llama-server answers)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)
