"""Tools as Python callables: OpenAI tool specs from type hints and docstrings, and running the calls.

``function_tool(fn)`` describes a function as an OpenAI tool: its parameters' type hints become a
JSON schema and its docstring (Google, NumPy or reST style) gives the descriptions. ``Tools`` holds
a set of tools and executes the calls a model makes (``call`` / ``acall``), turning the JSON
arguments into the annotated Python types and the result, or the error, into a tool message.

pydantic is optional: its models, dataclasses and types are understood when it is installed (it is
imported only when it is needed), and ``response_format`` / ``parse_model`` need it.
"""

from __future__ import annotations

import asyncio
import collections.abc as cabc
import copy
import dataclasses
import enum
import functools
import importlib
import inspect
import json
import math
import re
import sys
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar, overload

from ._validate import TOOL_NAME
from .errors import invalid

__all__ = ["Tools", "function_tool", "parse_model", "response_format"]

_T = TypeVar("_T")
_EMPTY: Any = inspect.Parameter.empty
_RESPONSE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# --- pydantic, imported lazily ------------------------------------------------------------------


def _loaded_pydantic() -> Any:
    """pydantic if something imported it already: no pydantic class or instance can exist before."""
    return sys.modules.get("pydantic")


def _try_pydantic() -> Any:
    try:
        return importlib.import_module("pydantic")
    except ImportError:
        return None


def _need_pydantic(what: str) -> Any:
    try:
        return importlib.import_module("pydantic")
    except ImportError as err:
        raise ImportError(f"{what} needs pydantic 2 (pip install pydantic)") from err


def _is_model_class(tp: Any) -> bool:
    pyd = _loaded_pydantic()
    return pyd is not None and isinstance(tp, type) and issubclass(tp, pyd.BaseModel)


def _is_model(obj: Any) -> bool:
    pyd = _loaded_pydantic()
    return pyd is not None and isinstance(obj, pyd.BaseModel)


