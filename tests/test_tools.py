"""pyllama.tools: tool specs from Python functions, running tool calls, pydantic structured output.

The generated schemas are checked against two independent judges: the JSON Schema metaschema
(jsonschema's Draft 2020-12 validator) and llama.cpp's own schema-to-grammar converter, whose
grammar must accept the JSON of the arguments a real caller would send.
"""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import datetime
import enum
import json
import re
import threading
import typing
from typing import Annotated, Any, Literal, NewType, Optional, TypedDict, Union

import jsonschema
import pytest

import pyllama
from pyllama.tools import Tools, _parse_docstring, function_tool, parse_model, response_format

from conftest import run_python

try:
    import pydantic
    from pydantic import BaseModel, Field
except ImportError:  # pragma: no cover - pydantic is optional
    pydantic = None
    BaseModel = object

    def Field(**kwargs: Any) -> Any:
        return None


needs_pydantic = pytest.mark.skipif(pydantic is None, reason="pydantic is not installed")


# --- helpers ------------------------------------------------------------------------------------


def check_schema(schema: dict[str, Any]) -> str:
    """The schema is valid JSON Schema and llama.cpp turns it into a grammar (returned)."""
    jsonschema.Draft202012Validator.check_schema(schema)
    return pyllama.json_schema_to_grammar(schema)


def params_of(fn: Any) -> dict[str, Any]:
    spec = function_tool(fn)
    assert spec["type"] == "function"
    check_schema(spec["function"]["parameters"])
    params: dict[str, Any] = spec["function"]["parameters"]
    return params


def one_param(annotation: Any, **defaults: Any) -> Any:
    """A function ``f(x: annotation)`` that returns its argument."""

    def f(x):
        return x

    f.__annotations__ = {"x": annotation}
    if "default" in defaults:
        f.__defaults__ = (defaults["default"],)
    return f


def call(fn_or_tools: Any, arguments: Any, name: str | None = None, call_id: str = "call_1") -> dict[str, str]:
    tools = fn_or_tools if isinstance(fn_or_tools, Tools) else Tools([fn_or_tools])
    name = name or tools.names[0]
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return tools.call({"id": call_id, "type": "function", "function": {"name": name, "arguments": raw}})


def accepts(grammar: str, value: Any) -> bool:
    return pyllama.grammar_match(grammar, json.dumps(value)) == "complete"


# --- types used in the tests --------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


UserId = NewType("UserId", int)


@dataclasses.dataclass
class Point:
    """A point in the plane.

    Attributes:
        x: Horizontal coordinate.
        y: Vertical coordinate.
    """

    x: float
    y: float = 0.0
    label: str = dataclasses.field(default="", metadata={"description": "A name for the point."})


@dataclasses.dataclass
class Tree:
    value: int
    children: list[Tree] = dataclasses.field(default_factory=list)


class Options(TypedDict, total=False):
    verbose: bool
    depth: int


class Person(TypedDict):
    """Someone."""

    name: str
    age: typing.NotRequired[int]


# --- schemas of simple functions, written by hand -----------------------------------------------


def get_weather(city: str, unit: Literal["c", "f"] = "c", days: int = 1, detailed: bool = False) -> str:
    """Get the current weather in a city.

    Args:
        city: The city's name.
        unit: Temperature unit.
    """
    return f"{city}:{unit}:{days}:{detailed}"


def test_simple_function_spec() -> None:
    assert function_tool(get_weather) == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city's name."},
                    "unit": {"type": "string", "enum": ["c", "f"], "description": "Temperature unit.", "default": "c"},
                    "days": {"type": "integer", "default": 1},
                    "detailed": {"type": "boolean", "default": False},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    check_schema(function_tool(get_weather)["function"]["parameters"])


def test_name_and_description_overrides() -> None:
    spec = function_tool(get_weather, name="weather.now", description="Weather.")
    assert spec["function"]["name"] == "weather.now"
    assert spec["function"]["description"] == "Weather."


def test_no_parameters_no_docstring() -> None:
    def ping():
        return "pong"

    assert function_tool(ping) == {
        "type": "function",
        "function": {
            "name": "ping",
            "description": "",
            "parameters": {"type": "object", "properties": {}, "required": [], "additionalProperties": False},
        },
    }


