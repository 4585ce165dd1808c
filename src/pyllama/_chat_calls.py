"""``Llama.chat``: the template renders the conversation in C++, the core generates, and the reply
is parsed (one-shot) or streamed as OpenAI chunks; tool rounds run the calls the model makes."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import _core, streams
from . import _openai as _oa
from ._adapters import LoraSpec
from ._llama_base import Decoding, LlamaBase
from .errors import ContextLengthError, InvalidRequestError, invalid
from .media import MediaPrompt, has_media, read_media
from .reply import ReplyStream, parse_reply
from .streams import Stream, Use, current_owner

REASONING_FORMATS = ("auto", "none", "deepseek", "deepseek-legacy")


class ChatCalls(LlamaBase):
    """``chat`` and ``achat``."""

    # --- chat -----------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any] | Callable[..., Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | type | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        logit_bias: dict[int, float] | None = None,
        grammar: str | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        reasoning_format: str = "auto",
        enable_thinking: bool | None = None,
        reasoning_effort: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool | str | None = None,
        run_tools: bool = False,
        max_tool_rounds: int = 8,
        truncate: bool = False,
        prediction: dict[str, Any] | None = None,
        speculative: bool = True,
        lora: LoraSpec | None = None,
        n: int = 1,
        stream: bool = False,
        **sampling: Any,
    ) -> dict[str, Any] | Stream:
        """An OpenAI ChatCompletion dict, or with ``stream=True`` an iterator of ChatCompletionChunk dicts.

        ``tools`` takes OpenAI tool dicts and Python functions (their type hints and docstrings become
        the schema); with ``run_tools=True`` the calls the model makes are run and answered, round
        after round (at most ``max_tool_rounds``), until it replies without calls. A final assistant
        message is continued (prefill) unless ``continue_final_message=False``. ``truncate=True`` drops
        the oldest turns (after the system message) when the conversation does not fit. ``grammar``
        (GBNF) constrains the whole reply, as in llama-server; it excludes tools and response_format.
        """
        _oa.check_sampling(sampling)
        if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
            raise invalid("messages must be a list of message objects", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise invalid(f"messages[{i}] must be an object with a role", f"messages[{i}]")
        if top_logprobs is not None and (
            isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20
        ):
            raise invalid("top_logprobs must be an int from 0 to 20", "top_logprobs")
        toolbox = None
        if tools is not None and (run_tools or any(callable(t) and not isinstance(t, dict) for t in tools)):
            from .tools import Tools

            toolbox = Tools(list(tools))
            tools = toolbox.specs
        elif run_tools:
            raise invalid("run_tools=True needs tools", "tools")
        parse_as: Any = None
        if isinstance(response_format, type):
            from .tools import response_format as _format_of

            parse_as, response_format = response_format, _format_of(response_format)
        kwargs: dict[str, Any] = {
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel_tool_calls,
            "response_format": response_format,
            "max_tokens": max_tokens,
            "seed": seed,
            "stop": stop,
            "logit_bias": logit_bias,
            "grammar": grammar,
            "logprobs": logprobs,
            "top_logprobs": top_logprobs,
            "reasoning_format": reasoning_format,
            "enable_thinking": enable_thinking,
            "reasoning_effort": reasoning_effort,
            "chat_template_kwargs": chat_template_kwargs,
            "continue_final_message": continue_final_message,
            "truncate": truncate,
            "decoding": self._decoding(prediction, speculative, lora),
            **sampling,
        }
        if run_tools:
            assert toolbox is not None
            if n != 1:
                raise invalid("run_tools takes n=1", "n")
            if max_tool_rounds < 1:
                raise invalid("max_tool_rounds must be >= 1", "max_tool_rounds")
            if stream:
                use = Use(current_owner())
                return Stream(self._tool_rounds_stream(use, list(messages), toolbox, max_tool_rounds, kwargs), use)
            return self._tool_rounds(list(messages), toolbox, max_tool_rounds, kwargs, parse_as)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _oa.MAX_CHOICES:
            raise invalid(f"n must be an int from 1 to {_oa.MAX_CHOICES}", "n")
        if n > 1:
            if stream:
                raise invalid("stream=True takes n=1", "n")
            outs = self._fan_out(
                [
                    functools.partial(
                        self._chat_once, messages, stream=False, **{**kwargs, "seed": _oa.nth_seed(seed, i)}
                    )
                    for i in range(n)
                ]
            )
            out: dict[str, Any] | Stream = _oa.merge_choices(outs, prompt_once=True)
        else:
            out = self._chat_once(messages, stream=stream, **kwargs)
        if parse_as is not None and isinstance(out, dict):
            _oa.attach_parsed(out, parse_as)
        return out

    def _render(
        self, messages: Sequence[dict[str, Any]], truncate: bool, max_tokens: int | None, **apply: Any
    ) -> tuple[_core.ChatResult, list[int]]:
        messages = list(messages)
        while True:
            result = self._template.apply(messages, **apply)
            tokens = list(result.prompt_tokens)  # tokenised in C++, with the BOS as the template wants it
            if not truncate or len(tokens) <= self._room(max_tokens):
                return result, tokens
            dropped = _drop_oldest_turn(messages)
            if dropped is None:
                raise ContextLengthError(
                    f"the conversation does not fit the context ({self.n_ctx()} tokens) even with only the "
                    f"system message and the last message ({len(tokens)} prompt tokens)"
                )
            messages = dropped

    def _writes_bos(self, result: _core.ChatResult) -> bool:
        """Whether the template wrote the BOS into the prompt text itself (then none is added)."""
        bos = self._model.token_bos
        if bos is None:
            return False
        return self._model.tokenize(result.prompt[:64], add_special=False, parse_special=True)[:1] == [bos]

    def _chat_once(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None,
        tool_choice: str | dict[str, Any] | None,
        parallel_tool_calls: bool | None,
        response_format: dict[str, Any] | None,
        max_tokens: int | None,
        seed: int | None,
        stop: str | Sequence[str] | None,
        logit_bias: dict[int, float] | None,
        grammar: str | None,
        logprobs: bool,
        top_logprobs: int | None,
        reasoning_format: str,
        enable_thinking: bool | None,
        reasoning_effort: str | None,
        chat_template_kwargs: dict[str, Any] | None,
        continue_final_message: bool | str | None,
        truncate: bool,
        stream: bool,
        decoding: Decoding | None = None,
        **sampling: Any,
    ) -> dict[str, Any] | Stream:
        json_schema = _oa.response_schema(response_format)
        if reasoning_format not in REASONING_FORMATS:
            known = ", ".join(REASONING_FORMATS)
            raise invalid(f"reasoning_format: {reasoning_format!r} is not one of {known}", "reasoning_format")
        if reasoning_effort is not None:
            chat_template_kwargs = {"reasoning_effort": reasoning_effort, **(chat_template_kwargs or {})}
        if continue_final_message is None and messages and messages[-1].get("role") == "assistant":
            continue_final_message = True  # a final assistant message is a prefill, as in llama-server
        media: list[_core.Media] = []
        if has_media(messages):  # images and audio become the projector's markers, then chunks
            messages, media = read_media(messages, self._projector, self._media)
        try:
            result, tokens = self._render(
                messages,
                truncate,
                max_tokens,
                tools=tools,
                tool_choice=tool_choice,
                parallel_tool_calls=parallel_tool_calls,
                enable_thinking=enable_thinking,
                reasoning_format=reasoning_format,
                chat_template_kwargs=chat_template_kwargs,
                json_schema=json_schema,
                continue_final_message=continue_final_message or None,
            )
        except InvalidRequestError as e:
            if e.param == "json_schema":  # the template's name for it; the caller gave response_format
                e.param = "response_format"
            raise
        if media:
            assert self._projector is not None
            tokens = MediaPrompt(
                self._projector.tokenize(result.prompt, media, add_special=not self._writes_bos(result))
            )
        budget = self._budget(len(tokens), max_tokens)
        if grammar is None:
            sampler = self._sampler(result, seed, {**sampling, "logit_bias": logit_bias})
        elif result.grammar is not None:
            raise invalid("grammar cannot be combined with tools or response_format", "grammar")
        else:  # a GBNF grammar for the whole reply, in place of the template's (none without tools)
            sampler = self._sampler(None, seed, {**sampling, "logit_bias": logit_bias, "grammar": grammar})
        stops = _oa.stop_list(stop)
        stops += [s for s in result.stops if s not in stops]
        n_top = -1 if not logprobs else (top_logprobs or 0)
        meta: dict[str, Any] = {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "created": int(time.time()),
            "model": self.model_name,
            # tool-call ids: from the request's seed when it has one, so a stream and a one-shot reply agree
            "id_seed": seed if seed is not None else self._rng.getrandbits(63),
        }
        if stream:
            use = Use(current_owner())
            return Stream(
                self._chat_stream(use, result, tokens, sampler, budget, stops, n_top, meta, decoding),
                use,
                pollable=self._engine.threaded,
            )
        gen, text = self._run(tokens, sampler, budget, stops, n_top, decoding=decoding)
        message = parse_reply(result, text, meta["id_seed"])
        finish = _oa.finish_reason(gen.finish_reason or "stop", bool(message.get("tool_calls")))
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        if logprobs:
            choice["logprobs"] = {"content": _oa.chat_logprobs(gen, self._model, n_top)}
        return {
            "id": meta["id"],
            "object": "chat.completion",
            "created": meta["created"],
            "model": meta["model"],
            "choices": [choice],
            "usage": _oa.usage(gen),
        }

    def _tool_rounds(
        self,
        messages: list[dict[str, Any]],
        toolbox: Any,
        max_rounds: int,
        kwargs: dict[str, Any],
        parse_as: Any,
    ) -> dict[str, Any]:
        added: list[dict[str, Any]] = []
        usage = _oa.empty_usage()
        out: dict[str, Any] = {}
        for round_ in range(max_rounds):
            if round_ == max_rounds - 1:
                kwargs = {**kwargs, "tool_choice": "none"}  # the last round must answer
            reply = self._chat_once(messages + added, stream=False, **kwargs)
            assert isinstance(reply, dict)
            out = reply
            _oa.add_usage(usage, out["usage"])
            message = out["choices"][0]["message"]
            added.append(message)
            if out["choices"][0]["finish_reason"] != "tool_calls":
                break  # an answer, or a reply cut at max_tokens: its calls may be incomplete
            added.extend(toolbox.call(call) for call in message["tool_calls"])
        out["usage"] = usage
        out["messages"] = added  # what the rounds added to the conversation, ending with the answer
        if parse_as is not None:
            _oa.attach_parsed(out, parse_as)
        return out

    def _tool_rounds_stream(
        self, use: Use, messages: list[dict[str, Any]], toolbox: Any, max_rounds: int, kwargs: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        added = use.added
        for round_ in range(max_rounds):
            if use.cancelled:
                return
            if round_ == max_rounds - 1:
                kwargs = {**kwargs, "tool_choice": "none"}  # the last round must answer
            chunks = self._chat_once(messages + added, stream=True, **kwargs)
            assert isinstance(chunks, Stream)
            use.link(chunks._use)
            calls: dict[int, dict[str, Any]] = {}
            content: list[str] = []
            reasoning: list[str] = []
            finish = None
            try:
                for chunk in chunks:
                    yield chunk
                    delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                    content.append(delta.get("content") or "")
                    reasoning.append(delta.get("reasoning_content") or "")
                    for tc in delta.get("tool_calls") or []:
                        call = calls.setdefault(
                            tc["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                        )
                        call["id"] = tc.get("id") or call["id"]
                        fn = tc.get("function") or {}
                        call["function"]["name"] += fn.get("name") or ""
                        call["function"]["arguments"] += fn.get("arguments") or ""
                    finish = chunk["choices"][0]["finish_reason"] if chunk["choices"] else None
            finally:
                chunks.close()
            if not calls or use.cancelled or finish != "tool_calls":
                return
            message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
            if any(reasoning):
                message["reasoning_content"] = "".join(reasoning)
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
            added.append(message)
            added.extend(toolbox.call(call) for call in message["tool_calls"])

    def _chat_stream(
        self,
        use: Use,
        result: _core.ChatResult,
        tokens: list[int],
        sampler: _core.Sampler,
        budget: int,
        stops: list[str],
        n_top: int,
        meta: dict[str, Any],
        decoding: Decoding | None = None,
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
            gen = self._generate(use, tokens, sampler, budget, stops, n_top, decoding=decoding)
            reply = ReplyStream(result, meta["id_seed"])
            # the role comes with the first token, so that an error of the first step (a grammar no
            # token satisfies) ends the stream before any chunk, as a server's status
            role: dict[str, Any] | None = chunk({"role": "assistant", "content": ""})
            # an error of the generation itself reaches the caller; output that does not parse as the
            # template's format is no error: the reply carries it as the one-shot reply does
            for piece in streams.text_pieces(use, gen):
                if piece is streams.WAIT:
                    yield streams.WAIT
                    continue
                if role is not None:
                    yield role
                    role = None
                assert isinstance(piece, str)
                for delta in reply.feed(piece):
                    yield chunk(delta)
            if role is not None:
                yield role
            message, rest = reply.finish()  # what the one-shot reply of this text has that was not sent
            for delta in rest:
                yield chunk(delta)
            finish = _oa.finish_reason(gen.finish_reason or "stop", bool(message.get("tool_calls")))
            self._store_in_cache()
        finally:
            self._exit(use)
        yield chunk({}, finish, usage=_oa.usage(gen))

    async def achat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """``chat`` without blocking the event loop: a ChatCompletion dict, or with ``stream=True``
        an AsyncStream to ``async for`` over. Cancelling the task stops the generation."""
        return await self._async(self.chat, messages, **kwargs)


def _drop_oldest_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The conversation without its oldest turn after the leading system messages: a user message
    and everything up to the next user message (the replies, calls and tool results), so that roles
    still alternate as templates expect. None when only the system messages and the last turn are left."""
    first = 0
    while first < len(messages) and messages[first].get("role") in ("system", "developer"):
        first += 1
    end = first + 1
    while end < len(messages) and messages[end].get("role") != "user":
        end += 1
    if end >= len(messages):
        return None  # the oldest turn is the last one
    return messages[:first] + messages[end:]
