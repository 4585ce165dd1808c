"""An OpenAI-compatible HTTP server over one ``pyllama.Llama`` (FastAPI + uvicorn).

``create_app(llm)`` gives the ASGI app; ``serve(llm, host=..., port=...)`` runs it with uvicorn;
``pyllama serve MODEL`` and ``python -m pyllama.server MODEL`` do both from the command line.
Needs the ``server`` extra: ``pip install 'pyllama[server]'``. See docs/server.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..llama import Llama
from .app import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_STORED_RESPONSES,
    DEFAULT_PREPARE_TIMEOUT,
    create_app,
)
from .params import APIError

__all__ = [
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_STORED_RESPONSES",
    "DEFAULT_PREPARE_TIMEOUT",
    "APIError",
    "create_app",
    "serve",
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
    import uvicorn

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
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    uvicorn.Server(config).run()