SCHEMAS: list[tuple[Any, dict[str, Any]]] = [
    (str, {"type": "string"}),
    (int, {"type": "integer"}),
    (float, {"type": "number"}),
    (bool, {"type": "boolean"}),
    (None, {"type": "null"}),
    (Any, {}),
    (Optional[int], {"anyOf": [{"type": "integer"}, {"type": "null"}]}),  # noqa: UP045
    (str | None, {"anyOf": [{"type": "string"}, {"type": "null"}]}),
    (Union[int, str], {"anyOf": [{"type": "integer"}, {"type": "string"}]}),  # noqa: UP007
    (Literal["a", "b"], {"type": "string", "enum": ["a", "b"]}),
    (Literal[1, "one"], {"enum": [1, "one"]}),
    (Literal[Color.RED], {"type": "string", "enum": ["red"]}),
    (Color, {"type": "string", "enum": ["red", "green"]}),
    (Level, {"type": "integer", "enum": [1, 2]}),
    (UserId, {"type": "integer"}),
    (list[int], {"type": "array", "items": {"type": "integer"}}),
    (typing.List[str], {"type": "array", "items": {"type": "string"}}),  # noqa: UP006
    (collections.abc.Sequence[float], {"type": "array", "items": {"type": "number"}}),
    (list, {"type": "array"}),
    (set[str], {"type": "array", "items": {"type": "string"}, "uniqueItems": True}),
    (frozenset[int], {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
    (tuple[int, ...], {"type": "array", "items": {"type": "integer"}}),
    (
        tuple[int, str],
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2, "maxItems": 2},
    ),
    (dict[str, int], {"type": "object", "additionalProperties": {"type": "integer"}}),
    (
        collections.abc.Mapping[str, list[bool]],
        {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "boolean"}}},
    ),
    (dict, {"type": "object"}),
    (Annotated[str, "A comment."], {"type": "string", "description": "A comment."}),
    (
        Optional[Annotated[int, "Count."]],  # noqa: UP045
        {"anyOf": [{"type": "integer", "description": "Count."}, {"type": "null"}]},
    ),
    (
        Options,
        {
            "type": "object",
            "properties": {"verbose": {"type": "boolean"}, "depth": {"type": "integer"}},
            "required": [],
            "additionalProperties": False,
        },
    ),
    (
        Person,
        {
            "type": "object",
            "description": "Someone.",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name"],
            "additionalProperties": False,
        },
    ),
    (
        Point,
        {
            "type": "object",
            "description": "A point in the plane.",
            "properties": {
                "x": {"type": "number", "description": "Horizontal coordinate."},
                "y": {"type": "number", "description": "Vertical coordinate.", "default": 0.0},
                "label": {"type": "string", "description": "A name for the point.", "default": ""},
            },
            "required": ["x"],
            "additionalProperties": False,
        },
    ),
]


@pytest.mark.parametrize(("annotation", "expected"), SCHEMAS, ids=[repr(a) for a, _ in SCHEMAS])
def test_annotation_schema(annotation: Any, expected: dict[str, Any]) -> None:
    params = params_of(one_param(annotation))
    assert params["properties"]["x"] == expected
    assert params["required"] == ["x"]
    assert params["additionalProperties"] is False


_NOT_JSON = object()


def test_unannotated_and_defaults() -> None:
    def f(
        a, b=3, c: Color = Color.GREEN, d: tuple[int, int] = (1, 2), e: Any = _NOT_JSON, g: set[str] = frozenset("ba")
    ):
        return a

    params = params_of(f)
    assert params["properties"] == {
        "a": {},
        "b": {"default": 3},
        "c": {"type": "string", "enum": ["red", "green"], "default": "green"},
        "d": {
            "type": "array",
            "prefixItems": [{"type": "integer"}, {"type": "integer"}],
            "minItems": 2,
            "maxItems": 2,
            "default": [1, 2],
        },
        "e": {},  # the default is not JSON: left out
        "g": {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "default": ["a", "b"]},
    }
    assert params["required"] == ["a"]


def test_recursive_dataclass_goes_to_defs() -> None:
    params = params_of(one_param(Tree))
    assert params["properties"]["x"] == {"$ref": "#/$defs/Tree"}
    assert params["$defs"]["Tree"] == {
        "type": "object",
        "properties": {
            "value": {"type": "integer"},
            "children": {"type": "array", "items": {"$ref": "#/$defs/Tree"}},
        },
        "required": ["value"],
        "additionalProperties": False,
    }
    good = {"x": {"value": 1, "children": [{"value": 2, "children": [{"value": 3}]}]}}
    jsonschema.validate(good, params)
    assert accepts(check_schema(params), good)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"x": {"value": 1, "children": [{"value": "two"}]}}, params)


# --- pydantic -----------------------------------------------------------------------------------

if pydantic is not None:

    class Address(BaseModel):
        """A postal address."""

        street: str
        city: str = Field(description="The city.")

    class Customer(BaseModel):
        name: str = Field(min_length=1)
        address: Address
        tags: list[str] = Field(default_factory=list)

    class Node(BaseModel):
        value: int
        children: list[Node] = Field(default_factory=list)


@needs_pydantic
def test_pydantic_model_parameter_is_its_own_schema() -> None:
    def register(customer: Customer, note: str = "") -> str:
        """Register a customer."""
        return customer.name

    params = params_of(register)
    own = Customer.model_json_schema()
    defs = own.pop("$defs")
    assert params["properties"]["customer"] == own
    assert params["$defs"] == defs
    good = {"customer": {"name": "Ann", "address": {"street": "Main St", "city": "Oslo"}}, "note": "x"}
    jsonschema.validate(good, params)
    assert accepts(check_schema(params), good)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"customer": {"name": "Ann", "address": {"street": "Main St"}}}, params)


