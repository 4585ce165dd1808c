"""Tiny random-weight GGUF models for tests, written with gguf-py.

Each model has the llama architecture, a real vocabulary copied from one of llama.cpp's
``models/ggml-vocab-*.gguf`` files and, optionally, a real chat template from
``models/templates``. A forward pass through one takes milliseconds, so tests can decode for real.
"""

from __future__ import annotations

import functools
from collections.abc import Container, Mapping, Sequence
from pathlib import Path
from typing import Any

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


@functools.cache
def _tokenizer_fields(vocab: Path) -> tuple[tuple[str, Any, Any, Any], ...]:
    """The tokenizer.* keys of a vocabulary file: (key, value, type, sub-type). gguf-py takes seconds to
    read a large vocabulary, so each file is read once per process."""
    reader = gguf.GGUFReader(vocab)
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = None
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                value: Any = tuple(bytes(field.parts[i]) for i in field.data)
            else:
                value = tuple(field.parts[i].tolist()[0] for i in field.data)
        elif vtype == gguf.GGUFValueType.STRING:
            value = bytes(field.parts[field.data[0]])
        else:
            value = field.parts[field.data[0]].tolist()[0]
        out.append((key, value, vtype, sub))
    return tuple(out)


def _copy_tokenizer(
    writer: gguf.GGUFWriter,
    vocab: Path,
    *,
    control_tokens: Mapping[int, str] | None = None,
    skip_keys: Container[str] = (),
) -> int:
    """Copy every tokenizer.* key of a vocabulary file but ``skip_keys``; returns the vocabulary size.

    ``control_tokens`` names unused (padding) slots of the vocabulary, by id, as control tokens, so that a model
    gets special tokens its base vocabulary lacks, at the ids its real vocabulary has them; each slot must hold the
    converter's ``[PAD{id}]`` filler.
    """
    control_tokens = control_tokens or {}
    n_vocab = 0
    for key, value, vtype, sub in _tokenizer_fields(Path(vocab)):
        if key in skip_keys:
            continue
        if vtype == gguf.GGUFValueType.ARRAY:
            values = list(value)
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(values)
                for i, text in control_tokens.items():
                    if values[i] != f"[PAD{i}]".encode():
                        raise ValueError(f"token {i} of {vocab} is {values[i]!r}, not a [PAD{i}] slot")
                    values[i] = text.encode("utf-8")
            elif key == "tokenizer.ggml.token_type":
                for i in control_tokens:
                    values[i] = int(gguf.TokenType.CONTROL)
            writer.add_key_value(key, values, vtype, sub_type=sub)
        else:
            writer.add_key_value(key, value, vtype)
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


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_encoder_blocks(
    writer: gguf.GGUFWriter,
    rng: np.random.Generator,
    prefix: str,
    *,
    n_layer: int,
    n_embd: int,
    n_ff: int,
    k_bias: bool,
) -> None:
    """Pre-norm transformer blocks with LayerNorm and biased linears, as clip.cpp's ``build_vit`` reads them.

    Tensors are ``{prefix}.blk.{i}.{ln1,attn_q,attn_k,attn_v,attn_out,ln2,ffn_up,ffn_down}.{weight,bias}``.
    Whisper has no bias on its key projection, so ``k_bias=False`` leaves ``attn_k.bias`` out.
    """
    if n_ff == n_embd:
        # clip.cpp swaps ffn_up and ffn_down back when ffn_down.weight has ne[0] == n_embd (legacy files).
        raise ValueError("n_ff must differ from n_embd")

    def linear(name: str, n_out: int, n_in: int, bias: bool = True) -> None:
        writer.add_tensor(f"{name}.weight", (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32))
        if bias:
            writer.add_tensor(f"{name}.bias", (0.02 * rng.standard_normal(n_out)).astype(np.float32))

    def layer_norm(name: str) -> None:
        writer.add_tensor(f"{name}.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{name}.bias", np.zeros(n_embd, dtype=np.float32))

    for i in range(n_layer):
        blk = f"{prefix}.blk.{i}"
        layer_norm(f"{blk}.ln1")
        linear(f"{blk}.attn_q", n_embd, n_embd)
        linear(f"{blk}.attn_k", n_embd, n_embd, bias=k_bias)
        linear(f"{blk}.attn_v", n_embd, n_embd)
        linear(f"{blk}.attn_out", n_embd, n_embd)
        layer_norm(f"{blk}.ln2")
        linear(f"{blk}.ffn_up", n_ff, n_embd)
        linear(f"{blk}.ffn_down", n_embd, n_ff)
    layer_norm(f"{prefix}.post_ln")


