"""JSON arguments -> Python values: a tool call's parsed JSON arguments as the annotated types (``_convert``),
checked against ``Annotated`` constraints, with a ValueError naming the argument when one does not fit.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import types
import typing
from collections.abc import Iterable
from typing import Any

from ._pydantic import _adapter, _is_model_class, _is_pydantic_dataclass
from ._schema import (
    _EMPTY,
    _MAPPINGS,
    _SEQUENCES,
    _SETS,
    _class_hints,
    _constraints,
    _is_dataclass_type,
    _is_typeddict,
    _json_type,
    _json_value,
    _required_keys,
    _type_name,
    _unalias,
)


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{_json_type(value)} {text}"


def _bad(path: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"argument {path!r}: expected {expected}, got {_show(value)}")


def _same_json(a: Any, b: Any) -> bool:
    """a == b as JSON values: True is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and bool(a == b)


def _check_constraints(value: Any, constraints: list[tuple[str, Any]], path: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    sized = isinstance(value, (str, list, tuple, set, frozenset, dict))
    for kind, limit in constraints:
        ok = True
        if number and kind == "gt":
            ok = value > limit
        elif number and kind == "ge":
            ok = value >= limit
        elif number and kind == "lt":
            ok = value < limit
        elif number and kind == "le":
            ok = value <= limit
        elif number and kind == "multiple_of" and limit:
            quotient = value / limit
            ok = math.isclose(quotient, round(quotient), rel_tol=0, abs_tol=1e-9)
        elif sized and kind == "min_length":
            ok = len(value) >= limit
        elif sized and kind == "max_length":
            ok = len(value) <= limit
        elif kind == "pattern" and isinstance(value, str):
            ok = re.search(limit, value) is not None
        if not ok:
            raise ValueError(f"argument {path!r}: {_show(value)} does not satisfy {kind}={limit!r}")


def _convert(value: Any, tp: Any, path: str, exact: bool = False) -> Any:
    """value (parsed JSON) as the annotated type tp; ValueError when it does not fit."""
    tp = _unalias(tp)
    if tp is _EMPTY or tp is Any or tp is object:
        return value
    if tp is None or tp is type(None):
        if value is not None:
            raise _bad(path, "null", value)
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        out = _convert(value, args[0], path, exact)
        _check_constraints(out, _constraints(tp.__metadata__), path)
        return out
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for strict in (True, False):  # exact matches first: 1 stays an int in float | int
            for member in args:
                try:
                    return _convert(value, member, path, strict)
                except ValueError:
                    pass
        raise _bad(path, _type_name(tp), value)
    if origin is typing.Literal:
        for choice in args:
            plain = choice.value if isinstance(choice, enum.Enum) else choice
            if _same_json(plain, value):
                return choice
        raise _bad(path, "one of " + ", ".join(json.dumps(_json_value(a)[1]) for a in args), value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if _same_json(member.value, value):
                return member
        raise _bad(path, "one of " + ", ".join(json.dumps(_json_value(m)[1]) for m in tp), value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(path, "boolean", value)
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not exact and isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad(path, "integer", value)
    if tp is float:
        if isinstance(value, float) or (not exact and isinstance(value, int) and not isinstance(value, bool)):
            return float(value)
        raise _bad(path, "number", value)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(path, "string", value)
        return value
    if _is_model_class(tp) or _is_pydantic_dataclass(tp):
        return _convert_pydantic(value, tp, path)
    if _is_dataclass_type(tp):
        return _convert_dataclass(value, tp, path)
    if _is_typeddict(tp):
        return _convert_typeddict(value, tp, path)
    base = origin if origin is not None else tp
    if base is tuple or base in _SEQUENCES or base in _SETS:
        return _convert_array(value, base, args, path, exact)
    if base in _MAPPINGS:
        if not isinstance(value, dict):
            raise _bad(path, "object", value)
        if len(args) < 2:
            return dict(value)
        return {k: _convert(v, args[1], f"{path}.{k}", exact) for k, v in value.items()}
    return _convert_pydantic(value, tp, path)  # what the schema took from pydantic (datetime, ...)


def _convert_array(value: Any, base: Any, args: tuple[Any, ...], path: str, exact: bool) -> Any:
    if not isinstance(value, list):
        raise _bad(path, "array", value)
    if base is tuple and args and not (len(args) == 2 and args[1] is Ellipsis) and args != ((),):
        if len(value) != len(args):
            raise _bad(path, f"array of {len(args)} items", value)
        return tuple(_convert(v, a, f"{path}[{i}]", exact) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    items = [_convert(v, args[0], f"{path}[{i}]", exact) if args else v for i, v in enumerate(value)]
    if base is tuple:
        return tuple(items)
    if base in _SETS:
        try:
            converted = frozenset(items) if base is frozenset else set(items)
        except TypeError as err:
            raise ValueError(f"argument {path!r}: items are not hashable ({err})") from err
        if len(converted) != len(items):
            raise ValueError(f"argument {path!r}: items must be unique, got {_show(value)}")
        return converted
    return items


def _check_keys(value: Any, cls: type, names: Iterable[str], required: Iterable[str], path: str) -> None:
    if not isinstance(value, dict):
        raise _bad(path, f"object ({cls.__qualname__})", value)
    known = set(names)
    unexpected = [k for k in value if k not in known]
    if unexpected:
        raise ValueError(
            f"argument {path!r}: unexpected key(s) {', '.join(map(repr, unexpected))} for {cls.__qualname__}"
        )
    missing = [k for k in required if k not in value]
    if missing:
        raise ValueError(f"argument {path!r}: missing key(s) {', '.join(map(repr, missing))} for {cls.__qualname__}")


def _convert_dataclass(value: Any, cls: type, path: str) -> Any:
    hints = _class_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    _check_keys(value, cls, [f.name for f in fields], required, path)
    kwargs = {k: _convert(v, hints.get(k, _EMPTY), f"{path}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except Exception as err:
        raise ValueError(f"argument {path!r}: {cls.__qualname__}(...) failed: {type(err).__name__}: {err}") from err


def _convert_typeddict(value: Any, cls: type, path: str) -> Any:
    hints = _class_hints(cls)
    _check_keys(value, cls, hints, sorted(_required_keys(cls, hints)), path)
    return {k: _convert(v, hints[k], f"{path}.{k}") for k, v in value.items()}


def _convert_pydantic(value: Any, tp: Any, path: str) -> Any:
    try:
        if _is_model_class(tp):
            return tp.model_validate(value)
        return _adapter(tp).validate_python(value)
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"argument {path!r}: {err}") from err
