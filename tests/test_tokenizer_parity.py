"""Tokenizer parity with llama.cpp's own test vectors (tests/test-tokenizer-0.cpp and its data)."""

from __future__ import annotations

from pathlib import Path

import pytest

import pyllama

from tiny_models import VOCABS

SEP = "\n__ggml_vocab_test__\n"
VOCAB_FILES = sorted(p for p in VOCABS.glob("ggml-vocab-*.gguf") if Path(f"{p}.inp").is_file())


def read_vectors(vocab: Path) -> dict[str, list[int]]:
    """Parse <vocab>.inp/.out exactly as test-tokenizer-0.cpp does (a map: later duplicates win)."""
    raw = Path(f"{vocab}.inp").read_bytes().decode("utf-8")
    inputs: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt == -1:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    outputs = Path(f"{vocab}.out").read_text(encoding="utf-8").split("\n")
    if outputs and outputs[-1] == "":
        outputs.pop()
    assert len(inputs) == len(outputs), f"{vocab.name}: {len(inputs)} inputs, {len(outputs)} outputs"
    return {s: [int(t) for t in o.strip().split(" ") if t] for s, o in zip(inputs, outputs, strict=False)}


def test_vectors_found() -> None:
    assert len(VOCAB_FILES) >= 10, "llama.cpp's tokenizer test data is missing from vendor/llama.cpp/models"


@pytest.mark.parametrize("vocab", VOCAB_FILES, ids=lambda p: p.name.removeprefix("ggml-vocab-").removesuffix(".gguf"))
def test_tokenizer_matches_llama_cpp_vectors(vocab: Path) -> None:
    vectors = read_vectors(vocab)
    with pyllama.Model(str(vocab), vocab_only=True) as model:
        mismatches = []
        for text, expected in vectors.items():
            got = model.tokenize(text, add_special=False, parse_special=False)
            if got != expected:
                mismatches.append((text, expected, got))
        assert not mismatches, f"{len(mismatches)} of {len(vectors)} differ, first: {mismatches[0]!r}"