def write_tiny_mmproj_vision(
    path: Path | str,
    *,
    text_n_embd: int = 64,
    image_size: int = 224,
    patch_size: int = 14,
    n_merge: int = 4,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    seed: int = 0,
    name: str = "tiny-gemma3-mmproj",
) -> Path:
    """Write a random-weight Gemma 3 vision projector (``clip.projector_type = gemma3``); returns its path.

    A SigLIP encoder over ``(image_size / patch_size)**2`` patches, an average pool of ``n_merge`` x ``n_merge``
    patches, an RMS norm (``mm.soft_emb_norm``) and a projection (``mm.input_projection``) to ``text_n_embd``, which
    must equal the text model's ``n_embd``. Each image becomes ``(image_size // patch_size // n_merge) ** 2``
    embeddings, 16 with the defaults; libmtmd wraps them in the text ``<start_of_image>`` ... ``<end_of_image>``.
    """
    n_side = image_size // patch_size
    if image_size % patch_size or n_side % n_merge:
        raise ValueError("image_size must be a multiple of patch_size, and image_size // patch_size of n_merge")
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    writer.add_vision_projection_dim(text_n_embd)
    writer.add_vision_image_size(image_size)
    writer.add_vision_patch_size(patch_size)
    writer.add_vision_embedding_length(n_embd)
    writer.add_vision_feed_forward_length(n_ff)
    writer.add_vision_block_count(n_layer)
    writer.add_vision_head_count(n_head)
    writer.add_vision_attention_layernorm_eps(1e-6)
    writer.add_vision_use_gelu(True)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    if n_merge != 4:  # clip.cpp's default for gemma3, which the converter leaves out
        writer.add_vision_projector_scale_factor(n_merge)

    fan_in = 3 * patch_size * patch_size
    patch = rng.standard_normal((n_embd, 3, patch_size, patch_size)) / np.sqrt(fan_in)  # ggml ne: [p, p, 3, n_embd]
    writer.add_tensor("v.patch_embd.weight", patch.astype(np.float32))
    writer.add_tensor("v.patch_embd.bias", (0.02 * rng.standard_normal(n_embd)).astype(np.float32))
    pos = 0.02 * rng.standard_normal((n_side * n_side, n_embd))
    writer.add_tensor("v.position_embd.weight", pos.astype(np.float32))
    _add_encoder_blocks(writer, rng, "v", n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, k_bias=True)
    # Gemma3RMSNorm scales by (1 + w); the converter stores 1 + w, so ones is the identity.
    writer.add_tensor("mm.soft_emb_norm.weight", np.ones(n_embd, dtype=np.float32))
    # Stored untransposed, numpy (n_embd, text_n_embd), i.e. ggml ne [text_n_embd, n_embd]; F16 as the converter does.
    proj = rng.standard_normal((n_embd, text_n_embd)) / np.sqrt(n_embd)
    writer.add_tensor("mm.input_projection.weight", proj.astype(np.float16))
    _finish(writer)
    return path


