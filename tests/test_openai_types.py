"""pyllama.Llama's responses validate against the openai package's own pydantic types.

Validation is strict (no coercion), every key must be a field of the type it sits in (openai's types
accept unknown keys, so they are looked for explicitly), and dumping the validated object gives the
response back unchanged. Documented extras: a ``run_tools=True`` chat adds ``messages`` to the
ChatCompletion; a thinking model's message carries ``reasoning_content``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from openai.types import Completion, CompletionChoice, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageFunctionToolCall
from pydantic import BaseModel, ValidationError

import pyllama

from tiny_models import WEATHER

ASK = [{"role": "user", "content": "Weather in Paris?"}]
DOCUMENTED_EXTRAS = {"messages", "reasoning_content"}


class _StreamedChoice(CompletionChoice):
    # openai types streamed completions as Completion, whose finish_reason is not nullable, while the
    # API (and pyllama) send null until the last chunk: that one field is nullable here.
    finish_reason: Literal["stop", "length", "content_filter"] | None  # type: ignore[assignment]


class _CompletionChunk(Completion):
    choices: list[_StreamedChoice]  # type: ignore[assignment]


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path: Path) -> Any:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1, seed=3) as llm:
        yield llm


@pytest.fixture(scope="module")
def tool_reply(llm: Any) -> dict[str, Any]:
    out: dict[str, Any] = llm.chat(
        ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=80, seed=4
    )
    return out


def _extras(obj: Any, path: str = "") -> list[str]:
    """The keys that matched no field, anywhere in a validated object."""
    out: list[str] = []
    if isinstance(obj, BaseModel):
        out += [f"{path}.{k}" for k in obj.model_extra or {}]
        for name in type(obj).model_fields:
            out += _extras(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            out += _extras(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out += _extras(v, f"{path}.{k}")
    return out


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    obj = model.model_validate(data, strict=True)
    assert set(data) <= set(model.model_fields), set(data) - set(model.model_fields)
    assert _extras(obj) == []
    assert obj.model_dump(exclude_unset=True) == data  # nothing was coerced or lost
    return obj


def _usage_ok(usage: Any) -> None:
    assert isinstance(usage.prompt_tokens, int) and usage.prompt_tokens > 0
    assert isinstance(usage.completion_tokens, int) and usage.completion_tokens >= 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None and isinstance(usage.prompt_tokens_details.cached_tokens, int)


def _chat_ok(out: dict[str, Any], llm: Any) -> Any:
    m = validate(ChatCompletion, out)
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert m.object == "chat.completion" and m.id.startswith("chatcmpl-") and m.model == llm.model_name
    assert abs(m.created - time.time()) < 600
    assert len(m.choices) == 1 and m.choices[0].index == 0 and m.choices[0].message.role == "assistant"
    _usage_ok(m.usage)
    return m


def test_plain_chat(llm: Any) -> None:
    m = _chat_ok(llm.chat(ASK, max_tokens=8, seed=1), llm)
    choice = m.choices[0]
    assert choice.finish_reason in {"stop", "length"}
    assert isinstance(choice.message.content, str) and choice.message.tool_calls is None
    assert choice.logprobs is None


def test_chat_with_a_tool_call(llm: Any, tool_reply: dict[str, Any]) -> None:
    m = _chat_ok(copy.deepcopy(tool_reply), llm)
    choice = m.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None or isinstance(choice.message.content, str)
    call = choice.message.tool_calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.type == "function" and isinstance(call.id, str) and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


def test_chat_with_logprobs(llm: Any) -> None:
    m = _chat_ok(llm.chat(ASK, max_tokens=6, seed=2, logprobs=True, top_logprobs=3), llm)
    content = m.choices[0].logprobs.content
    assert len(content) == m.usage.completion_tokens > 0
    for entry in content:
        assert isinstance(entry.token, str) and entry.logprob <= 0
        assert isinstance(entry.bytes, list) and all(isinstance(b, int) for b in entry.bytes)
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6


def _chunks_ok(chunks: list[dict[str, Any]], llm: Any) -> list[Any]:
    models = [validate(ChatCompletionChunk, c) for c in chunks]
    assert all(m.object == "chat.completion.chunk" and m.id == models[0].id for m in models)
    assert all(m.model == llm.model_name and len(m.choices) == 1 for m in models)
    assert models[0].choices[0].delta.role == "assistant"
    assert all(m.choices[0].finish_reason is None for m in models[:-1])
    assert all(m.usage is None for m in models[:-1])
    _usage_ok(models[-1].usage)  # the usage chunk
    return models


def test_streamed_chat_chunks(llm: Any) -> None:
    models = _chunks_ok(list(llm.chat(ASK, max_tokens=12, seed=3, stream=True)), llm)
    assert models[-1].choices[0].finish_reason in {"stop", "length"}
    assert "".join(m.choices[0].delta.content or "" for m in models)


def test_streamed_tool_call_chunks(llm: Any) -> None:
    chunks = list(
        llm.chat(
            ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=80, seed=4, stream=True
        )
    )
    models = _chunks_ok(chunks, llm)
    assert models[-1].choices[0].finish_reason == "tool_calls"
    pieces = [tc for m in models for tc in m.choices[0].delta.tool_calls or []]
    assert pieces and pieces[0].index == 0 and pieces[0].type == "function" and pieces[0].id
    assert "".join(p.function.name or "" for p in pieces if p.function) == "get_weather"
    args = "".join(p.function.arguments or "" for p in pieces if p.function)
    assert json.loads(args)["city"] in ("Paris", "Rome")


def test_completion_with_logprobs_and_echo(llm: Any) -> None:
    prompt = "Hello world"
    out = llm.complete(prompt, max_tokens=6, seed=1, logprobs=2, echo=True)
    m = validate(Completion, out)
    assert m.object == "text_completion" and m.id.startswith("cmpl-") and m.model == llm.model_name
    choice = m.choices[0]
    assert choice.finish_reason in {"stop", "length"} and choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == m.usage.completion_tokens > 0
    assert lp.text_offset[0] == len(prompt) and prompt + "".join(lp.tokens) == choice.text
    assert all(0 < len(top) <= 2 for top in lp.top_logprobs)
    _usage_ok(m.usage)


def test_streamed_completion_chunks(llm: Any) -> None:
    chunks = list(llm.complete("Once upon a time", max_tokens=10, seed=1, stream=True))
    models = [validate(_CompletionChunk, c) for c in chunks[:-1]]
    last = validate(Completion, chunks[-1])  # the last chunk is a full Completion, with usage
    assert all(m.choices[0].finish_reason is None and m.usage is None for m in models)
    assert all(m.object == "text_completion" and m.id == last.id for m in models)
    assert last.choices[0].finish_reason in {"stop", "length"} and last.choices[0].text == ""
    _usage_ok(last.usage)
    assert last.usage.completion_tokens == 10 or last.choices[0].finish_reason == "stop"


def test_embeddings(llm: Any) -> None:
    out = llm.create_embedding(["hello", "world"])
    m = validate(CreateEmbeddingResponse, out)
    assert m.object == "list" and m.model == llm.model_name
    assert [d.index for d in m.data] == [0, 1] and all(d.object == "embedding" for d in m.data)
    assert all(len(d.embedding) == llm.model.n_embd for d in m.data)
    assert all(type(x) is float for d in m.data for x in d.embedding)
    assert m.usage.prompt_tokens == m.usage.total_tokens > 0


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        _set(["choices", 0, "finish_reason"], "done"),
        _set(["choices", 0, "message", "tool_calls", 0, "type"], "func"),
        _set(["choices", 0, "message", "tool_calls", 0, "function", "arguments"], {"city": "Paris"}),
        _set(["choices", 0, "message", "role"], "user"),
        _set(["object"], "chat.completions"),
        _set(["usage", "total_tokens"], "7"),
        _set(["created"], 1.5),
        _set(["choices", 0, "message", "extra_field"], 1),
        _set(["unknown"], 1),
    ],
)
def test_the_checks_catch_wrong_shapes(tool_reply: dict[str, Any], mutate: Callable[[dict[str, Any]], None]) -> None:
    validate(ChatCompletion, tool_reply)  # as it is, it passes
    bad = copy.deepcopy(tool_reply)
    mutate(bad)
    with pytest.raises((ValidationError, AssertionError)):
        validate(ChatCompletion, bad)
