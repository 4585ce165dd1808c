"""Streams carry what the one-shot reply carries: a chat stream's joined deltas (content, reasoning,
tool-call names and arguments) and its finish_reason are the one-shot reply of the same request and
seed, computed in the same run, also when the output does not parse as the template's format and when
max_tokens cuts it. An error of the generation reaches the caller of a stream, never a normal finish.
Random-weight models write different text on different CPUs: nothing here expects a text."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pyllama
import pyllama.streams as streams_module
from pyllama.reply import ReplyStream, parse_reply

from tiny_models import TEMPLATES, WEATHER, template_text, write_tiny_llama

TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "enum": ["CET", "UTC"]}},
            "required": ["tz"],
        },
    },
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "Weather in Paris, and the time in CET?"}]
SEEDS = [1, 2, 3, 4, 5, 6]

# template -> (vocabulary of its model family, an assistant prefill that opens a tool call: whatever a
# model writes after it does not parse as the format)
FAMILIES = {
    "Qwen-Qwen2.5-7B-Instruct": ("qwen2", "<tool_call>\n{"),
    "meta-llama-Llama-3.1-8B-Instruct": ("llama-bpe", "{"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("llama-spm", "[TOOL_CALLS]["),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("llama-bpe", "<tool_call>\n{"),
}


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model_path: Path) -> dict[str, Path]:
    """A tiny model per vocabulary (each template is given to Llama as chat_template)."""
    folder = tmp_path_factory.mktemp("stream-models")
    out = {"qwen2": tiny_chat_model_path}
    for vocab in ("llama-bpe", "llama-spm"):
        out[vocab] = write_tiny_llama(folder / f"{vocab}.gguf", vocab=vocab, name=f"tiny-{vocab}")
    return out


def family_llama(vocabs: dict[str, Path], template: str) -> pyllama.Llama:
    return pyllama.Llama(vocabs[FAMILIES[template][0]], n_ctx=1024, n_threads=1, chat_template=template_text(template))


def joined(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's chunks joined as an OpenAI client joins them."""
    content, reasoning, calls, finish = "", "", {}, None
    for c in chunks:
        if not c["choices"]:
            continue
        choice = c["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        reasoning += delta.get("reasoning_content") or ""
        for tc in delta.get("tool_calls") or []:
            slot = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.get("id") or ""
            slot["name"] += tc["function"].get("name") or ""
            slot["arguments"] += tc["function"].get("arguments") or ""
        finish = choice["finish_reason"] or finish
    return {
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": [calls[i] for i in sorted(calls)],
        "finish_reason": finish,
    }


def one_shot(message: dict[str, Any], finish: str | None) -> dict[str, Any]:
    """A one-shot message in the shape of ``joined``."""
    return {
        "content": message.get("content") or "",
        "reasoning_content": message.get("reasoning_content") or "",
        "tool_calls": [
            {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in message.get("tool_calls") or []
        ],
        "finish_reason": finish,
    }


def stream_and_one_shot(llm: pyllama.Llama, messages: list[dict[str, Any]], **kwargs: Any) -> tuple[Any, Any, Any]:
    """The one-shot reply and the joined stream of one request. Both start from the same context state
    (the prompt cached but for its last token), so that they evaluate the same numbers."""
    whole = llm.chat(messages, **kwargs)
    assert isinstance(whole, dict)
    chunks = list(llm.chat(messages, stream=True, **kwargs))
    choice = whole["choices"][0]
    assert chunks[-1]["usage"] == whole["usage"]
    streamed, want = joined(chunks), one_shot(choice["message"], choice["finish_reason"])
    # a call's id is drawn anew for each request, as OpenAI's: the same shape, one per call
    for call in streamed["tool_calls"] + want["tool_calls"]:
        identifier = call.pop("id")
        assert len(identifier) == 9 and identifier.isalnum()
    return choice, streamed, want


VARIANTS = {
    # the model's own reply, with tools it may call (random weights: usually text, cut at max_tokens)
    "free": ({"max_tokens": 24}, False),
    # a call the grammar holds it to, cut by max_tokens (mostly inside the call)
    "cut-call": ({"tool_choice": "required", "max_tokens": 28}, False),
    # a call the grammar holds it to, with room for a whole call
    "required": ({"tool_choice": "required", "max_tokens": 64}, False),
    # a prefill that opens a call: the reply does not parse as the format and is all content
    "does-not-parse": ({"max_tokens": 16}, True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("template", FAMILIES)
def test_a_stream_adds_up_to_the_one_shot_reply(vocabs: dict[str, Path], template: str, variant: str) -> None:
    kwargs, prefilled = VARIANTS[variant]
    messages = list(ASK)
    if prefilled:
        messages.append({"role": "assistant", "content": FAMILIES[template][1]})
    with family_llama(vocabs, template) as llm:
        llm.chat(messages, tools=TOOLS, **{**kwargs, "max_tokens": 1})  # the prompt is cached from here on
        result = llm.chat_template.apply(messages, tools=TOOLS, continue_final_message=prefilled or None)
        for seed in SEEDS:
            choice, streamed, want = stream_and_one_shot(
                llm, messages, tools=TOOLS, seed=seed, temperature=1.0, **kwargs
            )
            assert streamed == want, f"seed {seed}"
            message = choice["message"]
            if kwargs.get("tool_choice") == "required":  # a call, or one cut by max_tokens
                assert choice["finish_reason"] == "length" or message.get("tool_calls")
            if prefilled:
                # the output (what the model wrote after the opened call) does not parse as the format,
                # and all of it is the content
                assert not message.get("tool_calls")
                if message["content"]:  # unless the model ended at once
                    with pytest.raises(ValueError, match="does not parse"):
                        result.parse(message["content"])


def test_a_reasoning_stream_adds_up_too(tiny_chat_model_path: Path) -> None:
    """A reasoning template (Qwen 3, thinking on), cut or not: reasoning_content streams as it comes."""
    qwen3 = template_text("Qwen-Qwen3-0.6B")
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1, chat_template=qwen3) as llm:
        llm.chat(ASK, tools=TOOLS, max_tokens=1, enable_thinking=True)
        for seed in SEEDS[:3]:
            for max_tokens in (5, 30):
                _, streamed, want = stream_and_one_shot(
                    llm, ASK, tools=TOOLS, seed=seed, temperature=1.0, max_tokens=max_tokens, enable_thinking=True
                )
                assert streamed == want


# --- the Python layer over the streaming parser, on outputs written by hand --------------------------------

CALL = {
    "Qwen-Qwen2.5-7B-Instruct": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ),
    "meta-llama-Llama-3.1-8B-Instruct": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistralai-Mistral-Nemo-Instruct-2407": (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]'
    ),
}
OPEN = {t: prefill for t, (_, prefill) in FAMILIES.items()}


def outputs(template: str) -> dict[str, str]:
    call, opening = CALL[template], OPEN[template]
    lead = "" if template.startswith("meta-llama") else "Let me check. "
    return {
        "plain": "Plain words, no call.",
        "call": lead + call,
        "text after the call": lead + call + "\nDone, it is sunny.",
        "a broken call": "Hello " + opening + "xyz junk",
        "a broken call first": opening + "xyz junk",
        # the parsers drop the whitespace a reply begins with, also while it streams
        "a space, then a broken call": " Hello " + opening + "xyz junk",
        "a space, then braces": " Hello {}{\nmore",
        "a broken second call": lead + call + opening + "xyz",
    }


def feed_in_pieces(result: pyllama.ChatResult, text: str, rng: random.Random) -> tuple[dict[str, Any], Any]:
    reply = ReplyStream(result, 11)
    deltas: list[dict[str, Any]] = []
    i = 0
    while i < len(text):
        j = min(len(text), i + rng.randint(1, 9))
        deltas += reply.feed(text[i:j])
        i = j
    message, rest = reply.finish()
    chunks = [{"choices": [{"delta": d, "finish_reason": None}]} for d in deltas + rest]
    return message, joined(chunks)


@pytest.mark.parametrize("template", FAMILIES)
def test_deltas_add_up_to_the_reply_of_every_beginning_of_an_output(template: str) -> None:
    """Every beginning of each output (a reply cut anywhere), fed in random pieces: the deltas add up
    to the one-shot message of that text; a text that parses gives the parser's own message."""
    source = (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    result = pyllama.ChatTemplate(template=source, bos_token="<s>", eos_token="</s>").apply(ASK, tools=TOOLS)
    rng = random.Random(template)
    for name, text in outputs(template).items():
        for end in range(len(text) + 1):
            message, streamed = feed_in_pieces(result, text[:end], rng)
            assert message == parse_reply(result, text[:end], 11)
            assert streamed == one_shot(message, None), (name, text[:end])
            try:
                assert message == result.parse(text[:end], id_seed=11)
            except ValueError:
                pass  # the text does not parse: checked below


@pytest.mark.parametrize("template", FAMILIES)
def test_an_output_that_does_not_parse_keeps_all_its_text(template: str) -> None:
    source = (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    result = pyllama.ChatTemplate(template=source, bos_token="<s>", eos_token="</s>").apply(ASK, tools=TOOLS)
    texts = outputs(template)
    for name in ("a broken call", "a broken call first"):
        with pytest.raises(ValueError):
            result.parse(texts[name])
        assert parse_reply(result, texts[name], 11) == {"role": "assistant", "content": texts[name]}
    # but the whitespace before the reply, which the format's parser drops from any reply
    with pytest.raises(ValueError):
        result.parse(texts["a space, then a broken call"])
    assert result.parse(" Hello ")["content"] == "Hello "
    message = parse_reply(result, texts["a space, then a broken call"], 11)
    assert message == {"role": "assistant", "content": texts["a space, then a broken call"][1:]}
    # text after a complete call: the call (a stream has sent it) and every character after it
    for name, tail in (
        ("text after the call", "\nDone, it is sunny."),
        ("a broken second call", OPEN[template] + "xyz"),
    ):
        with pytest.raises(ValueError):
            result.parse(texts[name])
        message = parse_reply(result, texts[name], 11)
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
        assert message["content"].endswith(tail)
        assert message["tool_calls"] == result.parse(CALL[template], id_seed=11)["tool_calls"]


# --- errors of the generation reach the caller ---------------------------------------------------------


def failing_generations(monkeypatch: pytest.MonkeyPatch, errors: list[BaseException]) -> None:
    """Generations, as the Python layer iterates them, raise the error in ``errors`` (while it is there)
    after their second piece of text, or at their end if they end first."""
    pieces = streams_module.text_pieces

    def failing(use: Any, gen: Any) -> Iterator[Any]:
        n = 0
        for piece in pieces(use, gen):
            if errors and n == 2:
                raise errors[0]
            yield piece
            n += piece is not streams_module.WAIT
        if errors:
            raise errors[0]

    monkeypatch.setattr(streams_module, "text_pieces", failing)


@pytest.fixture
def fail_after_two_pieces(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    errors: list[BaseException] = []
    failing_generations(monkeypatch, errors)
    return errors


ERRORS = [ValueError("batch validation failed"), pyllama.LlamaError("the grammar rejected every token")]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("n_parallel", [1, 2])
def test_an_error_during_a_stream_reaches_the_caller(
    tiny_chat_model_path: Path, fail_after_two_pieces: list[BaseException], error: BaseException, n_parallel: int
) -> None:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1, n_parallel=n_parallel) as llm:
        fail_after_two_pieces.append(error)
        for stream in (
            llm.chat(ASK, max_tokens=30, stream=True),
            llm.chat(ASK, tools=TOOLS, max_tokens=30, stream=True),
            llm.complete("Once upon a time", max_tokens=30, ignore_eos=True, stream=True),
        ):
            seen: list[dict[str, Any]] = []
            with pytest.raises(type(error), match=str(error)):
                for chunk in stream:
                    seen.append(chunk)
            assert seen and all(c["choices"][0]["finish_reason"] is None for c in seen)

        async def main() -> list[dict[str, Any]]:
            seen = []
            stream = await llm.achat(ASK, max_tokens=30, stream=True)
            with pytest.raises(type(error), match=str(error)):
                async for chunk in stream:
                    seen.append(chunk)
            return seen

        assert all(c["choices"][0]["finish_reason"] is None for c in asyncio.run(main()))
        # and the Llama serves the next request
        fail_after_two_pieces.clear()
        out = llm.chat(ASK, max_tokens=3)
        assert isinstance(out, dict) and out["usage"]["completion_tokens"] <= 3
