"""The `pyllama` command, driven as a user would drive it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyllama


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyllama", *args], capture_output=True, text=True, timeout=120)


def test_info_json_reports_the_model(tiny_chat_model_path: Path) -> None:
    proc = run_cli("info", str(tiny_chat_model_path), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    with pyllama.Model(str(tiny_chat_model_path), vocab_only=True) as model:
        assert info["metadata"] == model.metadata
        assert info["n_vocab"] == model.n_vocab
    assert info["n_layer"] == 2 and info["architecture"] == "llama"
    assert info["chat_templates"] == ["default"]


def test_info_shows_tokenization(tiny_model_path: Path) -> None:
    proc = run_cli("info", str(tiny_model_path), "--prompt", "Hello world")
    assert proc.returncode == 0, proc.stderr
    assert "[1, 15043, 3186]" in proc.stdout


def test_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    proc = run_cli("info", str(tmp_path / "nope.gguf"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"pyllama: model file not found: '{tmp_path / 'nope.gguf'}'"


def test_system() -> None:
    proc = run_cli("system")
    assert proc.returncode == 0
    assert pyllama.LLAMA_CPP_COMMIT[:9] in proc.stdout and "CPU" in proc.stdout
