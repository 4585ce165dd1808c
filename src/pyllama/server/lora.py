"""llama-server's LoRA endpoints and request field.

``GET /lora-adapters`` lists the adapters the server loaded (``--lora``, ``--lora-scaled``) with their
ids and global scales; ``POST /lora-adapters`` with ``[{"id", "scale"}, ...]`` sets the global scales
of the ids it names (the others keep theirs). A request's ``"lora": [{"id", "scale"}, ...]`` changes
the scales for that request only, the same way; requests with different adapter sets are decoded in
batches of their own.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from ..llama import Llama
from . import params
from .app import JSONBody, _json_body

__all__ = ["add_lora_routes", "request_lora"]


def request_lora(llm: Llama, pairs: list[tuple[int, float]], name: str = "lora") -> list[dict[str, Any]]:
    """The whole adapter set of a request: every loaded adapter at its global scale, but those the
    request names (llama-server's rule); 400 for an id the server has not loaded."""
    adapters = llm.lora_adapters
    scales = {a["id"]: a["scale"] for a in adapters}
    for i, (ident, scale) in enumerate(pairs):
        if ident not in scales:
            last = len(adapters) - 1
            known = f"0 to {last}" if adapters else "none: start the server with --lora"
            raise params.invalid(f"{name}[{i}].id", f"{ident} is not a loaded adapter ({known})")
        scales[ident] = scale
    return [{"id": ident, "scale": scale} for ident, scale in scales.items()]


def add_lora_routes(app: FastAPI, llm: Llama) -> None:
    @app.get("/lora-adapters")
    async def list_adapters() -> Response:
        return JSONBody(llm.lora_adapters)

    @app.post("/lora-adapters")
    async def set_adapters(request: Request) -> Response:
        body = await _json_body(request, array=True)
        lora = request_lora(llm, params.lora("body", body), "body")
        await asyncio.to_thread(llm.set_lora, lora)
        return JSONBody({"success": True})
