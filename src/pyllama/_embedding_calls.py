"""``Llama.embed`` and ``create_embedding``: a context of its own, pooled, L2-normalised on request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._llama_base import LlamaBase
from .errors import ContextLengthError, invalid


class EmbeddingCalls(LlamaBase):
    """``embed`` and ``create_embedding``."""

    # --- embeddings -------------------------------------------------------------------------

    def embed(
        self, input: str | Sequence[str], *, normalize: bool = True, truncate: bool = False
    ) -> npt.NDArray[np.float32]:
        """Embeddings of one text or a list of texts: a numpy array (n, n_embd), L2-normalised when
        ``normalize``. The model's own pooling is used (mean for a model that declares none, or the
        ``pooling_type`` given to the constructor). A text longer than the context raises
        ValueError, unless ``truncate=True`` (its first n_ctx tokens are used)."""
        texts = [input] if isinstance(input, str) else list(input)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("input must be a str or a list of str")
        with self._embed_lock:  # the embedding context is apart from the chat context
            self._check_open()
            ctx = self._embedding_context()
            out = np.empty((len(texts), ctx.n_embd), dtype=np.float32)
            encode = not self._model.has_decoder
            for i, text in enumerate(texts):
                tokens = self._tokenize(text, add_special=True)
                if not tokens:
                    raise invalid(f"input[{i}] has no tokens", f"input[{i}]")
                if len(tokens) > ctx.n_ctx:
                    if not truncate:
                        raise invalid(
                            f"input[{i}] has {len(tokens)} tokens and the context holds {ctx.n_ctx} "
                            "(pass truncate=True to embed its beginning)",
                            f"input[{i}]",
                            ContextLengthError,
                        )
                    tokens = tokens[: ctx.n_ctx]
                ctx.memory_clear()
                batch = _core.Batch.from_tokens(tokens, logits_last=True)
                if encode:
                    ctx.encode(batch)
                else:
                    ctx.decode(batch)
                out[i] = ctx.embeddings_seq(0)
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        return out

    def create_embedding(
        self, input: str | Sequence[str], *, model: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """An OpenAI embeddings response (``{"object": "list", "data": [...], "usage": ...}``)."""
        texts = [input] if isinstance(input, str) else list(input)
        vectors = EmbeddingCalls.embed(self, texts, **kwargs)
        n_tokens = sum(min(len(self._tokenize(t)), self.n_ctx()) for t in texts)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [float(x) for x in v]} for i, v in enumerate(vectors)
            ],
            "model": model or self.model_name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }
