"""OpenAI's Responses API (``POST /v1/responses``) over ``Llama.chat``, translated at the server's edge.

A request becomes a chat completion request: ``instructions`` a leading system message, ``input``
items chat messages (consecutive assistant items, that is messages, reasoning and function calls,
one assistant turn), flat function tools OpenAI's chat tools, ``text.format`` a ``response_format``,
``max_output_tokens`` ``max_tokens``. The reply is generated as a chat stream, and one builder turns
its chunks into output items (reasoning, messages, function calls, in the order they come) and the
typed events of a Responses stream, so that a one-shot response is exactly what its stream ends
with. ``previous_response_id`` replays a stored response's conversation (its input and output, not
its instructions) from a bounded in-memory store, the least recently used dropped first.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from .._validate import TOOL_NAME, check_messages, check_tools
from ..errors import InvalidRequestError
from ..llama import AsyncStream
from . import params
from .app import EventStream, JSONBody, _disconnected_response, _dumps, _json_body, _Server
from .params import APIError, invalid

__all__ = ["ResponseStore", "add_responses_routes", "parse_request", "to_chat"]

Item = dict[str, Any]
Event = dict[str, Any]

# Fields of a Responses request that would change the answer in a way this server cannot honour.
UNSUPPORTED = ("background", "conversation", "prompt", "context_management")
TEXT_PARTS = ("input_text", "output_text")
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512


# --- the store ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Stored:
    """A response and the conversation it answered (input items, earlier turns included, without
    instructions): what a request naming it as ``previous_response_id`` continues."""

    response: dict[str, Any]
    conversation: list[Item]


class ResponseStore:
    """At most ``size`` responses, the least recently used (created or read) dropped first."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("max_stored_responses must be >= 0")
        self.size = size
        self._items: collections.OrderedDict[str, Stored] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, stored: Stored) -> None:
        if self.size == 0:
            return
        key = stored.response["id"]
        self._items[key] = stored
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, key: str) -> Stored | None:
        stored = self._items.get(key)
        if stored is not None:
            self._items.move_to_end(key)
        return stored

    def delete(self, key: str) -> bool:
        return self._items.pop(key, None) is not None


# --- the request -------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text(value: Any, where: str) -> str:
    return params.string(where, value)


def _nonempty(value: Any, where: str) -> str:
    text = params.string(where, value)
    if not text:
        raise invalid(where, "must not be empty")
    return text


def _chat_parts(content: Any, where: str, *, kinds: Iterable[str]) -> str | list[dict[str, Any]]:
    """A message's content (a string or Responses content parts) as chat content."""
    if isinstance(content, str):
        return content
    parts = params.array(where, content)
    allowed = tuple(kinds)
    out: list[dict[str, Any]] = []
    for j, raw in enumerate(parts):
        at = f"{where}[{j}]"
        part = params.obj(at, raw)
        kind = part.get("type")
        if kind not in allowed:
            names = ", ".join(repr(k) for k in allowed)
            raise invalid(f"{at}.type", f"{kind!r} is not supported here: {names} are", "unsupported_value")
        if kind in TEXT_PARTS:
            out.append({"type": "text", "text": _text(part.get("text"), f"{at}.text")})
        elif kind == "refusal":
            out.append({"type": "text", "text": _text(part.get("refusal"), f"{at}.refusal")})
        elif kind == "input_image":
            if part.get("file_id") is not None:
                raise invalid(
                    f"{at}.file_id", "files are not supported: send the image as image_url", "unsupported_value"
                )
            url = _text(part.get("image_url"), f"{at}.image_url")
            out.append({"type": "image_url", "image_url": {"url": url}})
        else:  # input_audio
            audio = params.obj(f"{at}.input_audio", part.get("input_audio"))
            data = _text(audio.get("data"), f"{at}.input_audio.data")
            fmt = _text(audio.get("format"), f"{at}.input_audio.format")
            out.append({"type": "input_audio", "input_audio": {"data": data, "format": fmt}})
    return out


