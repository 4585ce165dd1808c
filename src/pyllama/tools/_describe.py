"""Callables -> tool specs: ``function_tool`` and ``_describe``, which reads a callable's signature,
type hints and docstring into an OpenAI tool spec and the ``_Entry`` that ``Tools`` runs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

from .._validate import TOOL_NAME
from ._docstrings import _own_doc, _parse_docstring
from ._pydantic import _is_model_class, _pydantic_schema
from ._schema import (
    _EMPTY,
    _annotated_description,
    _class_hints,
    _is_dataclass_type,
    _json_value,
    _Schemas,
    _Unsupported,
)


@dataclasses.dataclass(frozen=True)
class _Param:
    name: str
    annotation: Any
    required: bool


@dataclasses.dataclass(frozen=True)
class _Entry:
    spec: dict[str, Any]
    fn: Callable[..., Any] | None
    params: tuple[_Param, ...] | None  # None: a pydantic model class, validated as a whole


def _target(fn: Any) -> Any:
    """What carries the name, docstring and hints of a callable (through partials and decorators)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, type):
        return fn
    if inspect.isroutine(fn):
        return inspect.unwrap(fn)
    return fn


def _callable_name(fn: Any) -> str:
    target = _target(fn)
    name = getattr(target, "__name__", None)
    return name if isinstance(name, str) else type(target).__name__


def _callable_hints(fn: Any, label: str) -> dict[str, Any]:
    target = _target(fn)
    try:
        if isinstance(target, type):
            if _is_dataclass_type(target):
                return dict(_class_hints(target))
            cls: Any = target
            return typing.get_type_hints(cls.__init__, include_extras=True)
        if inspect.isroutine(target):
            return typing.get_type_hints(target, include_extras=True)
        return typing.get_type_hints(type(target).__call__, include_extras=True)
    except Exception as err:
        raise TypeError(f"function_tool: the type hints of {label} cannot be resolved ({err})") from err


def _callable_doc(fn: Any) -> str | None:
    target = _target(fn)
    if isinstance(target, type):
        return _own_doc(target)
    for source in (target, type(target).__call__) if not inspect.isroutine(target) else (target,):
        raw = getattr(source, "__doc__", None)
        if isinstance(raw, str):  # raw: inspect.getdoc's cleaning would lose a first line's indentation
            return raw
    return inspect.getdoc(target)  # inherited from an overridden method


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise ValueError(f"tool name {name!r} must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    return name


def _describe(fn: Callable[..., Any], name: str | None, description: str | None) -> _Entry:
    if not callable(fn):
        raise TypeError(f"function_tool: {fn!r} is not callable")
    tool_name = _check_name(name if name is not None else _callable_name(fn))
    label = f"{_callable_name(fn)}()"
    if _is_model_class(fn):  # a pydantic model: its schema is the parameters, its instance the result
        params = _pydantic_schema(fn)
        ref = params.get("$ref")
        if isinstance(ref, str) and "type" not in params:  # a recursive model: its definition at the root
            params.update(params["$defs"][ref.rsplit("/", 1)[-1]])
            del params["$ref"]
        doc = params.get("description")
        spec_description = description if description is not None else doc if isinstance(doc, str) else ""
        spec = _spec(tool_name, spec_description, params)
        return _Entry(spec, fn, None)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as err:
        raise TypeError(f"function_tool: cannot read the signature of {label} ({err})") from err
    hints = _callable_hints(fn, label)
    doc_description, documented = _parse_docstring(_callable_doc(fn))
    schemas = _Schemas()
    properties: dict[str, Any] = {}
    required: list[str] = []
    params_out: list[_Param] = []
    for p in signature.parameters.values():
        where = f"function_tool: parameter {p.name!r} of {label}"
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            star = "*" if p.kind is p.VAR_POSITIONAL else "**"
            raise TypeError(f"{where}: {star}{p.name} is not supported (a tool takes named arguments only)")
        if p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"{where} is positional-only (a tool's arguments are passed by name)")
        annotation = hints.get(p.name, _EMPTY)
        try:
            prop = dict(schemas.schema(annotation))
        except _Unsupported as err:
            raise TypeError(f"{where}: {err}") from None
        if p.name in documented and _annotated_description(annotation) is None:
            prop["description"] = documented[p.name]
        if p.default is p.empty:
            required.append(p.name)
        else:
            ok, value = _json_value(p.default)
            if ok:
                prop["default"] = value
        properties[p.name] = prop
        params_out.append(_Param(p.name, annotation, p.default is p.empty))
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    if schemas.defs:
        parameters["$defs"] = schemas.defs
    spec = _spec(tool_name, description if description is not None else doc_description, parameters)
    return _Entry(spec, fn, tuple(params_out))


def _spec(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def function_tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None) -> dict[str, Any]:
    """The OpenAI tool spec of a Python function, from its type hints and its docstring.

    ``{"type": "function", "function": {"name", "description", "parameters"}}``: the description is
    the docstring without its parameter (and other) sections, each parameter's description comes
    from the docstring's ``Args:`` / ``Parameters`` / ``:param x:`` entries (or an ``Annotated``
    description), parameters with a default are optional. A pydantic model class gives its own
    ``model_json_schema()`` as the parameters. Raises TypeError for ``*args``/``**kwargs``,
    positional-only parameters and annotations with no JSON schema, ValueError for a bad name.
    """
    return copy.deepcopy(_describe(fn, name, description).spec)
