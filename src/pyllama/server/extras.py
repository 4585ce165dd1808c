"""llama-server's own endpoints beyond OpenAI's: reranking (``POST /v1/rerank``, ``/rerank``,
``/v1/reranking``, ``/reranking``), the server's properties (``GET /props``), the tokens of a chat
request (``POST /v1/chat/completions/input_tokens``) and ``GET /metrics``.

Where llama-server has to be started with an option for an endpoint (``--reranking``, ``--metrics``,
``--props``), a server without it answers 501 ``not_supported_error``, as llama-server does.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from .. import _core
from ..errors import RequestTooComplexError
from ..llama import Llama
from . import params
from .anthropic import prompt_tokens
from .app import JSONBody, _disconnected_response, _json_body, _piece, _Server, translate
from .params import APIError

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["add_extra_routes", "ranks"]

RANK = "4"  # LLAMA_POOLING_TYPE_RANK, as a GGUF's {arch}.pooling_type holds it
DEFAULT_SEED = 0xFFFFFFFF  # llama-server's LLAMA_DEFAULT_SEED: a random seed for each request
RERANK_PATHS = ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking")


def not_supported(message: str) -> APIError:
    return APIError(501, message, type="not_supported_error", code="not_supported")


def ranks(llm: Llama) -> bool:
    """Whether ``llm`` scores pairs (rank pooling): as its embedding context pools where it has one,
    else as it was asked (``pooling_type``), else as the model declares, without making a context."""
    ctx = llm._embed_ctx
    if ctx is not None:
        return ctx.pooling_type == "rank"
    if llm._pooling_type is not None:
        return llm._pooling_type == "rank"
    model = llm.model
    return model.metadata.get(f"{model.architecture}.pooling_type") == RANK


def _token_text(llm: Llama, token: int | None) -> str:
    if token is None:
        return ""
    piece = _piece(llm.model.token_to_piece(token, special=True))
    return piece if isinstance(piece, str) else bytes(piece).decode("utf-8", "replace")


def add_extra_routes(app: FastAPI, server: _Server, metrics: Metrics | None) -> None:
    llm = server.llm

    # --- reranking ---

    async def rerank(request: Request) -> Response:
        if not ranks(llm):
            raise not_supported(
                "this server does not rerank: its model is not a reranker (rank pooling); serve a reranker, "
                "or start the server with --reranking"
            )
        body = await _json_body(request)
        query, documents, top_n, tei, return_text = params.rerank_inputs(body)
        try:
            result = await server.run(
                request,
                [*body, "documents"],  # the library's name for TEI's texts: renamed below
                lambda: asyncio.to_thread(llm.rerank, query, documents, top_n=top_n, model=server.model_id),
            )
        except APIError as e:
            if tei and e.param is not None and e.param.startswith("documents"):
                e.param = "texts" + e.param[len("documents") :]
            raise
        if result is None:
            return _disconnected_response()
        if not tei:
            return JSONBody(result)
        # TEI's shape: the results alone, "score" for "relevance_score", the text when asked for
        scored = []
        for r in result["results"]:
            item = {"index": r["index"], "score": r["relevance_score"]}
            if return_text:
                item["text"] = documents[r["index"]]
            scored.append(item)
        return JSONBody(scored)

    for path in RERANK_PATHS:
        app.add_api_route(path, rerank, methods=["POST"])

    # --- the server's properties ---

    @app.get("/props")
    async def get_props() -> Response:
        model = llm.model
        template = llm.chat_template
        props: dict[str, Any] = {
            "default_generation_settings": {
                "params": {
                    "seed": DEFAULT_SEED if llm._seed is None else llm._seed,
                    "lora": [{"id": a["id"], "scale": a["scale"]} for a in llm.lora_adapters],
                },
                "n_ctx": llm.n_ctx_seq(),
            },
            "total_slots": llm.n_parallel,
            "model_alias": server.model_id,
            "model_path": llm.model_path,
            "modalities": {"vision": llm.supports_vision, "video": False, "audio": llm.supports_audio},
            "endpoint_slots": True,
            "endpoint_props": False,
            "endpoint_metrics": metrics is not None,
            "ui": False,
            "chat_template": template.source,
            "chat_template_caps": template.caps,
            "bos_token": _token_text(llm, model.token_bos),
            "eos_token": _token_text(llm, model.token_eos),
            "build_info": f"pyllama {_core.__version__} (llama.cpp {_core.LLAMA_CPP_COMMIT})",
            "is_sleeping": False,
        }
        tool_use = model.get_chat_template("tool_use")
        own = {(model.get_chat_template() or "").strip(), (tool_use or "").strip()}
        if tool_use and template.source.strip() in own:  # the model's own templates, not one given instead
            props["chat_template_tool_use"] = tool_use
        return JSONBody(props)

    @app.post("/props")
    async def post_props() -> Response:
        raise not_supported("this server does not support changing global properties")

    # --- the tokens of a chat request ---

    @app.post("/v1/chat/completions/input_tokens")
    async def chat_input_tokens(request: Request) -> Response:
        body = await _json_body(request)
        messages, kwargs, _, _ = params.chat_kwargs(body)
        try:
            n = await asyncio.wait_for(asyncio.to_thread(prompt_tokens, llm, messages, kwargs), server.prepare_timeout)
        except asyncio.TimeoutError:
            error = RequestTooComplexError(f"rendering took longer than {server.prepare_timeout:g} s")
            raise translate(error, body) from None
        except Exception as e:
            raise translate(e, body) from e
        return JSONBody({"input_tokens": n, "object": "response.input_tokens"})

    # --- Prometheus ---

    @app.get("/metrics")
    async def get_metrics() -> Response:
        if metrics is None:
            raise not_supported("this server does not export metrics: start it with --metrics")
        from .metrics import CONTENT_TYPE

        text = await asyncio.to_thread(metrics.render, metrics.slot_counts())
        return Response(text, media_type=CONTENT_TYPE)
