"""Tiny random-weight GGUF models for tests, written with gguf-py.

Each model has the llama architecture, a real vocabulary copied from one of llama.cpp's
``models/ggml-vocab-*.gguf`` files and, optionally, a real chat template from
``models/templates``. A forward pass through one takes milliseconds, so tests can decode for real.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

import pyllama

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP = ROOT / "vendor" / "llama.cpp"
VOCABS = LLAMA_CPP / "models"
TEMPLATES = VOCABS / "templates"


def vocab_path(name: str) -> Path:
    return VOCABS / f"ggml-vocab-{name}.gguf"


def template_text(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def _copy_tokenizer(writer: gguf.GGUFWriter, vocab: Path) -> int:
    """Copy every tokenizer.* key of a vocabulary file; returns the vocabulary size."""
    reader = gguf.GGUFReader(vocab)
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                values: list = [bytes(field.parts[i]) for i in field.data]
            else:
                values = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(key, values, vtype, sub_type=sub)
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(values)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), vtype)
        else:
            writer.add_key_value(key, field.parts[field.data[0]].tolist()[0], vtype)
    if n_vocab == 0:
        raise ValueError(f"{vocab} has no tokenizer.ggml.tokens")
    return n_vocab


def write_tiny_llama(
    path: Path | str,
    *,
    vocab: str = "llama-spm",
    chat_template: str | None = None,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 2048,
    seed: int = 0,
    name: str = "tiny-llama",
) -> Path:
    """Write a random-weight llama model with a real vocabulary; returns its path."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    n_vocab = _copy_tokenizer(writer, vocab_path(vocab))
    writer.add_vocab_size(n_vocab)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def weight(rows: int, cols: int, dtype: type = np.float32) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(dtype)

    n_embd_kv = n_embd // n_head * n_head_kv
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd, np.float16))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def generate_from_chat(model: pyllama.Model, result: pyllama.ChatResult, seed: int, max_tokens: int) -> str:
    """Greedy-free generation from the rendered prompt with a Sampler built from the chat result."""
    sampler = pyllama.Sampler(model, chat=result, seed=seed, temperature=1.0)
    ctx = pyllama.Context(model, n_ctx=1024, n_threads=1)
    tokens = model.tokenize(result.prompt, add_special=False, parse_special=True)
    ctx.decode(pyllama.Batch.from_tokens(tokens))
    pieces = []
    pos = len(tokens)
    for _ in range(max_tokens):
        tok = sampler.sample(ctx)
        sampler.accept(tok)
        if model.token_is_eog(tok):
            break
        pieces.append(model.token_to_piece(tok, special=True))
        ctx.decode(pyllama.Batch.from_tokens([tok], pos0=pos))
        pos += 1
    ctx.close()
    return b"".join(pieces).decode("utf-8", "replace")


# A tool with an enum-typed argument, so that a random-weight model held to its grammar ends a call soon.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}