@needs_pydantic
def test_pydantic_model_as_the_tool() -> None:
    spec = function_tool(Customer)
    assert spec["function"]["name"] == "Customer"
    assert spec["function"]["parameters"] == Customer.model_json_schema()
    assert function_tool(Address)["function"]["description"] == "A postal address."
    check_schema(spec["function"]["parameters"])
    message = call(Customer, {"name": "Ann", "address": {"street": "Main St", "city": "Oslo"}})
    assert Customer.model_validate_json(message["content"]).address.city == "Oslo"
    assert call(Customer, {"name": "", "address": {}})["content"].startswith("Error: ValueError: ")


@needs_pydantic
def test_recursive_pydantic_model() -> None:
    params = function_tool(Node)["function"]["parameters"]
    assert params["type"] == "object"
    assert params["$defs"] == Node.model_json_schema()["$defs"]
    grammar = check_schema(params)
    good = {"value": 1, "children": [{"value": 2, "children": []}]}
    jsonschema.validate(good, params)
    assert accepts(grammar, good)

    def walk(root: Node, more: list[Node]) -> int:
        return root.value + len(more)

    params = params_of(walk)
    assert params["properties"]["root"] == {"$ref": "#/$defs/Node"}
    assert call(walk, {"root": good, "more": [good, good]})["content"] == "3"


@needs_pydantic
def test_pydantic_defs_with_the_same_name_are_kept_apart() -> None:
    def make_a() -> type:
        class Item(BaseModel):
            count: int

        class A(BaseModel):
            item: Item

        return A

    def make_b() -> type:
        class Item(BaseModel):
            label: str

        class B(BaseModel):
            item: Item

        return B

    a_cls, b_cls = make_a(), make_b()

    def f(a, b):
        return a.item.count, b.item.label

    f.__annotations__ = {"a": a_cls, "b": b_cls}
    params = params_of(f)
    assert sorted(params["$defs"]) == ["Item", "Item2"]
    good = {"a": {"item": {"count": 1}}, "b": {"item": {"label": "x"}}}
    jsonschema.validate(good, params)
    assert accepts(check_schema(params), good)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": {"item": {"count": 1}}, "b": {"item": {"count": 1}}}, params)
    assert call(f, good)["content"] == '[1, "x"]'


@needs_pydantic
def test_annotated_field_metadata() -> None:
    def f(
        n: Annotated[int, Field(ge=1, lt=10, description="How many.")],
        code: Annotated[str, Field(min_length=2, max_length=4, pattern="^[A-Z]+$")],
        ids: Annotated[list[int], Field(min_length=1)],
    ) -> str:
        """Args:
        n: overridden by the Field's description.
        """
        return "ok"

    params = params_of(f)
    assert params["properties"] == {
        "n": {"type": "integer", "minimum": 1, "exclusiveMaximum": 10, "description": "How many."},
        "code": {"type": "string", "minLength": 2, "maxLength": 4, "pattern": "^[A-Z]+$"},
        "ids": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
    }
    assert call(f, {"n": 3, "code": "AB", "ids": [1]})["content"] == "ok"
    for bad in (
        {"n": 10, "code": "AB", "ids": [1]},
        {"n": 3, "code": "ab", "ids": [1]},
        {"n": 3, "code": "AB", "ids": []},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, params)
        assert call(f, bad)["content"].startswith("Error: ValueError: ")


@needs_pydantic
def test_types_pydantic_describes() -> None:
    def f(when: datetime.date) -> str:
        return when.isoformat()

    params = params_of(f)
    assert params["properties"]["when"] == {"type": "string", "format": "date"}
    assert call(f, {"when": "2024-02-29"})["content"] == "2024-02-29"
    assert call(f, {"when": "yesterday"})["content"].startswith("Error: ValueError: ")


# --- arguments against the schema, and against Tools.call ---------------------------------------

# (annotation, values a real caller sends, values that are wrong)
INSTANCES: list[tuple[Any, list[Any], list[Any]]] = [
    (str, ["Paris", ""], [1, None, ["a"]]),
    (int, [0, -7, 10**12], ["3", 1.5, True, None]),
    (float, [1.5, 2, -0.25], ["1.5", None, False]),
    (bool, [True, False], [0, "true"]),
    (Optional[int], [1, None], ["1", 2.5]),  # noqa: UP045
    (Union[int, str], [1, "one"], [None, [1]]),  # noqa: UP007
    (Literal["c", "f"], ["c", "f"], ["k", 1]),
    (Literal[1, "one"], [1, "one"], [True, "1", 2]),
    (Literal[True], [True], [1, "true"]),
    (Color, ["red", "green"], ["RED", "blue", 1]),
    (Level, [1, 2], [3, "1", True]),
    (list[int], [[], [1, 2, 3]], [[1, "2"], "1", {"a": 1}]),
    (set[str], [["a", "b"]], [["a", "a"], [1]]),
    (tuple[int, str], [[1, "a"]], [[1], [1, "a", 2], ["a", 1]]),
    (tuple[float, ...], [[], [1.5, 2]], [["x"]]),
    (dict[str, int], [{}, {"a": 1}], [{"a": "1"}, [1]]),
    (Point, [{"x": 1.5}, {"x": 1, "y": 2, "label": "p"}], [{"y": 1}, {"x": 1, "z": 2}, {"x": "1"}, [1, 2]]),
    (Person, [{"name": "Ann"}, {"name": "Bob", "age": 3}], [{"age": 3}, {"name": "Ann", "email": "a@b"}]),
    (Options, [{}, {"verbose": True}], [{"verbose": "yes"}]),
    (list[Point], [[{"x": 1}, {"x": 2, "y": 3}]], [[{"x": 1}, {"y": 2}]]),
    (Annotated[str, "Anything."], ["x"], [3]),
]


