"""Structured output with pydantic: ``response_format`` (a chat request's JSON-schema ``response_format`` of
a type) and ``parse_model`` (a reply's JSON text as that type). Both need pydantic.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar, overload

from ._pydantic import _adapter, _is_model_class, _need_pydantic
from ._schema import _type_name

_T = TypeVar("_T")
_RESPONSE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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
