"""Anthropic's Messages API (``POST /v1/messages`` and ``/v1/messages/count_tokens``) over
``Llama.chat``, translated at the server's edge.

A request becomes a chat completion request: ``system`` a leading system message; each turn
(consecutive messages of one role are one turn, as Anthropic combines them) a chat message, its
``tool_result`` blocks tool messages before it, its ``tool_use`` blocks the assistant's tool calls
and its ``thinking`` blocks the assistant's reasoning_content; text blocks are text parts and
base64 images ``image_url`` parts with a ``data:`` URI; ``tools`` function tools, ``tool_choice``
OpenAI's (``any`` is ``required``), ``stop_sequences`` ``stop``, ``thinking`` ``enable_thinking``.

The reply is generated as a chat stream, and one builder turns its chunks into the message's
content blocks (thinking, text, tool_use, in the order they come) and the events of Anthropic's
stream, so that a one-shot message is exactly what its stream adds up to in Anthropic's client.
Which stop sequence ended a reply is read off the text of the tokens the generation core kept. A
``max_tokens`` larger than the context has room for lets the reply run until the context is full
(``stop_reason`` ``model_context_window_exceeded``), as Anthropic's models do.
Errors on these paths are answered in Anthropic's shape: ``{"type": "error", "error": {...}}``.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from .. import _core
from .._core import EngineRequest
from .._openai import response_schema
from .._validate import TOOL_NAME, check_messages, check_tools
from ..errors import ContextLengthError, InvalidRequestError, RequestTooComplexError
from ..llama import AsyncStream, Llama
from ..media import MediaPrompt, has_media, read_media
from . import params
from .app import EventStream, JSONBody, _disconnected_response, _dumps, _json_body, _Server, translate
from .params import APIError, invalid

__all__ = [
    "PATHS",
    "AnthropicError",
    "Builder",
    "add_anthropic_routes",
    "as_anthropic",
    "parse_request",
    "partial_json",
]

Event = dict[str, Any]

PATHS = ("/v1/messages", "/v1/messages/count_tokens")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")  # what Anthropic takes
# Fields that would change the answer in a way this server cannot honour (when not empty): MCP
# servers' tools, which it does not call.
UNSUPPORTED = ("mcp_servers",)
# thinking.type -> enable_thinking (adaptive: the template's default)
THINKING = {"enabled": True, "between_tools": True, "disabled": False, "adaptive": None}
EFFORTS = ("low", "medium", "high", "xhigh", "max")
ERROR_PREFIX = "Error: "  # what a tool_result with is_error: true begins with for the model


# --- errors --------------------------------------------------------------------------------------

# Anthropic's error types by HTTP status (the status itself comes from the server's one table).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",  # the queue is full: retry later
    529: "overloaded_error",
}


class AnthropicError(APIError):
    """An error answered in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``."""

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}


def as_anthropic(error: APIError) -> APIError:
    """The server's error in Anthropic's shape: its status, message and headers, the type by status."""
    if isinstance(error, AnthropicError):
        return error
    kind = ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return AnthropicError(
        error.status, error.message, type=kind, param=error.param, code=error.code, headers=error.headers
    )


# --- the request ---------------------------------------------------------------------------------


@dataclasses.dataclass
class MessagesRequest:
    """A Messages request as a chat completion request."""

    messages: list[dict[str, Any]]
    kwargs: dict[str, Any]  # keywords of Llama.chat
    stream: bool
    max_tokens: int  # as the request asked; 0 for count_tokens
    stop_sequences: list[str]

    @property
    def fields(self) -> list[str]:
        """The chat request's fields (what the server's error translation may name)."""
        return ["messages", *self.kwargs]


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    return False if value is None else params.boolean(name, value)


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Chat content: one text part as a plain string, anything else as the parts."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        text: str = parts[0]["text"]
        return text
    return parts


def _kind(block: dict[str, Any], where: str) -> str:
    return params.string(f"{where}.type", block.get("type"))


def _text(block: dict[str, Any], where: str) -> dict[str, Any]:
    return {"type": "text", "text": params.string(f"{where}.text", block.get("text"))}


def _image(block: dict[str, Any], where: str, llm: Llama) -> dict[str, Any]:
    if not llm.supports_vision:
        raise invalid(where, "this model takes no images (the server needs a projector: --mmproj)", "unsupported_value")
    source = params.obj(f"{where}.source", block.get("source"))
    kind = params.string(f"{where}.source.type", source.get("type"))
    if kind == "base64":
        media_type = params.one_of(*IMAGE_TYPES)(f"{where}.source.media_type", source.get("media_type"))
        data = params.string(f"{where}.source.data", source.get("data"))
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url":
        url = params.string(f"{where}.source.url", source.get("url"))
        if not llm.media.urls:
            raise invalid(
                f"{where}.source",
                "this server does not fetch images from URLs (start it with --allow-media-urls): send base64 data",
                "unsupported_value",
            )
        return {"type": "image_url", "image_url": {"url": url}}
    raise invalid(f"{where}.source.type", f"{kind!r} is not supported: 'base64' and 'url' are", "unsupported_value")


def _system(value: Any) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    parts = []
    for j, block in enumerate(params.array("system", value)):
        where = f"system[{j}]"
        params.obj(where, block)
        if _kind(block, where) != "text":
            raise invalid(f"{where}.type", "system blocks must be text blocks")
        parts.append(_text(block, where))
    return _content(parts)


def _tool_result(block: dict[str, Any], where: str, llm: Llama, tool_ids: set[str]) -> dict[str, Any]:
    tool_use_id = params.string(f"{where}.tool_use_id", block.get("tool_use_id"))
    if tool_use_id not in tool_ids:
        raise invalid(f"{where}.tool_use_id", f"{tool_use_id!r} answers no tool_use block of an earlier assistant turn")
    is_error = block.get("is_error")
    failed = False if is_error is None else params.boolean(f"{where}.is_error", is_error)
    raw = block.get("content")
    content: str | list[dict[str, Any]]
    if raw is None or isinstance(raw, str):
        text = raw or ""
        content = (ERROR_PREFIX + text if text else ERROR_PREFIX.rstrip()) if failed else text
    else:
        parts = []
        for k, item in enumerate(params.array(f"{where}.content", raw)):
            at = f"{where}.content[{k}]"
            params.obj(at, item)
            kind = _kind(item, at)
            if kind == "text":
                parts.append(_text(item, at))
            elif kind == "image":
                parts.append(_image(item, at, llm))
            else:
                raise invalid(f"{at}.type", f"{kind!r} is not supported in a tool result: 'text' and 'image' are")
        if failed:
            parts.insert(0, {"type": "text", "text": ERROR_PREFIX.rstrip()})
        content = _content(parts)
    return {"role": "tool", "tool_call_id": tool_use_id, "content": content}


def _tool_use(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = params.string(f"{where}.id", block.get("id"))
    if not call_id:
        raise invalid(f"{where}.id", "must not be empty")
    name = params.string(f"{where}.name", block.get("name"))
    arguments = params.obj(f"{where}.input", block.get("input"))
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def to_chat(system: Any, messages: list[Any], llm: Llama) -> list[dict[str, Any]]:
    """The chat messages of a Messages request's ``system`` and ``messages``; 400 naming the field."""
    turns: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = []  # role, its blocks and where they are
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        params.obj(at, message)
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise invalid(f"{at}.role", f"{role!r} is not 'user' or 'assistant' (the system prompt is 'system')")
        if message.get("content") is None:
            raise invalid(f"{at}.content", "is required", "missing_required_parameter")
        content = message["content"]
        if isinstance(content, str):
            blocks = [(f"{at}.content", {"type": "text", "text": content})]
        else:
            blocks = []
            for j, block in enumerate(params.array(f"{at}.content", content)):
                blocks.append((f"{at}.content[{j}]", params.obj(f"{at}.content[{j}]", block)))
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)  # consecutive turns of one role are one turn
        else:
            turns.append((role, blocks))

    out: list[dict[str, Any]] = []
    if system is not None:
        out.append({"role": "system", "content": _system(system)})
    tool_ids: set[str] = set()
    for role, blocks in turns:
        parts: list[dict[str, Any]] = []
        if role == "user":
            results = []
            for where, block in blocks:
                kind = _kind(block, where)
                if kind == "text":
                    parts.append(_text(block, where))
                elif kind == "image":
                    parts.append(_image(block, where, llm))
                elif kind == "tool_result":
                    results.append(_tool_result(block, where, llm, tool_ids))
                else:
                    raise invalid(
                        f"{where}.type",
                        f"{kind!r} is not supported in a user turn: 'text', 'image' and 'tool_result' are",
                    )
            out.extend(results)  # the results answer the assistant's calls: they come first
            if parts or not results:
                out.append({"role": "user", "content": _content(parts) if parts else ""})
            continue
        calls: list[dict[str, Any]] = []
        reasoning = ""
        for where, block in blocks:
            kind = _kind(block, where)
            if kind == "text":
                parts.append(_text(block, where))
            elif kind == "tool_use":
                calls.append(_tool_use(block, where))
                tool_ids.add(calls[-1]["id"])
            elif kind == "thinking":
                reasoning += params.string(f"{where}.thinking", block.get("thinking"))
            elif kind == "redacted_thinking":
                params.string(f"{where}.data", block.get("data"))  # encrypted by Anthropic: nothing to read
            else:
                raise invalid(
                    f"{where}.type",
                    f"{kind!r} is not supported in an assistant turn: 'text', 'tool_use' and 'thinking' are",
                )
        assistant: dict[str, Any] = {"role": "assistant", "content": _content(parts) if parts else ""}
        if reasoning:
            assistant["reasoning_content"] = reasoning
        if calls:
            assistant["tool_calls"] = calls
        out.append(assistant)
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    tools = []
    names: set[str] = set()
    for i, tool in enumerate(params.array("tools", value)):
        at = f"tools[{i}]"
        params.obj(at, tool)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise invalid(
                f"{at}.type",
                f"{kind!r} is one of Anthropic's own tools, which this server does not run: "
                "declare a custom tool with an input_schema",
                "unsupported_value",
            )
        name = params.string(f"{at}.name", tool.get("name"))
        if not TOOL_NAME.match(name):
            raise invalid(f"{at}.name", f"{name!r} must be 1-128 of A-Z a-z 0-9 _ . : -")
        if name in names:
            raise invalid(f"{at}.name", f"{name!r} is declared twice")
        names.add(name)
        if tool.get("input_schema") is None:
            raise invalid(f"{at}.input_schema", "is required", "missing_required_parameter")
        function: dict[str, Any] = {"name": name, "parameters": params.obj(f"{at}.input_schema", tool["input_schema"])}
        if tool.get("description") is not None:
            function["description"] = params.string(f"{at}.description", tool["description"])
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any, tools: list[dict[str, Any]], kwargs: dict[str, Any]) -> None:
    choice = params.obj("tool_choice", value)
    kind = params.one_of("auto", "any", "tool", "none")("tool_choice.type", choice.get("type"))
    if kind in ("any", "tool") and not tools:
        raise invalid("tool_choice", f"{kind!r} needs tools", "missing_required_parameter")
    disable = choice.get("disable_parallel_tool_use")
    if disable is not None and tools:
        kwargs["parallel_tool_calls"] = not params.boolean("tool_choice.disable_parallel_tool_use", disable)
    if kind == "tool":
        name = params.string("tool_choice.name", choice.get("name"))
        if name not in [t["function"]["name"] for t in tools]:
            raise invalid("tool_choice.name", f"{name!r} is no tool of this request")
        kwargs["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif tools:
        kwargs["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]


def _output_format(name: str, value: Any) -> dict[str, Any]:
    spec = params.obj(name, value)
    params.one_of("json_schema")(f"{name}.type", spec.get("type"))
    schema = params.obj(f"{name}.schema", spec.get("schema"))
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


def parse_request(body: dict[str, Any], llm: Llama, *, counting: bool = False) -> MessagesRequest:
    """The chat request of a Messages request body (of count_tokens' with ``counting``); 400 naming
    the field for what is wrong."""
    model = body.get("model")
    if model is not None:
        params.string("model", model)
    for name in UNSUPPORTED:
        if body.get(name):
            raise invalid(name, "is not supported by this server", "unsupported_parameter")
    kwargs: dict[str, Any] = {}
    max_tokens = 0
    stream = False
    if not counting:
        if body.get("max_tokens") is None:
            raise invalid("max_tokens", "is required", "missing_required_parameter")
        max_tokens = params.integer(1)("max_tokens", body["max_tokens"])
        kwargs["max_tokens"] = max_tokens
        stream = _flag(body, "stream")
    if body.get("messages") is None:
        raise invalid("messages", "is required", "missing_required_parameter")
    raw = params.array("messages", body["messages"])
    if not raw:
        raise invalid("messages", "must hold at least one message", "empty_array")
    messages = to_chat(body.get("system"), raw, llm)

    for name, check in params.SAMPLING.items():  # temperature, top_p, top_k, and llama-server's extras
        if body.get(name) is not None:
            kwargs[name] = check(name, body[name])
    if body.get("seed") is not None:
        kwargs["seed"] = params.integer(0, params.SEED_MAX)("seed", body["seed"])
    stops: list[str] = []
    if body.get("stop_sequences") is not None:
        stops = params.strings("stop_sequences", body["stop_sequences"])
        for i, stop in enumerate(stops):
            if not stop:
                raise invalid(f"stop_sequences[{i}]", "must not be empty")
        if stops and not counting:
            kwargs["stop"] = stops
    if body.get("metadata") is not None:
        user = params.obj("metadata", body["metadata"]).get("user_id")
        if user is not None:
            params.string("metadata.user_id", user)
    if body.get("tools") is not None:
        tools = _tools(body["tools"])
        if tools:
            kwargs["tools"] = tools
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], kwargs.get("tools", []), kwargs)
    if body.get("thinking") is not None:
        thinking = params.obj("thinking", body["thinking"])
        kind = params.one_of(*THINKING)("thinking.type", thinking.get("type"))
        if kind == "enabled":
            if thinking.get("budget_tokens") is None:
                raise invalid("thinking.budget_tokens", "is required", "missing_required_parameter")
            params.integer(1)("thinking.budget_tokens", thinking["budget_tokens"])
        if THINKING[kind] is not None:
            kwargs["enable_thinking"] = THINKING[kind]
    if body.get("output_config") is not None:
        config = params.obj("output_config", body["output_config"])
        if config.get("effort") is not None:
            params.one_of(*EFFORTS)("output_config.effort", config["effort"])
        if config.get("format") is not None:
            kwargs["response_format"] = _output_format("output_config.format", config["format"])
    if body.get("output_format") is not None:  # the name structured outputs had in beta
        kwargs["response_format"] = _output_format("output_format", body["output_format"])
    if body.get("chat_template_kwargs") is not None:  # llama-server's extra
        kwargs["chat_template_kwargs"] = params.obj("chat_template_kwargs", body["chat_template_kwargs"])

    try:  # the translation makes chat messages and tools: what is still wrong names their field
        check_messages(messages, media=True)
        check_tools(kwargs.get("tools"))
    except InvalidRequestError as e:
        raise APIError(400, str(e), param=e.param) from None
    return MessagesRequest(messages, kwargs, stream, max_tokens, stops)


