"""Docstrings -> descriptions: a callable's or class's description and its parameters' descriptions.

Google style (``Args:``), NumPy style (``Parameters`` underlined with dashes) and reST/Sphinx or Epytext
fields (``:param x:``, ``@param x:``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterable

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