def _joined(content: str | list[dict[str, Any]]) -> str:
    """The text of assistant content (its parts are all text)."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content)


def to_chat(items: list[Item], instructions: str | None, sources: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat messages of Responses input items, and for each message the request field it came from.

    ``sources[i]`` names item ``i`` in errors (``input[3]``). Consecutive assistant items (messages,
    reasoning, function calls) make one assistant message: its content and reasoning are their texts
    joined, its tool calls the calls in order. A function call's output is a ``tool`` message.
    """
    messages: list[dict[str, Any]] = []
    origin: list[str] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
        origin.append("instructions")
    turn: dict[str, Any] | None = None  # the assistant message being put together
    call_ids: set[str] = set()

    def assistant(where: str) -> dict[str, Any]:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": None}
            messages.append(turn)
            origin.append(where)
        return turn

    for item, at in zip(items, sources, strict=True):
        params.obj(at, item)
        kind = item.get("type")
        if kind is None and "role" not in item and "id" in item:
            kind = "item_reference"
        if kind in (None, "message"):
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(f"{at}.role", f"{role!r} is not 'user', 'system', 'developer' or 'assistant'")
            if "content" not in item or item["content"] is None:
                raise invalid(f"{at}.content", "is required", "missing_required_parameter")
            if role == "assistant":
                content = _chat_parts(item["content"], f"{at}.content", kinds=(*TEXT_PARTS, "refusal"))
                message = assistant(at)
                message["content"] = (message["content"] or "") + _joined(content)
                continue
            turn = None
            kinds = (*TEXT_PARTS, "input_image", "input_audio")
            messages.append({"role": role, "content": _chat_parts(item["content"], f"{at}.content", kinds=kinds)})
            origin.append(at)
        elif kind == "reasoning":
            texts = [
                _text(params.obj(f"{at}.content[{j}]", p).get("text"), f"{at}.content[{j}].text")
                for j, p in enumerate(params.array(f"{at}.content", item.get("content") or []))
            ]
            if not texts:  # a summary stands for the reasoning where its text is not given
                texts = [
                    _text(params.obj(f"{at}.summary[{j}]", p).get("text"), f"{at}.summary[{j}].text")
                    for j, p in enumerate(params.array(f"{at}.summary", item.get("summary") or []))
                ]
            message = assistant(at)
            message["reasoning_content"] = message.get("reasoning_content", "") + "".join(texts)
        elif kind == "function_call":
            call_id = _nonempty(item.get("call_id"), f"{at}.call_id")
            name = _nonempty(item.get("name"), f"{at}.name")
            arguments = _text(item.get("arguments"), f"{at}.arguments")
            try:
                decoded = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise invalid(f"{at}.arguments", f"is not valid JSON ({e.msg} at character {e.pos})") from None
            if not isinstance(decoded, dict):
                raise invalid(f"{at}.arguments", "must encode a JSON object")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            assistant(at).setdefault("tool_calls", []).append(call)
            call_ids.add(call_id)
        elif kind == "function_call_output":
            call_id = _nonempty(item.get("call_id"), f"{at}.call_id")
            if call_id not in call_ids:
                raise invalid(f"{at}.call_id", f"{call_id!r} answers no function_call before it")
            if "output" not in item or item["output"] is None:
                raise invalid(f"{at}.output", "is required", "missing_required_parameter")
            output = _chat_parts(item["output"], f"{at}.output", kinds=TEXT_PARTS)
            turn = None
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
            origin.append(at)
        else:
            raise invalid(
                f"{at}.type",
                f"{kind!r} is not supported: messages, reasoning, function_call and function_call_output items are",
                "unsupported_value",
            )
    return messages, origin


