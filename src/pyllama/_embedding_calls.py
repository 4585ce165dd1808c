"""``Llama.embed``, ``create_embedding`` and ``rerank``: a context of its own, pooled (L2-normalised on
request), or rank-pooled for a reranker."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._llama_base import LlamaBase
from .errors import ContextLengthError, invalid


class EmbeddingCalls(LlamaBase):
    """``embed``, ``create_embedding`` and ``rerank``."""

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
            if ctx.pooling_type == "rank":
                raise invalid("this model is a reranker (rank pooling): use rerank(query, documents)", "input")
            out = np.empty((len(texts), ctx.n_embd), dtype=np.float32)
            for i, text in enumerate(texts):
                tokens = self._tokenize(text, add_special=True)
                if not tokens:
                    raise invalid(f"input[{i}] has no tokens", f"input[{i}]")
                out[i] = self._pooled(ctx, tokens, truncate, f"input[{i}]", "embed its beginning")[0]
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        return out

    def _pooled(
        self, ctx: _core.Context, tokens: list[int], truncate: bool, param: str, what: str
    ) -> tuple[npt.NDArray[np.float32], int]:
        """One sequence through the embedding context (with the lock held): its pooled output (a
        reranker's scores) and the tokens evaluated; ContextLengthError past the context unless
        ``truncate`` (then its beginning)."""
        if len(tokens) > ctx.n_ctx:
            if not truncate:
                raise invalid(
                    f"{param} has {len(tokens)} tokens and the context holds {ctx.n_ctx} "
                    f"(pass truncate=True to {what})",
                    param,
                    ContextLengthError,
                )
            tokens = tokens[: ctx.n_ctx]
        ctx.memory_clear()
        ctx.set_lora(self._adapters.default)  # the Llama's adapters, as llama-server embeds with them
        batch = _core.Batch.from_tokens(tokens, logits_last=True)
        if self._model.has_decoder:
            ctx.decode(batch)
        else:
            ctx.encode(batch)
        return ctx.embeddings_seq(0), len(tokens)

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

    # --- reranking ----------------------------------------------------------------------------

    def _rerank_tokens(self, query: str, document: str) -> list[int]:
        """The pair as llama-server puts it (format_prompt_rerank): the model's "rerank" template with
        {query} and {document}, or [BOS] query [EOS] [SEP] document [EOS] as the vocabulary adds them."""
        m = self._model
        template = m.get_chat_template("rerank")
        if template:
            text = template.replace("{query}", query).replace("{document}", document)
            return self._tokenize(text, add_special=False, parse_special=True)
        eos = m.token_eos if m.token_eos is not None else m.token_sep
        out: list[int] = [m.token_bos] if m.add_bos and m.token_bos is not None else []
        out += self._tokenize(query, add_special=False)
        if m.add_eos and eos is not None:
            out.append(eos)
        if m.add_sep and m.token_sep is not None:
            out.append(m.token_sep)
        out += self._tokenize(document, add_special=False)
        if m.add_eos and eos is not None:
            out.append(eos)
        return out

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        model: str | None = None,
        truncate: bool = False,
    ) -> dict[str, Any]:
        """How relevant each document is to the query, from a reranker (a model with rank pooling, or
        ``pooling_type="rank"``), in llama-server's ``/v1/rerank`` shape: ``{"model", "object": "list",
        "usage", "results": [{"index", "relevance_score"}, ...]}``, the most relevant first, at most
        ``top_n``. Each pair is evaluated through the embedding context; a pair longer than the context
        raises ContextLengthError unless ``truncate=True``."""
        if not isinstance(query, str):
            raise invalid("query must be a string", "query")
        if isinstance(documents, str) or not all(isinstance(d, str) for d in documents):
            raise invalid("documents must be a list of strings", "documents")
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise invalid("top_n must be an int >= 1", "top_n")
        results = []
        n_tokens = 0
        with self._embed_lock:
            self._check_open()
            ctx = self._embedding_context()
            if ctx.pooling_type != "rank":
                raise invalid(
                    f"this model is not a reranker (its pooling is {ctx.pooling_type!r}, not 'rank'): "
                    "load a reranker, or one with pooling_type='rank'",
                    "model",
                )
            for i, doc in enumerate(documents):
                scores, n = self._pooled(
                    ctx, self._rerank_tokens(query, doc), truncate, f"documents[{i}]", "score its beginning"
                )
                results.append({"index": i, "relevance_score": float(scores[0])})
                n_tokens += n
        results.sort(key=lambda r: -r["relevance_score"])  # stable: ties keep the documents' order
        if top_n is not None:
            results = results[:top_n]
        return {
            "model": model or self.model_name,
            "object": "list",
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            "results": results,
        }