@pytest.mark.parametrize(("annotation", "good", "bad"), INSTANCES, ids=[repr(a) for a, _, _ in INSTANCES])
def test_instances(annotation: Any, good: list[Any], bad: list[Any]) -> None:
    fn = one_param(annotation)
    params = params_of(fn)
    grammar = check_schema(params)
    for value in good:
        jsonschema.validate({"x": value}, params)
        assert accepts(grammar, {"x": value}), value
        content = call(fn, {"x": value})["content"]
        assert not content.startswith("Error:"), (value, content)
    for value in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"x": value}, params)
        content = call(fn, {"x": value})["content"]
        assert content.startswith("Error: ValueError: tool 'f': argument 'x"), (value, content)


def test_missing_and_unexpected_arguments_fail_the_schema_too() -> None:
    params = params_of(get_weather)
    for bad in ({}, {"city": "Paris", "country": "FR"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, params)
    good = {"city": "Paris", "unit": "f", "days": 3, "detailed": True}
    jsonschema.validate(good, params)
    assert accepts(check_schema(params), good)


# --- docstrings ---------------------------------------------------------------------------------


def google(city: str, days: int = 1) -> None:
    """Forecast for a city.

    Uses the national service.

    Args:
        city (str): The city's name,
            as the user wrote it.
        days (int, optional): How many days ahead.

    Returns:
        dict: The forecast.

    Raises:
        ValueError: Unknown city.
    """


def numpy_style(city: str, days: int = 1) -> None:
    """Forecast for a city.

    Uses the national service.

    Parameters
    ----------
    city : str
        The city's name,
        as the user wrote it.
    days : int, optional
        How many days ahead.

    Returns
    -------
    dict
        The forecast.
    """


def rest_style(city: str, days: int = 1) -> None:
    """Forecast for a city.

    Uses the national service.

    :param city: The city's name,
        as the user wrote it.
    :param int days: How many days ahead.
    :type city: str
    :returns: The forecast.
    :raises ValueError: Unknown city.
    """


def epytext_style(city: str, days: int = 1) -> None:
    """Forecast for a city.

    Uses the national service.

    @param city: The city's name,
        as the user wrote it.
    @param days: How many days ahead.
    @return: The forecast.
    """


@pytest.mark.parametrize("fn", [google, numpy_style, rest_style, epytext_style])
def test_docstring_styles(fn: Any) -> None:
    description, params = _parse_docstring(fn.__doc__)
    assert description == "Forecast for a city.\n\nUses the national service."
    assert params == {"city": "The city's name, as the user wrote it.", "days": "How many days ahead."}
    spec = function_tool(fn)["function"]
    assert spec["description"] == "Forecast for a city.\n\nUses the national service."
    assert spec["parameters"]["properties"]["city"]["description"] == "The city's name, as the user wrote it."
    assert spec["parameters"]["properties"]["days"]["description"] == "How many days ahead."


def test_docstring_details() -> None:
    assert _parse_docstring(None) == ("", {})
    assert _parse_docstring("Just a summary.") == ("Just a summary.", {})
    # multi-paragraph parameter text, a type with parentheses, *args names, the description ending
    # at the first section
    doc = """Summary line.

    Args:
        mapping (dict(str, int)): Names to counts: all of them.

            Second paragraph.
        *args: Extra values.
        **kwargs: Options.

    Note:
        Not part of the description.
    """
    description, params = _parse_docstring(doc)
    assert description == "Summary line."
    assert params == {
        "mapping": "Names to counts: all of them.\n\nSecond paragraph.",
        "args": "Extra values.",
        "kwargs": "Options.",
    }
    # NumPy: several names on one line
    description, params = _parse_docstring("Sum.\n\nParameters\n----------\nx, y : float\n    Operands.\n")
    assert (description, params) == ("Sum.", {"x": "Operands.", "y": "Operands."})
    # a line ending in a colon that is not a section stays in the description
    description, params = _parse_docstring("Do this:\n    step one.\n\nArgs:\n    a: A.\n")
    assert description == "Do this:\n    step one."
    assert params == {"a": "A."}


def test_annotated_description_beats_docstring() -> None:
    def f(a: Annotated[int, "From the hint."], b: int) -> None:
        """Args:
        a: From the docstring.
        b: Only the docstring.
        """

    props = params_of(f)["properties"]
    assert props["a"]["description"] == "From the hint."
    assert props["b"]["description"] == "Only the docstring."

    @dataclasses.dataclass
    class Box:
        """A box.

        Attributes:
            width: From the docstring.
            height: Only the docstring.
        """

        width: Annotated[int, "From the hint."]
        height: int

    props = params_of(one_param(Box))["properties"]["x"]["properties"]
    assert props["width"]["description"] == "From the hint."
    assert props["height"]["description"] == "Only the docstring."


def test_methods_partials_and_callable_objects() -> None:
    import functools

    class Shop:
        def price(self, item: str, qty: int = 1) -> float:
            """Price of an item."""
            return 2.5 * qty

    shop = Shop()
    spec = function_tool(shop.price)["function"]
    assert spec["name"] == "price"
    assert list(spec["parameters"]["properties"]) == ["item", "qty"]
    assert call(shop.price, {"item": "pen", "qty": 2})["content"] == "5.0"

    def power(base: float, exp: int) -> float:
        """Raise base to exp."""
        return float(base**exp)

    square = functools.partial(power, exp=2)
    spec = function_tool(square, name="square")["function"]
    assert spec["description"] == "Raise base to exp."
    assert spec["parameters"]["required"] == ["base"]
    assert spec["parameters"]["properties"]["exp"] == {"type": "integer", "default": 2}

    class Adder:
        """Adds numbers."""

        def __call__(self, a: int, b: int) -> int:
            return a + b

    spec = function_tool(Adder())["function"]
    assert (spec["name"], spec["description"]) == ("Adder", "Adds numbers.")
    assert call(Adder(), {"a": 1, "b": 2})["content"] == "3"


# --- what function_tool refuses -----------------------------------------------------------------


def _varargs(*values: int) -> None: ...


def _varkw(**options: int) -> None: ...


def _posonly(a: int, /, b: int) -> None: ...


class Opaque:
    pass


def _opaque(thing: Opaque) -> None: ...


def _int_keys(counts: dict[int, str]) -> None: ...


def _nested(items: list[Opaque]) -> None: ...


def _callback(fn: collections.abc.Callable[[int], int]) -> None: ...


def _unresolved(x: NoSuchType) -> None: ...  # noqa: F821


@pytest.mark.parametrize(
    ("fn", "param", "words"),
    [
        (_varargs, "values", "*values"),
        (_varkw, "options", "**options"),
        (_posonly, "a", "positional-only"),
        (_opaque, "thing", "Opaque"),
        (_int_keys, "counts", "key type must be str"),
        (_nested, "items", "Opaque"),
        (_callback, "fn", "Callable"),
    ],
)
def test_refused(fn: Any, param: str, words: str) -> None:
    with pytest.raises(TypeError) as info:
        function_tool(fn)
    message = str(info.value)
    assert f"{fn.__name__}()" in message
    assert repr(param) in message
    assert words in message
    with pytest.raises(TypeError):
        Tools([fn])


def test_refused_unresolvable_hint_and_bad_name() -> None:
    with pytest.raises(TypeError, match=r"_unresolved\(\).*NoSuchType"):
        function_tool(_unresolved)
    with pytest.raises(ValueError, match="tool name"):
        function_tool(lambda: None)
    with pytest.raises(ValueError, match="tool name"):
        function_tool(get_weather, name="has space")
    with pytest.raises(ValueError, match="tool name"):
        function_tool(get_weather, name="x" * 129)
    with pytest.raises(TypeError, match="not callable"):
        function_tool(42)


# --- Tools --------------------------------------------------------------------------------------

SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    },
}


