"""pyllama: Python bindings for llama.cpp.

The engine is a pinned llama.cpp compiled into the extension module ``pyllama._core``. Its log goes
to the ``logging`` logger named ``pyllama`` (silent unless you configure logging).
"""

from __future__ import annotations

try:
    from . import _core  # noqa: F401  (imported first so that a failure is explained)
except ImportError as _err:  # pragma: no cover - only when the build is missing or broken
    raise ImportError(
        "pyllama's native extension (pyllama._core) could not be imported. pyllama must be built "
        "and installed with `pip install .` from its source tree (which compiles llama.cpp); "
        "importing it from a source checkout without installing does not work. "
        f"The underlying error was: {_err}"
    ) from _err

from . import tools
from ._core import (
    JSON_GRAMMAR,
    LLAMA_CPP_COMMIT,
    PORTABLE,
    Batch,
    ChatResult,
    ChatStream,
    Chunk,
    Context,
    Engine,
    EngineRequest,
    LlamaError,
    LoraAdapter,
    Media,
    Model,
    Notifier,
    Projector,
    Sampler,
    TokenAttr,
    __version__,
    devices,
    grammar_match,
    json_schema_to_grammar,
    kv_cache_types,
    load_control_vectors,
    max_devices,
    rpc_serve,
    set_template_limits,
    supports_gpu_offload,
    supports_mlock,
    supports_mmap,
    system_info,
    template_limits,
    template_render_peaks,
)
from ._logging import logger, set_log_level
from .cache import DiskCache, LlamaState, RAMCache, StateCache
from .chat import ChatTemplate, vet_template
from .errors import (
    CancelledError,
    ContextLengthError,
    GrammarError,
    InvalidRequestError,
    ModelLoadError,
    RequestTooComplexError,
    TemplateError,
)
from .llama import AsyncStream, Llama, Stream
from .media import MediaPolicy
from .session import ChatSession

__all__ = [
    "JSON_GRAMMAR",
    "LLAMA_CPP_COMMIT",
    "PORTABLE",
    "AsyncStream",
    "Batch",
    "CancelledError",
    "ChatResult",
    "ChatSession",
    "ChatStream",
    "ChatTemplate",
    "Chunk",
    "Context",
    "ContextLengthError",
    "DiskCache",
    "Engine",
    "EngineRequest",
    "GrammarError",
    "InvalidRequestError",
    "Llama",
    "LlamaError",
    "LlamaState",
    "LoraAdapter",
    "Media",
    "MediaPolicy",
    "Model",
    "ModelLoadError",
    "Notifier",
    "Projector",
    "RAMCache",
    "RequestTooComplexError",
    "Sampler",
    "StateCache",
    "Stream",
    "TemplateError",
    "TokenAttr",
    "__version__",
    "devices",
    "grammar_match",
    "json_schema_to_grammar",
    "kv_cache_types",
    "load_control_vectors",
    "logger",
    "max_devices",
    "rpc_serve",
    "set_log_level",
    "set_template_limits",
    "supports_gpu_offload",
    "supports_mlock",
    "supports_mmap",
    "system_info",
    "template_limits",
    "template_render_peaks",
    "tools",
    "vet_template",
]
