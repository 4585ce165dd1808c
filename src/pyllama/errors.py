"""pyllama's exceptions: one hierarchy under ``LlamaError``, told apart by type, never by message.

``LlamaError`` (a ``RuntimeError``) is a failure of the engine. ``InvalidRequestError`` is the caller's
mistake: it is also a ``ValueError`` and names the request parameter at fault in ``param`` (OpenAI's
``messages[2].role``, or None). The C++ core raises the same types (they are defined in
``pyllama._core``); the server maps each to an HTTP status in one table (``pyllama.server.app``).

::

    LlamaError (RuntimeError)
    ├── ModelLoadError              the model file cannot be loaded
    ├── CancelledError              the generation was stopped: the Llama or its engine was closed
    └── InvalidRequestError (ValueError)
        ├── ContextLengthError      the prompt, with max_tokens, does not fit the context
        ├── TemplateError           the chat template refused the messages, or is refused
        ├── GrammarError            a grammar or a JSON schema that does not compile
        └── RequestTooComplexError  preparing the request took longer than its time limit (a server's)
"""

from __future__ import annotations

from typing import Any

from ._core import (
    CancelledError,
    ContextLengthError,
    GrammarError,
    InvalidRequestError,
    LlamaError,
    ModelLoadError,
    RequestTooComplexError,
    TemplateError,
)

__all__ = [
    "CancelledError",
    "ContextLengthError",
    "GrammarError",
    "InvalidRequestError",
    "LlamaError",
    "ModelLoadError",
    "RequestTooComplexError",
    "TemplateError",
]


def invalid(message: str, param: str | None = None, kind: type[InvalidRequestError] = InvalidRequestError) -> Any:
    """An ``InvalidRequestError`` (or the subclass ``kind``) naming ``param``."""
    error = kind(message)
    error.param = param
    return error
