"""The high-level API: ``Llama(model_path).chat(messages)`` and ``complete(prompt)``, OpenAI-shaped.

The token loop runs in C++ (``pyllama._core.Generator``) with the GIL released; this module only
renders the prompt, builds the sampler and shapes the results. Each call evaluates only the tokens
after its longest common prefix with what the context already holds, so a chat turn costs the new
turn only.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from . import _core
from .chat import ChatTemplate

__all__ = ["AsyncStream", "Llama", "Stream"]

DEFAULT_N_CTX = 4096

# The sampling keywords of the OpenAI API (and llama-cpp-python) that map onto pyllama.Sampler's.
_SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "penalty_last_n",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "dry_sequence_breakers",
    "xtc_probability",
    "xtc_threshold",
    "top_n_sigma",
    "dynatemp_range",
    "dynatemp_exponent",
    "samplers",
)


def _logprob_entry(token_text: bytes, logprob: float, top: list[dict[str, Any]] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "token": token_text.decode("utf-8", "replace"),
        "logprob": logprob,
        "bytes": list(token_text),
    }
    if top is not None:
        entry["top_logprobs"] = top
    return entry


_OWNER: ContextVar[object | None] = ContextVar("pyllama_owner", default=None)
_HANDLE: ContextVar[_Use | None] = ContextVar("pyllama_handle", default=None)


class _Use:
    """One use of a Llama: a call, or a stream from its first chunk to its last.

    ``owner`` is who started it (a thread, or an asyncio task): a new call from the same owner while
    its stream is suspended means that stream was abandoned (the caller broke out of it), so the new
    call takes the Llama over instead of waiting for ever.
    """

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.generation: _core.Generation | None = None
        self.cancelled = False
        self.abandoned = False
        self.running = False

    def attach(self, gen: _core.Generation) -> None:
        self.generation = gen
        if self.cancelled:
            gen.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        if self.generation is not None:
            self.generation.cancel()


def _owner() -> object:
    owner = _OWNER.get()
    return owner if owner is not None else threading.get_ident()


class Stream(Iterator[dict[str, Any]]):
    """An iterator of OpenAI chunk dicts; ``close()`` (or ``cancel()`` from any thread) stops it."""

    def __init__(self, chunks: Iterator[dict[str, Any]], use: _Use) -> None:
        self._chunks = chunks
        self._use = use

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._use.abandoned:
            raise StopIteration
        self._use.running = True
        try:
            return next(self._chunks)
        finally:
            self._use.running = False

    def cancel(self) -> None:
        self._use.cancel()

    def close(self) -> None:
        self._use.cancel()
        if not self._use.running:
            self._chunks.close()  # type: ignore[attr-defined]


class AsyncStream:
    """``async for`` over a Stream, one step at a time in a worker thread; cancelling the task
    that iterates (or ``aclose()``) stops the generation at its next token."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._pending: asyncio.Future[Any] | None = None

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        self._pending = asyncio.ensure_future(asyncio.to_thread(next, self._stream, None))
        try:
            chunk = await asyncio.shield(self._pending)
        except asyncio.CancelledError:
            self._stream.cancel()
            raise
        if chunk is None:
            raise StopAsyncIteration
        return chunk  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        self._stream.cancel()
        if self._pending is not None:
            await asyncio.gather(self._pending, return_exceptions=True)
        self._stream.close()


