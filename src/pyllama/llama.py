"""The high-level API: ``Llama(model_path).chat(messages)`` and ``complete(prompt)``, OpenAI-shaped.

Every generation runs through the C++ generation core (``pyllama._core.Engine``) with the GIL
released, one sequence or many; the Python layer only renders the prompt, builds the sampler and
shapes the results. Each call evaluates only the tokens after its longest common prefix with what
the context already holds, so a chat turn costs the new turn only.

Where things are: loading, lifecycle, states and the shared machinery in ``_llama_base.py``;
``chat`` in ``_chat_calls.py``, ``complete`` in ``_completion_calls.py``, ``embed`` in
``_embedding_calls.py``; streams in ``streams.py``; OpenAI's shapes in ``_openai.py``; shared models
and the default context's fit in ``_fitting.py``.
"""

from __future__ import annotations

import os
from typing import Any

from ._chat_calls import ChatCalls
from ._completion_calls import CompletionCalls
from ._embedding_calls import EmbeddingCalls
from ._fitting import DEFAULT_N_CTX, fit_n_ctx, kv_bytes_per_token
from .errors import ContextLengthError
from .streams import AsyncStream, Stream

__all__ = [
    "DEFAULT_N_CTX",
    "AsyncStream",
    "ContextLengthError",
    "Llama",
    "Stream",
    "fit_n_ctx",
    "kv_bytes_per_token",
]


class Llama(ChatCalls, CompletionCalls, EmbeddingCalls):
    """A model and a context, with OpenAI-shaped ``chat`` and ``complete``.

    ``Llama(model_path, *, n_ctx=None, n_gpu_layers=-1, n_threads=None, n_batch=2048, n_ubatch=512,
    flash_attn=None, seed=None, chat_template=None, embedding=False, pooling_type=None, cache=None,
    cache_ram=None, verbose=False, use_mmap=None, use_mlock=False, main_gpu=0, split_mode="layer",
    tensor_split=None, kv_overrides=None, progress=None, n_parallel=1, mmproj=None, mmproj_use_gpu=None,
    media=None, **context_params)``

    ``n_ctx=0`` takes the model's training context; the default (None) is llama.cpp's: the training
    context, reduced to fit free memory (never below 4096 tokens); any other value is used as given.
    ``n_gpu_layers=-1`` offloads every layer where a GPU backend exists.
    ``chat_template`` overrides the model's template (Jinja source, "chatml" or a built-in name).
    ``cache_ram`` (bytes; like llama-server's ``--cache-ram``) keeps the prefixes that the sequences
    give up in RAM and loads them back for a prompt that starts with one; ``cache`` takes a
    ``pyllama.RAMCache`` (the same) or a ``pyllama.DiskCache`` (states in files, ``n_parallel=1``).
    ``mmproj`` loads a multimodal projector (llama.cpp's libmtmd): chat messages may then hold images
    (``image_url`` parts) and audio (``input_audio``), as the projector allows; it goes to the GPU
    with the model unless ``mmproj_use_gpu=False``. ``media`` (a ``pyllama.MediaPolicy``) says where
    media may come from: ``data:`` URIs and local files by default, ``http(s)`` URLs only when allowed.
    Two Llamas over the same file with the same load options share one loaded model. Calls on one
    Llama are serialised; ``close()`` (or ``with``) frees the context, and the model once no other
    Llama uses it.
    """

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        sha256: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
        **llama_kwargs: Any,
    ) -> Llama:
        """Download a GGUF file into the cache (resumable, verified against ``sha256`` when given),
        then load it: see ``pyllama.models.download``."""
        from .models import download

        return cls(download(url, sha256=sha256, cache_dir=cache_dir, progress=progress), **llama_kwargs)

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: str,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
        mmproj: bool | str | None = None,
        **llama_kwargs: Any,
    ) -> Llama:
        """Download ``filename`` (a glob pattern matching one file, e.g. ``"*q4_k_m.gguf"``) from the
        Hugging Face Hub repository ``repo_id``, then load it (needs ``pip install 'pyllama[hf]'``).
        ``mmproj=True`` also downloads the repository's projector (images, audio) as llama-server
        picks it (a file named ``*mmproj*``, the quantization closest to the model's); a string names
        it (or a glob)."""
        from .models import hf_download, hf_mmproj

        path = hf_download(repo_id, filename, revision=revision, cache_dir=cache_dir, progress=progress)
        if mmproj is True:
            mmproj = hf_mmproj(repo_id, filename, revision=revision)
        if isinstance(mmproj, str):
            llama_kwargs["mmproj"] = hf_download(
                repo_id, mmproj, revision=revision, cache_dir=cache_dir, progress=progress
            )
        return cls(path, **llama_kwargs)