# --- count_tokens ------------------------------------------------------------------------------


def prompt_tokens(llm: Llama, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> int:
    """The number of tokens of the prompt ``llm.chat(messages, **kwargs)`` evaluates (the template's
    rendering with the tools, media as the projector counts them), without generating."""
    media: list[_core.Media] = []
    if has_media(messages):
        messages, media = read_media(messages, llm.projector, llm.media)
    prefill = messages[-1].get("role") == "assistant"  # continued, as Llama.chat continues it
    template_kwargs = kwargs.get("chat_template_kwargs")
    if kwargs.get("reasoning_effort") is not None:  # as Llama.chat hands it to the template
        template_kwargs = {"reasoning_effort": kwargs["reasoning_effort"], **(template_kwargs or {})}
    result = llm.chat_template.apply(
        messages,
        tools=kwargs.get("tools"),
        tool_choice=kwargs.get("tool_choice"),
        parallel_tool_calls=kwargs.get("parallel_tool_calls"),
        enable_thinking=kwargs.get("enable_thinking"),
        reasoning_format=kwargs.get("reasoning_format") or "auto",
        chat_template_kwargs=template_kwargs,
        json_schema=response_schema(kwargs.get("response_format")),
        continue_final_message=True if prefill else None,
    )
    if not media:
        return len(result.prompt_tokens)
    assert llm.projector is not None
    chunks = llm.projector.tokenize(result.prompt, media, add_special=not llm._writes_bos(result))
    return len(MediaPrompt(chunks))


# --- the reply ---------------------------------------------------------------------------------

_WS = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("+-0123456789.eE")
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}
_CUT = object()  # a value the text ends in the middle of


