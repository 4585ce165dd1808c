"""Several models behind one server, as llama-server's router mode.

``create_router(models)`` gives an ASGI app over a list of ``ModelSpec``. A request names its model
as llama-server's router reads it: the ``"model"`` field of a JSON body, else the ``?model=`` query
parameter (GET endpoints); an id or one of its aliases. The model is loaded on first use (off the
event loop; requests that come while it loads wait for that one load), and the request goes to an
app of ``create_app`` over that model's ``Llama``: every endpoint works per model as the server of
one model answers it. At most ``models_max`` models are loaded at once: to load another, the least
recently used one that has no request in flight is unloaded; while every loaded model has one, the
request waits (as llama-server's requests queue for a free place), until its client goes away.

The router's own endpoints: ``GET /v1/models`` (and ``/models``): every model with its status
(``unloaded``, ``loading``, ``loaded``; a failed load is ``unloaded`` with ``failed: true``);
``POST /models/load`` and ``POST /models/unload`` with ``{"model": ...}``; ``GET /props`` without a
model (the router's properties); ``GET /health``. API keys and the body size are checked once, here.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import _core
from ..llama import Llama
from . import anthropic
from .app import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_STORED_RESPONSES,
    DEFAULT_PREPARE_TIMEOUT,
    Guard,
    JSONBody,
    _disconnected,
    _json_body,
    _reject_constant,
    _Server,
    _status_type,
    create_app,
    error_response,
    translate,
)
from .params import APIError

__all__ = ["DEFAULT_MODELS_MAX", "ModelSpec", "create_router"]

logger = logging.getLogger("pyllama.server.models")

DEFAULT_MODELS_MAX = 4  # llama-server's --models-max
UNLOADED, LOADING, LOADED, UNLOADING = "unloaded", "loading", "loaded", "unloading"
OWN_PATHS = frozenset({"/health", "/models", "/v1/models", "/models/load", "/models/unload"})
RESPONSE_PATH = re.compile(r"^/v1/responses/[^/]+$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of a router: its ``id`` (what requests name), the GGUF file, other names that pick
    it (``aliases``), the keywords of its ``pyllama.Llama`` (``options``: ``n_ctx``, ``n_parallel``,
    ``mmproj``, ``draft_model``, ``lora``...), ``spm_infill`` for its ``/infill``, whether it loads
    when the server starts (``load_on_startup``) and where it was found (``source``, as
    ``/v1/models`` shows it: ``"models_dir"`` or ``"config"``)."""

    id: str
    path: str | os.PathLike[str]
    aliases: tuple[str, ...] = ()
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    spm_infill: bool = False
    load_on_startup: bool = False
    source: str = "config"


class _Model:
    """A model's state: ``UNLOADED`` -> ``LOADING`` -> ``LOADED`` -> ``UNLOADING`` -> ``UNLOADED``."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.state = UNLOADED
        self.llm: Llama | None = None
        self.app: ASGIApp | None = None
        self.server: _Server | None = None
        self.in_flight = 0  # requests forwarded to its app and not yet answered
        self.last_used = 0.0
        self.error: str | None = None  # why its last load failed
        self.task: asyncio.Task[BaseException | None] | None = None  # the load or the unload under way
        self.modalities = _modalities(spec)

    @property
    def n_parallel(self) -> int:
        value = self.spec.options.get("n_parallel", 1)
        return value if isinstance(value, int) and value > 0 else 1


def _modalities(spec: ModelSpec) -> list[str]:
    """What its messages may hold, read from its projector's file without loading it."""
    mmproj = spec.options.get("mmproj")
    if not mmproj:
        return ["text"]
    try:
        caps = _core.Projector.capabilities(os.fspath(mmproj))
    except Exception:  # the load will say what is wrong with the file
        return ["text"]
    return ["text"] + (["image"] if caps.get("vision") else []) + (["audio"] if caps.get("audio") else [])


