"""llama-server's ``POST /infill``: fill-in-the-middle for code editors (llama.vim, llama.vscode).

The prompt is built as llama-server's format_prompt_infill builds it (``Llama._infill_tokens``, which
``complete(suffix=)`` uses too): the extra chunks of other files, then ``[BOS] PRE prefix prompt SUF
suffix MID`` (``SUF suffix`` first with ``spm_infill``), the prefix and suffix cut to fit a batch.
It is completed through ``Llama.complete``; the answer is llama-server's own completion shape
(``content``, ``stop``, ``tokens_predicted``, ``tokens_evaluated``, ``prompt``, ``timings``...), not
OpenAI's, streamed as ``data: {...}`` events without ``[DONE]``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from ..errors import RequestTooComplexError
from ..llama import AsyncStream
from . import params
from .app import EventStream, JSONBody, TimedStream, _disconnected_response, _dumps, _json_body, _Server, translate
from .lora import request_lora
from .params import APIError

__all__ = ["add_infill_route"]

# The extra context keeps at most n_ctx - n_batch - 2 * n_predict of its tokens (its end), as
# llama-server's; llama-server takes its --n-predict (default -1) for n_predict, pyllama the request's
# n_predict, or that default.
N_PREDICT = -1


def _timings(timed: TimedStream, usage: dict[str, Any]) -> dict[str, Any]:
    """llama-server's ``timings``, measured here: the prompt from the first read of the stream to its
    first text, the generation from there to its end (the first token counts as the prompt's)."""
    cached = int(usage["prompt_tokens_details"]["cached_tokens"])
    prompt_n = int(usage["prompt_tokens"]) - cached
    predicted_n = int(usage["completion_tokens"])
    started = timed.started or 0.0
    ended = timed.ended or started
    first = timed.first or ended
    prompt_ms = (first - started) * 1e3
    predicted_ms = (ended - first) * 1e3
    steps = max(predicted_n - 1, 0)
    out: dict[str, Any] = {
        "cache_n": cached,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n > 0 else 0.0,
        "prompt_per_second": 1e3 / prompt_ms * prompt_n if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / steps if steps > 0 else 0.0,
        "predicted_per_second": 1e3 / predicted_ms * steps if predicted_ms > 0 else 0.0,
    }
    drafts = usage.get("completion_tokens_details") or {}
    accepted = int(drafts.get("accepted_prediction_tokens") or 0)
    drafted = accepted + int(drafts.get("rejected_prediction_tokens") or 0)
    if drafted > 0:
        out["draft_n"] = drafted
        out["draft_n_accepted"] = accepted
    return out


class _Answer:
    """The final object of an infill (the whole text, or with a stream "" after the pieces)."""

    def __init__(self, server: _Server, timed: TimedStream, prompt: str) -> None:
        self.server = server
        self.timed = timed
        self.prompt = prompt

    def final(self, content: str, text: str) -> dict[str, Any]:
        usage = self.timed.usage
        assert usage is not None, "a finished completion stream carries its usage"
        return {
            "index": 0,
            "content": content,
            "stop": True,
            "model": self.server.model_id,
            "tokens_predicted": usage["completion_tokens"],
            "tokens_evaluated": usage["prompt_tokens"],
            "prompt": self.prompt,
            "has_new_line": "\n" in text,
            "truncated": False,  # a prompt that does not fit is refused, never cut
            "timings": _timings(self.timed, usage),
        }


class InfillEvents(EventStream):
    """The completion stream as llama-server's: ``data: {"index", "content", "stop": false}`` per
    piece, then the final object with ``"stop": true``; no ``[DONE]``."""

    def __init__(self, server: _Server, chunks: AsyncStream, answer: _Answer, fields: dict[str, Any]) -> None:
        super().__init__(server, chunks, include_usage=False, fields=fields)
        self.answer = answer
        self.text: list[str] = []

    def events(self, chunk: dict[str, Any]) -> list[bytes]:
        out = []
        for choice in chunk["choices"]:
            if choice["text"]:
                self.text.append(choice["text"])
                out.append(b"data: " + _dumps({"index": 0, "content": choice["text"], "stop": False}) + b"\n\n")
        if chunk.get("usage") is not None:
            out.append(b"data: " + _dumps(self.answer.final("", "".join(self.text))) + b"\n\n")
        return out

    def last(self) -> bytes:
        return b""


def add_infill_route(app: FastAPI, server: _Server, spm: bool) -> None:
    """``POST /infill``; ``spm``: the suffix before the prefix (llama-server's ``--spm-infill``)."""
    llm = server.llm

    @app.post("/infill")
    async def infill(request: Request) -> Response:
        model = llm.model
        fim = {"prefix": model.token_fim_pre, "suffix": model.token_fim_suf, "middle": model.token_fim_mid}
        missing = [name for name, token in fim.items() if token is None]
        if missing:
            raise APIError(
                501,
                f"infill is not supported by this model: its vocabulary has no fill-in-the-middle "
                f"{', '.join(missing)} token",
                type="not_supported_error",
                code="not_supported",
            )
        body = await _json_body(request)
        prefix, suffix, extra, prompt, kwargs, stream = params.infill_request(body)
        if "lora" in kwargs:
            kwargs["lora"] = request_lora(llm, kwargs["lora"])

        def tokens_of(value: str | list[str | int]) -> str | list[int]:
            if isinstance(value, str):
                return value
            out: list[int] = []
            for item in value:
                out += llm.tokenize(item, False, False) if isinstance(item, str) else [item]
            return out

        n_predict = kwargs["max_tokens"] if kwargs["max_tokens"] > 0 else N_PREDICT

        def build() -> tuple[list[int], str]:
            n_batch = int(llm.context.n_batch)
            tokens = llm._infill_tokens(
                tokens_of(prefix),
                tokens_of(suffix),
                extra=extra,
                middle=llm.tokenize(prompt, False, True),
                n_batch=n_batch,
                n_extra=llm.n_ctx_seq() - n_batch - 2 * n_predict,
                spm=spm,
            )
            return tokens, llm.detokenize(tokens, special=True)

        try:
            tokens, prompt_text = await asyncio.wait_for(asyncio.to_thread(build), server.prepare_timeout)
        except asyncio.TimeoutError:
            error = RequestTooComplexError(f"building the prompt took longer than {server.prepare_timeout:g} s")
            raise translate(error, body) from None
        except Exception as e:
            raise translate(e, body) from e
        server.deadline()
        # Llama.complete's names: its prompt is the whole FIM prompt (not the request's "prompt")
        fields = [name for name in body if name != "prompt"] + ["max_tokens"]
        try:
            chunks = await server.stream(fields, server.acomplete(tokens, stream=True, **kwargs))
        except APIError as e:
            if e.param == "max_tokens" and "max_tokens" not in body:
                e.param = "n_predict"  # llama-server's name, which the request used
            raise
        timed = chunks if isinstance(chunks, TimedStream) else TimedStream(chunks)
        answer = _Answer(server, timed, prompt_text)
        if stream:
            return InfillEvents(server, timed, answer, body)

        async def generate() -> dict[str, Any]:
            text = []
            async for chunk in timed:
                text += [c["text"] for c in chunk["choices"]]
            content = "".join(text)
            return answer.final(content, content)

        try:
            result = await server.run(request, body, generate)
        finally:
            await timed.aclose()  # also when the client went away while the request waited for a slot
        return _disconnected_response() if result is None else JSONBody(result)
