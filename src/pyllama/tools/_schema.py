"""Type hints -> JSON schema: the schema of a parameter's annotation (``_Schemas``).

Primitives, unions, literals, enums, containers, dataclasses, TypedDicts, ``Annotated`` descriptions and
constraints, and pydantic models and types; the helpers the argument conversion shares with it
(``_unalias``, ``_class_hints``, ``_constraints``, ``_json_type``, ...).
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import enum
import functools
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._docstrings import _own_doc, _parse_docstring
from ._pydantic import _is_model, _is_model_class, _is_pydantic_dataclass, _pydantic_schema, _try_pydantic

_EMPTY: Any = inspect.Parameter.empty
_PRIMITIVES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_SEQUENCES = (list, cabc.Sequence, cabc.MutableSequence, cabc.Collection, cabc.Iterable)
_SETS = (set, frozenset, cabc.Set, cabc.MutableSet)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)
_QUALIFIERS = frozenset({"Required", "NotRequired", "ReadOnly"})


class _Unsupported(TypeError):
    pass


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


def _unalias(tp: Any) -> Any:
    """NewType and ``type X = ...`` aliases, and Required/NotRequired/ReadOnly, stripped."""
    while True:
        if isinstance(tp, typing.NewType):
            tp = tp.__supertype__
        elif type(tp).__name__ == "TypeAliasType" and hasattr(tp, "__value__"):
            tp = tp.__value__
        elif getattr(typing.get_origin(tp), "_name", None) in _QUALIFIERS:
            tp = typing.get_args(tp)[0]
        else:
            return tp


def _is_typeddict(tp: Any) -> bool:
    return (
        isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__") and hasattr(tp, "__total__")
    )


def _required_keys(cls: type, hints: Mapping[str, Any]) -> frozenset[str]:
    """A TypedDict's required keys, also where ``NotRequired[...]`` was a string annotation (which
    ``__required_keys__`` misses on older Pythons)."""
    required = set(getattr(cls, "__required_keys__", ()))
    for name, hint in hints.items():
        qualifier = getattr(typing.get_origin(hint), "_name", None)
        if qualifier == "NotRequired":
            required.discard(name)
        elif qualifier == "Required":
            required.add(name)
    return frozenset(required)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.lru_cache(maxsize=256)
def _class_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except Exception as err:
        raise _Unsupported(f"the type hints of {cls.__qualname__} cannot be resolved ({err})") from err


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _enum_schema(values: list[Any], where: Any) -> dict[str, Any]:
    kinds = {_json_type(v) for v in values}
    if not kinds <= {"null", "boolean", "integer", "number", "string"}:
        raise _Unsupported(f"{_type_name(where)} has values that are not JSON strings, numbers, booleans or null")
    schema: dict[str, Any] = {"enum": values}
    if len(kinds) == 1 and "null" not in kinds:
        schema = {"type": kinds.pop(), "enum": values}
    return schema


def _constraints(metadata: Iterable[Any]) -> list[tuple[str, Any]]:
    """Constraints of ``Annotated`` metadata (annotated_types / pydantic.Field): (kind, value) pairs."""
    out: list[tuple[str, Any]] = []
    for item in metadata:
        if isinstance(item, str):
            continue
        nested = getattr(item, "metadata", None)
        if isinstance(nested, list):  # pydantic.Field(...) keeps its constraints there
            out.extend(_constraints(nested))
        for kind in ("gt", "ge", "lt", "le", "multiple_of", "min_length", "max_length", "pattern"):
            value = getattr(item, kind, None)
            if value is not None and not isinstance(value, bool):
                out.append((kind, value))
    return out


def _annotated_description(tp: Any) -> str | None:
    """The description an ``Annotated`` hint gives (a str, or an object with a ``description``)."""
    if typing.get_origin(tp) is not typing.Annotated:
        return None
    found: str | None = None
    for item in tp.__metadata__:
        if isinstance(item, str):
            found = item
        elif isinstance(getattr(item, "description", None), str):
            found = item.description
    return found


_NUMBER_KEYS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}
_LENGTH_KEYS = {
    "string": ("minLength", "maxLength"),
    "array": ("minItems", "maxItems"),
    "object": ("minProperties", "maxProperties"),
}


def _json_value(value: Any) -> tuple[bool, Any]:
    """(True, the JSON form of value) when value is JSON-serialisable, else (False, None)."""
    if isinstance(value, enum.Enum):
        value = value.value
    elif _is_model(value):
        value = value.model_dump(mode="json")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif isinstance(value, (set, frozenset)):
        try:
            value = sorted(value)
        except TypeError:
            value = list(value)
    try:
        return True, json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return False, None


def _rename_refs(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rename_refs(v, mapping) for k, v in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[len("#/$defs/") :] in mapping:
            out["$ref"] = "#/$defs/" + mapping[ref[len("#/$defs/") :]]
        return out
    if isinstance(node, list):
        return [_rename_refs(v, mapping) for v in node]
    return node


class _Schemas:
    """Builds the schemas of one tool's parameters; recursive types and pydantic's ``$defs`` go to
    ``defs`` (the ``$defs`` of the parameters object), everything else is inlined."""

    def __init__(self) -> None:
        self.defs: dict[str, dict[str, Any]] = {}
        self._names: dict[Any, str] = {}
        self._building: list[Any] = []
        self._recursive: set[Any] = set()

    def _free_name(self, base: str) -> str:
        taken = set(self.defs) | set(self._names.values())
        name, k = base, 2
        while name in taken:
            name, k = f"{base}{k}", k + 1
        return name

    def schema(self, tp: Any) -> dict[str, Any]:
        tp = _unalias(tp)
        if tp is _EMPTY or tp is Any or tp is object:
            return {}
        if tp is None or tp is type(None):
            return {"type": "null"}
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Annotated:
            return self._annotated(args[0], tp.__metadata__)
        if origin is typing.Union or origin is types.UnionType:
            return {"anyOf": [self.schema(a) for a in args]}
        if origin is typing.Literal:
            return _enum_schema([a.value if isinstance(a, enum.Enum) else a for a in args], tp)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return _enum_schema([m.value for m in tp], tp)
        if isinstance(tp, type) and tp in _PRIMITIVES:
            return {"type": _PRIMITIVES[tp]}
        if _is_model_class(tp) or _is_pydantic_dataclass(tp):
            return self._pydantic(tp)
        if _is_dataclass_type(tp):
            return self._named(tp, self._dataclass)
        if _is_typeddict(tp):
            return self._named(tp, self._typeddict)
        container = self._container(tp, origin, args)
        if container is not None:
            return container
        if not isinstance(tp, (typing.TypeVar, str, typing.ForwardRef)) and _try_pydantic() is not None:
            try:  # datetime, UUID, Decimal, ... as pydantic describes them
                return self._pydantic(tp)
            except Exception:
                pass
        raise _Unsupported(f"unsupported annotation {_type_name(tp)}")

    def _annotated(self, base: Any, metadata: tuple[Any, ...]) -> dict[str, Any]:
        schema = dict(self.schema(base))
        kind = schema.get("type")
        for item in metadata:
            if isinstance(item, str):
                schema["description"] = item
                continue
            if isinstance(getattr(item, "description", None), str):
                schema["description"] = item.description
            examples = getattr(item, "examples", None)
            if isinstance(examples, list) and examples:
                schema["examples"] = examples
        for key, value in _constraints(metadata):
            if key in _NUMBER_KEYS and kind in ("integer", "number"):
                schema[_NUMBER_KEYS[key]] = value
            elif key == "multiple_of" and kind in ("integer", "number"):
                schema["multipleOf"] = value
            elif key in ("min_length", "max_length") and kind in _LENGTH_KEYS:
                schema[_LENGTH_KEYS[kind][key == "max_length"]] = value
            elif key == "pattern" and kind == "string":
                schema["pattern"] = value if isinstance(value, str) else value.pattern
        return schema

    def _container(self, tp: Any, origin: Any, args: tuple[Any, ...]) -> dict[str, Any] | None:
        base = origin if origin is not None else tp
        if base is tuple:
            if not args:
                return {"type": "array"}
            if len(args) == 2 and args[1] is Ellipsis:
                return {"type": "array", "items": self.schema(args[0])}
            if args == ((),):  # tuple[()] on some versions
                return {"type": "array", "maxItems": 0}
            items = [self.schema(a) for a in args]
            return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
        if base in _SEQUENCES or base in _SETS:
            schema: dict[str, Any] = {"type": "array"}
            if args:
                item = self.schema(args[0])
                if item:
                    schema["items"] = item
            if base in _SETS:
                schema["uniqueItems"] = True
            return schema
        if base in _MAPPINGS:
            schema = {"type": "object"}
            if args:
                key = _unalias(args[0])
                if key is not str and key is not Any:
                    raise _Unsupported(f"{_type_name(tp)}: JSON object keys are strings, so the key type must be str")
                value = self.schema(args[1])
                if value:
                    schema["additionalProperties"] = value
            return schema
        return None

    def _named(self, tp: type, build: Callable[[type], dict[str, Any]]) -> dict[str, Any]:
        """A dataclass or TypedDict: inlined, or in ``$defs`` when it refers to itself."""
        if tp in self._names and self._names[tp] in self.defs:
            return {"$ref": f"#/$defs/{self._names[tp]}"}
        if tp in self._building:
            self._recursive.add(tp)
            if tp not in self._names:
                self._names[tp] = self._free_name(tp.__name__)
            return {"$ref": f"#/$defs/{self._names[tp]}"}
        self._building.append(tp)
        try:
            schema = build(tp)
        finally:
            self._building.pop()
        if tp in self._recursive:
            self.defs[self._names[tp]] = schema
            return {"$ref": f"#/$defs/{self._names[tp]}"}
        return schema

    def _object(
        self, cls: type, fields: list[tuple[str, Any, bool, Any, str | None]], doc: str | None
    ) -> dict[str, Any]:
        """An object schema; fields are (name, annotation, required, default, description)."""
        description, documented = _parse_docstring(doc)
        properties: dict[str, Any] = {}
        required: list[str] = []
        for name, annotation, is_required, default, field_doc in fields:
            try:
                prop = dict(self.schema(annotation))
            except _Unsupported as err:
                raise _Unsupported(f"{cls.__qualname__}.{name}: {err}") from None
            text = field_doc or documented.get(name)
            if text and _annotated_description(annotation) is None:
                prop["description"] = text
            if is_required:
                required.append(name)
            elif default is not _EMPTY:
                ok, value = _json_value(default)
                if ok:
                    prop["default"] = value
            properties[name] = prop
        schema: dict[str, Any] = {"type": "object"}
        if description:
            schema["description"] = description
        schema.update(properties=properties, required=required, additionalProperties=False)
        return schema

    def _dataclass(self, cls: type) -> dict[str, Any]:
        hints = _class_hints(cls)
        fields: list[tuple[str, Any, bool, Any, str | None]] = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = _EMPTY if f.default is dataclasses.MISSING else f.default
            doc = f.metadata.get("description")
            fields.append((f.name, hints.get(f.name, _EMPTY), required, default, doc if isinstance(doc, str) else None))
        return self._object(cls, fields, _own_doc(cls))

    def _typeddict(self, cls: type) -> dict[str, Any]:
        hints = _class_hints(cls)
        required_keys = _required_keys(cls, hints)
        fields: list[tuple[str, Any, bool, Any, str | None]] = [
            (name, hint, name in required_keys, _EMPTY, None) for name, hint in hints.items()
        ]
        return self._object(cls, fields, _own_doc(cls))

    def _pydantic(self, tp: Any) -> dict[str, Any]:
        """pydantic's own schema of tp, its ``$defs`` merged into ours (renamed on a clash)."""
        schema = _pydantic_schema(tp)
        defs: dict[str, Any] = schema.pop("$defs", {})
        mapping: dict[str, str] = {}
        for name, definition in defs.items():
            if (name in self.defs and self.defs[name] != definition) or name in self._names.values():
                mapping[name] = self._free_name(name)
        if mapping:
            defs = {mapping.get(k, k): _rename_refs(v, mapping) for k, v in defs.items()}
            schema = _rename_refs(schema, mapping)
        for name, definition in defs.items():
            self.defs.setdefault(name, definition)
        return schema