def _tools(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(the tools as the response echoes them, as chat tools)``."""
    echoed: list[dict[str, Any]] = []
    chat: list[dict[str, Any]] = []
    for i, raw in enumerate(params.array("tools", value)):
        at = f"tools[{i}]"
        tool = params.obj(at, raw)
        if tool.get("type") != "function":
            raise invalid(
                f"{at}.type", f"{tool.get('type')!r} is not supported: only function tools are", "unsupported_value"
            )
        name = _text(tool.get("name"), f"{at}.name")
        if not TOOL_NAME.match(name):
            raise invalid(f"{at}.name", f"{name!r} must be 1-128 of A-Z a-z 0-9 _ . : -")
        function: dict[str, Any] = {"name": name}
        if tool.get("description") is not None:
            function["description"] = _text(tool["description"], f"{at}.description")
        if tool.get("parameters") is not None:
            function["parameters"] = params.obj(f"{at}.parameters", tool["parameters"])
        strict = None if tool.get("strict") is None else params.boolean(f"{at}.strict", tool["strict"])
        if strict is not None:
            function["strict"] = strict
        chat.append({"type": "function", "function": function})
        echoed.append(
            {
                "type": "function",
                "name": name,
                "description": function.get("description"),
                "parameters": function.get("parameters"),
                "strict": strict,
            }
        )
    return echoed, chat


def _tool_choice(value: Any, names: list[str]) -> tuple[str | dict[str, Any], list[str] | None]:
    """``(chat's tool_choice, the names of the tools allowed, or None for all)``."""
    if isinstance(value, str):
        return params.tool_choice("tool_choice", value), None
    choice = params.obj("tool_choice", value)
    kind = choice.get("type")
    if kind == "function":
        name = _text(choice.get("name"), "tool_choice.name")
        if name not in names:
            raise invalid("tool_choice.name", f"{name!r} is not one of the tools")
        return {"type": "function", "function": {"name": name}}, None
    if kind == "allowed_tools":
        mode = params.one_of("auto", "required")("tool_choice.mode", choice.get("mode"))
        allowed = []
        for j, raw in enumerate(params.array("tool_choice.tools", choice.get("tools"))):
            at = f"tool_choice.tools[{j}]"
            ref = params.obj(at, raw)
            if ref.get("type") != "function":
                raise invalid(f"{at}.type", "only function tools are supported", "unsupported_value")
            name = _text(ref.get("name"), f"{at}.name")
            if name not in names:
                raise invalid(f"{at}.name", f"{name!r} is not one of the tools")
            allowed.append(name)
        return mode, allowed
    raise invalid(
        "tool_choice.type", f"{kind!r} is not supported: 'function' and 'allowed_tools' are", "unsupported_value"
    )


def _text_format(value: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(text as the response echoes it, chat's response_format or None)``."""
    text = params.obj("text", value)
    fmt = params.obj("text.format", text.get("format") or {"type": "text"})
    verbosity = text.get("verbosity")
    if verbosity is not None:
        params.one_of("low", "medium", "high")("text.verbosity", verbosity)
    kind = fmt.get("type")
    if kind == "text":
        return {"format": {"type": "text"}, "verbosity": verbosity}, None
    if kind == "json_object":
        return {"format": {"type": "json_object"}, "verbosity": verbosity}, {"type": "json_object"}
    if kind != "json_schema":
        raise invalid("text.format.type", f"{kind!r} is not 'text', 'json_object' or 'json_schema'")
    name = _text(fmt.get("name"), "text.format.name")
    schema = params.obj("text.format.schema", fmt.get("schema"))
    spec: dict[str, Any] = {"name": name, "schema": schema}
    if fmt.get("description") is not None:
        spec["description"] = _text(fmt["description"], "text.format.description")
    if fmt.get("strict") is not None:
        spec["strict"] = params.boolean("text.format.strict", fmt["strict"])
    echoed = {"type": "json_schema", "description": None, "strict": None, **spec}
    return {"format": echoed, "verbosity": verbosity}, {"type": "json_schema", "json_schema": spec}


def _metadata(value: Any) -> dict[str, str]:
    metadata = params.obj("metadata", value)
    if len(metadata) > METADATA_PAIRS:
        raise invalid("metadata", f"has {len(metadata)} keys; at most {METADATA_PAIRS} are allowed")
    for key, text in metadata.items():
        if len(key) > METADATA_KEY:
            raise invalid("metadata", f"the key {key[:16]!r}... is longer than {METADATA_KEY} characters")
        if len(params.string(f"metadata.{key}", text)) > METADATA_VALUE:
            raise invalid(f"metadata.{key}", f"is longer than {METADATA_VALUE} characters")
    return dict(metadata)


@dataclasses.dataclass
class ChatRequest:
    """A Responses request as a chat completion request, and what its response echoes."""

    messages: list[dict[str, Any]]
    kwargs: dict[str, Any]  # keywords of Llama.chat
    stream: bool
    store: bool
    conversation: list[Item]  # the input items, the previous response's turns included
    echo: dict[str, Any]  # the request's fields as the response object carries them
    origin: list[str]  # per chat message, the request field it came from
    tool_index: list[int]  # per chat tool, its index in the request's tools

    @property
    def fields(self) -> list[str]:
        """The chat request's fields (what the server's error translation may name)."""
        return ["messages", *self.kwargs]

    def param(self, name: str | None) -> str | None:
        """The field of the Responses request that chat's field ``name`` stands for."""
        if name is None:
            return None
        match = re.match(r"([A-Za-z_]+)(.*)", name)
        if match is None:
            return name
        root, rest = match.groups()
        if root == "messages":
            index = re.match(r"\[(\d+)\]", rest)
            if index is None or int(index.group(1)) >= len(self.origin):
                return "input"
            return self.origin[int(index.group(1))]
        if root == "tools":
            index = re.match(r"\[(\d+)\](?:\.function)?(.*)", rest)
            if index is None or int(index.group(1)) >= len(self.tool_index):
                return "tools"
            return f"tools[{self.tool_index[int(index.group(1))]}]{index.group(2)}"
        if root in ("response_format", "json_schema"):
            return "text.format" + rest.replace(".json_schema", "", 1)
        return {
            "max_tokens": "max_output_tokens",
            "reasoning_effort": "reasoning.effort",
            "prompt": "input",
        }.get(root, root) + ("" if root in ("max_tokens", "reasoning_effort", "prompt") else rest)

    def renamed(self, error: APIError) -> APIError:
        error.param = self.param(error.param)
        return error


def parse_request(body: dict[str, Any], store: ResponseStore) -> ChatRequest:
    """The chat request of a Responses request body; 400 naming the field for what is wrong."""
    model = body.get("model")
    if model is not None:
        params.string("model", model)
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False):
            raise invalid(name, "is not supported by this server", "unsupported_parameter")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and params.integer(0, 20)("top_logprobs", top_logprobs) > 0:
        raise invalid("top_logprobs", "logprobs are not supported by /v1/responses", "unsupported_value")
    stream = _flag(body, "stream", False)
    keep = _flag(body, "store", True)
    instructions = body.get("instructions")
    if instructions is not None:
        instructions = _text(instructions, "instructions")

    conversation: list[Item] = []
    sources: list[str] = []
    previous_id = body.get("previous_response_id")
    if previous_id is not None:
        previous_id = _text(previous_id, "previous_response_id")
        previous = store.get(previous_id)
        if previous is None:
            raise APIError(
                400,
                f"Previous response with id {previous_id!r} not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        # a function call whose arguments max_output_tokens cut short is no call: it is left out
        output = [item for item in previous.response["output"] if not _cut_call(item)]
        conversation = [*previous.conversation, *output]
        sources = ["previous_response_id"] * len(conversation)
    if "input" not in body or body["input"] is None:
        raise invalid("input", "is required", "missing_required_parameter")
    raw = body["input"]
    new = [{"role": "user", "content": raw}] if isinstance(raw, str) else list(params.array("input", raw))
    if not new and not conversation:
        raise invalid("input", "must hold at least one item", "empty_array")
    conversation += new
    sources += ["input"] if isinstance(raw, str) else [f"input[{i}]" for i in range(len(new))]
    try:
        messages, origin = to_chat(conversation, instructions, sources)
    except APIError as e:  # an item of the stored conversation: the field is previous_response_id
        if e.param is not None and e.param.startswith("previous_response_id"):
            e.param = "previous_response_id"
        raise

    kwargs: dict[str, Any] = {}
    for name, check in params.SAMPLING.items():  # temperature and top_p, and llama-server's extras
        if body.get(name) is not None:
            kwargs[name] = check(name, body[name])
    if body.get("seed") is not None:
        kwargs["seed"] = params.integer(0, params.SEED_MAX)("seed", body["seed"])
    max_output = body.get("max_output_tokens")
    if max_output is not None:
        kwargs["max_tokens"] = params.integer(1)("max_output_tokens", max_output)

    tools_echo: list[dict[str, Any]] = []
    tool_index: list[int] = []
    if body.get("tools") is not None:
        tools_echo, chat_tools = _tools(body["tools"])
        tool_index = list(range(len(chat_tools)))
        if chat_tools:
            kwargs["tools"] = chat_tools
    choice_echo: Any = body.get("tool_choice") if body.get("tool_choice") is not None else "auto"
    if body.get("tool_choice") is not None:
        names = [t["name"] for t in tools_echo]
        choice, allowed = _tool_choice(body["tool_choice"], names)
        if choice == "required" and not names:
            raise invalid("tool_choice", "'required' needs tools", "missing_required_parameter")
        if allowed is not None:
            tool_index = [i for i, name in enumerate(names) if name in allowed]
            kwargs["tools"] = [kwargs["tools"][i] for i in tool_index]
        if "tools" in kwargs:
            kwargs["tool_choice"] = choice
    parallel = _flag(body, "parallel_tool_calls", True)
    if body.get("parallel_tool_calls") is not None and "tools" in kwargs:
        kwargs["parallel_tool_calls"] = parallel

    text_echo: dict[str, Any] = {"format": {"type": "text"}, "verbosity": None}
    if body.get("text") is not None:
        text_echo, response_format = _text_format(body["text"])
        if response_format is not None:
            kwargs["response_format"] = response_format
    reasoning_echo = None
    if body.get("reasoning") is not None:
        reasoning = params.obj("reasoning", body["reasoning"])
        effort = reasoning.get("effort")
        if effort is not None:
            kwargs["reasoning_effort"] = params.one_of(*EFFORTS)("reasoning.effort", effort)
        summary = reasoning.get("summary")
        if summary is not None:
            params.one_of("auto", "concise", "detailed")("reasoning.summary", summary)
        reasoning_echo = {"effort": effort, "summary": summary}
    truncation = body.get("truncation")
    truncation = "disabled" if truncation is None else params.one_of("auto", "disabled")("truncation", truncation)
    metadata = {} if body.get("metadata") is None else _metadata(body["metadata"])

    echo = {
        "instructions": instructions,
        "max_output_tokens": kwargs.get("max_tokens"),
        "metadata": metadata,
        "parallel_tool_calls": parallel,
        "previous_response_id": previous_id,
        "reasoning": reasoning_echo,
        "store": keep,
        "temperature": kwargs.get("temperature"),
        "text": text_echo,
        "tool_choice": choice_echo,
        "tools": tools_echo,
        "top_p": kwargs.get("top_p"),
        "truncation": truncation,
        "user": body.get("user") if isinstance(body.get("user"), str) else None,
    }
    if truncation == "auto":
        kwargs["truncate"] = True  # the oldest turns go when the conversation does not fit
    request = ChatRequest(messages, kwargs, stream, keep, conversation, echo, origin, tool_index)
    try:  # before the request waits in the queue; what is wrong names the input item it came from
        check_messages(messages, media=True)
        check_tools(kwargs.get("tools"))
    except InvalidRequestError as e:
        raise APIError(400, str(e), param=request.param(e.param)) from None
    return request


def _cut_call(item: Item) -> bool:
    """Whether an output item is a function call cut before its arguments were a JSON object."""
    if item["type"] != "function_call" or item["status"] != "incomplete":
        return False
    try:
        return not isinstance(json.loads(item["arguments"]), dict)
    except json.JSONDecodeError:
        return True


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    return default if value is None else params.boolean(name, value)


# --- the response ------------------------------------------------------------------------------


def _usage(chat: dict[str, Any], reasoning_tokens: int) -> dict[str, Any]:
    """Responses' usage of chat's: the prompt tokens the prefix cache gave are cached, the others were
    evaluated and stay in it (written); the reasoning tokens are those of the reasoning text."""
    output = chat["completion_tokens"]
    cached = chat["prompt_tokens_details"]["cached_tokens"]
    return {
        "input_tokens": chat["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": chat["prompt_tokens"] - cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, output)},
        "total_tokens": chat["total_tokens"],
    }


class Builder:
    """Chat chunks in; the response's output items and the Responses stream's events out.

    Each kind of delta (reasoning, content, a tool call) goes to an output item of its kind, opened
    when it first comes and done when another item opens or the reply ends: the items are in the
    order their text came. The first chunk also gives ``response.created`` and
    ``response.in_progress``; the last one (with the finish reason) closes the open item and gives
    ``response.completed``, or ``response.incomplete`` when max_output_tokens cut the reply.
    """

    def __init__(self, response: dict[str, Any], count_tokens: Callable[[str], int]) -> None:
        self.response = response
        self.count_tokens = count_tokens
        self.items: list[Item] = []
        self.open: int | None = None  # the index of the item taking deltas
        self.calls: dict[int, int] = {}  # a chat tool call's index -> its item's index
        self.sequence = 0
        self.started = False
        self.finished = False

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _snapshot(self, kind: str) -> Event:
        return self._event(kind, response=copy.deepcopy(self.response))

    def _start(self, kind: str, **fields: Any) -> list[Event]:
        if self.open is not None:
            events = self._close(self.open, "completed")
        else:
            events = []
        index = len(self.items)
        item: Item = {"id": "", "type": kind, "status": "in_progress", **fields}
        if kind == "message":
            item.update(id=_new_id("msg"), role="assistant", content=[])
        elif kind == "reasoning":
            item.update(id=_new_id("rs"), summary=[], content=[])
        else:
            item["id"] = _new_id("fc")
        self.items.append(item)
        self.open = index
        events.append(self._event("response.output_item.added", output_index=index, item=copy.deepcopy(item)))
        if kind in ("message", "reasoning"):
            part = self._part(kind, "")
            item["content"].append(part)
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=dict(part),
                )
            )
        return events

    @staticmethod
    def _part(kind: str, text: str) -> dict[str, Any]:
        if kind == "message":
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "reasoning_text", "text": text}

    def _close(self, index: int, status: str) -> list[Event]:
        item = self.items[index]
        item["status"] = status
        self.open = None
        where = {"item_id": item["id"], "output_index": index}
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events.append(
                self._event("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[])
            )
            events.append(self._event("response.content_part.done", **where, content_index=0, part=dict(part)))
        elif item["type"] == "reasoning":
            part = item["content"][0]
            events.append(self._event("response.reasoning_text.done", **where, content_index=0, text=part["text"]))
            events.append(self._event("response.content_part.done", **where, content_index=0, part=dict(part)))
        else:
            events.append(self._event("response.function_call_arguments.done", **where, arguments=item["arguments"]))
        events.append(self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item)))
        return events

    def _text(self, kind: str, delta: str) -> list[Event]:
        events: list[Event] = []
        if self.open is None or self.items[self.open]["type"] != kind:
            events += self._start(kind)
        assert self.open is not None
        index = self.open
        item = self.items[index]
        item["content"][0]["text"] += delta
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        events.append(self._event(name, item_id=item["id"], output_index=index, content_index=0, delta=delta, **extra))
        return events

    def _call(self, call: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        fn = call.get("function") or {}
        index = self.calls.get(call["index"])
        if index is None:
            events += self._start(
                "function_call", arguments="", call_id=call.get("id") or "", name=fn.get("name") or ""
            )
            index = self.calls[call["index"]] = len(self.items) - 1
        else:  # the rest of a name or id that came in pieces
            self.items[index]["call_id"] += call.get("id") or ""
            self.items[index]["name"] += fn.get("name") or ""
        delta = fn.get("arguments") or ""
        if delta:
            item = self.items[index]
            item["arguments"] += delta
            events.append(
                self._event(
                    "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=delta
                )
            )
        return events

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        """The events of one chat chunk."""
        events: list[Event] = []
        if not self.started:
            self.started = True
            events += [self._snapshot("response.created"), self._snapshot("response.in_progress")]
        if not chunk.get("choices"):
            return events
        choice = chunk["choices"][0]
        delta = choice.get("delta") or {}
        if delta.get("reasoning_content"):
            events += self._text("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            events += self._text("message", delta["content"])
        for call in delta.get("tool_calls") or []:
            events += self._call(call)
        if choice.get("finish_reason") is not None:
            events += self._finish(choice["finish_reason"], chunk.get("usage"))
        return events

    def _finish(self, reason: str, usage: dict[str, Any] | None) -> list[Event]:
        cut = reason == "length"
        events: list[Event] = []
        if not self.items:  # an empty reply is an empty message, as chat's content ""
            events += self._start("message")
        if self.open is not None:
            events += self._close(self.open, "incomplete" if cut else "completed")
        response = self.response
        response["output"] = self.items
        response["status"] = "incomplete" if cut else "completed"
        if cut:
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            response["completed_at"] = int(time.time())
        if usage is not None:
            reasoning = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "reasoning")
            response["usage"] = _usage(usage, self.count_tokens(reasoning) if reasoning else 0)
        self.finished = True
        events.append(self._snapshot("response.incomplete" if cut else "response.completed"))
        return events

    def fail(self, error: APIError) -> list[Event]:
        """The events that end a stream an error stopped: OpenAI's ``error`` event, then
        ``response.failed``."""
        events = [self._event("error", code=error.code, message=error.message, param=error.param)]
        self.response["status"] = "failed"
        self.response["output"] = self.items
        code = "server_error" if error.status >= 500 else "invalid_prompt"
        self.response["error"] = {"code": code, "message": error.message}
        events.append(self._snapshot("response.failed"))
        return events


def _sse(event: Event) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode("ascii") + b"\ndata: " + _dumps(event) + b"\n\n"


class ResponseEvents(EventStream):
    """The chat stream as a Responses stream: typed events, no ``[DONE]``; an error after the
    status is sent ends it with an ``error`` and a ``response.failed`` event."""

    def __init__(
        self,
        server: _Server,
        chunks: AsyncStream,
        request: ChatRequest,
        builder: Builder,
        done: Callable[[], None],
    ) -> None:
        super().__init__(server, chunks, include_usage=False, fields=request.fields)
        self.request = request
        self.builder = builder
        self.done = done

    def events(self, chunk: dict[str, Any]) -> list[bytes]:
        out = [_sse(e) for e in self.builder.feed(chunk)]
        if self.builder.finished:
            self.done()
        return out

    def last(self) -> bytes:
        return b""

    def client_error(self, error: BaseException) -> APIError:
        return self.request.renamed(super().client_error(error))

    def error_event(self, error: APIError) -> bytes:
        return b"".join(_sse(e) for e in self.builder.fail(error))


# --- the routes --------------------------------------------------------------------------------


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id {response_id!r} not found.", param="response_id", code="not_found")


def add_responses_routes(app: FastAPI, server: _Server, max_stored: int) -> ResponseStore:
    """``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``; returns the store."""
    store = ResponseStore(max_stored)
    llm = server.llm

    def count_tokens(text: str) -> int:
        return len(llm.tokenize(text, False, False))

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        body = await _json_body(request)
        chat = parse_request(body, store)
        response: dict[str, Any] = {
            "id": _new_id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "model": server.model_id,
            "output": [],
            "usage": None,
            **chat.echo,
        }
        builder = Builder(response, count_tokens)

        def keep() -> None:
            if chat.store:
                store.put(Stored(response, chat.conversation))

        server.deadline()
        if chat.stream:
            try:
                chunks = await server.stream(chat.fields, server.achat(chat.messages, stream=True, **chat.kwargs))
            except APIError as e:
                raise chat.renamed(e) from None
            return ResponseEvents(server, chunks, chat, builder, keep)

        async def generate() -> dict[str, Any]:
            chunks = await server.achat(chat.messages, stream=True, **chat.kwargs)
            try:
                async for chunk in chunks:
                    builder.feed(chunk)
            finally:
                await chunks.aclose()
            return response

        try:
            result = await server.run(request, chat.fields, generate)
        except APIError as e:
            raise chat.renamed(e) from None
        if result is None:
            return _disconnected_response()
        keep()
        return JSONBody(result)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> Response:
        stored = store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        return JSONBody(stored.response)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Response:
        if not store.delete(response_id):
            raise _not_found(response_id)
        return JSONBody({"id": response_id, "object": "response", "deleted": True})

    return store
