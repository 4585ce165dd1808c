"""Tools as Python callables: OpenAI tool specs from type hints and docstrings, and running the calls.

``function_tool(fn)`` describes a function as an OpenAI tool: its parameters' type hints become a
JSON schema and its docstring (Google, NumPy or reST style) gives the descriptions. ``Tools`` holds
a set of tools and executes the calls a model makes (``call`` / ``acall``), turning the JSON
arguments into the annotated Python types and the result, or the error, into a tool message.

pydantic is optional: its models, dataclasses and types are understood when it is installed (it is
imported only when it is needed), and ``response_format`` / ``parse_model`` need it.

The package, by concern:

- ``_describe``: callables -> tool specs (``function_tool``)
- ``_docstrings``: docstrings -> descriptions (Google, NumPy, reST)
- ``_schema``: type hints -> JSON schema
- ``_convert``: JSON arguments -> Python values
- ``_runner``: ``Tools``, running the calls and the tool messages
- ``_response``: ``response_format`` / ``parse_model`` (structured output with pydantic)
- ``_pydantic``: the lazy, optional pydantic
"""

from __future__ import annotations

from ._describe import function_tool
from ._docstrings import _parse_docstring as _parse_docstring
from ._response import parse_model, response_format
from ._runner import Tools

__all__ = ["Tools", "function_tool", "parse_model", "response_format"]