class _PartialReader:
    """A JSON text that may end anywhere, read as far as it goes (see ``partial_json``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def more(self) -> bool:
        """Skips whitespace; whether any text is left."""
        text, n = self.text, len(self.text)
        while self.i < n and text[self.i] in _WS:
            self.i += 1
        return self.i < n

    def value(self) -> tuple[Any, bool]:
        """The value here (``_CUT`` for a scalar the text ends in) and whether it is complete."""
        text, c = self.text, self.text[self.i]
        if c in "{[":
            return self.container("}" if c == "{" else "]")
        if c == '"':
            value = self.string()
            return value, value is not _CUT
        for word, literal in _LITERALS.items():
            if text.startswith(word, self.i):
                self.i += len(word)
                return literal, True
            if word.startswith(text[self.i :]):
                self.i = len(text)
                return _CUT, False
        end = self.i
        while end < len(text) and text[end] in _NUMBER_CHARS:
            end += 1
        run = text[self.i : end]
        if not run:
            raise ValueError(f"unexpected {c!r} at offset {self.i}")
        self.i = end
        if _NUMBER.fullmatch(run):
            return json.loads(run), True
        if end == len(text):
            return _CUT, False
        raise ValueError(f"{run!r} is not a number")

    def string(self) -> Any:
        text, start = self.text, self.i
        end = start + 1
        while True:
            end = text.find('"', end)
            if end < 0:
                self.i = len(text)
                return _CUT
            slashes = 0
            while text[end - 1 - slashes] == "\\":
                slashes += 1
            if slashes % 2 == 0:
                break
            end += 1
        self.i = end + 1
        return json.loads(text[start : end + 1])

    def container(self, close: str) -> tuple[Any, bool]:
        text = self.text
        out: Any = {} if close == "}" else []
        self.i += 1
        first = True
        while True:
            if not self.more():
                return out, False
            if text[self.i] == close:
                self.i += 1
                return out, True
            if not first:
                if text[self.i] != ",":
                    raise ValueError(f"expected ',' at offset {self.i}")
                self.i += 1
                if not self.more():
                    return out, False
            first = False
            key = None
            if close == "}":
                if text[self.i] != '"':
                    raise ValueError(f"expected a key at offset {self.i}")
                key = self.string()
                if key is _CUT or not self.more():
                    return out, False
                if text[self.i] != ":":
                    raise ValueError(f"expected ':' at offset {self.i}")
                self.i += 1
                if not self.more():
                    return out, False
            value, complete = self.value()
            if value is _CUT:
                return out, False
            if close == "}":
                out[key] = value
            else:
                out.append(value)
            if not complete:
                return out, False


def partial_json(text: str) -> Any:
    """What a JSON text that may be cut short holds so far, as Anthropic's client reads a streamed
    tool input (jiter's partial mode): complete values kept; a string, number or literal the text
    ends in, and a key without its value, left out; open objects and arrays closed. ValueError when
    the text is not the beginning of a JSON value."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    reader = _PartialReader(text)
    if not reader.more():
        raise ValueError("no JSON value")
    value, complete = reader.value()
    if value is _CUT:
        raise ValueError("the text ends inside its only value")
    if complete and reader.more():
        raise ValueError(f"extra data at offset {reader.i}")
    return value


def _tool_input(arguments: str) -> Any:
    if not arguments:
        return {}
    try:
        return partial_json(arguments)
    except (ValueError, RecursionError):
        return {}  # not JSON at all: the model wrote no input


class Builder:
    """Chat chunks in; the message's content blocks and the events of Anthropic's stream out.

    Each kind of delta (reasoning, content, a tool call) goes to a content block of its kind, started
    when it first comes and stopped when another block starts or the reply ends: the blocks are in
    the order their text came. The first chunk also gives ``message_start`` (the prompt's usage) and
    a ``ping``; the last one (with the finish reason) stops the open block and gives
    ``message_delta`` (the stop reason and the usage) and ``message_stop``.
    """

    def __init__(
        self,
        model: str,
        *,
        max_tokens: int,
        stops: list[str],
        generation: Callable[[], EngineRequest | None],
    ) -> None:
        self.message: dict[str, Any] = {
            "id": "msg_" + uuid.uuid4().hex,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0},
        }
        self.max_tokens = max_tokens
        self.stops = stops
        self.generation = generation
        self.blocks: list[dict[str, Any]] = self.message["content"]
        self.open: int | None = None  # the index of the block taking deltas
        self.calls: dict[int, int] = {}  # a chat tool call's index -> its block's index
        self.inputs: dict[int, str] = {}  # a tool_use block's index -> its input's JSON text so far
        self.started = False
        self.finished = False

    def _begin(self) -> list[Event]:
        generation = self.generation()
        assert generation is not None, "the first chunk comes after the generation started"
        cached = generation.n_reused
        self.message["usage"] = {
            "input_tokens": generation.n_prompt - cached,
            "cache_read_input_tokens": cached,
            "output_tokens": 0,  # as many as the message holds yet: message_delta gives the total
        }
        return [{"type": "message_start", "message": copy.deepcopy(self.message)}, {"type": "ping"}]

    def _start(self, block: dict[str, Any]) -> list[Event]:
        events = [] if self.open is None else self._stop(self.open)
        self.open = len(self.blocks)
        self.blocks.append(block)
        events.append({"type": "content_block_start", "index": self.open, "content_block": dict(block)})
        return events

    def _stop(self, index: int) -> list[Event]:
        self.open = None
        events: list[Event] = []
        if self.blocks[index]["type"] == "thinking":  # Anthropic signs its thinking; a local model cannot
            delta = {"type": "signature_delta", "signature": self.blocks[index]["signature"]}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
        return events

    def _text(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self.open is None or self.blocks[self.open]["type"] != kind:
            block = (
                {"type": "thinking", "thinking": "", "signature": ""}
                if kind == "thinking"
                else {"type": "text", "text": ""}
            )
            events += self._start(block)
        assert self.open is not None
        self.blocks[self.open][kind] += text
        delta = {"type": f"{kind}_delta", kind: text}
        events.append({"type": "content_block_delta", "index": self.open, "delta": delta})
        return events

    def _call(self, call: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        function = call.get("function") or {}
        index = self.calls.get(call["index"])
        if index is None:
            events += self._start(
                {"type": "tool_use", "id": call.get("id") or "", "name": function.get("name") or "", "input": {}}
            )
            assert self.open is not None
            index = self.calls[call["index"]] = self.open
            self.inputs[index] = ""
        arguments = function.get("arguments") or ""
        if arguments:
            self.inputs[index] += arguments
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        return events

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        """The events of one chat chunk."""
        events: list[Event] = []
        if not self.started:
            self.started = True
            events += self._begin()
        if not chunk.get("choices"):
            return events
        choice = chunk["choices"][0]
        delta = choice.get("delta") or {}
        if delta.get("reasoning_content"):
            events += self._text("thinking", delta["reasoning_content"])
        if delta.get("content"):
            events += self._text("text", delta["content"])
        for call in delta.get("tool_calls") or []:
            events += self._call(call)
        if choice.get("finish_reason") is not None:
            events += self._finish(choice["finish_reason"], chunk["usage"])
        return events

    def _finish(self, reason: str, usage: dict[str, Any]) -> list[Event]:
        events = [] if self.open is None else self._stop(self.open)
        for index, arguments in self.inputs.items():  # as the client reads the deltas it got
            self.blocks[index]["input"] = _tool_input(arguments)
        output = usage["completion_tokens"]
        stop_sequence = None
        if reason == "length":  # max_tokens, or the context is full (a max_tokens larger than it has room for)
            stop_reason = "max_tokens" if output >= self.max_tokens else "model_context_window_exceeded"
        elif reason == "tool_calls":
            stop_reason = "tool_use"
        else:
            generation = self.generation()
            word = None if generation is None else generation.stop_word  # the request's, or the template's
            stop_sequence = word if word in self.stops else None
            stop_reason = "end_turn" if stop_sequence is None else "stop_sequence"
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        self.message["usage"] = {
            "input_tokens": usage["prompt_tokens"] - cached,
            "cache_read_input_tokens": cached,
            "output_tokens": output,
        }
        self.message.update(stop_reason=stop_reason, stop_sequence=stop_sequence)
        self.finished = True
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": dict(self.message["usage"]),
            }
        )
        events.append({"type": "message_stop"})
        return events


