"""An OpenAI-compatible HTTP server over one ``pyllama.Llama`` (FastAPI + uvicorn), or over several
models that load on demand (llama-server's router mode).

``create_app(llm)`` gives the ASGI app; ``serve(llm, host=..., port=...)`` runs it with uvicorn;
``pyllama serve MODEL`` and ``python -m pyllama.server MODEL`` do both from the command line.
``create_router(models)`` and ``serve_models(models, ...)`` do the same for a list of ``ModelSpec``;
``pyllama serve --models-dir DIR`` or ``--config FILE`` from the command line.
Needs the ``server`` extra: ``pip install 'pyllama[server]'``. See docs/server.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from starlette.types import ASGIApp

from ..llama import Llama
from .app import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_STORED_RESPONSES,
    DEFAULT_PREPARE_TIMEOUT,
    create_app,
)
from .params import APIError
from .router import DEFAULT_MODELS_MAX, ModelSpec, create_router

__all__ = [
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_STORED_RESPONSES",
    "DEFAULT_MODELS_MAX",
    "DEFAULT_PREPARE_TIMEOUT",
    "APIError",
    "ModelSpec",
    "create_app",
    "create_router",
    "serve",
    "serve_models",
]

GRACEFUL_SHUTDOWN_S = 10


def serve(
    llm: Llama,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
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
    log_level: str = "info",
) -> None:
    """Serve ``llm`` until SIGINT or SIGTERM. On shutdown the server stops accepting connections and
    lets the requests in progress finish (cancelling those still running after 10 s)."""
    app = create_app(
        llm,
        api_key=api_key,
        alias=alias,
        max_queue=max_queue,
        max_request_bytes=max_request_bytes,
        prepare_timeout=prepare_timeout,
        slot_save_path=slot_save_path,
        allow_media_urls=allow_media_urls,
        max_stored_responses=max_stored_responses,
        metrics=metrics,
        spm_infill=spm_infill,
    )
    _run(app, host, port, log_level)


def serve_models(
    models: Sequence[ModelSpec],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
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
    log_level: str = "info",
) -> None:
    """Serve several models (``create_router``) until SIGINT or SIGTERM, as ``serve`` serves one;
    the loads and unloads of models are logged at ``log_level``."""
    app = create_router(
        models,
        models_max=models_max,
        autoload=autoload,
        api_key=api_key,
        max_queue=max_queue,
        max_request_bytes=max_request_bytes,
        prepare_timeout=prepare_timeout,
        slot_save_path=slot_save_path,
        allow_media_urls=allow_media_urls,
        max_stored_responses=max_stored_responses,
        metrics=metrics,
    )
    log = logging.getLogger("pyllama.server.models")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_UvicornStyle())
        log.addHandler(handler)
    level = logging.getLevelName(log_level.upper())
    log.setLevel(level if isinstance(level, int) else logging.DEBUG)  # uvicorn's "trace" is below DEBUG
    _run(app, host, port, log_level)


def _run(app: ASGIApp, host: str, port: int, log_level: str) -> None:
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    uvicorn.Server(config).run()


class _UvicornStyle(logging.Formatter):
    """``INFO:     message``, as uvicorn's own lines read."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname + ':':<9} {super().format(record)}"