def _is_pydantic_dataclass(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and "__pydantic_validator__" in vars(tp)


_adapters: dict[Any, Any] = {}


def _adapter(tp: Any) -> Any:
    """A cached ``pydantic.TypeAdapter`` of ``tp``."""
    try:
        return _adapters[tp]
    except (KeyError, TypeError):
        pass
    adapter = _need_pydantic("this type").TypeAdapter(tp)
    try:
        _adapters[tp] = adapter
    except TypeError:  # an unhashable type (Annotated with unhashable metadata)
        pass
    return adapter


def _pydantic_schema(tp: Any) -> dict[str, Any]:
    if _is_model_class(tp):
        schema: dict[str, Any] = tp.model_json_schema()
    else:
        schema = _adapter(tp).json_schema()
    return copy.deepcopy(schema)


# --- docstrings ---------------------------------------------------------------------------------

_PARAM_SECTIONS = frozenset(
    {
        "args",
        "arguments",
        "parameters",
        "params",
        "keyword args",
        "keyword arguments",
        "other args",
        "other arguments",
        "other parameters",
        "attributes",
    }
)
_SECTIONS = _PARAM_SECTIONS | frozenset(
    {
        "returns",
        "return",
        "yields",
        "yield",
        "raises",
        "raise",
        "except",
        "exceptions",
        "warns",
        "example",
        "examples",
        "note",
        "notes",
        "see also",
        "seealso",
        "warning",
        "warnings",
        "references",
        "todo",
        "methods",
        "receives",
        "tip",
        "hint",
        "important",
        "caution",
        "danger",
        "attention",
    }
)
_PARAM_FIELDS = frozenset({"param", "parameter", "arg", "argument", "key", "keyword"})
_GOOGLE_HEADER = re.compile(r"^([A-Za-z][A-Za-z ]*?)\s*:\s*$")
_GOOGLE_ITEM = re.compile(r"^\s*\*{0,2}([A-Za-z_]\w*)\s*(?:\(.*?\))?\s*:(.*)$")
_UNDERLINE = re.compile(r"^-{3,}\s*$")
_FIELD = re.compile(r"^[:@]([A-Za-z_]\w*)([^:]*):(.*)$")  # :param x: ..., :returns: ..., @param x: ...
_IDENT = re.compile(r"^[A-Za-z_]\w*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _at_top(line: str) -> bool:
    return bool(line) and not line[0].isspace()


def _join(lines: Iterable[str]) -> str:
    """Lines of a description as paragraphs: lines joined by spaces, paragraphs by a blank line."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _google_items(body: list[str]) -> dict[str, str]:
    items: dict[str, list[str]] = {}
    filled = [line for line in body if line.strip()]
    if not filled:
        return {}
    item_indent = min(_indent(line) for line in filled)
    current: list[str] | None = None
    for line in body:
        if line.strip() and _indent(line) == item_indent:
            m = _GOOGLE_ITEM.match(line)
            current = None
            if m:
                current = items[m.group(1)] = [m.group(2)]
        elif current is not None:
            current.append(line)
    return {name: _join(lines) for name, lines in items.items()}


def _numpy_items(body: list[str]) -> dict[str, str]:
    filled = [line for line in body if line.strip()]
    if not filled:
        return {}
    item_indent = min(_indent(line) for line in filled)
    out: dict[str, str] = {}
    names: list[str] = []
    lines: list[str] = []

    def flush() -> None:
        for name in names:
            out[name] = _join(lines)

    for line in body:
        if line.strip() and _indent(line) == item_indent:
            flush()
            head = line.split(":", 1)[0]
            names = [part.strip().lstrip("*") for part in head.split(",")]
            if not all(_IDENT.match(name) for name in names):
                names = []
            lines = []
        else:
            lines.append(line)
    flush()
    return out


def _numpy_header(lines: list[str], i: int) -> bool:
    return _at_top(lines[i]) and i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]) is not None


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """A docstring's description (the text before its first section) and its parameters' descriptions.

    Understands Google style (``Args:`` sections), NumPy style (``Parameters`` underlined with dashes)
    and reST/Sphinx fields (``:param name: text``, also Epytext ``@param name: text``).
    """
    if not doc:
        return "", {}
    first = doc.lstrip().split("\n", 1)[0]
    header = _GOOGLE_HEADER.match(first)
    if header and header.group(1).lower() in _SECTIONS and doc.lstrip() != first:
        doc = "\n" + doc.lstrip()  # '"""Args:' on the first line: the indentation of what follows counts
    lines = inspect.cleandoc(doc).expandtabs().splitlines()
    description: list[str] = []
    params: dict[str, str] = {}
    in_sections = False
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if _numpy_header(lines, i):
            in_sections = True
            name = line.strip().lower()
            i += 2
            start = i
            while i < n and not _numpy_header(lines, i) and not (_at_top(lines[i]) and _FIELD.match(lines[i])):
                i += 1
            if name in _PARAM_SECTIONS:
                params.update(_numpy_items(lines[start:i]))
            continue
        header = _GOOGLE_HEADER.match(line) if _at_top(line) else None
        if header and header.group(1).lower() in _SECTIONS:
            in_sections = True
            i += 1
            start = i
            while i < n and not _at_top(lines[i]):
                i += 1
            if header.group(1).lower() in _PARAM_SECTIONS:
                params.update(_google_items(lines[start:i]))
            continue
        field = _FIELD.match(line) if _at_top(line) else None
        if field:
            in_sections = True
            i += 1
            body = [field.group(3)]
            while i < n and not _at_top(lines[i]):
                body.append(lines[i])
                i += 1
            words = field.group(2).split()
            if field.group(1).lower() in _PARAM_FIELDS and words:
                params[words[-1].lstrip("*")] = _join(body)
            continue
        if not in_sections:
            description.append(line)
        i += 1
    return "\n".join(description).strip(), params


def _own_doc(cls: type) -> str | None:
    """A class's own docstring (not an inherited one, nor the signature dataclasses write)."""
    doc = vars(cls).get("__doc__")
    if not isinstance(doc, str):
        return None
    if dataclasses.is_dataclass(cls) and doc.startswith(cls.__name__ + "("):
        return None
    return doc


# --- type hints -> JSON schema ------------------------------------------------------------------

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


# --- callables -> tool specs --------------------------------------------------------------------


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


# --- JSON arguments -> Python values ------------------------------------------------------------


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


# --- structured output with pydantic ------------------------------------------------------------


def _model_adapter(model_cls: Any, what: str) -> Any:
    """pydantic's TypeAdapter of a non-model type; TypeError when pydantic cannot take it."""
    try:
        return _adapter(model_cls)
    except ImportError:
        raise
    except Exception as err:
        raise TypeError(f"{what}: pydantic cannot handle {_type_name(model_cls)}: {err}") from err


def response_format(model_cls: Any, *, name: str | None = None, strict: bool = True) -> dict[str, Any]:
    """The ``response_format`` of a chat request whose reply must be a ``model_cls`` as JSON.

    ``model_cls`` is a pydantic model, or any type pydantic's TypeAdapter takes (a dataclass, a
    TypedDict, ``list[...]``). Gives ``{"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}``. Needs pydantic.
    """
    _need_pydantic("response_format()")
    schema: dict[str, Any]
    if _is_model_class(model_cls):
        schema = model_cls.model_json_schema()
    else:
        schema = _model_adapter(model_cls, "response_format()").json_schema()
    if name is None:
        raw = getattr(model_cls, "__name__", None) or "response"
        name = re.sub(r"[^A-Za-z0-9_-]", "_", str(raw))[:64] or "response"
    elif not _RESPONSE_NAME.match(name):
        raise ValueError(f"response_format name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


@overload
def parse_model(model_cls: type[_T], text: str | bytes) -> _T: ...
@overload
def parse_model(model_cls: Any, text: str | bytes) -> Any: ...
def parse_model(model_cls: Any, text: str | bytes) -> Any:
    """A reply's JSON text as ``model_cls`` (a pydantic model, or a type pydantic's TypeAdapter takes).

    Raises ValueError naming the type when the text is not valid JSON for it. Needs pydantic.
    """
    _need_pydantic("parse_model()")
    if not isinstance(text, (str, bytes)):
        raise TypeError(f"parse_model() takes the reply's text (str or bytes), not {type(text).__name__}")
    validate = (
        model_cls.model_validate_json
        if _is_model_class(model_cls)
        else _model_adapter(model_cls, "parse_model()").validate_json
    )
    try:
        return validate(text)
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"the reply is not a valid {_type_name(model_cls)}: {err}") from err
