"""The real Gemma 3 270M loads and reports the metadata written in its file."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

import pyllama

pytestmark = pytest.mark.real_model


def test_gemma_metadata(gemma_path: Path) -> None:
    reader = gguf.GGUFReader(gemma_path)
    fields = reader.fields

    def val(key: str) -> object:
        return fields[key].contents()

    with pyllama.Model(str(gemma_path)) as model:
        assert model.architecture == val("general.architecture") == "gemma3"
        assert model.n_layer == val("gemma3.block_count")
        assert model.n_embd == val("gemma3.embedding_length")
        assert model.n_head == val("gemma3.attention.head_count")
        assert model.n_head_kv == val("gemma3.attention.head_count_kv")
        assert model.n_ctx_train == val("gemma3.context_length")
        assert model.n_vocab == len(fields["tokenizer.ggml.tokens"].data)
        assert model.token_bos == val("tokenizer.ggml.bos_token_id")
        assert model.token_eos == val("tokenizer.ggml.eos_token_id")
        assert model.n_params == sum(int(t.n_elements) for t in reader.tensors)
        assert 250e6 < model.n_params < 300e6  # "270M"
        assert model.size <= gemma_path.stat().st_size
        key = "tokenizer.chat_template"
        assert model.chat_template == (val(key) if key in fields else None)
        assert "Q4_K" in model.description
        # Gemma's tokenizer: a BOS, then the text; the round trip gives the text back.
        tokens = model.tokenize("The capital of France is")
        assert tokens[0] == model.token_bos
        assert model.detokenize(tokens, remove_special=True) == "The capital of France is"
        assert (
            model.token_id("<start_of_turn>")
            == model.tokenize("<start_of_turn>", add_special=False, parse_special=True)[0]
        )
