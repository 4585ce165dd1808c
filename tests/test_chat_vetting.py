"""Untrusted chat templates are vetted before llama.cpp runs them in this process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import pyllama

from tiny_models import template_text

HOSTILE = {
    "macro that calls itself": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "100,000-deep nesting": "{% if true %}" * 100_000 + "x" + "{% endif %}" * 100_000,
    "100,000-deep expression": "{{ " + "(" * 100_000 + "1" + ")" * 100_000 + " }}",
    "loop over range(10**9)": "{% for i in range(1000000000) %}x{% endfor %}",
    "'a' * 10**9": "{{ 'a' * 1000000000 }}",
}


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_refused_quickly_and_cheaply(name: str) -> None:
    before = rss_kb()
    start = time.monotonic()
    with pytest.raises(pyllama.TemplateError):
        pyllama.ChatTemplate(template=HOSTILE[name])
    assert time.monotonic() - start < 5.0
    assert rss_kb() - before < 200 * 1024
    # ... and a good template still works in this process afterwards.
    good = pyllama.ChatTemplate(template=template_text("Qwen-Qwen2.5-7B-Instruct"))
    assert "<|im_start|>user\nhi" in good.apply([{"role": "user", "content": "hi"}]).prompt


def test_hostile_template_in_a_model_file_is_refused(tmp_path: Path) -> None:
    from tiny_models import write_tiny_llama

    path = write_tiny_llama(tmp_path / "evil.gguf", n_layer=1, chat_template=HOSTILE["macro that calls itself"])
    with pyllama.Model(str(path), vocab_only=True) as model, pytest.raises(pyllama.TemplateError):
        pyllama.ChatTemplate(model)


def test_a_vetted_template_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYLLAMA_CACHE", str(tmp_path))
    source = template_text("Qwen-Qwen2.5-7B-Instruct") + "{# a variant only this test uses #}"
    pyllama.vet_template(source)
    assert len(list((tmp_path / "vetted-templates").iterdir())) == 1


@pytest.mark.parametrize("depth", [100, 5000])
def test_deeply_nested_requests_are_refused(depth: int) -> None:
    tmpl = pyllama.ChatTemplate(template=template_text("Qwen-Qwen2.5-7B-Instruct"))
    deep: object = "x"
    for _ in range(depth):
        deep = {"type": "object", "properties": {"a": deep}}
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": deep}}
    with pytest.raises(ValueError, match="nested"):
        tmpl.apply([{"role": "user", "content": "hi"}], tools=[tool])
    with pytest.raises((ValueError, RecursionError)):
        tmpl.apply([{"role": "user", "content": "hi"}], json_schema=deep)
