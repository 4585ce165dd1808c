"""``Llama.complete``: text or token prompts (several, and n choices each), fill-in-the-middle,
echo, truncation, logprobs, streamed or not."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from . import _openai as _oa
from . import streams
from ._adapters import LoraSpec
from ._llama_base import LlamaBase
from .errors import invalid
from .streams import Stream, Use, current_owner


class CompletionCalls(LlamaBase):
    """``complete`` (also ``__call__``) and ``acomplete``."""

    # --- completion -------------------------------------------------------------------------

    def complete(
        self,
        prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        *,
        n: int = 1,
        stream: bool = False,
        seed: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | Stream:
        """An OpenAI Completion dict, or with ``stream=True`` an iterator of completion chunks.

        ``prompt`` is text, tokens, or a list of either (one choice each, in order). ``n`` gives that
        many choices per prompt. With ``n_parallel > 1`` the choices are generated together. Keywords:
        ``suffix`` asks a model with fill-in-the-middle tokens for the text between ``prompt`` and
        ``suffix``; ``max_tokens`` (16), ``stop``, ``logit_bias``, ``logprobs``, ``echo``,
        ``ignore_eos``, ``grammar``, ``json_schema``, the sampler keywords; ``truncate=True`` keeps
        the end of a prompt that does not fit (and its BOS).
        """
        many = not isinstance(prompt, str) and len(prompt) > 0 and not isinstance(prompt[0], int)
        prompts: list[Any] = list(prompt) if many else [prompt]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _oa.MAX_CHOICES:
            raise invalid(f"n must be an int from 1 to {_oa.MAX_CHOICES}", "n")
        if len(prompts) == 1 and n == 1:
            return self._complete_one(prompts[0], seed=seed, stream=stream, **kwargs)
        if stream:
            raise invalid("stream=True takes one prompt and n=1", "n")
        jobs = [(p, i) for p in prompts for i in range(n)]
        outs = self._fan_out(
            [
                functools.partial(self._complete_one, p, seed=_oa.nth_seed(seed, i), stream=False, **kwargs)
                for p, i in jobs
            ]
        )
        return _oa.merge_choices(outs, prompt_once=False)

    def _complete_one(
        self,
        prompt: str | Sequence[int],
        *,
        suffix: str | None = None,
        max_tokens: int | None = 16,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        logit_bias: dict[int, float] | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        ignore_eos: bool = False,
        grammar: str | None = None,
        json_schema: dict[str, Any] | None = None,
        truncate: bool = False,
        stream: bool = False,
        prediction: dict[str, Any] | None = None,
        speculative: bool = True,
        lora: LoraSpec | None = None,
        **sampling: Any,
    ) -> dict[str, Any] | Stream:
        """An OpenAI Completion dict, or with ``stream=True`` an iterator of completion chunks.

        ``suffix`` asks a model with fill-in-the-middle tokens for the text between ``prompt`` and
        ``suffix``. ``truncate=True`` keeps the end of a prompt that does not fit (and its BOS).
        """
        _oa.check_sampling(sampling)
        decoding = self._decoding(prediction, speculative, lora)
        if suffix is not None:
            if not isinstance(prompt, str):
                raise TypeError("suffix needs the prompt as text")
            tokens = self._infill_tokens(prompt, suffix)
            prompt_text = prompt
        elif isinstance(prompt, str):
            tokens = self._tokenize(prompt, add_special=True, parse_special=False)
            prompt_text = prompt
        else:
            tokens = [int(t) for t in prompt]
            prompt_text = self._detokenize(tokens, special=True)
        if truncate and len(tokens) > self._room(max_tokens):
            room = self._room(max_tokens)
            bos = self._model.token_bos
            head = tokens[:1] if tokens and tokens[0] == bos else []
            tokens = head + tokens[len(tokens) - (room - len(head)) :]
            if suffix is None:
                prompt_text = self._detokenize(tokens, special=True)
        budget = self._budget(len(tokens), max_tokens)
        sampler = self._sampler(
            None, seed, {**sampling, "logit_bias": logit_bias, "grammar": grammar, "json_schema": json_schema}
        )
        stops = _oa.stop_list(stop)
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise invalid("logprobs must be an int >= 0 (the alternatives per token)", "logprobs")
        n_top = -1 if logprobs is None else logprobs
        cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

        def shape(text: str, finish: str | None, extra: dict[str, Any]) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
                **extra,
            }

        if stream:
            use = Use(current_owner())

            def pieces() -> Iterator[dict[str, Any]]:
                self._enter(use)
                try:
                    gen = self._generate(use, tokens, sampler, budget, stops, n_top, ignore_eos, decoding)
                    if echo:
                        yield shape(prompt_text, None, {})
                    for piece in streams.text_pieces(use, gen):
                        if piece is streams.WAIT:
                            yield streams.WAIT
                        else:
                            assert isinstance(piece, str)
                            yield shape(piece, None, {})
                    self._store_in_cache()
                finally:
                    self._exit(use)
                yield shape("", _oa.finish_reason(gen.finish_reason or "stop", False), {"usage": _oa.usage(gen)})

            return Stream(pieces(), use, pollable=self._engine.threaded)
        gen, text = self._run(tokens, sampler, budget, stops, n_top, ignore_eos, decoding)
        out = shape(
            (prompt_text if echo else "") + text,
            _oa.finish_reason(gen.finish_reason or "stop", False),
            {"usage": _oa.usage(gen)},
        )
        if logprobs is not None:
            out["choices"][0]["logprobs"] = _oa.completion_logprobs(gen, self._model, len(prompt_text) if echo else 0)
        return out

    __call__ = complete

    def _infill_tokens(
        self,
        prefix: str | Sequence[int],
        suffix: str | Sequence[int],
        *,
        extra: Sequence[tuple[str, str]] | None = None,
        middle: Sequence[int] = (),
        n_batch: int | None = None,
        n_extra: int | None = None,
        spm: bool = False,
    ) -> list[int]:
        """The fill-in-the-middle prompt as llama-server builds it (format_prompt_infill):

        ``[extra] [BOS] PRE prefix middle SUF suffix MID`` (``SUF suffix`` first with ``spm``). Text is
        tokenised without special tokens. ``extra`` (llama-server's ``/infill``; None: the single-file
        prompt of ``complete(suffix=)``): ``(filename, text)`` chunks of other files, in the repo-level
        pattern where the vocabulary has FIM_REP and FIM_SEP (``REP myproject\\n``, then
        ``SEP filename\\n text`` per chunk, then ``SEP filename\\n``), else each after a snippet line.
        With ``n_batch`` the prefix keeps its last ``3 * (n_batch // 4)`` tokens and the suffix its
        first ``n_batch // 4 - 2 - len(middle)``; with ``n_extra`` the extra context its last
        ``n_extra`` tokens. ``middle``: tokens that continue the prefix (llama-server's ``prompt``)."""
        m = self._model
        pre, suf, mid = m.token_fim_pre, m.token_fim_suf, m.token_fim_mid
        if pre is None or suf is None or mid is None:
            raise invalid("suffix needs a model with fill-in-the-middle tokens (FIM_PRE, FIM_SUF, FIM_MID)", "suffix")

        def tokens_of(text: str | Sequence[int]) -> list[int]:
            return self._tokenize(text, add_special=False) if isinstance(text, str) else [int(t) for t in text]

        head: list[int] = []
        if extra is not None:
            if m.token_fim_rep is not None:
                head += [m.token_fim_rep, *tokens_of("myproject\n")]
            for filename, text in extra:
                if m.token_fim_sep is not None:
                    head += [m.token_fim_sep, *tokens_of(filename + "\n")]
                else:
                    head += tokens_of("\n\n--- snippet ---\n\n")
                head += tokens_of(text)
            if m.token_fim_sep is not None:
                head += [m.token_fim_sep, *tokens_of("filename\n")]
        if n_extra is not None:
            head = head[len(head) - min(max(0, n_extra), len(head)) :]
        before, after = tokens_of(prefix), tokens_of(suffix)
        if n_batch is not None:
            before = before[len(before) - min(len(before), 3 * (n_batch // 4)) :]
            after = after[: min(len(after), max(0, n_batch // 4 - (2 + len(middle))))]
        first = [pre, *before, *middle]
        second = [suf, *after]
        if spm:
            first, second = second, first
        if m.add_bos and m.token_bos is not None:
            first.insert(0, m.token_bos)
        return [*head, *first, *second, mid]

    async def acomplete(self, prompt: str | Sequence[int], **kwargs: Any) -> Any:
        """``complete`` without blocking the event loop (see ``achat``)."""
        return await self._async(self.complete, prompt, **kwargs)
