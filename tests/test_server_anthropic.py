"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens), run for real on 127.0.0.1 and
driven by the official anthropic client.

The truth of each reply is ``Llama.chat`` of the same conversation, written by hand in OpenAI's format,
on an independent Llama over the same files with the same seed (or /v1/chat/completions on the same
server); of each stream, the one-shot message; of count_tokens, the chat template's rendering
tokenised; of a tool input read off a stream, the client's own JSON parser. Shapes are checked with
the client's types.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, TypeAdapter

import pyllama

anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
jsonschema = pytest.importorskip("jsonschema")
jiter = pytest.importorskip("jiter")

from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent  # noqa: E402

from pyllama.server import create_app  # noqa: E402
from test_server import Running  # noqa: E402

from tiny_models import LLAMA_CPP, template_text, write_tiny_mmproj_vision  # noqa: E402

KEY = "sk-ant-test-key"
IMAGE = LLAMA_CPP / "tools" / "mtmd" / "test-1.jpeg"
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["colour"],
}
PICK = {"name": "pick_colour", "description": "Pick a colour.", "input_schema": SCHEMA}
PICK_CHAT = {
    "type": "function",
    "function": {"name": "pick_colour", "description": "Pick a colour.", "parameters": SCHEMA},
}
PAINT_SCHEMA = {
    "type": "object",
    "properties": {"colour": SCHEMA["properties"]["colour"], "finish": {"type": "string", "enum": ["matt", "gloss"]}},
    "required": ["colour", "finish"],
}
PAINT = {"name": "paint", "description": "Paint the wall.", "input_schema": PAINT_SCHEMA}
PAINT_CHAT = {
    "type": "function",
    "function": {"name": "paint", "description": "Paint the wall.", "parameters": PAINT_SCHEMA},
}
ASK = [{"role": "user", "content": "Name a colour."}]
EVENT = TypeAdapter(RawMessageStreamEvent)
MAX_BODY = 512 * 1024


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mmproj_vision(tmp_path_factory.mktemp("anthropic") / "vision.gguf", text_n_embd=64)


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path: Path, vision: Path) -> Iterator[pyllama.Llama]:
    """The served Llama: Qwen 2.5's template (tools), a vision projector, two sequences."""
    with pyllama.Llama(tiny_chat_model_path, mmproj=vision, n_ctx=2048, n_threads=1, n_parallel=2, seed=0) as llm:
        yield llm


@pytest.fixture(scope="module")
def served(llm: pyllama.Llama) -> Iterator[Running]:
    running = Running(create_app(llm, api_key=KEY, alias="tiny", max_request_bytes=MAX_BODY))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(tiny_chat_model_path: Path, vision: Path) -> Iterator[pyllama.Llama]:
    """An independent Llama over the same files: what a request's answer must equal."""
    with pyllama.Llama(tiny_chat_model_path, mmproj=vision, n_ctx=1024, n_threads=1) as ref:
        yield ref


