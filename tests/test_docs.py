"""The code in the docs runs as written (on the default model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.real_model
def test_low_level_walkthrough_runs(gemma_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (DOCS / "low-level.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    exec(compile(code.group(1), "docs/low-level.md", "exec"), {})  # its asserts check greedy == argmax
    out = capsys.readouterr().out
    assert out.startswith("most likely next token:")
    assert "The capital of France is" in out


def test_chat_walkthrough_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tiny_models import TEMPLATES

    text = (DOCS / "chat.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    monkeypatch.chdir(TEMPLATES)  # the example opens a template of llama.cpp's models/templates
    exec(compile(code.group(1), "docs/chat.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "True True"
    assert out[2].startswith("Let me check. {'name': 'get_weather'")
    assert out[-1] == "{'city': 'Paris'}"


def _run_with_a_model(doc: str, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the first Python block of docs/`doc` in a folder where "model.gguf" is `model`."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    (tmp_path / "model.gguf").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.group(1), f"docs/{doc}", "exec"), {})


def test_llama_walkthrough_runs(
    tiny_chat_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_with_a_model("llama.md", tiny_chat_model_path, tmp_path, monkeypatch)
    out = capsys.readouterr().out.splitlines()
    first = out[0].split()
    assert first[0] == "chat.completion" and first[1] in ("stop", "length") and 0 < int(first[2]) <= 16
    assert out[1:] == ["True", "assistant True", "True"]


def test_the_errors_example_runs(
    tiny_chat_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_with_a_model("errors.md", tiny_chat_model_path, tmp_path, monkeypatch)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "max_tokens" and out[1] == "chat.completion"
    assert out[2] == "messages[0].role"
    assert out[3] == "grammar"


def test_multimodal_walkthrough_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/multimodal.md on a tiny chat model with a tiny Gemma 3 vision projector and llama.cpp's
    test image: its checks (the low-level greedy loop against Llama.chat, no second encode) print True."""
    from tiny_models import LLAMA_CPP, template_text, write_tiny_llama, write_tiny_mmproj_vision

    write_tiny_llama(
        tmp_path / "model.gguf", vocab="qwen2", chat_template=template_text("Qwen-Qwen2.5-7B-Instruct"), name="tiny"
    )
    write_tiny_mmproj_vision(tmp_path / "mmproj.gguf", text_n_embd=64)
    (tmp_path / "image.jpeg").symlink_to(LLAMA_CPP / "tools" / "mtmd" / "test-1.jpeg")
    text = (DOCS / "multimodal.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    exec(compile(code.group(1), "docs/multimodal.md", "exec"), {})
    assert capsys.readouterr().out.splitlines() == [
        "True False",
        "True",
        "True True",
        "['text', 'image', 'text']",
        "True",
        "True",
    ]