def write_tiny_mmproj_audio(
    path: Path | str,
    *,
    text_n_embd: int = 64,
    n_mel_bins: int = 80,
    stack_factor: int = 4,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    n_proj_ff: int = 128,
    seed: int = 0,
    name: str = "tiny-ultravox-mmproj",
) -> Path:
    """Write a random-weight Ultravox audio projector (``clip.projector_type = ultravox``); returns its path.

    A Whisper encoder (two conv1d, the second with stride 2, then transformer blocks over 1500 positions) on each
    30 s chunk of 3000 mel frames, frames stacked by ``stack_factor``, then RMS norm, SwiGLU to ``n_proj_ff``,
    RMS norm and a projection to ``text_n_embd``, which must equal the text model's ``n_embd``. Each 30 s chunk
    becomes ``1500 // stack_factor`` embeddings (375 with the default 4); ``stack_factor`` must divide 1500,
    since clip.cpp counts ``3000 / stack_factor / 2`` tokens while its graph pads 1500 up to a multiple (with
    Ultravox's real 8 it aborts: "expected output 187 tokens, got 188").
    libmtmd adds no marker text around Ultravox audio.
    """
    if 1500 % stack_factor:
        raise ValueError("stack_factor must divide 1500")
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_clip_has_audio_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.ULTRAVOX)
    writer.add_audio_projection_dim(text_n_embd)
    writer.add_audio_embedding_length(n_embd)
    writer.add_audio_feed_forward_length(n_ff)
    writer.add_audio_block_count(n_layer)
    writer.add_audio_head_count(n_head)
    writer.add_audio_num_mel_bins(n_mel_bins)
    writer.add_audio_attention_layernorm_eps(1e-5)
    writer.add_audio_stack_factor(stack_factor)

    def conv(n_out: int, n_in: int) -> np.ndarray:  # torch Conv1d (out, in, kernel), ggml ne [3, in, out]; F16
        return (rng.standard_normal((n_out, n_in, 3)) / np.sqrt(3 * n_in)).astype(np.float16)

    def conv_bias(n: int) -> np.ndarray:  # (n, 1), ggml ne [1, n], to broadcast over the frames
        return (0.02 * rng.standard_normal((n, 1))).astype(np.float32)

    writer.add_tensor("a.conv1d.1.weight", conv(n_embd, n_mel_bins))
    writer.add_tensor("a.conv1d.1.bias", conv_bias(n_embd))
    writer.add_tensor("a.conv1d.2.weight", conv(n_embd, n_embd))
    writer.add_tensor("a.conv1d.2.bias", conv_bias(n_embd))
    writer.add_tensor("a.position_embd.weight", (0.02 * rng.standard_normal((1500, n_embd))).astype(np.float32))
    _add_encoder_blocks(writer, rng, "a", n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, k_bias=False)

    n_stacked = n_embd * stack_factor
    writer.add_tensor("mm.a.norm_pre.weight", np.ones(n_stacked, dtype=np.float32))
    # SwiGLU: the first output half is the value, the second goes through silu.
    mlp1 = rng.standard_normal((2 * n_proj_ff, n_stacked)) / np.sqrt(n_stacked)
    writer.add_tensor("mm.a.mlp.1.weight", mlp1.astype(np.float32))
    writer.add_tensor("mm.a.norm_mid.weight", np.ones(n_proj_ff, dtype=np.float32))
    mlp2 = rng.standard_normal((text_n_embd, n_proj_ff)) / np.sqrt(n_proj_ff)
    writer.add_tensor("mm.a.mlp.2.weight", mlp2.astype(np.float32))
    _finish(writer)
    return path


# Qwen2-VL's special tokens past <|im_end|>, which the qwen2 vocabulary leaves as [PAD] slots.
QWEN2VL_SPECIAL_TOKENS = {
    151646: "<|object_ref_start|>",
    151647: "<|object_ref_end|>",
    151648: "<|box_start|>",
    151649: "<|box_end|>",
    151650: "<|quad_start|>",
    151651: "<|quad_end|>",
    151652: "<|vision_start|>",
    151653: "<|vision_end|>",
    151654: "<|vision_pad|>",
    151655: "<|image_pad|>",
    151656: "<|video_pad|>",
}