@pytest.fixture(scope="module")
def client(served: Running) -> Any:
    return anthropic.Anthropic(base_url=served.url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def thinker(tiny_chat_model_path: Path) -> Iterator[tuple[pyllama.Llama, Running]]:
    """The same model with QwQ's template, which opens a reasoning block in the generation prompt;
    the smallest context."""
    qwq = template_text("Qwen-QwQ-32B")
    with pyllama.Llama(tiny_chat_model_path, chat_template=qwq, n_ctx=256, n_threads=1) as llm:
        running = Running(create_app(llm, alias="tiny"))
        yield llm, running
        running.stop()


# --- helpers -----------------------------------------------------------------------------------


def extras(obj: Any, path: str = "") -> list[str]:
    """The keys that matched no field of the client's types, anywhere in a validated object."""
    out: list[str] = []
    if isinstance(obj, BaseModel):
        out += [f"{path}.{k}" for k in obj.model_extra or {}]
        for name in type(obj).model_fields:
            out += extras(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            out += extras(item, f"{path}[{i}]")
    return out


def create(client: Any, **kwargs: Any) -> Any:
    """``messages.create``, its JSON checked against the client's Message type."""
    raw = client.messages.with_raw_response.create(model="claude-anything", **kwargs)
    body = raw.http_response.json()
    assert not extras(Message.model_validate(body))
    assert body["type"] == "message" and body["role"] == "assistant" and body["model"] == "tiny"
    assert body["id"].startswith("msg_")
    return raw.parse()


def streamed(client: Any, **kwargs: Any) -> Any:
    with client.messages.stream(model="claude-anything", **kwargs) as stream:
        return stream.get_final_message()


def dump(message: Any) -> dict[str, Any]:
    """A message without its id, its usage as totals (the prompt cache moves input to cache reads)."""
    out: dict[str, Any] = message.model_dump(mode="json")
    del out["id"]
    usage = out.pop("usage")
    out["input"] = usage["input_tokens"] + (usage["cache_read_input_tokens"] or 0)
    out["output"] = usage["output_tokens"]
    return out


def post(running: Running, path: str, body: Any, key: str | None = KEY, **kwargs: Any) -> httpx.Response:
    headers = {"x-api-key": key} if key else {}
    return httpx.post(running.url + path, json=body, headers=headers, timeout=60, **kwargs)


def events_of(running: Running, body: dict[str, Any], key: str | None = KEY) -> list[dict[str, Any]]:
    """The events of a streamed /v1/messages request off the wire: an ``event:`` line naming each
    event's type and a ``data:`` line, valid as the client's event types, in Anthropic's order."""
    headers = {"x-api-key": key} if key else {}
    with httpx.stream("POST", running.url + "/v1/messages", json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    events = []
    for block in blocks[:-1]:
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data[len("data: ") :])
        assert event["type"] == kind[len("event: ") :]
        if event["type"] not in ("ping", "error"):
            assert not extras(EVENT.validate_python(event))
        events.append(event)
    return events


def check_events(events: list[dict[str, Any]], one_shot: Any) -> None:
    """A stream in Anthropic's order (message_start, ping, each block started, its deltas, stopped in
    turn, message_delta, message_stop) adding up to the one-shot message ``one_shot``."""
    types = [e["type"] for e in events]
    assert types[:2] == ["message_start", "ping"] and types[-2:] == ["message_delta", "message_stop"]
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    blocks: list[dict[str, Any]] = []
    inputs: dict[int, str] = {}
    open_: int | None = None
    for event in events[2:-2]:
        if event["type"] == "content_block_start":
            assert open_ is None and event["index"] == len(blocks)
            open_ = event["index"]
            blocks.append(dict(event["content_block"]))
        elif event["type"] == "content_block_stop":
            assert event["index"] == open_
            open_ = None
        else:
            assert event["type"] == "content_block_delta" and event["index"] == open_
            delta, block = event["delta"], blocks[event["index"]]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            else:
                assert delta["type"] == "input_json_delta"
                inputs[event["index"]] = inputs.get(event["index"], "") + delta["partial_json"]
    assert open_ is None
    for index, text in inputs.items():
        blocks[index]["input"] = jiter.from_json(text.encode(), partial_mode=True)  # as the client reads them
    expected = one_shot.model_dump(mode="json", exclude_none=True)
    assert blocks == [{k: v for k, v in b.items() if v is not None} for b in expected["content"]]
    delta = events[-2]
    assert delta["delta"] == {"stop_reason": one_shot.stop_reason, "stop_sequence": one_shot.stop_sequence}
    usage = delta["usage"]
    assert usage["output_tokens"] == one_shot.usage.output_tokens
    total = one_shot.usage.input_tokens + one_shot.usage.cache_read_input_tokens
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == total
    assert start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"] == total


def stop_reason(choice: dict[str, Any]) -> str:
    return {"length": "max_tokens", "stop": "end_turn", "tool_calls": "tool_use"}[choice["finish_reason"]]


def check_reply(message: Any, want: dict[str, Any], reason: str | None = None) -> None:
    """An Anthropic message carrying what Llama.chat's reply ``want`` carries (with the stop reason
    ``reason`` where the finish reason does not tell it)."""
    choice = want["choices"][0]
    reply = choice["message"]
    blocks = [b.model_dump(mode="json", exclude_none=True) for b in message.content]
    expected: list[dict[str, Any]] = []
    if reply.get("reasoning_content"):
        expected.append({"type": "thinking", "thinking": reply["reasoning_content"], "signature": ""})
    if reply.get("content"):
        expected.append({"type": "text", "text": reply["content"]})
    for call in reply.get("tool_calls") or []:
        fn = call["function"]
        expected.append(
            {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": json.loads(fn["arguments"])}
        )
    assert blocks == expected
    assert message.stop_reason == (reason or stop_reason(choice)) and message.stop_sequence is None
    usage = want["usage"]
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == usage["prompt_tokens"]
    assert message.usage.output_tokens == usage["completion_tokens"]


def assert_error(response: httpx.Response, status: int, kind: str, *words: str) -> str:
    """An error in Anthropic's shape; its message names what is wrong."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    message: str = body["error"]["message"]
    for word in words:
        assert word in message, message
    return message


# --- messages ------------------------------------------------------------------------------------


def test_a_message_is_llama_chat_of_the_conversation_and_its_stream_carries_it(
    served: Running, client: Any, reference: pyllama.Llama
) -> None:
    """System blocks, turns with string and block content: the reply is Llama.chat's of the same
    conversation (same seed), through the client one-shot, streamed, and on the wire."""
    system = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in English."}]
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "Another"}, {"type": "text", "text": "one?"}]},
    ]
    chat = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": messages[2]["content"]},
    ]
    request = {"system": system, "messages": messages, "max_tokens": 12, "metadata": {"user_id": "u1"}}
    reply = create(client, **request, extra_body={"seed": 3})
    want = reference.chat(chat, max_tokens=12, seed=3)
    assert isinstance(want, dict)
    check_reply(reply, want)
    assert dump(streamed(client, **request, extra_body={"seed": 3})) == dump(reply)
    check_events(events_of(served, {**request, "seed": 3}), reply)


def test_any_tool_gives_a_tool_use_block_and_its_result_goes_back(
    served: Running, client: Any, reference: pyllama.Llama
) -> None:
    """tool_choice any on a tool-calling template: a tool_use block whose input is valid for the tool's
    input_schema, Llama.chat's call with tool_choice required; its stream's input_json_deltas read by the
    client give the same input, also when max_tokens cuts the call. The call and an is_error
    tool_result sent back are the OpenAI conversation with the tool call and a tool message beginning
    with 'Error:'."""
    ask = [{"role": "user", "content": "Paint the wall."}]
    request: dict[str, Any] = {
        "messages": ask,
        "max_tokens": 256,
        "tools": [PAINT],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    reply = create(client, **request, extra_body={"seed": 5})
    want = reference.chat(
        ask,
        tools=[PAINT_CHAT],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=256,
        seed=5,
        logprobs=True,
    )
    assert isinstance(want, dict)
    check_reply(reply, want)
    assert reply.stop_reason == "tool_use"
    calls = [b for b in reply.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "paint"
    jsonschema.validate(calls[0].input, PAINT_SCHEMA)
    assert dump(streamed(client, **request, extra_body={"seed": 5})) == dump(reply)
    check_events(events_of(served, {**request, "seed": 5}), reply)

    # The same call cut by max_tokens inside its input, after the first value: the one-shot input is
    # what the client's parser makes of the JSON text cut there, as the stream gives it.
    text = ""
    for n, entry in enumerate(want["choices"][0]["logprobs"]["content"], 1):
        text += bytes(entry["bytes"]).decode("utf-8", "replace")
        arguments = re.search(r'"arguments"\s*:\s*(\{.*)$', text, re.S)
        if arguments and jiter.from_json(arguments.group(1).encode(), partial_mode=True):
            cut_short = {**request, "max_tokens": n}
            cut = create(client, **cut_short, extra_body={"seed": 5})
            assert cut.stop_reason == "max_tokens" and cut.content[-1].type == "tool_use"
            assert cut.content[-1].input == jiter.from_json(arguments.group(1).encode(), partial_mode=True)
            assert cut.content[-1].input != calls[0].input  # a part of it
            assert dump(streamed(client, **cut_short, extra_body={"seed": 5})) == dump(cut)
            break
    else:
        raise AssertionError(f"the call has no point where its input's first value is written: {text!r}")

    turn = [
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": calls[0].id, "content": "no such colour", "is_error": True},
                {"type": "text", "text": "Try again."},
            ],
        },
    ]
    chat = [
        *ask,
        want["choices"][0]["message"],
        {"role": "tool", "tool_call_id": calls[0].id, "content": "Error: no such colour"},
        {"role": "user", "content": "Try again."},
    ]
    again = create(client, messages=turn, max_tokens=8, tools=[PAINT], extra_body={"seed": 6})
    expected = reference.chat(chat, tools=[PAINT_CHAT], max_tokens=8, seed=6)
    assert isinstance(expected, dict)
    check_reply(again, expected)


def test_stop_sequences(served: Running, client: Any, reference: pyllama.Llama) -> None:
    """Stop sequences taken from the free reply: the reply ends before the one the model writes first
    (whatever their order in the request; also when one token writes both), as Llama.chat's with these
    stops, with stop_reason stop_sequence naming it; one the reply never writes changes nothing."""
    for seed in range(10):  # a seed whose reply (on this machine) is long enough to take stops from
        free = reference.chat(ASK, max_tokens=16, seed=seed, logprobs=True)
        assert isinstance(free, dict)
        text = free["choices"][0]["message"]["content"] or ""
        words = [text[i : i + 2] for i in range(len(text) - 1) if not any(c.isspace() for c in text[i : i + 2])]
        if len(words) >= 6:
            break
    else:
        pytest.skip("the model ends its replies at once on this machine")

    def check(stops: list[str], first: str) -> None:
        request = {"messages": ASK, "max_tokens": 16, "stop_sequences": stops}
        reply = create(client, **request, extra_body={"seed": seed})
        want = reference.chat(ASK, max_tokens=16, seed=seed, stop=stops)
        assert isinstance(want, dict) and want["choices"][0]["finish_reason"] == "stop"
        assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == first
        content = want["choices"][0]["message"]["content"]
        assert [b.text for b in reply.content] == ([content] if content else [])
        assert reply.usage.output_tokens == want["usage"]["completion_tokens"]
        assert dump(streamed(client, **request, extra_body={"seed": seed})) == dump(reply)
        check_events(events_of(served, {**request, "seed": seed}), reply)

    stops = [words[-1], words[1]]
    check(stops, min(stops, key=text.find))  # the one written first (the first listed on a tie)

    # two letters of one token, the later one listed first, neither written before that token: the
    # token writes both, and the reply ends before the earlier one
    pieces = [bytes(e["bytes"]).decode("utf-8", "replace") for e in free["choices"][0]["logprobs"]["content"]]
    for k, piece in enumerate(pieces):
        before = "".join(pieces[:k])
        letters = [c for c in dict.fromkeys(piece) if c.isascii() and c.isalpha() and c not in before]
        if len(letters) >= 2:
            check([letters[1], letters[0]], letters[0])
            break

    never = create(client, messages=ASK, max_tokens=16, stop_sequences=["\x07never"], extra_body={"seed": seed})
    check_reply(never, free)


def test_an_output_format_is_a_json_schema_response_format(client: Any, reference: pyllama.Llama) -> None:
    """output_config.format (structured outputs): the reply is Llama.chat's with that schema as a
    json_schema response_format, JSON valid for the schema when it ended by itself."""
    fmt = {"type": "json_schema", "schema": SCHEMA}
    reply = create(client, messages=ASK, max_tokens=96, output_config={"format": fmt}, extra_body={"seed": 9})
    response_format = {"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}}
    want = reference.chat(ASK, max_tokens=96, seed=9, response_format=response_format)
    assert isinstance(want, dict)
    check_reply(reply, want)
    if reply.stop_reason == "end_turn":
        jsonschema.validate(json.loads(reply.content[0].text), SCHEMA)


def test_count_tokens_is_the_rendered_prompt(served: Running, client: Any, reference: pyllama.Llama) -> None:
    """count_tokens: the tokens of the chat template's rendering of the system, the messages and the
    tools (a final assistant message continued, as a prefill is), which is also the prompt a message
    for the same request evaluates."""
    messages = [*ASK, {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}]
    chat = [{"role": "system", "content": "Be brief."}, *messages]
    counted = client.messages.count_tokens(model="tiny", system="Be brief.", messages=messages, tools=[PICK])
    assert isinstance(counted, MessageTokensCount)
    truth = len(reference.chat_template.apply(chat, tools=[PICK_CHAT]).prompt_tokens)
    assert counted.input_tokens == truth
    reply = create(client, system="Be brief.", messages=messages, tools=[PICK], max_tokens=1)
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == truth

    prefill = [*ASK, {"role": "assistant", "content": "My favourite is"}]
    counted = client.messages.count_tokens(model="tiny", messages=prefill)
    rendered = reference.chat_template.apply(prefill, continue_final_message=True).prompt_tokens
    assert counted.input_tokens == len(rendered)
    reply = create(client, messages=prefill, max_tokens=4, extra_body={"seed": 1})
    want = reference.chat(prefill, max_tokens=4, seed=1)
    assert isinstance(want, dict)
    check_reply(reply, want)  # the continuation only, as Anthropic answers a prefill


def test_an_image_block_is_an_image_url_part(served: Running, client: Any, reference: pyllama.Llama) -> None:
    """A base64 image block before the text: the reply is Llama.chat's with the same image as a data:
    URI part; count_tokens counts the image's tokens as the projector gives them."""
    data = base64.b64encode(IMAGE.read_bytes()).decode()
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": data}},
        {"type": "text", "text": "Describe this."},
    ]
    messages = [{"role": "user", "content": content}]
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + data}},
                {"type": "text", "text": "Describe this."},
            ],
        }
    ]
    reply = create(client, messages=messages, max_tokens=6, extra_body={"seed": 2})
    want = reference.chat(chat, max_tokens=6, seed=2)
    assert isinstance(want, dict)
    check_reply(reply, want)
    counted = client.messages.count_tokens(model="tiny", messages=messages)
    assert reference.projector is not None
    marker = {"type": "media_marker", "text": pyllama.Projector.default_marker()}
    marked = [{"role": "user", "content": [marker, {"type": "text", "text": "Describe this."}]}]
    prompt = reference.chat_template.apply(marked).prompt
    chunks = reference.projector.tokenize(prompt, [reference.projector.media_from_file(str(IMAGE))])
    assert counted.input_tokens == sum(c.n_tokens for c in chunks) == want["usage"]["prompt_tokens"]