class Llama:
    """A model and a context, with OpenAI-shaped ``chat`` and ``complete``.

    ``Llama(model_path, *, n_ctx=None, n_gpu_layers=-1, n_threads=None, n_batch=2048, n_ubatch=512,
    flash_attn=None, seed=None, chat_template=None, verbose=False, **context_params)``

    ``n_ctx=0`` takes the model's training context; the default (None) is 4096, or the training
    context when that is smaller; any other value is used as given. ``n_gpu_layers=-1`` offloads
    every layer where a GPU backend exists.
    ``chat_template`` overrides the model's template (Jinja source, "chatml" or a built-in name).
    Calls on one Llama are serialised; ``close()`` (or ``with``) frees the model and context.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int | None = None,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        flash_attn: bool | None = None,
        seed: int | None = None,
        chat_template: str | None = None,
        verbose: bool = False,
        **context_params: Any,
    ) -> None:
        if verbose:
            from ._logging import set_log_level

            set_log_level("INFO")
        self.model_path = str(model_path)
        self._model = _core.Model(self.model_path, n_gpu_layers=n_gpu_layers)
        train_ctx = int(self._model.n_ctx_train)
        if n_ctx is None:
            n_ctx = min(DEFAULT_N_CTX, train_ctx) if train_ctx > 0 else DEFAULT_N_CTX
        elif n_ctx == 0:
            n_ctx = train_ctx
        elif n_ctx < 0:
            raise ValueError("n_ctx must be >= 0")
        ctx_kwargs: dict[str, Any] = {"n_ctx": n_ctx, "n_batch": min(n_batch, n_ctx), "n_ubatch": n_ubatch}
        if n_threads is not None:
            ctx_kwargs["n_threads"] = n_threads
        if flash_attn is not None:
            ctx_kwargs["flash_attn"] = flash_attn
        ctx_kwargs.update(context_params)
        self._ctx = _core.Context(self._model, **ctx_kwargs)
        self._generator = _core.Generator(self._ctx)
        self._template = ChatTemplate(self._model, template=chat_template)
        # A ChatML template on a model whose vocabulary lacks ChatML's tokens (the fallback for models
        # without a template): the end of a turn is text, so it is a stop string.
        self._turn_ends = [
            tag
            for tag in ("<|im_end|>", "<|im_start|>")
            if tag in self._template.source
            and len(self._model.tokenize(tag, add_special=False, parse_special=True)) > 1
        ]
        self._lock = threading.Lock()  # held by the use in progress
        self._state = threading.Lock()  # guards _active
        self._active: _Use | None = None
        self._seed = seed
        self._rng = random.Random(seed)
        self.model_name = Path(self.model_path).stem

    # --- basics -----------------------------------------------------------------------------

    @property
    def model(self) -> _core.Model:
        return self._model

    @property
    def context(self) -> _core.Context:
        return self._ctx

    @property
    def chat_template(self) -> ChatTemplate:
        return self._template

    def n_ctx(self) -> int:
        return int(self._ctx.n_ctx)

    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return list(self._model.tokenize(text, add_special=add_special, parse_special=parse_special))

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return str(self._model.detokenize(list(tokens), unparse_special=special))

    def close(self) -> None:
        with self._lock:
            self._ctx.close()
            self._model.close()

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the shared machinery -----------------------------------------------------------------

    def _enter(self, use: _Use) -> None:
        """Wait for the Llama (calls are serialised), taking it over from an abandoned stream."""
        while not self._lock.acquire(timeout=0.02):
            with self._state:
                active = self._active
                if active is not None and active.owner == use.owner and not active.running:
                    active.abandoned = True
                    active.cancel()
                    self._active = None
                    self._lock.release()
        with self._state:
            self._active = use

    def _exit(self, use: _Use) -> None:
        with self._state:
            if self._active is use and not use.abandoned:
                self._active = None
                self._lock.release()

    def _generate(
        self,
        use: _Use,
        tokens: list[int],
        sampler: _core.Sampler,
        budget: int,
        stops: list[str],
        n_top: int,
        ignore_eos: bool = False,
    ) -> _core.Generation:
        gen = self._generator.generate(
            tokens, sampler, max_tokens=budget, stop=stops, logprobs=n_top, ignore_eos=ignore_eos
        )
        use.attach(gen)
        handle = _HANDLE.get()
        if handle is not None:
            handle.attach(gen)
        return gen

    def _run(
        self,
        tokens: list[int],
        sampler: _core.Sampler,
        budget: int,
        stops: list[str],
        n_top: int,
        ignore_eos: bool = False,
    ) -> tuple[_core.Generation, str]:
        use = _Use(_owner())
        self._enter(use)
        try:
            gen = self._generate(use, tokens, sampler, budget, stops, n_top, ignore_eos)
            return gen, gen.run()
        finally:
            self._exit(use)

    def _sampler(self, chat: _core.ChatResult | None, seed: int | None, kw: dict[str, Any]) -> _core.Sampler:
        params = {k: v for k, v in kw.items() if v is not None}
        if seed is None:
            seed = self._seed if self._seed is not None else self._rng.getrandbits(32)
        params["seed"] = seed
        if chat is not None:
            params["chat"] = chat
        return _core.Sampler(self._model, **params)

    def _prompt_tokens(self, prompt: str) -> list[int]:
        tokens = self.tokenize(prompt, add_special=True, parse_special=True)
        bos = self._model.token_bos
        if len(tokens) > 1 and tokens[0] == bos and tokens[1] == bos:
            tokens = tokens[1:]  # the template wrote the BOS already
        return tokens

    def _budget(self, n_prompt: int, max_tokens: int | None) -> int:
        n_ctx = self.n_ctx()
        if n_prompt >= n_ctx:
            raise ValueError(f"the prompt has {n_prompt} tokens and the context holds {n_ctx}")
        if max_tokens is None or max_tokens < 0:
            return n_ctx - n_prompt
        if n_prompt + max_tokens > n_ctx:
            raise ValueError(
                f"the prompt ({n_prompt} tokens) and max_tokens ({max_tokens}) exceed the context ({n_ctx} tokens)"
            )
        return max_tokens

    # --- chat -----------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        logit_bias: dict[int, float] | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        reasoning_format: str = "auto",
        enable_thinking: bool | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        stream: bool = False,
        **sampling: Any,
    ) -> dict[str, Any] | Stream:
        """An OpenAI ChatCompletion dict, or with ``stream=True`` an iterator of ChatCompletionChunk dicts."""
        _check_sampling(sampling)
        json_schema = _response_schema(response_format)
        result = self._template.apply(
            messages,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            enable_thinking=enable_thinking,
            reasoning_format=reasoning_format,
            chat_template_kwargs=chat_template_kwargs,
            json_schema=json_schema,
        )
        tokens = self._prompt_tokens(result.prompt)
        budget = self._budget(len(tokens), max_tokens)
        sampler = self._sampler(result, seed, {**sampling, "logit_bias": logit_bias})
        stops = _stop_list(stop)
        stops += [s for s in [*result.additional_stops, *self._turn_ends] if s not in stops]
        n_top = -1 if not logprobs else (top_logprobs or 0)
        meta: dict[str, Any] = {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "created": int(time.time()),
            "model": self.model_name,
            "id_seed": self._rng.getrandbits(63),
        }
        if stream:
            use = _Use(_owner())
            return Stream(self._chat_stream(use, result, tokens, sampler, budget, stops, n_top, meta), use)
        gen, text = self._run(tokens, sampler, budget, stops, n_top)
        message = _parse_reply(result, text, meta["id_seed"])
        finish = "tool_calls" if message.get("tool_calls") else gen.finish_reason
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        if logprobs:
            choice["logprobs"] = {"content": _chat_logprobs(gen, self._model, n_top)}
        return {
            "id": meta["id"],
            "object": "chat.completion",
            "created": meta["created"],
            "model": meta["model"],
            "choices": [choice],
            "usage": _usage(gen),
        }

    def _chat_stream(
        self,
        use: _Use,
        result: _core.ChatResult,
        tokens: list[int],
        sampler: _core.Sampler,
        budget: int,
        stops: list[str],
        n_top: int,
        meta: dict[str, Any],
    ) -> Iterator[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            return {
                "id": meta["id"],
                "object": "chat.completion.chunk",
                "created": meta["created"],
                "model": meta["model"],
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                **extra,
            }

        self._enter(use)
        try:
            gen = self._generate(use, tokens, sampler, budget, stops, n_top)
            parser = result.stream(id_seed=meta["id_seed"])
            yield chunk({"role": "assistant", "content": ""})
            has_calls = False
            try:
                for piece in gen:
                    for delta in parser.feed(piece):
                        has_calls = has_calls or "tool_calls" in delta
                        yield chunk(delta)
                for delta in parser.finish():
                    has_calls = has_calls or "tool_calls" in delta
                    yield chunk(delta)
            except ValueError:
                pass  # the reply does not parse as the format: what streamed so far stands
            finish = "tool_calls" if has_calls else (gen.finish_reason or "stop")
        finally:
            self._exit(use)
        yield chunk({}, finish, usage=_usage(gen))

    # --- completion -------------------------------------------------------------------------

    def complete(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = 16,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        logit_bias: dict[int, float] | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        ignore_eos: bool = False,
        grammar: str | None = None,
        json_schema: dict[str, Any] | None = None,
        stream: bool = False,
        **sampling: Any,
    ) -> dict[str, Any] | Stream:
        """An OpenAI Completion dict, or with ``stream=True`` an iterator of completion chunks."""
        _check_sampling(sampling)
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt, add_special=True, parse_special=False)
            prompt_text = prompt
        else:
            tokens = [int(t) for t in prompt]
            prompt_text = self.detokenize(tokens)
        budget = self._budget(len(tokens), max_tokens)
        sampler = self._sampler(
            None, seed, {**sampling, "logit_bias": logit_bias, "grammar": grammar, "json_schema": json_schema}
        )
        stops = _stop_list(stop)
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
            use = _Use(_owner())

            def pieces() -> Iterator[dict[str, Any]]:
                self._enter(use)
                try:
                    gen = self._generate(use, tokens, sampler, budget, stops, n_top, ignore_eos)
                    if echo:
                        yield shape(prompt_text, None, {})
                    for piece in gen:
                        yield shape(piece, None, {})
                finally:
                    self._exit(use)
                yield shape("", gen.finish_reason or "stop", {"usage": _usage(gen)})

            return Stream(pieces(), use)
        gen, text = self._run(tokens, sampler, budget, stops, n_top, ignore_eos)
        out = shape((prompt_text if echo else "") + text, gen.finish_reason, {"usage": _usage(gen)})
        if logprobs is not None:
            out["choices"][0]["logprobs"] = _completion_logprobs(gen, self._model, len(prompt_text) if echo else 0)
        return out

    __call__ = complete

    # --- async ------------------------------------------------------------------------------

    async def achat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """``chat`` without blocking the event loop: a ChatCompletion dict, or with ``stream=True``
        an AsyncStream to ``async for`` over. Cancelling the task stops the generation."""
        return await self._async(self.chat, messages, **kwargs)

    async def acomplete(self, prompt: str | Sequence[int], **kwargs: Any) -> Any:
        """``complete`` without blocking the event loop (see ``achat``)."""
        return await self._async(self.complete, prompt, **kwargs)

    async def _async(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        token = _OWNER.set(("task", id(task)))
        try:
            if kwargs.get("stream"):
                return AsyncStream(fn(*args, **kwargs))
            handle = _Use(_owner())

            def call() -> Any:
                _HANDLE.set(handle)
                return fn(*args, **kwargs)

            work = asyncio.ensure_future(asyncio.to_thread(call))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                handle.cancel()  # the generation stops at its next token and the Llama is free again
                raise
        finally:
            _OWNER.reset(token)


def _check_sampling(sampling: dict[str, Any]) -> None:
    unknown = set(sampling) - set(_SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return response_format.get("schema") or {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError("response_format.json_schema: must be an object with a 'schema'")
        schema = spec.get("schema", {"type": "object"})
        return schema if isinstance(schema, dict) else None
    raise ValueError(f"response_format.type: {kind!r} is not 'text', 'json_object' or 'json_schema'")


def _parse_reply(result: _core.ChatResult, text: str, id_seed: int) -> dict[str, Any]:
    try:
        return result.parse(text, id_seed=id_seed)
    except ValueError:
        # not the template's format (text after a call, say): the reply is plain content
        return {"role": "assistant", "content": text}


def _usage(gen: _core.Generation) -> dict[str, Any]:
    return {
        "prompt_tokens": gen.n_prompt,
        "completion_tokens": gen.n_completion,
        "total_tokens": gen.n_prompt + gen.n_completion,
        "prompt_tokens_details": {"cached_tokens": gen.n_reused},
    }


def _chat_logprobs(gen: _core.Generation, model: _core.Model, n_top: int) -> list[dict[str, Any]]:
    out = []
    for _tok, piece, lp, top in gen.logprobs:
        alts = None
        if n_top >= 0:
            alts = [_logprob_entry(model.token_to_piece(t), v, None) for t, v in top]
        out.append(_logprob_entry(piece, lp, alts))
    return out


def _completion_logprobs(gen: _core.Generation, model: _core.Model, offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    pos = offset
    for _tok, piece, lp, top in gen.logprobs:
        text = piece.decode("utf-8", "replace")
        tokens.append(text)
        token_logprobs.append(lp)
        top_logprobs.append({model.token_to_piece(t).decode("utf-8", "replace"): v for t, v in top})
        text_offset.append(pos)
        pos += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
