"""``Tools``: a set of tools (callables and OpenAI tool dicts) and running the calls a model makes, with
``call`` / ``acall``, the result or the error becoming the content of the tool message.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import enum
import inspect
import json
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from .._validate import TOOL_NAME
from ..errors import invalid
from ._convert import _convert, _show
from ._describe import _describe, _Entry
from ._pydantic import _is_model

# --- results -> content -------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return obj.value
    if _is_model(obj):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    return str(obj)


def _content(result: Any) -> str:
    if isinstance(result, str):
        return result
    if _is_model(result):
        text: str = result.model_dump_json()
        return text
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    return json.dumps(result, default=_json_default, ensure_ascii=False)


def _error_content(err: BaseException) -> str:
    message = str(err)
    return f"Error: {type(err).__name__}: {message}" if message else f"Error: {type(err).__name__}"


# --- Tools --------------------------------------------------------------------------------------


class _UseAcall(RuntimeError):
    pass


def _is_async(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    return not isinstance(fn, type) and inspect.iscoroutinefunction(type(fn).__call__)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _check_spec(item: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The tool dict, copied; InvalidRequestError naming the field (``tools[0].function.name``) if it
    is not an OpenAI function tool."""
    where, at = f"Tools: item {index}", f"tools[{index}]"
    if item.get("type") != "function":
        raise invalid(f"{where}: a tool dict must have type 'function', got {item.get('type')!r}", f"{at}.type")
    fn = item.get("function")
    if not isinstance(fn, Mapping):
        raise invalid(f"{where}: 'function' must be an object with a name and parameters", f"{at}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        message = f"{where}: function.name {name!r} must be a string of 1-128 A-Z a-z 0-9 _ . : -"
        raise invalid(message, f"{at}.function.name")
    if not isinstance(fn.get("description", ""), str):
        raise invalid(f"{where}: function.description must be a string", f"{at}.function.description")
    params = fn.get("parameters", {"type": "object", "properties": {}})  # optional, as in OpenAI's API
    if not isinstance(params, Mapping) or params.get("type") != "object":
        message = f"{where}: function.parameters must be an object schema ({{'type': 'object', ...}})"
        raise invalid(message, f"{at}.function.parameters")
    if not isinstance(params.get("properties", {}), Mapping):
        message = f"{where}: function.parameters.properties must be an object"
        raise invalid(message, f"{at}.function.parameters.properties")
    return copy.deepcopy(dict(item))


@dataclasses.dataclass(frozen=True)
class _Prepared:
    entry: _Entry
    kwargs: dict[str, Any]
    built: Any = None  # the validated model, for a pydantic model tool


class Tools:
    """A set of tools: Python callables and/or OpenAI tool dicts, with unique names.

    ``specs`` goes to a chat request's ``tools=``; ``call(tool_call)`` / ``await acall(tool_call)``
    run a call the model made and give the tool message that answers it. Errors (an unknown tool,
    bad arguments, an exception in the tool) become an ``"Error: Type: message"`` content the model
    can read, unless ``raise_errors=True``: then bad calls raise ValueError and the tool's own
    exceptions propagate. A tool dict that is not an OpenAI function tool, or a second tool of the
    same name, raises ``InvalidRequestError`` naming the field (``tools[1].function.name``).
    """

    def __init__(
        self, items: Iterable[Callable[..., Any] | Mapping[str, Any]] = (), *, raise_errors: bool = False
    ) -> None:
        if isinstance(items, (Mapping, str, bytes)) or callable(items):
            raise TypeError("Tools takes a list of tools (functions or OpenAI tool dicts), not a single one")
        self.raise_errors = raise_errors
        self._entries: dict[str, _Entry] = {}
        for index, item in enumerate(items):
            if isinstance(item, Mapping):
                entry = _Entry(_check_spec(item, index), None, None)
            elif callable(item):
                entry = _describe(item, None, None)
            else:
                raise TypeError(f"Tools: item {index} is neither a callable nor a tool dict: {item!r}")
            name = entry.spec["function"]["name"]
            if name in self._entries:
                raise invalid(f"Tools: two tools are named {name!r}", f"tools[{index}].function.name")
            self._entries[name] = entry

    def __repr__(self) -> str:
        return f"Tools({self.names!r})"

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def specs(self) -> list[dict[str, Any]]:
        """The OpenAI tool dicts, for a chat request's ``tools=`` (copies)."""
        return [copy.deepcopy(e.spec) for e in self._entries.values()]

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> dict[str, Any] | None:
        """The tool dict named ``name`` (a copy), or None."""
        entry = self._entries.get(name)
        return None if entry is None else copy.deepcopy(entry.spec)

    def callable(self, name: str) -> Callable[..., Any] | None:
        """The Python callable of tool ``name``; None for a tool given as a dict. KeyError if unknown."""
        if name not in self._entries:
            raise KeyError(f"no tool named {name!r}")
        return self._entries[name].fn

    # --- running calls ---

    def _prepare(self, tool_call: Any) -> _Prepared:
        if not isinstance(tool_call, Mapping):
            raise ValueError(f"a tool call must be a dict, got {type(tool_call).__name__}")
        if tool_call.get("type", "function") != "function":
            raise ValueError(f"unsupported tool call type {tool_call.get('type')!r} (only 'function')")
        function = tool_call.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError("the tool call has no function name")
        name: str = function["name"]
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self._entries) or "none"
            raise ValueError(f"unknown tool {name!r} (the tools are: {known})")
        if entry.fn is None:
            raise ValueError(f"no Python function is registered for tool {name!r} (it was given as a dict)")
        raw = function.get("arguments")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            args: Any = {}
        elif isinstance(raw, (str, bytes)):
            try:
                args = json.loads(raw)
            except ValueError as err:
                text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
                text = text if len(text) <= 200 else text[:200] + "..."
                raise ValueError(f"tool {name!r}: the arguments are not valid JSON ({err}): {text!r}") from err
        else:
            args = raw
        if not isinstance(args, Mapping):
            raise ValueError(f"tool {name!r}: the arguments must be a JSON object, got {_show(args)}")
        args = dict(args)
        if entry.params is None:
            try:
                built = entry.fn.model_validate(args)  # type: ignore[attr-defined]
            except ValueError as err:
                raise ValueError(f"tool {name!r}: invalid arguments: {err}") from err
            return _Prepared(entry, {}, built)
        known_params = {p.name for p in entry.params}
        unexpected = [k for k in args if k not in known_params]
        if unexpected:
            raise ValueError(
                f"tool {name!r}: unexpected argument(s) {', '.join(map(repr, unexpected))}"
                f" (its parameters are: {', '.join(p.name for p in entry.params) or 'none'})"
            )
        missing = [p.name for p in entry.params if p.required and p.name not in args]
        if missing:
            raise ValueError(f"tool {name!r}: missing required argument(s) {', '.join(map(repr, missing))}")
        kwargs: dict[str, Any] = {}
        for p in entry.params:
            if p.name in args:
                try:
                    kwargs[p.name] = _convert(args[p.name], p.annotation, p.name)
                except ValueError as err:
                    raise ValueError(f"tool {name!r}: {err}") from err
        return _Prepared(entry, kwargs)

    def _begin(self, tool_call: Any) -> tuple[str, _Prepared | str]:
        """The call's id and the prepared call, or the error content for a bad call."""
        call_id = tool_call.get("id") if isinstance(tool_call, Mapping) else None
        call_id = call_id if isinstance(call_id, str) else ""
        try:
            return call_id, self._prepare(tool_call)
        except ValueError as err:
            if self.raise_errors:
                raise
            return call_id, _error_content(err)

    def _finish(self, call_id: str, result: Any) -> dict[str, str]:
        return {"role": "tool", "tool_call_id": call_id, "content": _content(result)}

    def _failed(self, call_id: str, err: Exception) -> dict[str, str]:
        if self.raise_errors or isinstance(err, _UseAcall):
            raise err
        return {"role": "tool", "tool_call_id": call_id, "content": _error_content(err)}

    def call(self, tool_call: Mapping[str, Any]) -> dict[str, str]:
        """Run one OpenAI tool call; the tool message ``{"role": "tool", "tool_call_id", "content"}``.

        A coroutine function is run with ``asyncio.run``; from inside a running event loop that is
        impossible and RuntimeError says to use ``acall``.
        """
        call_id, prepared = self._begin(tool_call)
        if isinstance(prepared, str):
            return {"role": "tool", "tool_call_id": call_id, "content": prepared}
        fn = prepared.entry.fn
        assert fn is not None
        name = prepared.entry.spec["function"]["name"]
        advice = f"tool {name!r} is a coroutine function and an event loop is running: use `await tools.acall(...)`"
        if prepared.entry.params is not None and _is_async(fn) and _loop_running():
            raise _UseAcall(advice)
        try:
            if prepared.entry.params is None:
                result = prepared.built
            elif _is_async(fn):
                result = asyncio.run(fn(**prepared.kwargs))
            else:
                result = fn(**prepared.kwargs)
                if inspect.isawaitable(result):
                    if _loop_running():
                        if inspect.iscoroutine(result):
                            result.close()
                        raise _UseAcall(advice)
                    result = asyncio.run(_await(result))
            return self._finish(call_id, result)
        except Exception as err:
            return self._failed(call_id, err)

    async def acall(self, tool_call: Mapping[str, Any]) -> dict[str, str]:
        """``call`` for asyncio: coroutine functions are awaited, others run in ``asyncio.to_thread``,
        so several calls (``asyncio.gather``) run concurrently."""
        call_id, prepared = self._begin(tool_call)
        if isinstance(prepared, str):
            return {"role": "tool", "tool_call_id": call_id, "content": prepared}
        fn = prepared.entry.fn
        assert fn is not None
        try:
            if prepared.entry.params is None:
                result = prepared.built
            elif _is_async(fn):
                result = await fn(**prepared.kwargs)
            else:
                result = await asyncio.to_thread(fn, **prepared.kwargs)
                if inspect.isawaitable(result):
                    result = await result
            return self._finish(call_id, result)
        except Exception as err:
            return self._failed(call_id, err)