def write_tiny_qwen2vl(
    path: Path | str,
    *,
    vocab: str = "qwen2",
    chat_template: str | None = None,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
    rope_sections: Sequence[int] | None = None,
    seed: int = 0,
    name: str = "tiny-qwen2vl",
) -> Path:
    """Write a random-weight Qwen2-VL text model (architecture ``qwen2vl``, M-RoPE); returns its path.

    A Qwen2 decoder (biased q, k, v projections, tied output) whose rotary embedding is split into
    ``rope_sections`` (``qwen2vl.rope.dimension_sections``, pairs of dimensions rotated by the temporal, height,
    width and a fourth position), ``[2, 3, 3, 0]`` by default for a head of 16, as Qwen2-VL's ``[16, 24, 24]`` for
    128. llama.cpp gives this architecture ``LLAMA_ROPE_TYPE_MROPE``, so libmtmd decodes image embeddings at 2-D
    positions (``mtmd_decode_use_mrope``). With the ``qwen2`` vocabulary, Qwen2-VL's ``<|vision_start|>`` and
    other special tokens take their real ids. ``chat_template`` defaults to Qwen2.5's; pass ``""`` for none.
    """
    head_dim = n_embd // n_head
    if rope_sections is None:
        n_pairs = head_dim // 2
        t = n_pairs // 4
        h = (n_pairs - t) // 2
        rope_sections = [t, h, n_pairs - t - h, 0]
    rope_sections = list(rope_sections) + [0] * (4 - len(rope_sections))
    if len(rope_sections) != 4 or sum(rope_sections) > head_dim // 2:
        raise ValueError("rope_sections must have at most 4 entries, summing to at most n_embd // n_head // 2")
    if chat_template is None:
        chat_template = template_text("Qwen-Qwen2.5-7B-Instruct")
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "qwen2vl")
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(1e6)
    writer.add_rope_dimension_sections(rope_sections)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    control = QWEN2VL_SPECIAL_TOKENS if vocab == "qwen2" else None
    skip = ("tokenizer.chat_template",) if chat_template else ()
    n_vocab = _copy_tokenizer(writer, vocab_path(vocab), control_tokens=control, skip_keys=skip)
    writer.add_vocab_size(n_vocab)
    if chat_template:
        writer.add_chat_template(chat_template)

    def weight(rows: int, cols: int, dtype: type = np.float32) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(dtype)

    def bias(n: int) -> np.ndarray:
        return (0.02 * rng.standard_normal(n)).astype(np.float32)

    n_embd_kv = head_dim * n_head_kv
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd, np.float16))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_q.bias", bias(n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.bias", bias(n_embd_kv))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(n_embd_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.bias", bias(n_embd_kv))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    _finish(writer)
    return path


def write_tiny_mmproj_qwen2vl(
    path: Path | str,
    *,
    text_n_embd: int = 64,
    image_size: int = 672,
    patch_size: int = 42,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    seed: int = 0,
    name: str = "tiny-qwen2vl-mmproj",
) -> Path:
    """Write a random-weight Qwen2-VL vision projector (``clip.projector_type = qwen2vl_merger``); returns its path.

    A ViT with 2-D M-RoPE (no position embeddings) over ``patch_size`` patches, whose two-frame Conv3D patch
    embedding the converter splits into two Conv2D kernels (``v.patch_embd.weight`` and ``.weight.1``, no bias),
    LayerNorm blocks with a quick-GELU MLP, then the merger: a LayerNorm (``v.post_ln``, the HF ``merger.ln_q``)
    per patch, 2 x 2 patches concatenated, and an MLP (``mm.0``, GELU, ``mm.2``) to ``text_n_embd``, which must
    equal the text model's ``n_embd``. libmtmd wraps the embeddings in ``<|vision_start|>`` ... ``<|vision_end|>``.

    Images keep their aspect ratio: clip.cpp resizes them to multiples of ``2 * patch_size`` with between 8 and
    4096 embeddings (hard-coded for this projector type; no GGUF key changes it, only a context's
    ``image_min_tokens`` / ``image_max_tokens``). Each embedding covers ``2 * patch_size`` pixels a side, so the
    default 42 turns llama.cpp's 640 x 488 ``test-1.jpeg`` into 8 x 6 = 48 embeddings at 8 M-RoPE positions
    (Qwen2-VL's real 14 would make 23 x 17 = 391, or 9 x 6 = 54 with ``image_max_tokens=64``). The price of a
    large patch: clip.cpp sizes its dummy image to 46 x 46 embeddings, 3864 pixels a side here, so loading takes
    about 0.2 s (0.35 s with a warm-up encode) against 0.02 s with 14. ``image_size`` is only nominal, as the
    converter writes it.
    """
    if n_embd % n_head or (n_embd // n_head) % 4:
        raise ValueError("n_embd // n_head must be a multiple of 4 (four M-RoPE sections)")
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.QWEN2VL)
    writer.add_vision_projection_dim(text_n_embd)
    writer.add_vision_image_size(image_size)
    writer.add_vision_patch_size(patch_size)
    writer.add_vision_embedding_length(n_embd)
    writer.add_vision_feed_forward_length(n_ff)
    writer.add_vision_block_count(n_layer)
    writer.add_vision_head_count(n_head)
    writer.add_vision_attention_layernorm_eps(1e-6)
    writer.add_vision_spatial_merge_size(2)
    # OpenAI CLIP's, as Qwen2-VL's preprocessor_config.json has them; no use_gelu/use_silu key: quick GELU.
    writer.add_vision_image_mean([0.48145466, 0.4578275, 0.40821073])
    writer.add_vision_image_std([0.26862954, 0.26130258, 0.27577711])

    fan_in = 2 * 3 * patch_size * patch_size
    for suffix in ("", ".1"):  # the two temporal slices of the Conv3D kernel; ggml ne [p, p, 3, n_embd]
        patch = rng.standard_normal((n_embd, 3, patch_size, patch_size)) / np.sqrt(fan_in)
        writer.add_tensor(f"v.patch_embd.weight{suffix}", patch.astype(np.float32))
    _add_encoder_blocks(writer, rng, "v", n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, k_bias=True)
    n_merged = 4 * n_embd  # 2 x 2 patches
    mm0 = rng.standard_normal((n_merged, n_merged)) / np.sqrt(n_merged)
    writer.add_tensor("mm.0.weight", mm0.astype(np.float32))
    writer.add_tensor("mm.0.bias", (0.02 * rng.standard_normal(n_merged)).astype(np.float32))
    mm2 = rng.standard_normal((text_n_embd, n_merged)) / np.sqrt(n_merged)
    writer.add_tensor("mm.2.weight", mm2.astype(np.float32))
    writer.add_tensor("mm.2.bias", (0.02 * rng.standard_normal(text_n_embd)).astype(np.float32))
    _finish(writer)
    return path


def write_tiny_reranker(
    path: Path | str,
    *,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_ff: int = 64,
    seed: int = 0,
    name: str = "tiny-reranker",
) -> Path:
    """Write a random-weight BERT reranker (``bert.pooling_type = 4``, rank) with BGE's vocabulary; returns its path.

    A post-norm BERT encoder (token, token-type and learned position embeddings, an embedding LayerNorm, biased
    q, k, v, output and GELU feed-forward linears, LayerNorm after attention and after the feed-forward) with a
    classification head on the ``[CLS]`` token: ``cls`` (n_embd x n_embd, then tanh) and ``cls.output`` (one
    output, the score). With no ``bert.classifier.output_labels`` llama.cpp's ``n_cls_out`` stays 1, so a context
    with rank pooling gives one float per sequence. The vocabulary, ``[CLS]``/``[SEP]`` and the two token types
    come from ``models/ggml-vocab-bert-bge.gguf``; the context length is BERT's 512.
    """
    n_ctx_train = 512
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    n_vocab = _copy_tokenizer(writer, vocab_path("bert-bge"))  # includes tokenizer.ggml.token_type_count = 2
    writer.add_vocab_size(n_vocab)

    def linear(name: str, n_out: int, n_in: int) -> None:
        writer.add_tensor(f"{name}.weight", (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32))
        writer.add_tensor(f"{name}.bias", (0.02 * rng.standard_normal(n_out)).astype(np.float32))

    def layer_norm(name: str) -> None:
        writer.add_tensor(f"{name}.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{name}.bias", np.zeros(n_embd, dtype=np.float32))

    def embedding(rows: int, dtype: type = np.float32) -> np.ndarray:
        return rng.standard_normal((rows, n_embd)).astype(dtype)

    writer.add_tensor("token_embd.weight", embedding(n_vocab, np.float16))
    writer.add_tensor("token_types.weight", 0.1 * embedding(2))
    writer.add_tensor("position_embd.weight", 0.1 * embedding(n_ctx_train))
    layer_norm("token_embd_norm")
    for i in range(n_layer):
        blk = f"blk.{i}"
        linear(f"{blk}.attn_q", n_embd, n_embd)
        linear(f"{blk}.attn_k", n_embd, n_embd)
        linear(f"{blk}.attn_v", n_embd, n_embd)
        linear(f"{blk}.attn_output", n_embd, n_embd)
        layer_norm(f"{blk}.attn_output_norm")
        linear(f"{blk}.ffn_up", n_ff, n_embd)
        linear(f"{blk}.ffn_down", n_embd, n_ff)
        layer_norm(f"{blk}.layer_output_norm")
    linear("cls", n_embd, n_embd)  # ggml ne [n_embd, n_embd]
    linear("cls.output", 1, n_embd)  # numpy (1, n_embd), ggml ne [n_embd, 1]: one score
    _finish(writer)
    return path


def write_tiny_lora(
    path: Path | str,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    rank: int = 4,
    alpha: float | None = None,
    strength: float = 1.0,
    targets: Sequence[str] = ("attn_q", "attn_v", "ffn_up"),
    invocation_tokens: Sequence[int] | None = None,
    seed: int = 1,
) -> Path:
    """Write a random LoRA adapter for ``write_tiny_llama``'s model of the same shape (an aLoRA when
    ``invocation_tokens`` is given): lora_a and lora_b for each target weight of each layer, as
    llama.cpp's convert_lora_to_gguf.py writes them; returns its path. ``strength`` scales lora_b, so
    that the adapter moves the logits well past the model's near-ties."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank if alpha is None else alpha))
    if invocation_tokens is not None:
        writer.add_key_value(
            "adapter.alora.invocation_tokens",
            [int(t) for t in invocation_tokens],
            gguf.GGUFValueType.ARRAY,
            sub_type=gguf.GGUFValueType.UINT32,
        )
    n_embd_kv = n_embd // n_head * n_head_kv
    shapes = {  # (n_out, n_in) of each weight
        "attn_q": (n_embd, n_embd),
        "attn_k": (n_embd_kv, n_embd),
        "attn_v": (n_embd_kv, n_embd),
        "attn_output": (n_embd, n_embd),
        "ffn_gate": (n_ff, n_embd),
        "ffn_up": (n_ff, n_embd),
        "ffn_down": (n_embd, n_ff),
    }
    for i in range(n_layer):
        for name in targets:
            n_out, n_in = shapes[name]
            a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)  # ggml ne [n_in, rank]
            b = (strength * rng.standard_normal((n_out, rank)) / np.sqrt(rank)).astype(np.float32)  # ne [rank, n_out]
            writer.add_tensor(f"blk.{i}.{name}.weight.lora_a", a)
            writer.add_tensor(f"blk.{i}.{name}.weight.lora_b", b)
    _finish(writer)
    return path


def write_tiny_control_vector(
    path: Path | str, *, n_embd: int = 64, n_layer: int = 2, strength: float = 1.0, seed: int = 2
) -> Path:
    """Write a random control vector in llama.cpp's cvector-generator format (F32 tensors
    direction.<layer> for layers 1 to n_layer); returns its path."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_int32("controlvector.layer_count", n_layer)
    for layer in range(1, n_layer + 1):
        writer.add_tensor(f"direction.{layer}", (strength * rng.standard_normal(n_embd)).astype(np.float32))
    _finish(writer)
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
