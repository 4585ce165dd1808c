"""Bad input from Python gets a clear exception, never a crash. Each case runs in a subprocess,
so that a crash would fail the test instead of taking pytest down."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import run_python
from isolated_cases import check_case, run_cases
from tiny_models import vocab_path

# Each case: Python code run against `m` (a loaded vocabulary; TMP is a fresh directory) and the
# exception type it must raise with a fragment of the message. The cases run in as few subprocesses
# as possible (tests/isolated_cases.py): a crash still fails exactly the case that caused it.
CASES: dict[str, tuple[str, str, str]] = {
    "missing file": ("pyllama.Model('/no/such/model.gguf')", "FileNotFoundError", "not found"),
    "directory": ("pyllama.Model(TMP)", "LlamaError", "directory"),
    "not gguf": (
        "open(TMP + '/x.gguf', 'wb').write(b'hello world'); pyllama.Model(TMP + '/x.gguf')",
        "LlamaError",
        "not a GGUF file",
    ),
    "empty file": (
        "open(TMP + '/e.gguf', 'wb').close(); pyllama.Model(TMP + '/e.gguf')",
        "LlamaError",
        "not a GGUF file",
    ),
    "truncated": (
        "open(TMP + '/t.gguf', 'wb').write(open(VOCAB, 'rb').read()[:5000]); pyllama.Model(TMP + '/t.gguf')",
        "LlamaError",
        "t.gguf",
    ),
    "split_mode": ("pyllama.Model(VOCAB, split_mode='diagonal')", "ValueError", "split_mode"),
    "main_gpu": ("pyllama.Model(VOCAB, main_gpu=-1)", "ValueError", "main_gpu"),
    "tensor_split length": ("pyllama.Model(VOCAB, tensor_split=[1.0] * 100000)", "ValueError", "tensor_split"),
    "tensor_split value": ("pyllama.Model(VOCAB, tensor_split=[float('nan')])", "ValueError", "tensor_split"),
    "kv_overrides key": ("pyllama.Model(VOCAB, kv_overrides={'k' * 200: 1})", "ValueError", "127"),
    "kv_overrides value": ("pyllama.Model(VOCAB, kv_overrides={'a.b': [1]})", "ValueError", "bool, int, float or str"),
    "kv_overrides int": ("pyllama.Model(VOCAB, kv_overrides={'a.b': 2**70})", "ValueError", "64-bit"),
    # Metadata the loader would abort on (GGML_ASSERT) is refused first, overrides included.
    "override block_count 0": (
        "pyllama.Model(VOCAB, kv_overrides={'llama.block_count': 0})",
        "LlamaError",
        "block_count is 0",
    ),
    "override block_count 600": (
        "pyllama.Model(VOCAB, kv_overrides={'llama.block_count': 600})",
        "LlamaError",
        "block_count is 600",
    ),
    "override experts": (
        "pyllama.Model(VOCAB, kv_overrides={'llama.expert_count': 4})",
        "LlamaError",
        "expert_used_count is 0",
    ),
    "override too many experts": (
        "pyllama.Model(VOCAB, kv_overrides={'llama.expert_count': 5000})",
        "LlamaError",
        "expert_count is 5000",
    ),
    "override rope scaling": (
        "pyllama.Model(VOCAB, kv_overrides={'llama.rope.scaling.type': 'bogus'})",
        "LlamaError",
        "rope.scaling.type",
    ),
    "progress not callable": ("pyllama.Model(VOCAB, progress_callback=3)", "TypeError", "callable"),
    "detokenize id too big": ("m.detokenize([1, 10**6])", "ValueError", "out of range"),
    "detokenize id negative": ("m.detokenize([-1])", "ValueError", "out of range"),
    "detokenize id huge": ("m.detokenize([2**40])", "ValueError", "out of range"),
    "detokenize not ints": ("m.detokenize(['a'])", "TypeError", "integers"),
    "token_to_piece": ("m.token_to_piece(32000)", "ValueError", "out of range"),
    "token_to_piece lstrip": ("m.token_to_piece(5, lstrip=-1)", "ValueError", "lstrip"),
    "token_get_text": ("m.token_get_text(-5)", "ValueError", "out of range"),
    "token_get_attr": ("m.token_get_attr(99999)", "ValueError", "out of range"),
    "token_is_eog": ("m.token_is_eog(99999)", "ValueError", "out of range"),
    "invalid utf-8": ("m.tokenize(b'ok \\xff\\xfe')", "ValueError", "UTF-8"),
    "truncated utf-8": ("m.tokenize(b'ok \\xe4\\xbd')", "ValueError", "UTF-8"),
    "surrogate utf-8": ("m.tokenize(b'\\xed\\xa0\\x80')", "ValueError", "UTF-8"),
    "lone surrogate str": ("m.tokenize('a\\ud800b')", "UnicodeEncodeError", "surrogate"),
    "tokenize wrong type": ("m.tokenize(42)", "TypeError", "str or bytes"),
    "closed model": ("m.close(); m.tokenize('x')", "LlamaError", "closed"),
    "closed twice": ("m.close(); m.close()", "LlamaError", "already closed"),
}

SETUP = """
import pyllama
m = pyllama.Model(VOCAB, vocab_only=True)
"""


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    setup = f"VOCAB = {str(vocab_path('llama-spm'))!r}\n" + SETUP
    return run_cases(setup, {name: code for name, (code, _, _) in CASES.items()}, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises(case: str, bad_input_results: dict[str, dict[str, Any]]) -> None:
    _, exc_type, fragment = CASES[case]
    check_case(bad_input_results[case], exc_type, fragment)


def test_huge_input_tokenizes_or_raises_cleanly() -> None:
    """A 16 MiB text (twice the server's largest body) either tokenizes (the result is then checked) or raises; it
    never crashes."""
    proc = run_python(
        """
        import sys, pyllama
        m = pyllama.Model(sys.argv[1], vocab_only=True)
        text = "ab " * (16 * 1024 * 1024 // 3)
        tokens = m.tokenize(text, add_special=False)
        assert len(tokens) > 1_000_000
        print(len(tokens))
        """,
        str(vocab_path("llama-spm")),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