def test_tools_collection() -> None:
    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    tools = Tools([get_weather, add, SEARCH])
    assert tools.names == ["get_weather", "add", "search"]
    assert len(tools) == 3 and "add" in tools and "nope" not in tools
    assert list(tools) == tools.names
    assert tools.specs == [function_tool(get_weather), function_tool(add), SEARCH]
    assert tools.get("search") == SEARCH
    assert tools.get("nope") is None
    assert tools.callable("add") is add
    assert tools.callable("search") is None
    with pytest.raises(KeyError):
        tools.callable("nope")
    tools.specs[0]["function"]["name"] = "changed"  # copies: the collection is unchanged
    assert tools.names[0] == "get_weather" and tools.specs[0]["function"]["name"] == "get_weather"


def test_tools_refuses() -> None:
    with pytest.raises(ValueError, match="two tools are named 'get_weather'"):
        Tools([get_weather, get_weather])
    with pytest.raises(ValueError, match="two tools are named 'search'"):
        Tools([SEARCH, SEARCH])
    with pytest.raises(TypeError, match="a list of tools"):
        Tools(get_weather)
    with pytest.raises(TypeError, match="a list of tools"):
        Tools(SEARCH)
    with pytest.raises(TypeError, match="neither a callable nor a tool dict"):
        Tools([42])
    bad_dicts = [
        {"type": "retrieval", "function": SEARCH["function"]},
        {"type": "function"},
        {"type": "function", "function": {"parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "bad name", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}},
        {"type": "function", "function": {"name": "f", "description": 3, "parameters": {"type": "object"}}},
    ]
    for bad in bad_dicts:
        with pytest.raises(ValueError, match="item 0"):
            Tools([bad])
    # parameters are optional, as in OpenAI's API: a function without arguments
    bare = Tools([{"type": "function", "function": {"name": "f"}}])
    assert bare.names == ["f"]


@dataclasses.dataclass
class Booking:
    room: int
    guests: tuple[str, ...]
    color: Color


def test_call_converts_arguments_and_encodes_the_result() -> None:
    seen: dict[str, Any] = {}

    def book(
        point: Point,
        color: Color,
        level: Level,
        pair: tuple[int, str],
        tags: set[str],
        people: list[Person],
        user: UserId,
        scores: tuple[float, ...],
        count: int,
        amount: float | int,
        ratio: float | int,
        when: Point | None = None,
    ) -> Booking:
        seen.update(locals())
        return Booking(room=7, guests=("Ann", "Bob"), color=color)

    arguments = {
        "point": {"x": 1, "y": 2.5},
        "color": "green",
        "level": 2,
        "pair": [1, "a"],
        "tags": ["x", "y"],
        "people": [{"name": "Ann", "age": 30}],
        "user": 42,
        "scores": [1, 2.5],
        "count": 3.0,
        "amount": 1,
        "ratio": 2.0,
    }
    message = call(book, arguments, call_id="abc")
    assert message == {
        "role": "tool",
        "tool_call_id": "abc",
        "content": '{"room": 7, "guests": ["Ann", "Bob"], "color": "green"}',
    }
    assert seen["point"] == Point(x=1.0, y=2.5) and isinstance(seen["point"].x, float)
    assert seen["color"] is Color.GREEN
    assert seen["level"] is Level.HIGH
    assert seen["pair"] == (1, "a")
    assert seen["tags"] == {"x", "y"}
    assert seen["people"] == [{"name": "Ann", "age": 30}]
    assert seen["user"] == 42
    assert seen["scores"] == (1.0, 2.5) and isinstance(seen["scores"], tuple) and isinstance(seen["scores"][0], float)
    assert seen["count"] == 3 and type(seen["count"]) is int  # 3.0 is a JSON Schema integer
    assert type(seen["amount"]) is int and type(seen["ratio"]) is float  # the exact member of the union first
    assert seen["when"] is None  # the default: not passed


def test_nested_dataclasses_are_built() -> None:
    def total(tree: Tree) -> int:
        assert isinstance(tree, Tree) and all(isinstance(c, Tree) for c in tree.children)
        return tree.value + sum(total(c) for c in tree.children)

    assert call(total, {"tree": {"value": 1, "children": [{"value": 2}, {"value": 3, "children": []}]}}) == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "6",
    }


@pytest.mark.parametrize(
    ("result", "content"),
    [
        ("plain text, not JSON", "plain text, not JSON"),
        ({"temp": 21.5, "sky": "clear"}, '{"temp": 21.5, "sky": "clear"}'),
        ([1, None, True], "[1, null, true]"),
        (None, "null"),
        ("Zürich ☀", "Zürich ☀"),
        ({"city": "Zürich"}, '{"city": "Zürich"}'),
        (Point(1, 2, "p"), '{"x": 1, "y": 2, "label": "p"}'),
        ({"color": Color.RED, "when": datetime.date(2024, 1, 2)}, '{"color": "red", "when": "2024-01-02"}'),
    ],
)
def test_result_encoding(result: Any, content: str) -> None:
    def tool() -> Any:
        return result

    assert call(tool, {})["content"] == content


@needs_pydantic
def test_pydantic_arguments_and_result() -> None:
    def move(customer: Customer, city: str) -> Customer:
        assert isinstance(customer, Customer) and isinstance(customer.address, Address)
        return customer.model_copy(update={"address": Address(street="?", city=city)})

    customer = {"name": "Ann", "address": {"street": "Main St", "city": "Oslo"}}
    content = call(move, {"customer": customer, "city": "Bergen"})["content"]
    assert content == Customer(name="Ann", address=Address(street="?", city="Bergen")).model_dump_json()
    bad = call(move, {"customer": {"name": "Ann"}, "city": "Bergen"})["content"]
    assert bad.startswith("Error: ValueError: tool 'move': argument 'customer'")


def test_empty_and_dict_arguments() -> None:
    def now() -> str:
        return "noon"

    tools = Tools([now, get_weather])
    for arguments in ("", "  ", None, "{}", {}):
        message = tools.call({"id": "1", "type": "function", "function": {"name": "now", "arguments": arguments}})
        assert message["content"] == "noon"
    message = tools.call({"id": "2", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}})
    assert message == {"role": "tool", "tool_call_id": "2", "content": "Oslo:c:1:False"}


