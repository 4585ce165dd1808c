"""llama-server's slot endpoints: ``GET /slots`` and ``POST /slots/{id}?action=save|restore|erase``.

A slot is a sequence of the generation core (``n_parallel`` of them). Save writes the tokens a slot
holds and their KV memory to a file in the configured directory (``--slot-save-path``); restore loads
one back, so that a prompt starting with those tokens evaluates only the rest; erase forgets what the
slot holds. An action on a slot a generation is using waits until it is free, as llama-server's does.
File names are plain names inside that directory: a path, ``..``, or a name that resolves outside it
is refused.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from .. import _core
from ..cache import LlamaState
from ..llama import Llama
from . import params
from .app import JSONBody, _disconnected_response, _json_body, _while_connected, translate
from .params import APIError

__all__ = ["add_slot_routes", "check_filename"]

POLL_S = 0.01  # how often an action waiting for its slot looks again
_FORBIDDEN = set('/\\:*?"<>|')


def check_filename(directory: Path, value: Any) -> Path:
    """The path of file ``name`` in ``directory``; 400 for anything but a plain file name in it."""
    name: str = params.string("filename", value)
    raw = name.encode("utf-8", "surrogatepass")
    if not name or len(raw) > 255:
        raise params.invalid("filename", "must be 1 to 255 bytes long")
    if name in (".", "..") or name != name.strip() or name.endswith("."):
        raise params.invalid("filename", "is not a valid file name")
    if any(c in _FORBIDDEN or ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise params.invalid("filename", "must be a plain file name (no path, no control characters)")
    path = directory / name
    if path.resolve().parent != directory.resolve():  # a link that leads elsewhere
        raise params.invalid("filename", "leads outside the slot directory")
    return path


def add_slot_routes(app: FastAPI, llm: Llama, save_path: str | os.PathLike[str] | None) -> None:
    directory = None if save_path is None else Path(save_path).expanduser()
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    engine = llm._engine

    @app.get("/slots")
    async def list_slots() -> Response:
        def read() -> list[dict[str, Any]]:
            return [
                {
                    "id": i,
                    "n_ctx": int(engine.n_ctx_seq),
                    "is_processing": bool(engine.busy(i)),
                    "n_tokens": len(engine.tokens(i)),
                }
                for i in range(llm.n_parallel)
            ]

        return JSONBody(await asyncio.to_thread(read))

    @app.post("/slots/{id_slot}")
    async def slot_action(id_slot: str, request: Request) -> Response:
        if directory is None:
            raise APIError(
                501,
                "this server does not save or restore slots: start it with --slot-save-path DIR",
                type="not_supported_error",
                code="not_supported",
            )
        try:
            slot = int(id_slot)
        except ValueError:
            raise params.invalid("id_slot", "must be an integer") from None
        if not 0 <= slot < llm.n_parallel:
            raise params.invalid("id_slot", f"must be from 0 to {llm.n_parallel - 1}")
        action = request.query_params.get("action")
        if action not in ("save", "restore", "erase"):
            raise params.invalid("action", "must be save, restore or erase")
        path = None
        if action != "erase":
            body = await _json_body(request)
            if body.get("filename") is None:
                raise params.invalid("filename", "is required", "missing_required_parameter")
            path = check_filename(directory, body["filename"])

        def act() -> dict[str, Any] | None:
            """The action's result, or None while a generation uses the slot."""
            start = time.perf_counter()
            if action == "save":
                assert path is not None
                taken = engine.snapshot(slot)
                if taken is None:
                    return None
                state = llm._state_of(taken)
                state.save(path)
                ms = (time.perf_counter() - start) * 1000
                return {
                    "id_slot": slot,
                    "filename": path.name,
                    "n_saved": state.n_tokens,
                    "n_written": path.stat().st_size,
                    "timings": {"save_ms": ms},
                }
            if engine.busy(slot):
                return None
            if action == "erase":
                n = len(engine.tokens(slot))
                try:
                    engine.reset(slot)
                except _core.LlamaError:
                    return None  # taken in between
                return {"id_slot": slot, "n_erased": n}
            assert path is not None
            try:
                state = LlamaState.load(path)
            except FileNotFoundError:
                raise APIError(
                    404, f"there is no slot file {path.name!r}", param="filename", code="not_found"
                ) from None
            except ValueError as e:
                raise params.invalid("filename", f"is not a slot file of pyllama ({e})") from None
            try:
                llm.load_state(state, slot=slot)
            except _core.LlamaError:
                if engine.busy(slot):
                    return None
                raise
            except ValueError as e:  # another model or context settings, or a damaged state
                raise params.invalid("filename", str(e)) from None
            ms = (time.perf_counter() - start) * 1000
            return {
                "id_slot": slot,
                "filename": path.name,
                "n_restored": state.n_tokens,
                "n_read": path.stat().st_size,
                "timings": {"restore_ms": ms},
            }

        async def until_done() -> dict[str, Any]:
            while True:
                result = await asyncio.to_thread(act)
                if result is not None:
                    return result
                await asyncio.sleep(POLL_S)

        task = await _while_connected(request, until_done())
        if task is None:
            return _disconnected_response()
        error = task.exception()
        if isinstance(error, OSError):
            raise APIError(500, f"the slot file could not be written or read: {error.strerror}", type="server_error")
        if error is not None:
            raise translate(error, ("id_slot", "filename"))
        return JSONBody(task.result())