def _sse(event: Event) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode("ascii") + b"\ndata: " + _dumps(event) + b"\n\n"


class MessageEvents(EventStream):
    """The chat stream as Anthropic's: named events, no ``[DONE]``; an error after the status is
    sent ends it with an ``error`` event in Anthropic's shape."""

    def __init__(self, server: _Server, chunks: AsyncStream, builder: Builder, fields: list[str]) -> None:
        super().__init__(server, chunks, include_usage=False, fields=fields)
        self.builder = builder

    def events(self, chunk: dict[str, Any]) -> list[bytes]:
        return [_sse(e) for e in self.builder.feed(chunk)]

    def last(self) -> bytes:
        return b""  # message_stop was the last event

    def client_error(self, error: BaseException) -> APIError:
        return as_anthropic(super().client_error(error))

    def error_event(self, error: APIError) -> bytes:
        return _sse(error.body())


# --- the routes --------------------------------------------------------------------------------


async def _chat_stream(server: _Server, request: MessagesRequest) -> AsyncStream:
    try:
        return await server.achat(request.messages, stream=True, **request.kwargs)  # type: ignore[no-any-return]
    except ContextLengthError as e:
        if e.param != "max_tokens":
            raise
    # The prompt and max_tokens exceed the context: as Anthropic's models do, the reply then goes on
    # until the context is full (stop_reason "model_context_window_exceeded").
    return await server.achat(request.messages, stream=True, **{**request.kwargs, "max_tokens": -1})  # type: ignore[no-any-return]