def _boom(x: int) -> int:
    raise ZeroDivisionError(f"cannot divide {x}")


ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown tool", {"function": {"name": "nope", "arguments": "{}"}}, "unknown tool 'nope'"),
    ("not JSON", {"function": {"name": "get_weather", "arguments": '{"city": '}}, "not valid JSON"),
    ("not an object", {"function": {"name": "get_weather", "arguments": '["Paris"]'}}, "must be a JSON object"),
    (
        "missing",
        {"function": {"name": "get_weather", "arguments": '{"unit": "c"}'}},
        "missing required argument(s) 'city'",
    ),
    (
        "unexpected",
        {"function": {"name": "get_weather", "arguments": '{"city": "Oslo", "country": "NO"}'}},
        "unexpected argument(s) 'country'",
    ),
    (
        "wrong type",
        {"function": {"name": "get_weather", "arguments": '{"city": 3}'}},
        "argument 'city': expected string",
    ),
    ("wrong enum", {"function": {"name": "get_weather", "arguments": '{"city": "x", "unit": "k"}'}}, "argument 'unit'"),
    ("no function", {"function": {"name": "search", "arguments": '{"q": "x"}'}}, "no Python function is registered"),
    ("no name", {"function": {"arguments": "{}"}}, "no function name"),
    ("bad type", {"type": "code", "function": {"name": "get_weather"}}, "unsupported tool call type"),
]


