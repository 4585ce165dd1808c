"""Model: loading options, metadata, vocabulary and tokenizer, checked against the GGUF file itself."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import gguf
import pytest

import pyllama

from tiny_models import template_text, vocab_path, write_tiny_llama


def gguf_scalar(path: Path, key: str) -> object:
    field = gguf.GGUFReader(path).fields[key]
    return field.contents()


def test_metadata_matches_the_file(tiny_chat_model_path: Path) -> None:
    reader = gguf.GGUFReader(tiny_chat_model_path)
    with pyllama.Model(str(tiny_chat_model_path)) as model:
        assert model.architecture == "llama"
        assert model.name == "tiny-qwen"
        assert model.n_layer == 2
        assert model.n_embd == 64
        assert model.n_head == 4
        assert model.n_head_kv == 2
        assert model.n_ctx_train == 2048
        assert model.n_vocab == len(reader.fields["tokenizer.ggml.tokens"].data)
        # n_params: the sum of the sizes of the tensors in the file.
        assert model.n_params == sum(int(t.n_elements) for t in reader.tensors)
        assert model.vocab_type == "bpe"
        assert not model.has_encoder and model.has_decoder
        assert not model.is_recurrent
        meta = model.metadata
        for key in ("general.name", "llama.block_count", "llama.context_length", "tokenizer.ggml.model"):
            assert meta[key] == str(reader.fields[key].contents())
        # The chat template is the file's, byte for byte.
        assert model.chat_template == template_text("Qwen-Qwen2.5-7B-Instruct")
        assert model.chat_templates == {"default": model.chat_template}
        assert model.get_chat_template() == model.chat_template
        assert model.get_chat_template("tool_use") is None


def test_special_tokens_match_the_vocabulary_file() -> None:
    path = vocab_path("llama-spm")
    with pyllama.Model(str(path), vocab_only=True) as model:
        assert model.token_bos == gguf_scalar(path, "tokenizer.ggml.bos_token_id")
        assert model.token_eos == gguf_scalar(path, "tokenizer.ggml.eos_token_id")
        assert model.add_bos is gguf_scalar(path, "tokenizer.ggml.add_bos_token")
        assert model.add_eos is gguf_scalar(path, "tokenizer.ggml.add_eos_token")
        tokens = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
        assert model.token_get_text(model.token_bos) == tokens[model.token_bos] == "<s>"
        assert model.token_id("<s>") == model.token_bos
        assert model.token_id(tokens[1000]) == 1000
        with pytest.raises(KeyError):
            model.token_id("no such token in any vocabulary \u2603\u2603")
        assert model.token_is_eog(model.token_eos)
        assert not model.token_is_eog(1000)
        assert model.token_is_control(model.token_bos)
        assert model.token_get_attr(model.token_bos) & pyllama.TokenAttr.CONTROL
        assert model.token_get_attr(1000) & pyllama.TokenAttr.NORMAL
        # A model without FIM tokens reports None, not llama.cpp's -1.
        assert model.token_fim_pre is None


def test_tokenize_detokenize_round_trip() -> None:
    with pyllama.Model(str(vocab_path("qwen2")), vocab_only=True) as model:
        text = "Hello, world! Ünïcödé 你好 🦙 tabs\tand\nnewlines"
        tokens = model.tokenize(text, add_special=False)
        assert model.detokenize(tokens) == text
        # bytes in, same tokens out
        assert model.tokenize(text.encode(), add_special=False) == tokens
        assert b"".join(model.token_to_piece(t) for t in tokens) == text.encode()
        # parse_special turns special-token text into the special token
        im_start = model.token_id("<|im_start|>")
        assert model.tokenize("<|im_start|>", add_special=False, parse_special=True) == [im_start]
        assert im_start not in model.tokenize("<|im_start|>", add_special=False, parse_special=False)
        assert model.detokenize([im_start], unparse_special=True) == "<|im_start|>"
        assert model.detokenize([im_start], unparse_special=False) == ""
        assert model.token_to_piece(im_start, special=True) == b"<|im_start|>"
        # numpy arrays of ids are accepted too
        import numpy as np

        assert model.detokenize(np.array(tokens, dtype=np.int32)) == text


def test_add_special_adds_bos() -> None:
    with pyllama.Model(str(vocab_path("llama-spm")), vocab_only=True) as model:
        with_bos = model.tokenize("Hello", add_special=True)
        without = model.tokenize("Hello", add_special=False)
        assert with_bos == [model.token_bos, *without]
        assert model.detokenize(with_bos, unparse_special=True).startswith("<s>")
        assert "<s>" not in model.detokenize(with_bos, remove_special=True, unparse_special=True)


def test_close_and_context_manager(tiny_model_path: Path) -> None:
    model = pyllama.Model(str(tiny_model_path))
    assert not model.closed
    model.close()
    assert model.closed
    with pytest.raises(pyllama.LlamaError, match="closed"):
        model.tokenize("x")
    with pytest.raises(pyllama.LlamaError, match="closed"):
        _ = model.n_vocab
    with pytest.raises(pyllama.LlamaError, match="already closed"):
        model.close()
    assert "closed" in repr(model)
    with pyllama.Model(str(tiny_model_path)) as m2:
        assert m2.n_layer == 2
    assert m2.closed
    with pyllama.Model(str(tiny_model_path)) as m3:
        m3.close()  # closing inside the block is fine; __exit__ does not close twice


def test_progress_callback_reports_and_cancels(tiny_model_path: Path) -> None:
    seen: list[float] = []
    pyllama.Model(str(tiny_model_path), progress_callback=seen.append).close()
    assert seen and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)

    with pytest.raises(pyllama.LlamaError, match="cancelled"):
        pyllama.Model(str(tiny_model_path), progress_callback=lambda p: False)

    class Boom(Exception):
        pass

    def explode(p: float) -> bool:
        raise Boom("from the callback")

    with pytest.raises(Boom, match="from the callback"):
        pyllama.Model(str(tiny_model_path), progress_callback=explode)


def test_kv_overrides_change_the_loaded_values(tiny_model_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pyllama.Model(str(tiny_model_path), kv_overrides={"llama.context_length": 512}) as model:
        assert model.n_ctx_train == 512
    # llama.cpp ignores an override of the wrong type for a known key, and says so in its log,
    # which reaches the `pyllama` logger.
    caplog.set_level(logging.WARNING, logger="pyllama")
    with pyllama.Model(str(tiny_model_path), kv_overrides={"llama.context_length": "long"}) as model:
        assert model.n_ctx_train == 2048
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "Bad metadata override" not in caplog.text:
        pyllama._logging.flush()
        time.sleep(0.05)
    assert "Bad metadata override type for key 'llama.context_length'" in caplog.text


@pytest.mark.parametrize("use_mmap", [None, True, False])
def test_load_modes_give_the_same_model(tiny_model_path: Path, use_mmap: bool | None) -> None:
    with pyllama.Model(str(tiny_model_path), use_mmap=use_mmap, check_tensors=True) as model:
        assert model.n_params > 0
        assert model.tokenize("Hello world") == [1, 15043, 3186]


def test_vocab_only_skips_weights(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", n_layer=1)
    with pyllama.Model(str(path), vocab_only=True) as model:
        assert model.n_vocab == 32000
        assert model.tokenize("Hello") == [1, 15043]


def test_load_releases_the_gil(tiny_model_path: Path) -> None:
    """A Python thread runs while this thread loads and tokenizes in native code. With a long switch
    interval the interpreter never takes the GIL from this thread by itself, so the other thread can only
    advance during these calls if they release the GIL."""
    stop = threading.Event()
    ticks = 0

    def spin() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    old = sys.getswitchinterval()
    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.05)  # let it start spinning
    sys.setswitchinterval(0.5)
    try:
        before = ticks
        with pyllama.Model(str(tiny_model_path), check_tensors=True) as model:
            model.tokenize("word " * 200_000)
        during = ticks - before
    finally:
        sys.setswitchinterval(old)
        stop.set()
        t.join()
    assert during > 0


def test_system_info_and_devices() -> None:
    info = pyllama.system_info()
    assert "CPU" in info
    devs = pyllama.devices()
    assert any(d["type"] == "cpu" for d in devs)
    assert isinstance(pyllama.supports_gpu_offload(), bool)
    assert pyllama.supports_mmap() in (True, False)
    assert pyllama.max_devices() >= 1
    assert len(pyllama.LLAMA_CPP_COMMIT) == 40