def add_anthropic_routes(app: FastAPI, server: _Server) -> None:
    """``POST /v1/messages`` and ``POST /v1/messages/count_tokens``, their errors in Anthropic's shape."""
    llm = server.llm
    server.error_shapes.update(dict.fromkeys(PATHS, as_anthropic))

    @app.post("/v1/messages")
    async def create_message(request: Request) -> Response:
        body = await _json_body(request)
        chat = parse_request(body, llm)
        server.deadline()
        chunks = await server.stream(chat.fields, _chat_stream(server, chat))
        builder = Builder(
            server.model_id,
            max_tokens=chat.max_tokens,
            stops=chat.stop_sequences,
            generation=lambda: chunks.generation,
        )
        if chat.stream:
            return MessageEvents(server, chunks, builder, chat.fields)

        async def generate() -> dict[str, Any]:
            async for chunk in chunks:
                builder.feed(chunk)
            return builder.message

        try:
            result = await server.run(request, chat.fields, generate)
        finally:
            await chunks.aclose()  # also when the client went away while the request waited for a slot
        return _disconnected_response() if result is None else JSONBody(result)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        body = await _json_body(request)
        chat = parse_request(body, llm, counting=True)
        try:
            n = await asyncio.wait_for(
                asyncio.to_thread(prompt_tokens, llm, chat.messages, chat.kwargs), server.prepare_timeout
            )
        except asyncio.TimeoutError:
            error = RequestTooComplexError(f"rendering took longer than {server.prepare_timeout:g} s")
            raise translate(error, chat.fields) from None
        except Exception as e:
            raise translate(e, chat.fields) from e
        return JSONBody({"input_tokens": n})
