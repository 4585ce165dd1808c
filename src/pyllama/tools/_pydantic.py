"""pydantic, imported lazily: pydantic is optional, so nothing here imports it before it is needed.

Tests for pydantic classes and instances (``_is_model_class``, ``_is_model``, ...) look only at an already
imported pydantic, and ``_adapter`` caches the ``TypeAdapter`` of each type.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import sys
from typing import Any


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