def _not_found(name: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist here", param="model", code="model_not_found")


class _Models:
    """The models, their states and the limit on how many are loaded. Everything here runs on the
    event loop; the loads and unloads themselves run in threads."""

    def __init__(
        self, specs: Sequence[ModelSpec], models_max: int, make_app: Callable[[Llama, ModelSpec], ASGIApp]
    ) -> None:
        self.max = models_max
        self.make_app = make_app
        self.all = [_Model(s) for s in specs]
        self.names: dict[str, _Model] = {}
        for m in self.all:
            for name in (m.spec.id, *m.spec.aliases):
                if name in self.names:
                    raise ValueError(f"the model name {name!r} is given twice")
                self.names[name] = m
        self.waiting: collections.Counter[str] = collections.Counter()  # models that wait for room
        self._event: asyncio.Event | None = None

    # --- changes and waiting for them ---

    async def _changed(self) -> None:
        """Returns at the next change of a state or of a count of requests in flight."""
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    def _notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    # --- room under the limit ---

    def _running(self) -> int:
        return sum(1 for m in self.all if m.state != UNLOADED)

    def _victim(self, keep: set[str]) -> _Model | None:
        """The least recently used loaded model without requests in flight, but those in ``keep``."""
        idle = [m for m in self.all if m.state == LOADED and m.in_flight == 0 and m.spec.id not in keep]
        return min(idle, key=lambda m: m.last_used, default=None)

    def _wanted(self) -> set[str]:
        """The models that requests wait to load, that no load has room for yet."""
        return {name for name in self.waiting if self.names[name].state == UNLOADED}

    def _unloading(self) -> int:
        return sum(1 for m in self.all if m.state == UNLOADING)

    def _make_room(self, model: _Model) -> bool:
        """True where ``model`` may load now; else, where no unload already makes the room that the
        waiting models need, the unload of the least recently used idle model begins."""
        if self.max <= 0 or self._running() < self.max:
            return True
        wanted = self._wanted() | {model.spec.id}
        if self._unloading() < len(wanted):
            victim = self._victim(wanted)
            if victim is not None:
                logger.info("models_max (%d) reached: unloading %r, the least recently used", self.max, victim.spec.id)
                self._start_unload(victim)
        return False

    # --- loading ---

    def _start_load(self, model: _Model) -> None:
        model.state = LOADING
        model.error = None
        model.task = asyncio.ensure_future(self._load(model))
        self._notify()

    async def _load(self, model: _Model) -> BaseException | None:
        spec = model.spec
        try:
            llm, app = await asyncio.to_thread(self._open, spec)
        except Exception as e:
            logger.error("model %r failed to load: %s", spec.id, e)
            model.state = UNLOADED
            model.error = str(e) or type(e).__name__
            self._notify()
            return e
        model.llm, model.app = llm, app
        server = getattr(getattr(app, "state", None), "pyllama", None)
        model.server = server if isinstance(server, _Server) else None
        model.state = LOADED
        model.last_used = time.monotonic()
        self._notify()
        return None

    def _open(self, spec: ModelSpec) -> tuple[Llama, ASGIApp]:
        """Load the model and make its app (in a worker thread), logging the progress."""
        logger.info("loading model %r from %s", spec.id, os.fspath(spec.path))
        started = time.perf_counter()
        shown = 0

        def progress(fraction: float) -> bool:
            nonlocal shown
            step = int(fraction * 4) * 25
            if step > shown:
                shown = step
                logger.info("loading model %r: %d%%", spec.id, step)
            return True

        llm = Llama(spec.path, progress=progress, **spec.options)
        try:
            app = self.make_app(llm, spec)
        except BaseException:
            llm.close()
            raise
        logger.info("model %r loaded in %.1f s", spec.id, time.perf_counter() - started)
        return llm, app

    async def _loaded(self, model: _Model) -> None:
        """Wait for the load under way; its failure as the client's error."""
        assert model.task is not None
        error = await asyncio.shield(model.task)
        if error is not None:
            raise APIError(
                500,
                f"the model {model.spec.id!r} failed to load: {model.error}",
                type="server_error",
                code="model_load_failed",
            )

    # --- unloading ---

    def _start_unload(self, model: _Model) -> None:
        model.state = UNLOADING
        model.task = asyncio.ensure_future(self._unload(model))
        self._notify()

    async def _unload(self, model: _Model) -> BaseException | None:
        while model.in_flight:
            await self._changed()
        llm = model.llm
        model.llm = model.app = model.server = None
        if llm is not None:
            logger.info("unloading model %r", model.spec.id)
            try:
                await asyncio.to_thread(llm.close)
            except Exception as e:  # the memory is the engine's to free: nothing the client can do
                logger.error("model %r failed to close: %s", model.spec.id, e)
        model.state = UNLOADED
        self._notify()
        return None

    # --- requests ---

    def take(self, model: _Model, touch: bool) -> ASGIApp:
        """The app of a loaded model, with one more request in flight (``release`` ends it)."""
        assert model.state == LOADED and model.app is not None
        model.in_flight += 1
        if touch:
            model.last_used = time.monotonic()
        return model.app

    async def acquire(self, model: _Model, *, autoload: bool, touch: bool) -> ASGIApp:
        """``take`` once the model is loaded: loading it (after making room) where it is not."""
        waiting = False
        try:
            while True:
                if model.state == LOADED:
                    return self.take(model, touch)
                if model.state == LOADING:
                    await self._loaded(model)
                    continue
                if model.state == UNLOADING:
                    await self._changed()
                    continue
                if not autoload:
                    raise APIError(
                        400,
                        f"the model {model.spec.id!r} is not loaded: POST /models/load loads it",
                        param="model",
                        code="model_not_loaded",
                    )
                if self._make_room(model):
                    self._start_load(model)
                    continue
                if not waiting:
                    waiting = True
                    self.waiting[model.spec.id] += 1
                    logger.info("models_max (%d) reached: a request for %r waits for room", self.max, model.spec.id)
                await self._changed()
        finally:
            if waiting:
                self.waiting[model.spec.id] -= 1
                if self.waiting[model.spec.id] <= 0:
                    del self.waiting[model.spec.id]

    def release(self, model: _Model) -> None:
        model.in_flight -= 1
        if model.in_flight == 0:
            # a model that falls idle while others wait for room goes at once (as llama-server's)
            wanted = self._wanted()
            if (
                wanted
                and model.state == LOADED
                and model.spec.id not in self.waiting
                and 0 < self.max <= self._running()
                and self._unloading() < len(wanted)
            ):
                logger.info("model %r is idle and others wait for room: unloading it", model.spec.id)
                self._start_unload(model)
            self._notify()

    # --- the load and unload endpoints ---

    async def load(self, model: _Model) -> None:
        if model.state in (LOADING, LOADED):
            raise APIError(400, f"the model {model.spec.id!r} is already {model.state}", param="model")
        await self.acquire(model, autoload=True, touch=True)
        self.release(model)

    async def unload(self, model: _Model) -> None:
        if model.state == UNLOADED:
            raise APIError(400, f"the model {model.spec.id!r} is not loaded", param="model", code="model_not_loaded")
        while model.state != UNLOADED:
            if model.state == LOADING:
                with contextlib.suppress(APIError):
                    await self._loaded(model)
            elif model.state == LOADED:
                self._start_unload(model)
            else:
                assert model.task is not None
                await asyncio.shield(model.task)

    async def start(self) -> None:
        for m in self.all:
            if m.spec.load_on_startup and m.state == UNLOADED:
                self._start_load(m)

    async def close(self) -> None:
        """At shutdown: wait for the loads and unloads under way, then free every model (a Llama's
        close waits for a call still using it)."""
        while True:
            tasks = [m.task for m in self.all if m.task is not None and not m.task.done()]
            if not tasks:
                break
            await asyncio.gather(*tasks, return_exceptions=True)
        for m in self.all:
            llm = m.llm
            m.llm = m.app = m.server = None
            m.state = UNLOADED
            if llm is not None:
                await asyncio.to_thread(llm.close)

    # --- what /v1/models shows ---

    def card(self, model: _Model, created: int) -> dict[str, Any]:
        spec = model.spec
        status: dict[str, Any] = {"value": LOADED if model.state == UNLOADING else model.state}
        if model.state == UNLOADED and model.error is not None:
            status["failed"] = True
            status["error"] = model.error
        card: dict[str, Any] = {
            "id": spec.id,
            "aliases": list(spec.aliases),
            "tags": [],
            "object": "model",
            "owned_by": "pyllama",
            "created": created,
            "status": status,
            "architecture": {"input_modalities": model.modalities, "output_modalities": ["text"]},
            "source": spec.source,
            "path": os.fspath(spec.path),
        }
        if model.server is not None:  # what the model's own server says of it, as llama-server merges it
            for key, value in model.server.model_card().items():
                card.setdefault(key, value)
        return card


# --- the router --------------------------------------------------------------------------------------


def _query(scope: Scope) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body, or None where the client went away."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body)


def _shaped(path: str, error: APIError) -> APIError:
    return anthropic.as_anthropic(error) if path in anthropic.PATHS else error


class _Router:
    """Reads the request's model, loads it where needed and hands the request to its app."""

    def __init__(self, models: _Models, own: ASGIApp, autoload: bool) -> None:
        self.models = models
        self.own = own
        self.autoload = autoload

    def _is_own(self, scope: Scope) -> bool:
        path = scope["path"]
        if path in OWN_PATHS or path.startswith("/v1/models/"):
            return True
        # the router's properties, as llama-server's (a server of one model answers for it)
        several = len(self.models.all) > 1
        return path == "/props" and scope["method"] == "GET" and several and not _query(scope).get("model")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_own(scope):
            await self.own(scope, receive, send)
            return
        try:
            await self._forward(scope, receive, send)
        except APIError as e:
            await error_response(_shaped(scope["path"], e))(scope, receive, send)

    def _named(self, scope: Scope, body: bytes) -> str | None:
        """The model the request names: the body's ``"model"``, else ``?model=``."""
        if body.strip():
            try:
                parsed = json.loads(body, parse_constant=_reject_constant)
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                if len(self.models.all) == 1:
                    return None  # the model's own server says what is wrong with it
                raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
            if isinstance(parsed, dict) and parsed.get("model") is not None:
                name = parsed["model"]
                if not isinstance(name, str):
                    raise APIError(400, "model: must be a string", param="model", code="invalid_type")
                return name or None
        values = _query(scope).get("model")
        return values[-1] if values and values[-1] else None

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        name = self._named(scope, body)
        query = _query(scope)
        autoload = query["autoload"][-1] in ("true", "1") if "autoload" in query else self.autoload
        if name is None:
            if len(self.models.all) == 1:
                model = self.models.all[0]
            elif RESPONSE_PATH.match(scope["path"]) and scope["method"] in ("GET", "DELETE"):
                await self._stored_response(scope, body, receive, send)
                return
            else:
                ids = ", ".join(repr(m.spec.id) for m in self.models.all)
                raise APIError(
                    400,
                    f"model name is missing from the request: this server has several models ({ids})",
                    param="model",
                    code="missing_required_parameter",
                )
        else:
            found = self.models.names.get(name)
            if found is None:
                raise _not_found(name)
            model = found
        touch = scope["method"] == "POST"  # a GET (props, slots, metrics) keeps no model in use, as llama-server
        if model.state == LOADED:
            app = self.models.take(model, touch)
        else:
            waited = await self._acquire(model, autoload, touch, receive)
            if waited is None:
                return  # the client went away while the model loaded
            app = waited
        try:
            await app(dict(scope), _replay(body, receive), send)
        finally:
            self.models.release(model)

    async def _acquire(self, model: _Model, autoload: bool, touch: bool, receive: Receive) -> ASGIApp | None:
        """``acquire``, given up (None) when the client goes away first."""
        task = asyncio.ensure_future(self.models.acquire(model, autoload=autoload, touch=touch))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, watch, return_exceptions=True)
        if task.cancelled():
            return None
        return task.result()

    async def _stored_response(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """``GET``/``DELETE /v1/responses/{id}`` without a model: asked of every loaded model, the most
        recently used first; the first answer that is not a 404 is the answer."""
        loaded = sorted((m for m in self.models.all if m.state == LOADED), key=lambda m: -m.last_used)
        last: list[Message] = []
        for model in loaded:
            if model.state != LOADED:  # unloaded while an earlier one answered
                continue
            app = self.models.take(model, False)
            messages: list[Message] = []

            async def keep(message: Message, messages: list[Message] = messages) -> None:
                messages.append(message)

            try:
                await app(dict(scope), _replay(body, receive), keep)
            finally:
                self.models.release(model)
            if messages and messages[0].get("status") != 404:
                for message in messages:
                    await send(message)
                return
            last = messages
        if last:
            for message in last:
                await send(message)
            return
        from .responses import _not_found as response_not_found

        response_id = scope["path"].rsplit("/", 1)[1]
        await error_response(response_not_found(response_id))(scope, receive, send)


# --- the app ---------------------------------------------------------------------------------------


def create_router(
    models: Sequence[ModelSpec],
    *,
    models_max: int = DEFAULT_MODELS_MAX,
    autoload: bool = True,
    api_key: str | Sequence[str] | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    prepare_timeout: float = DEFAULT_PREPARE_TIMEOUT,
    slot_save_path: str | os.PathLike[str] | None = None,
    allow_media_urls: bool = False,
    max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES,
    metrics: bool = False,
) -> ASGIApp:
    """An ASGI app that serves several models, as llama-server's router mode (see the module's doc).

    ``models_max``: the most models loaded at once (0: no limit). ``autoload``: a request for a model
    that is not loaded loads it (else it is a 400 until ``POST /models/load``; a request's
    ``?autoload=true|false`` says otherwise for it). The other keywords are ``create_app``'s, for
    the app of every model. Nothing loads before the app runs (but the models with
    ``load_on_startup``, when it starts); every model is unloaded when it stops.
    """
    if not models:
        raise ValueError("a router needs at least one model")
    if models_max < 0:
        raise ValueError("models_max must be >= 0 (0: no limit)")
    for spec in models:
        if not spec.id or any(not a for a in spec.aliases):
            raise ValueError("a model's id and aliases must not be empty")
        if "progress" in spec.options or "model_path" in spec.options:
            raise ValueError(f"model {spec.id!r}: options must not hold progress or model_path")
    on_startup = [s.id for s in models if s.load_on_startup]
    if 0 < models_max < len(on_startup):
        raise ValueError(f"{len(on_startup)} models load on startup, more than models_max ({models_max})")
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    if any(not k for k in keys):
        raise ValueError("an API key must not be empty")
    if max_request_bytes < 1:
        raise ValueError("max_request_bytes must be >= 1")
    if metrics:  # said now, not at the first load
        try:
            from . import metrics as _metrics  # noqa: F401
        except ModuleNotFoundError as e:
            if e.name != "prometheus_client":
                raise
            raise ModuleNotFoundError(
                "metrics need prometheus-client: pip install 'pyllama[metrics]'", name=e.name
            ) from None

    def make_app(llm: Llama, spec: ModelSpec) -> ASGIApp:
        return create_app(
            llm,
            alias=spec.id,
            max_queue=max_queue,
            max_request_bytes=max_request_bytes,
            prepare_timeout=prepare_timeout,
            slot_save_path=slot_save_path,
            allow_media_urls=allow_media_urls,
            max_stored_responses=max_stored_responses,
            metrics=metrics,
            spm_infill=spec.spm_infill,
        )

    registry = _Models(models, models_max, make_app)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # one thread for each slot of every model (see create_app), some for loads, unloads and the rest
        threads = sum(m.n_parallel for m in registry.all) + len(registry.all) + 8
        executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="pyllama-server")
        asyncio.get_running_loop().set_default_executor(executor)
        await registry.start()
        try:
            yield
        finally:
            await registry.close()

    own = FastAPI(
        lifespan=lifespan,
        title="pyllama",
        version=_core.__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(_shaped(request.url.path, exc))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = APIError(exc.status_code, str(exc.detail), type=_status_type(exc.status_code), code=code)
        return error_response(_shaped(request.url.path, error))

    async def on_error(request: Request, exc: Exception) -> Response:
        return error_response(_shaped(request.url.path, translate(exc, ())))

    own.add_exception_handler(APIError, on_api_error)
    own.add_exception_handler(StarletteHTTPException, on_http_error)
    own.add_exception_handler(Exception, on_error)

    def named(body: dict[str, Any]) -> _Model:
        name = body.get("model")
        if name is None or name == "":
            raise APIError(400, "model: is required", param="model", code="missing_required_parameter")
        if not isinstance(name, str):
            raise APIError(400, "model: must be a string", param="model", code="invalid_type")
        model = registry.names.get(name)
        if model is None:
            raise _not_found(name)
        return model

    @own.get("/health")
    async def health() -> Response:
        loaded = sum(1 for m in registry.all if m.state in (LOADED, UNLOADING))
        return JSONBody({"status": "ok", "models": len(registry.all), "models_loaded": loaded})

    async def list_models() -> Response:
        return JSONBody({"object": "list", "data": [registry.card(m, created) for m in registry.all]})

    own.add_api_route("/v1/models", list_models, methods=["GET"])
    own.add_api_route("/models", list_models, methods=["GET"])

    @own.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Response:
        found = registry.names.get(model)
        if found is None:
            raise _not_found(model)
        return JSONBody(registry.card(found, created))

    @own.post("/models/load")
    async def load_model(request: Request) -> Response:
        model = named(await _json_body(request))
        await registry.load(model)
        return JSONBody({"success": True})

    @own.post("/models/unload")
    async def unload_model(request: Request) -> Response:
        model = named(await _json_body(request))
        await registry.unload(model)
        return JSONBody({"success": True})

    @own.get("/props")
    async def router_props() -> Response:
        return JSONBody(
            {
                "role": "router",
                "max_instances": models_max,
                "models_autoload": autoload,
                "model_alias": "pyllama",
                "model_path": "none",
                "default_generation_settings": {"params": {}, "n_ctx": 0},
                "build_info": f"pyllama {_core.__version__} (llama.cpp {_core.LLAMA_CPP_COMMIT})",
            }
        )

    return Guard(_Router(registry, own, autoload), keys=keys, max_bytes=max_request_bytes, shaped=_shaped)