def test_thinking_blocks_are_the_reasoning(thinker: tuple[pyllama.Llama, Running]) -> None:
    """A template that reasons: the message's thinking block is the chat reply's reasoning_content
    (through /v1/chat/completions on the same server, same seed), before its text; the stream carries it."""
    _, running = thinker
    client = anthropic.Anthropic(base_url=running.url, api_key="none", max_retries=0, timeout=60)
    request = {
        "messages": [{"role": "user", "content": "Think about colours."}],
        "max_tokens": 10,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    reply = create(client, **request, extra_body={"seed": 4})
    chat = {"messages": request["messages"], "max_tokens": 10, "seed": 4, "enable_thinking": True}
    want = httpx.post(running.url + "/v1/chat/completions", json=chat, timeout=60).json()
    assert want["choices"][0]["message"].get("reasoning_content")
    check_reply(reply, want)
    assert reply.content[0].type == "thinking" and reply.content[0].signature == ""
    check_events(events_of(running, {**request, "seed": 4}, key=None), reply)


def test_a_max_tokens_past_the_context_runs_until_the_context_is_full(thinker: tuple[pyllama.Llama, Running]) -> None:
    """max_tokens larger than the context has room for: the reply goes on until the context is full,
    as the chat reply without max_tokens does, and says so (model_context_window_exceeded). A prompt
    longer than the context is a 400."""
    llm, running = thinker
    client = anthropic.Anthropic(base_url=running.url, api_key="none", max_retries=0, timeout=60)

    def ask(n: int) -> list[dict[str, Any]]:
        return [{"role": "user", "content": "hello " * n}]

    # a prompt that leaves room for about 24 tokens (counted by count_tokens), so that the test is short
    n10, n20 = (client.messages.count_tokens(model="tiny", messages=ask(n)).input_tokens for n in (10, 20))
    n = 10 + (llm.n_ctx() - 24 - n10) * 10 // (n20 - n10)
    # both evaluated afresh: a long prompt evaluated in one batch or reused but for its last token gives
    # logits that differ in their last bits, enough for a random model's samples to part
    llm.reset()
    reply = create(client, messages=ask(n), max_tokens=100_000, extra_body={"seed": 8})
    llm.reset()
    want = httpx.post(running.url + "/v1/chat/completions", json={"messages": ask(n), "seed": 8}, timeout=60).json()
    full = want["choices"][0]["finish_reason"] == "length"  # else the model ended first
    check_reply(reply, want, "model_context_window_exceeded" if full else None)
    assert want["usage"]["total_tokens"] <= llm.n_ctx()
    too_long = {"messages": ask(2 * llm.n_ctx()), "max_tokens": 4}
    assert_error(post(running, "/v1/messages", too_long, key=None), 400, "invalid_request_error", "context")
    assert_error(post(running, "/v1/messages", {**too_long, "stream": True}, key=None), 400, "invalid_request_error")


# --- keys and errors ---------------------------------------------------------------------------


def test_a_wrong_key_is_the_clients_authentication_error(served: Running, client: Any) -> None:
    """x-api-key (what the client sends) and Authorization: Bearer are both keys; a wrong one is 401 in
    Anthropic's shape on its paths (the client's AuthenticationError), in OpenAI's on OpenAI's."""
    bad = anthropic.Anthropic(base_url=served.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bad.messages.create(model="tiny", max_tokens=2, messages=ASK)
    assert info.value.status_code == 401 and info.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.count_tokens(model="tiny", messages=ASK)
    assert_error(
        post(served, "/v1/messages", {"messages": ASK, "max_tokens": 2}, key=None), 401, "authentication_error"
    )
    bearer = anthropic.Anthropic(base_url=served.url, auth_token=KEY, max_retries=0)
    assert bearer.messages.count_tokens(model="tiny", messages=ASK).input_tokens > 0
    assert httpx.get(served.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
    openai_shaped = httpx.get(served.url + "/v1/models", headers={"x-api-key": "sk-wrong"})
    assert openai_shaped.status_code == 401 and openai_shaped.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": ASK}, "max_tokens"),
        ({"messages": ASK, "max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4}, "messages"),
        ({"messages": [], "max_tokens": 4}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}], "max_tokens": 4}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document"}]}], "max_tokens": 4},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}], "max_tokens": 4},
            "messages[0].content[0].text",
        ),
        (
            {
                "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}],
                "max_tokens": 4,
            },
            "messages[0].content[0].tool_use_id",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/a.png"}}]}
                ],
                "max_tokens": 4,
            },
            "messages[0].content[0].source",
        ),
        ({"messages": ASK, "max_tokens": 4, "stop_sequences": ["a", ""]}, "stop_sequences[1]"),
        ({"messages": ASK, "max_tokens": 4, "temperature": "hot"}, "temperature"),
        ({"messages": ASK, "max_tokens": 4, "system": [{"type": "image"}]}, "system[0].type"),
        ({"messages": ASK, "max_tokens": 4, "tools": [{"name": "f"}]}, "tools[0].input_schema"),
        (
            {"messages": ASK, "max_tokens": 4, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools[0].type",
        ),
        ({"messages": ASK, "max_tokens": 4, "tool_choice": {"type": "any"}}, "tool_choice"),
        (
            {"messages": ASK, "max_tokens": 4, "tools": [PICK], "tool_choice": {"type": "tool", "name": "f"}},
            "tool_choice.name",
        ),
        ({"messages": ASK, "max_tokens": 4, "tools": [PICK], "tool_choice": {"type": "all"}}, "tool_choice.type"),
        ({"messages": ASK, "max_tokens": 4, "thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        (
            {"messages": ASK, "max_tokens": 4, "mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]},
            "mcp_servers",
        ),
    ],
)
def test_a_bad_request_is_400_naming_the_field(served: Running, body: dict[str, Any], field: str) -> None:
    assert_error(post(served, "/v1/messages", body), 400, "invalid_request_error", field)
    counting = {k: v for k, v in body.items() if k != "max_tokens"}
    if field != "max_tokens":
        assert_error(post(served, "/v1/messages/count_tokens", counting), 400, "invalid_request_error", field)


def test_the_client_raises_bad_requests(served: Running, client: Any) -> None:
    """The client's BadRequestError for a 400; requests that are not JSON, too large, or with another
    method are errors in Anthropic's shape too."""
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="tiny", max_tokens=4, messages=[{"role": "robot", "content": "hi"}])
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].role" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model="tiny", messages=ASK, tools=[{"name": "bad name!", "input_schema": SCHEMA}])
    not_json = httpx.post(served.url + "/v1/messages", content=b"{", headers={"x-api-key": KEY}, timeout=30)
    assert_error(not_json, 400, "invalid_request_error", "JSON")
    huge = {"messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}], "max_tokens": 2}
    assert_error(post(served, "/v1/messages", huge), 413, "request_too_large")
    assert_error(httpx.get(served.url + "/v1/messages", headers={"x-api-key": KEY}), 405, "invalid_request_error")
    assert post(served, "/v1/messages", {"messages": ASK, "max_tokens": 2}).status_code == 200  # still fine


def test_an_error_during_a_stream_is_its_last_event(served: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error of the generation after the stream started ends it with an ``error`` event in
    Anthropic's shape, and the client raises it."""
    from test_streams import failing_generations

    failing_generations(monkeypatch, [pyllama.LlamaError("decode failed")])
    body = {"messages": ASK, "max_tokens": 30, "stream": True}
    with httpx.stream("POST", served.url + "/v1/messages", json=body, headers={"x-api-key": KEY}) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    events = [block.split("\n") for block in raw.split("\n\n")[:-1]]
    assert events[0][0] == "event: message_start" and events[-1][0] == "event: error"
    error = json.loads(events[-1][1][len("data: ") :])
    assert error == {"type": "error", "error": {"type": "api_error", "message": error["error"]["message"]}}
    assert "message_stop" not in raw
    client = anthropic.Anthropic(base_url=served.url, api_key=KEY, max_retries=0)
    with (
        pytest.raises(anthropic.APIStatusError, match="internal error"),
        client.messages.stream(model="tiny", max_tokens=30, messages=ASK) as stream,
    ):
        stream.get_final_message()


def test_a_full_queue_is_overloaded(tiny_chat_model_path: Path) -> None:
    """One slot, no queue: while a stream holds the slot, a message, streamed or not, is a 503 of type
    overloaded_error with Retry-After (the client's InternalServerError), before any event."""
    with pyllama.Llama(tiny_chat_model_path, n_ctx=8192, n_threads=1) as llm:  # seconds of generation
        running = Running(create_app(llm, alias="tiny", max_queue=0))
        try:
            body = {"messages": ASK, "max_tokens": 100_000, "stream": True}
            with httpx.stream("POST", running.url + "/v1/messages", json=body, timeout=60) as holder:
                assert holder.status_code == 200
                lines = holder.iter_lines()  # kept: an iterator dropped closes the connection
                next(lines)  # it generates, holding the only slot until it is closed
                for stream in (False, True):
                    request = {"messages": ASK, "max_tokens": 2, "stream": stream}
                    busy = post(running, "/v1/messages", request, key=None)
                    assert_error(busy, 503, "overloaded_error")
                    assert int(busy.headers["Retry-After"]) >= 1
                client = anthropic.Anthropic(base_url=running.url, api_key="none", max_retries=0)
                with pytest.raises(anthropic.InternalServerError) as info:
                    client.messages.create(model="tiny", max_tokens=2, messages=ASK)
                assert info.value.status_code == 503
        finally:
            running.stop()


# --- the translation alone ---------------------------------------------------------------------


def test_turns_blocks_and_tool_results_as_chat_messages(llm: pyllama.Llama) -> None:
    """Consecutive turns of one role are one turn; tool_result blocks are tool messages before the
    user's text (is_error begins them with 'Error:'); tool_use blocks the assistant's calls with their
    input as JSON arguments, thinking its reasoning_content; a string is plain content."""
    from pyllama.server.anthropic import to_chat

    messages = [
        {"role": "user", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Pick one."}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Hm.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
                {"type": "tool_use", "id": "t2", "name": "g", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "one"}]},
                {"type": "tool_result", "tool_use_id": "t2", "content": "two", "is_error": True},
                {"type": "text", "text": "And now?"},
            ],
        },
    ]
    assert to_chat("Be kind.", messages, llm) == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "Hello."}, {"type": "text", "text": "Pick one."}]},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "Hm.",
            "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                {"id": "t2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "one"},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: two"},
        {"role": "user", "content": "And now?"},
    ]


def test_a_cut_tool_input_reads_as_the_client_reads_it() -> None:
    """A tool input cut anywhere (max_tokens in the middle of a call) is, in the one-shot message,
    what the client's parser (jiter's partial mode) makes of the same text in a stream."""
    from pyllama.server.anthropic import partial_json

    documents = [
        '{"colour": "red", "n": [1, 2.5, -3e2, true, false, null, {"a": "x\\"y\\\\"}], "e": {}, "f": []}',
        '{\n\n  \t"city":\n\n    \t\t"Pa\\u00e9ris"}',
        '[{"a": [[]]}, "s", 10, 0.5]',
        '{"k" : -0.25e-3 , "t":true, "u": "é\\n"}',
    ]
    for document in documents:
        for n in range(len(document) + 1):
            text = document[:n]
            try:
                want: Any = jiter.from_json(text.encode(), partial_mode=True)
            except ValueError:
                want = ValueError
            try:
                got: Any = partial_json(text)
            except ValueError:
                got = ValueError
            assert got == want, text