@pytest.mark.parametrize(("what", "tool_call", "words"), ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_calls(what: str, tool_call: dict[str, Any], words: str) -> None:
    tool_call = {"id": "c1", "type": "function", **tool_call}
    message = Tools([get_weather, _boom, SEARCH]).call(tool_call)
    assert message["role"] == "tool" and message["tool_call_id"] == "c1"
    assert message["content"].startswith("Error: ValueError: "), message
    assert words in message["content"]
    with pytest.raises(ValueError, match="^" + re.escape(message["content"][len("Error: ValueError: ") :])):
        Tools([get_weather, _boom, SEARCH], raise_errors=True).call(tool_call)
    assert asyncio.run(Tools([get_weather, _boom, SEARCH]).acall(tool_call)) == message


def test_tool_exception() -> None:
    tool_call = {"id": "c2", "type": "function", "function": {"name": "_boom", "arguments": '{"x": 3}'}}
    message = Tools([_boom]).call(tool_call)
    assert message == {"role": "tool", "tool_call_id": "c2", "content": "Error: ZeroDivisionError: cannot divide 3"}
    with pytest.raises(ZeroDivisionError, match="cannot divide 3"):
        Tools([_boom], raise_errors=True).call(tool_call)
    assert asyncio.run(Tools([_boom]).acall(tool_call)) == message
    with pytest.raises(ZeroDivisionError):
        asyncio.run(Tools([_boom], raise_errors=True).acall(tool_call))


def test_unserialisable_result_is_an_error() -> None:
    def loop() -> Any:
        x: list[Any] = []
        x.append(x)
        return x

    assert call(loop, {})["content"].startswith("Error: ValueError: Circular reference")


# --- async --------------------------------------------------------------------------------------


def _tc(name: str, arguments: dict[str, Any], call_id: str = "1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def test_acall_awaits_coroutines_and_runs_calls_concurrently() -> None:
    async def main() -> list[dict[str, str]]:
        first_in, second_in = asyncio.Event(), asyncio.Event()

        async def first(n: int) -> str:
            first_in.set()
            await asyncio.wait_for(second_in.wait(), 10)  # only returns if the other call runs meanwhile
            return f"first {n}"

        async def second(n: int) -> str:
            second_in.set()
            await asyncio.wait_for(first_in.wait(), 10)
            return f"second {n}"

        tools = Tools([first, second], raise_errors=True)
        return list(
            await asyncio.gather(tools.acall(_tc("first", {"n": 1}, "a")), tools.acall(_tc("second", {"n": 2}, "b")))
        )

    assert asyncio.run(main()) == [
        {"role": "tool", "tool_call_id": "a", "content": "first 1"},
        {"role": "tool", "tool_call_id": "b", "content": "second 2"},
    ]


def test_acall_runs_sync_tools_in_threads() -> None:
    barrier = threading.Barrier(2, timeout=10)  # both calls must be inside at the same time
    loop_threads: list[int] = []

    def wait(tag: str) -> str:
        assert threading.get_ident() not in loop_threads
        barrier.wait()
        return tag

    async def main() -> tuple[dict[str, str], ...]:
        loop_threads.append(threading.get_ident())
        tools = Tools([wait], raise_errors=True)
        return tuple(
            await asyncio.gather(tools.acall(_tc("wait", {"tag": "x"})), tools.acall(_tc("wait", {"tag": "y"})))
        )

    assert [m["content"] for m in asyncio.run(main())] == ["x", "y"]


def test_call_runs_a_coroutine_function_without_a_loop() -> None:
    async def slow_add(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    assert Tools([slow_add]).call(_tc("slow_add", {"a": 2, "b": 3}))["content"] == "5"


def test_call_inside_a_running_loop_says_to_use_acall() -> None:
    async def fetch(url: str) -> str:
        return url

    async def main() -> None:
        tools = Tools([fetch])  # raise_errors=False: still raised, it is the caller's mistake
        with pytest.raises(RuntimeError, match="acall"):
            tools.call(_tc("fetch", {"url": "u"}))
        assert (await tools.acall(_tc("fetch", {"url": "u"})))["content"] == "u"

    asyncio.run(main())


def test_async_tool_errors() -> None:
    async def fail(x: int) -> int:
        raise KeyError(x)

    tools = Tools([fail])
    assert asyncio.run(tools.acall(_tc("fail", {"x": 1})))["content"] == "Error: KeyError: 1"
    assert tools.call(_tc("fail", {"x": 1}))["content"] == "Error: KeyError: 1"
    assert asyncio.run(tools.acall(_tc("fail", {"x": "1"})))["content"].startswith("Error: ValueError: tool 'fail'")
    with pytest.raises(KeyError):
        asyncio.run(Tools([fail], raise_errors=True).acall(_tc("fail", {"x": 1})))


# --- structured output --------------------------------------------------------------------------


@needs_pydantic
def test_response_format_and_parse_model_round_trip() -> None:
    fmt = response_format(Customer)
    assert fmt == {
        "type": "json_schema",
        "json_schema": {"name": "Customer", "schema": Customer.model_json_schema(), "strict": True},
    }
    grammar = check_schema(fmt["json_schema"]["schema"])
    customer = Customer(name="Ann", address=Address(street="Main St", city="Oslo"), tags=["vip"])
    text = customer.model_dump_json()
    assert pyllama.grammar_match(grammar, text) == "complete"
    assert parse_model(Customer, text) == customer
    assert parse_model(Customer, text.encode()) == customer
    with pytest.raises(ValueError, match="the reply is not a valid Customer"):
        parse_model(Customer, '{"name": "Ann"}')
    with pytest.raises(ValueError, match="the reply is not a valid Customer"):
        parse_model(Customer, "Sure! Here is the JSON")
    assert response_format(Customer, name="cust", strict=False)["json_schema"]["name"] == "cust"
    with pytest.raises(ValueError, match="1-64"):
        response_format(Customer, name="a b")


@needs_pydantic
def test_response_format_of_other_types() -> None:
    import typing_extensions

    class Pet(typing_extensions.TypedDict):
        name: str
        legs: int

    for tp, value, bad in [
        (Point, Point(1.0, 2.0, "p"), '{"y": 1}'),
        (list[int], [1, 2, 3], '["a"]'),
        (Pet, {"name": "Rex", "legs": 4}, '{"name": "Rex"}'),
    ]:
        fmt = response_format(tp)
        schema = fmt["json_schema"]["schema"]
        assert schema == pydantic.TypeAdapter(tp).json_schema()
        text = pydantic.TypeAdapter(tp).dump_json(value).decode()
        jsonschema.validate(json.loads(text), schema)
        assert pyllama.grammar_match(check_schema(schema), text) == "complete"
        assert parse_model(tp, text) == value
        with pytest.raises(ValueError, match="the reply is not a valid"):
            parse_model(tp, bad)
    assert response_format(list[int])["json_schema"]["name"] == "list"
    with pytest.raises(TypeError, match="pydantic cannot handle"):
        response_format(Opaque)


# --- without pydantic ---------------------------------------------------------------------------


def test_works_without_pydantic() -> None:
    code = """
import sys
sys.modules["pydantic"] = None  # import pydantic now raises ImportError
import dataclasses, datetime, json
from typing import Annotated, NewType
from pyllama.tools import Tools, function_tool, parse_model, response_format

@dataclasses.dataclass
class P:
    x: int

def f(p: P, n: int = 2) -> P:
    "Echo p."
    return P(p.x * n)

spec = function_tool(f)
assert spec["function"]["parameters"]["properties"]["p"]["required"] == ["x"], spec
message = Tools([f]).call({"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"p": {"x": 3}}'}})
assert message["content"] == '{"x": 6}', message

UserId = NewType("UserId", int)
def h(user: UserId, tags: list[Annotated[str, "A tag."]]) -> None: ...
assert function_tool(h)["function"]["parameters"]["properties"] == {
    "user": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "description": "A tag."}},
}
message = Tools([h]).call({"id": "1", "function": {"name": "h", "arguments": '{"user": "1", "tags": []}'}})
assert message["content"].startswith("Error: ValueError: tool 'h': argument 'user': expected integer"), message

def g(when: datetime.date) -> None: ...
try:
    function_tool(g)
except TypeError as e:
    assert "'when'" in str(e)
else:
    raise AssertionError("datetime needs pydantic")
for fn in (response_format, lambda t: parse_model(t, "{}")):
    try:
        fn(P)
    except ImportError as e:
        assert "needs pydantic" in str(e)
    else:
        raise AssertionError("no ImportError")
print("ok")
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_module_does_not_import_pydantic() -> None:
    code = "import sys, pyllama.tools; print('pydantic' in sys.modules)"
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
