"""Llama: chat and complete over the C++ token loop, checked against independent truths (the
template's own rendering, numpy argmax, the non-streamed result, a JSON schema)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pyllama

from tiny_models import WEATHER

ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path: Path) -> Any:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1, seed=3) as llm:
        yield llm


def _joined(chunks: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]], str | None]:
    content, calls, finish = "", {}, None
    for c in chunks:
        choice = c["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.get("id", "")
            slot["name"] += tc["function"].get("name", "")
            slot["arguments"] += tc["function"].get("arguments", "")
        finish = choice["finish_reason"] or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_chat_prompt_is_the_templates_rendering(llm: Any) -> None:
    out = llm.chat(ASK, max_tokens=4, seed=1)
    prompt = pyllama.ChatTemplate(llm.model).apply(ASK).prompt
    expected = llm.model.tokenize(prompt, add_special=True, parse_special=True)
    assert llm._engine.tokens()[: len(expected)] == list(expected)
    assert out["usage"]["prompt_tokens"] == len(expected)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streamed_chunks_add_up_to_the_non_streamed_result(llm: Any, seed: int) -> None:
    llm.chat(ASK, max_tokens=1)  # both calls below start with the prompt cached, and evaluate the same numbers
    whole = llm.chat(ASK, max_tokens=40, seed=seed, temperature=1.0)
    chunks = list(llm.chat(ASK, max_tokens=40, seed=seed, temperature=1.0, stream=True))
    content, _, finish = _joined(chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content == (whole["choices"][0]["message"]["content"] or "")
    assert finish == whole["choices"][0]["finish_reason"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert len(chunks) >= 4  # it streams: several chunks before the last


def test_tool_calls_arrive_with_finish_reason_tool_calls(llm: Any) -> None:
    # one call, which the grammar ends within 200 tokens however much whitespace a random model puts in it
    kwargs: dict[str, Any] = {
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 200,
        "seed": 4,
    }
    llm.chat(ASK, **{**kwargs, "max_tokens": 1})  # both calls below start with the prompt cached
    out = llm.chat(ASK, **kwargs)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")
    # streamed: the same call, with the same id
    _, calls, finish = _joined(list(llm.chat(ASK, stream=True, **kwargs)))
    assert finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == call["function"]["arguments"]


def test_json_schema_response_validates(llm: Any) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "n": {"type": "integer"}},
        "required": ["answer", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    out = llm.chat(ASK, response_format=fmt, max_tokens=60, seed=2)
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), schema)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chat_grammar_constrains_the_whole_reply(llm: Any, seed: int) -> None:
    """A GBNF grammar given to chat holds every reply (the truth: llama.cpp's own grammar matcher),
    streamed or not; with tools or response_format, which bring a grammar of their own, it is refused."""
    grammar = 'root ::= ("yes" | "no" | "maybe") " " [0-9] [0-9]? "."'
    out = llm.chat(ASK, grammar=grammar, max_tokens=20, seed=seed, temperature=1.0)
    reply = out["choices"][0]["message"]["content"]
    assert pyllama.grammar_match(grammar, reply, model=llm.model) == "complete"
    chunks = list(llm.chat(ASK, grammar=grammar, max_tokens=20, seed=seed, temperature=1.0, stream=True))
    assert _joined(chunks)[0] == reply
    for other in ({"tools": [WEATHER]}, {"response_format": {"type": "json_object"}}):
        with pytest.raises(pyllama.InvalidRequestError) as e:
            llm.chat(ASK, grammar=grammar, max_tokens=4, **other)
        assert e.value.param == "grammar"


def test_second_turn_evaluates_only_the_new_tokens(llm: Any) -> None:
    first = llm.chat(ASK, max_tokens=8, seed=1)
    history = [*ASK, first["choices"][0]["message"], {"role": "user", "content": "And in Rome?"}]
    before = list(llm._engine.tokens())
    second = llm.chat(history, max_tokens=8, seed=1)
    prompt = llm.model.tokenize(pyllama.ChatTemplate(llm.model).apply(history).prompt, parse_special=True)
    common = 0
    while common < min(len(before), len(prompt)) and before[common] == prompt[common]:
        common += 1
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == common
    assert common >= len(llm.model.tokenize(pyllama.ChatTemplate(llm.model).apply(ASK).prompt, parse_special=True))


def test_stop_strings_never_leak(llm: Any) -> None:
    # every call starts with the prompt cached, and goes on to max_tokens but for the stop string
    llm.complete("Once upon a time", max_tokens=1)
    free = llm.complete("Once upon a time", max_tokens=30, seed=9, temperature=0, ignore_eos=True)["choices"][0]["text"]
    stop = free[10:13]
    assert stop and stop in free
    out = llm.complete("Once upon a time", max_tokens=30, seed=9, temperature=0, ignore_eos=True, stop=[stop])
    assert out["choices"][0]["text"] == free[: free.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(
        c["choices"][0]["text"]
        for c in llm.complete(
            "Once upon a time", max_tokens=30, seed=9, temperature=0, ignore_eos=True, stop=[stop], stream=True
        )
    )
    assert streamed == out["choices"][0]["text"]


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_multibyte_text_survives_streaming(llm: Any, seed: int) -> None:
    """A random model emits byte-level tokens that split characters; pieces never do."""
    whole = llm.complete("日本語", max_tokens=48, seed=seed, temperature=1.5)["choices"][0]["text"]
    pieces = [
        c["choices"][0]["text"] for c in llm.complete("日本語", max_tokens=48, seed=seed, temperature=1.5, stream=True)
    ]
    assert "".join(pieces) == whole
    # no piece ends inside a character that the next piece completes
    assert all(not p.endswith("\ufffd") or "\ufffd" in whole for p in pieces)


def test_greedy_completion_is_the_argmax_of_a_fresh_evaluation(tiny_chat_model_path: Path) -> None:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=256, n_threads=1) as llm:
        out = llm.complete("Hello world", max_tokens=12, temperature=0, logprobs=1)
        tokens = llm.tokenize("Hello world")
        ctx = pyllama.Context(llm.model, n_ctx=256, n_threads=1)
        ctx.decode(pyllama.Batch.from_tokens(tokens))
        expected = []
        for _ in range(12):
            logits = ctx.logits(-1)
            tok = int(np.argmax(logits))
            if llm.model.token_is_eog(tok):
                break
            expected.append(tok)
            ctx.decode(pyllama.Batch.from_tokens([tok], pos0=len(tokens) + len(expected) - 1))
        ctx.close()
        lp = out["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(expected)
        assert out["choices"][0]["text"] == llm.detokenize(expected)


def test_logprobs_are_the_log_softmax_of_the_raw_logits(tiny_chat_model_path: Path) -> None:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=256, n_threads=1) as llm:
        out = llm.complete("Hello world", max_tokens=1, temperature=0, logprobs=3)
        ctx = pyllama.Context(llm.model, n_ctx=256, n_threads=1)
        ctx.decode(pyllama.Batch.from_tokens(llm.tokenize("Hello world")))
        logits = ctx.logits(-1).astype(np.float64)
        ctx.close()
    ref = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    lp = out["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] == pytest.approx(ref.max(), abs=1e-4)
    assert sorted(lp["top_logprobs"][0].values(), reverse=True) == pytest.approx(np.sort(ref)[::-1][:3], abs=1e-4)


def test_context_overflow_is_a_clear_error(llm: Any) -> None:
    with pytest.raises(ValueError, match="exceed the context"):
        llm.complete("hello " * 50, max_tokens=500)
    with pytest.raises(ValueError, match="context holds"):
        llm.chat([{"role": "user", "content": "word " * 600}])
    # and the Llama still works
    assert llm.complete("hello", max_tokens=2, seed=1)["choices"][0]["finish_reason"] in ("stop", "length")


def test_breaking_out_of_a_stream_leaves_the_llama_usable(llm: Any) -> None:
    stream = llm.chat(ASK, max_tokens=50, seed=1, stream=True)
    next(stream)
    next(stream)
    stream.close()
    out = llm.chat(ASK, max_tokens=5, seed=1)
    assert out["usage"]["completion_tokens"] <= 5


def test_bad_arguments(llm: Any) -> None:
    with pytest.raises(TypeError, match="unexpected keyword"):
        llm.chat(ASK, temprature=0.5)
    with pytest.raises(ValueError, match=r"response_format\.type"):
        llm.chat(ASK, response_format={"type": "yaml"})
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        llm.chat([{"role": "wizard", "content": "x"}])


def test_a_new_call_takes_over_from_an_abandoned_stream(llm: Any) -> None:
    stream = llm.chat(ASK, max_tokens=50, seed=1, stream=True)
    for _ in stream:
        break  # `stream` is still referenced, suspended mid-generation
    out = llm.complete("hello", max_tokens=3, seed=1)  # does not wait for ever
    assert out["usage"]["completion_tokens"] <= 3
    with pytest.raises(pyllama.CancelledError):  # the abandoned stream has ended, and says so
        next(stream)


def test_async_chat_and_stream(llm: Any) -> None:
    import asyncio

    async def main() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        await llm.achat(ASK, max_tokens=1)  # both calls below start with the prompt cached
        whole = await llm.achat(ASK, max_tokens=20, seed=5, temperature=1.0)
        chunks = [c async for c in await llm.achat(ASK, max_tokens=20, seed=5, temperature=1.0, stream=True)]
        return whole, chunks

    whole, chunks = asyncio.run(main())
    content, _, finish = _joined(chunks)
    assert content == (whole["choices"][0]["message"]["content"] or "")
    assert finish == whole["choices"][0]["finish_reason"]


def test_cancelling_an_async_call_stops_generation_and_frees_the_llama(tiny_chat_model_path: Path) -> None:
    import asyncio
    import time

    with pyllama.Llama(tiny_chat_model_path, n_ctx=2048, n_threads=1, seed=1) as big:

        async def main() -> float:
            task = asyncio.create_task(big.acomplete("Once", max_tokens=2000, ignore_eos=True))
            await asyncio.sleep(0.1)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            start = time.monotonic()
            out = await big.acomplete("Once", max_tokens=2, seed=1)
            assert out["usage"]["completion_tokens"] <= 2
            return time.monotonic() - start

        assert asyncio.run(main()) < 2.0  # the cancelled generation let go within a token or so


def test_async_stream_cancel_and_loop_stays_free(llm: Any) -> None:
    import asyncio

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        t = asyncio.create_task(ticker())
        stream = await llm.achat(ASK, max_tokens=60, seed=2, stream=True)
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break
        await stream.aclose()
        t.cancel()
        out = await llm.achat(ASK, max_tokens=2, seed=1)
        assert out["choices"][0]["finish_reason"] in ("stop", "length")
        return ticks

    assert asyncio.run(main()) > 0  # the event loop ran while tokens were generated


def test_max_tokens_zero_generates_nothing(llm: Any) -> None:
    out = llm.complete("hello", max_tokens=0)
    assert out["choices"][0]["text"] == "" and out["usage"]["completion_tokens"] == 0
    assert out["choices"][0]["finish_reason"] == "length"


def test_an_explicit_n_ctx_is_used_as_given(tiny_chat_model_path: Path) -> None:
    with (
        pyllama.Llama(tiny_chat_model_path, n_threads=1) as default,
        pyllama.Llama(tiny_chat_model_path, n_ctx=4096, n_threads=1) as explicit,
    ):
        assert default.n_ctx() == default.model.n_ctx_train  # the training context (it fits memory)
        assert explicit.n_ctx() == 4096


@pytest.mark.parametrize(
    ("vocab", "template"),
    [
        ("llama-bpe", "meta-llama-Llama-3.1-8B-Instruct"),
        ("llama-spm", "mistralai-Mistral-Nemo-Instruct-2407"),
        ("qwen2", "Qwen-Qwen3-0.6B"),
    ],
)
def test_other_templates_prompt_and_stream(vocab: str, template: str, tmp_path: Path) -> None:
    from tiny_models import template_text, write_tiny_llama

    path = write_tiny_llama(tmp_path / "m.gguf", vocab=vocab, chat_template=template_text(template))
    messages = [{"role": "system", "content": "Be brief."}, *ASK]
    with pyllama.Llama(path, n_ctx=1024, n_threads=1, seed=5) as llm:
        out = llm.chat(messages, tools=[WEATHER], max_tokens=12, seed=2)
        prompt = pyllama.ChatTemplate(llm.model).apply(messages, tools=[WEATHER]).prompt
        expected = list(llm.model.tokenize(prompt, add_special=True, parse_special=True))
        if len(expected) > 1 and expected[0] == expected[1] == llm.model.token_bos:
            expected = expected[1:]
        assert out["usage"]["prompt_tokens"] == len(expected)
        assert llm._engine.tokens()[: len(expected)] == expected
        # the stream's truth is the one-shot reply from the state the stream starts from (the prompt
        # cached): a whole prompt evaluated at once and its last token alone need not give equal logits
        out = llm.chat(messages, tools=[WEATHER], max_tokens=12, seed=2)
        chunks = list(llm.chat(messages, tools=[WEATHER], max_tokens=12, seed=2, stream=True))
        content, calls, finish = _joined(chunks)
        message = out["choices"][0]["message"]
        assert content == (message.get("content") or "")
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []
        ]
        assert finish == out["choices"][0]["finish_reason"]


def test_streams_deliver_pieces_while_generating(llm: Any) -> None:
    stream = llm.complete("Once upon a time", max_tokens=200, ignore_eos=True, stream=True)
    first = next(stream)
    gen = stream._use.generation
    # the first piece arrived while the generation was still running, far from its end
    assert first["choices"][0]["text"] and gen.finish_reason is None and gen.n_completion < 50
    rest = list(stream)
    assert rest[-1]["choices"][0]["finish_reason"] == "length" and gen.n_completion == 200
