"""Checks of OpenAI-format chat requests before llama.cpp sees them.

llama.cpp's own checks report a JSON exception or nothing at all (an unknown role, a tool result
without its id); these name the field at fault, as OpenAI's API does: ``messages[2].tool_call_id``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from . import _core
from .errors import invalid

ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise invalid(f"{where}: {what}", where)


def _check_content(content: Any, where: str, *, nullable: bool, media: bool = False) -> None:
    if content is None:
        _need(nullable, where, "must be a string or a list of text parts")
        return
    if isinstance(content, str):
        return
    _need(
        isinstance(content, list), where, f"must be a string or a list of content parts, not {type(content).__name__}"
    )
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        _need(isinstance(part, dict), at, "must be an object")
        kind = part.get("type")
        if kind == "media_marker":  # where an image or audio part was (pyllama.media), the projector's marker
            _need(part.get("text") == _core.Projector.default_marker(), f"{at}.text", "must be the media marker")
            continue
        if kind in ("image_url", "input_audio") and not media:
            _need(False, f"{at}.type", f"{kind!r} is not supported by a chat template: Llama(mmproj=) takes media")
        if kind == "image_url":  # read by pyllama.media for a Llama with a projector (mmproj=)
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            _need(isinstance(url, str), f"{at}.image_url.url", "must be a string (a data: URI, a URL or a path)")
            continue
        if kind == "input_audio":
            audio = part.get("input_audio")
            _need(
                isinstance(audio, dict) and isinstance(audio.get("data"), str),
                f"{at}.input_audio",
                "must be an object with base64 data",
            )
            continue
        _need(kind == "text", f"{at}.type", f"{kind!r} is not supported: 'text', 'image_url' and 'input_audio' are")
        _need(isinstance(part.get("text"), str), f"{at}.text", "must be a string")


def _check_arguments(args: Any, where: str) -> None:
    if isinstance(args, dict):
        return
    _need(isinstance(args, str), where, "must be a JSON string")
    try:
        value = json.loads(args)
    except json.JSONDecodeError as e:
        raise invalid(f"{where}: is not valid JSON ({e.msg} at character {e.pos})", where) from None
    _need(isinstance(value, dict), where, "must encode a JSON object")


def check_messages(messages: Any, *, media: bool = False) -> None:
    """Raise InvalidRequestError naming the field (its ``param``) when messages are not OpenAI chat messages.
    ``media``: ``image_url`` and ``input_audio`` parts may appear (a Llama reads them, pyllama.media)."""
    _need(
        isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)),
        "messages",
        "must be a list of message objects",
    )
    call_ids: set[str] = set()
    for i, msg in enumerate(messages):
        at = f"messages[{i}]"
        _need(isinstance(msg, dict), at, "must be an object")
        role = msg.get("role")
        _need(isinstance(role, str), f"{at}.role", "is required and must be a string")
        _need(role in ROLES, f"{at}.role", f"{role!r} is not one of {', '.join(ROLES)}")
        if "name" in msg and msg["name"] is not None:
            _need(isinstance(msg["name"], str), f"{at}.name", "must be a string")
        reasoning = msg.get("reasoning_content")
        _need(reasoning is None or isinstance(reasoning, str), f"{at}.reasoning_content", "must be a string")
        calls = msg.get("tool_calls")
        if role == "assistant":
            _check_content(msg.get("content"), f"{at}.content", nullable=True, media=media)
        else:
            _need("content" in msg, f"{at}.content", "is required")
            _check_content(msg["content"], f"{at}.content", nullable=False, media=media)
            _need(calls is None, f"{at}.tool_calls", "only assistant messages carry tool calls")
        if calls is not None:
            _need(isinstance(calls, list), f"{at}.tool_calls", "must be a list")
            for j, call in enumerate(calls):
                cat = f"{at}.tool_calls[{j}]"
                _need(isinstance(call, dict), cat, "must be an object")
                _need(call.get("type", "function") == "function", f"{cat}.type", "must be 'function'")
                call_id = call.get("id")
                _need(call_id is None or isinstance(call_id, str), f"{cat}.id", "must be a string")
                if call_id:
                    call_ids.add(call_id)
                fn = call.get("function")
                _need(isinstance(fn, dict), f"{cat}.function", "is required and must be an object")
                _need(isinstance(fn.get("name"), str) and bool(fn["name"]), f"{cat}.function.name", "must be a name")
                _need("arguments" in fn, f"{cat}.function.arguments", "is required")
                _check_arguments(fn["arguments"], f"{cat}.function.arguments")
        if role == "tool":
            tc_id = msg.get("tool_call_id")
            _need(isinstance(tc_id, str) and bool(tc_id), f"{at}.tool_call_id", "is required for a tool result")
            _need(
                not call_ids or tc_id in call_ids,
                f"{at}.tool_call_id",
                f"{tc_id!r} answers no tool call of an earlier assistant message",
            )


def check_tools(tools: Any) -> None:
    """Raise InvalidRequestError naming the field (its ``param``) when tools are not OpenAI function tools."""
    if tools is None:
        return
    _need(isinstance(tools, Sequence) and not isinstance(tools, (str, bytes)), "tools", "must be a list")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        _need(isinstance(tool, dict), at, "must be an object")
        _need(tool.get("type", "function") == "function", f"{at}.type", "must be 'function'")
        fn = tool.get("function")
        _need(isinstance(fn, dict), f"{at}.function", "is required and must be an object")
        name = fn.get("name")
        _need(isinstance(name, str), f"{at}.function.name", "is required and must be a string")
        _need(bool(TOOL_NAME.match(name)), f"{at}.function.name", f"{name!r} must be 1-128 of A-Z a-z 0-9 _ . : -")
        _need(name not in seen, f"{at}.function.name", f"{name!r} is declared twice")
        seen.add(name)
        desc = fn.get("description")
        _need(desc is None or isinstance(desc, str), f"{at}.function.description", "must be a string")
        params = fn.get("parameters")
        _need(params is None or isinstance(params, dict), f"{at}.function.parameters", "must be a JSON schema object")
