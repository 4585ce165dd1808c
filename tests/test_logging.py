"""llama.cpp's log, ggml's and common's, reaches Python's logging; silent by default."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import pyllama

from conftest import run_python
from tiny_models import vocab_path


def wait_for(caplog: pytest.LogCaptureFixture, pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pyllama._logging.flush()
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_llama_cpp_lines_reach_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyllama")
    pyllama.set_log_level(logging.INFO)
    try:
        pyllama.Model(str(vocab_path("llama-spm")), vocab_only=True).close()
        assert wait_for(caplog, lambda: "llama_model_loader" in caplog.text)
        assert all(r.name == "pyllama" for r in caplog.records)
        # one record per line, newline stripped
        assert all("\n" not in r.getMessage() for r in caplog.records)
    finally:
        pyllama.set_log_level(logging.NOTSET)


def test_lines_below_the_level_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="pyllama")
    pyllama.set_log_level(logging.ERROR)
    try:
        pyllama.Model(str(vocab_path("llama-spm")), vocab_only=True).close()
        time.sleep(0.3)
        pyllama._logging.flush()
        assert [r for r in caplog.records if r.levelno < logging.ERROR] == []
    finally:
        pyllama.set_log_level(logging.NOTSET)


def test_common_library_log_is_routed_too(caplog: pytest.LogCaptureFixture) -> None:
    """common/ has its own logger (not llama_log_set); its warning arrives as a pyllama record."""
    caplog.set_level(logging.WARNING, logger="pyllama")
    with pyllama.Model(str(vocab_path("llama-spm")), vocab_only=True) as model:
        with pytest.raises(ValueError, match="unable to match sampler by name 'bogus'"):
            pyllama.Sampler(model, samplers=["top_k", "bogus"])
    assert wait_for(caplog, lambda: "common_sampler_types_from_names" in caplog.text)


def test_silent_by_default(tiny_model_path: Path) -> None:
    """Without logging configured, loading and decoding print nothing (llama.cpp alone prints a lot)."""
    proc = run_python(
        """
        import sys, pyllama
        m = pyllama.Model(sys.argv[1])
        ctx = pyllama.Context(m, n_ctx=64)
        ctx.decode(pyllama.Batch.from_tokens(m.tokenize("Hello world")))
        print("done")
        """,
        str(tiny_model_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert proc.stderr == ""


def test_verbose_subprocess_shows_lines_on_stderr(tiny_model_path: Path) -> None:
    proc = run_python(
        """
        import logging, sys, pyllama
        logging.basicConfig(level=logging.INFO)
        pyllama.set_log_level(logging.INFO)
        pyllama.Model(sys.argv[1]).close()
        """,
        str(tiny_model_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "INFO:pyllama:llama_model_loader" in proc.stderr
