"""OpenAI's Responses API (/v1/responses), run for real on 127.0.0.1 and driven by the official client.

The truth of each reply is the chat completion of the same conversation through /v1/chat/completions
on the same server (same seed, greedy), and of each stream the one-shot response; the shapes are
checked with the client's own pydantic types.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import pyllama

openai = pytest.importorskip("openai")
pytest.importorskip("openai.types.responses")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
jsonschema = pytest.importorskip("jsonschema")

from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from pyllama.server import create_app  # noqa: E402
from test_server import Running  # noqa: E402

from tiny_models import template_text  # noqa: E402

KEY = "sk-test-key"
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["colour"],
}
PICK = {"type": "function", "name": "pick_colour", "description": "Pick a colour.", "parameters": SCHEMA}
PICK_CHAT = {"type": "function", "function": {k: v for k, v in PICK.items() if k != "type"}}
EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path: Path) -> Iterator[pyllama.Llama]:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=2048, n_threads=1, n_parallel=2, seed=0) as llm:
        yield llm


@pytest.fixture(scope="module")
def served(llm: pyllama.Llama) -> Iterator[Running]:
    running = Running(create_app(llm, api_key=KEY, alias="tiny"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(served: Running) -> Any:
    return served.client()


def create(client: Any, **kwargs: Any) -> Any:
    """``client.responses.create``, its JSON checked against the client's Response type."""
    raw = client.responses.with_raw_response.create(model="tiny", **kwargs)
    body = raw.http_response.json()
    Response.model_validate(body)
    assert body["object"] == "response" and body["model"] == "tiny"
    return raw.parse()


def chat(client: Any, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def events_of(served: Running, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a streamed /v1/responses request, read off the wire: each an ``event:`` line
    naming its type and a ``data:`` line, valid as the client's event types, numbered in order."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", served.url + "/v1/responses", json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200
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
        EVENT.validate_python(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def without_ids(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items without their item ids (fresh per response)."""
    return [{k: v for k, v in item.items() if k != "id"} for item in output]


def check_stream(events: list[dict[str, Any]], one_shot: Any) -> None:
    """A stream in OpenAI's order, carrying exactly the one-shot response ``one_shot``."""
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    assert types[-1] == ("response.incomplete" if one_shot.status == "incomplete" else "response.completed")
    assert final["status"] == one_shot.status
    expected = one_shot.model_dump(mode="json", exclude_unset=True)
    assert without_ids(final["output"]) == without_ids(expected["output"])
    usage = {k: v for k, v in final["usage"].items() if k != "input_tokens_details"}
    assert usage == {k: v for k, v in expected["usage"].items() if k != "input_tokens_details"}
    # each item: added, its parts and deltas, done, in turn; the deltas add up to its text
    items = final["output"]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["item"]["id"] for e in added] == [e["item"]["id"] for e in done] == [i["id"] for i in items]
    assert [e["item"] for e in done] == items
    for index, item in enumerate(items):
        mine = [e for e in events if e.get("output_index") == index]
        kinds = [e["type"] for e in mine]
        assert kinds[0] == "response.output_item.added" and kinds[-1] == "response.output_item.done"
        assert mine[0]["item"]["status"] == "in_progress"
        if item["type"] in ("message", "reasoning"):
            text_kind = "output_text" if item["type"] == "message" else "reasoning_text"
            assert kinds[1] == "response.content_part.added"
            assert kinds[-3:-1] == [f"response.{text_kind}.done", "response.content_part.done"]
            assert mine[-2]["part"] == item["content"][0] and mine[1]["part"]["text"] == ""
        if item["type"] == "message":
            text = "".join(e["delta"] for e in mine if e["type"] == "response.output_text.delta")
            assert text == item["content"][0]["text"]
            assert [e["text"] for e in mine if e["type"] == "response.output_text.done"] == [text]
        elif item["type"] == "function_call":
            arguments = "".join(e["delta"] for e in mine if e["type"] == "response.function_call_arguments.delta")
            assert arguments == item["arguments"]
            assert kinds[-2] == "response.function_call_arguments.done" and mine[-2]["arguments"] == arguments
        else:
            assert item["type"] == "reasoning"
            text = "".join(e["delta"] for e in mine if e["type"] == "response.reasoning_text.delta")
            assert text == item["content"][0]["text"]
    # items open and close one after the other
    opened = [
        e["output_index"] for e in events if e["type"] in ("response.output_item.added", "response.output_item.done")
    ]
    assert opened == [i for i in range(len(items)) for _ in (0, 1)]


# --- replies against chat completions ----------------------------------------------------------


def test_text_reply_is_the_chat_completion(client: Any) -> None:
    reply = create(
        client,
        instructions="Answer briefly.",
        input="Name a colour.",
        max_output_tokens=12,
        temperature=0,
        metadata={"k": "v"},
        extra_body={"seed": 3},
    )
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
    expected = chat(client, messages, max_tokens=12, temperature=0, seed=3)
    assert reply.output_text == expected.choices[0].message.content
    assert [item.type for item in reply.output] == ["message"] and reply.output[0].role == "assistant"
    assert reply.usage.input_tokens == expected.usage.prompt_tokens
    assert reply.usage.output_tokens == expected.usage.completion_tokens
    assert reply.usage.total_tokens == expected.usage.total_tokens
    assert reply.usage.output_tokens_details.reasoning_tokens == 0
    cut = expected.choices[0].finish_reason == "length"
    assert reply.status == ("incomplete" if cut else "completed")
    assert (reply.incomplete_details is not None and reply.incomplete_details.reason == "max_output_tokens") == cut
    assert reply.output[0].status == reply.status
    assert reply.instructions == "Answer briefly." and reply.metadata == {"k": "v"} and reply.max_output_tokens == 12


def test_items_are_chat_messages(client: Any) -> None:
    """Message items with content parts, roles and an assistant turn give the chat conversation
    written out by hand."""
    items = [
        {"role": "developer", "content": [{"type": "input_text", "text": "Be terse."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello.", "annotations": []}]},
        {"role": "user", "content": "Name a colour."},
    ]
    reply = create(client, input=items, max_output_tokens=8, temperature=0, extra_body={"seed": 1})
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
    expected = chat(client, messages, max_tokens=8, temperature=0, seed=1)
    assert reply.output_text == expected.choices[0].message.content
    assert reply.usage.input_tokens == expected.usage.prompt_tokens


def test_text_stream_is_the_one_shot_response(served: Running, client: Any) -> None:
    body = {"model": "tiny", "input": "Tell me a story.", "max_output_tokens": 10, "temperature": 0, "seed": 5}
    one_shot = create(client, **{k: v for k, v in body.items() if k not in ("model", "seed")}, extra_body={"seed": 5})
    events = events_of(served, body)
    check_stream(events, one_shot)
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == one_shot.output_text
    # and the client's own stream gives the same
    streamed = list(
        client.responses.create(
            model="tiny", input="Tell me a story.", max_output_tokens=10, temperature=0, stream=True
        )
    )
    assert streamed[-1].response.output_text == one_shot.output_text


def test_required_function_call(served: Running, client: Any) -> None:
    """tool_choice="required" on a tool-calling template: one function_call item whose arguments are
    valid for the tool's schema, the chat completion's call; its stream carries the same; the
    call's output answered in the next request is the chat conversation with a tool message."""
    ask = {"role": "user", "content": "Pick a colour."}
    kwargs: dict[str, Any] = {"tools": [PICK], "parallel_tool_calls": False, "max_output_tokens": 200, "temperature": 0}
    reply = create(client, input=[ask], tool_choice="required", **kwargs, extra_body={"seed": 7})
    assert reply.status == "completed"
    assert [item.type for item in reply.output] == ["function_call"]
    call = reply.output[0]
    assert call.name == "pick_colour" and call.status == "completed" and call.call_id
    jsonschema.validate(json.loads(call.arguments), SCHEMA)
    expected = chat(
        client,
        [ask],
        tools=[PICK_CHAT],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0,
        seed=7,
    )
    assert expected.choices[0].finish_reason == "tool_calls"
    (chat_call,) = expected.choices[0].message.tool_calls
    assert (call.call_id, call.name, call.arguments) == (
        chat_call.id,
        chat_call.function.name,
        chat_call.function.arguments,
    )
    assert reply.usage.input_tokens == expected.usage.prompt_tokens
    assert reply.usage.output_tokens == expected.usage.completion_tokens

    body = {"model": "tiny", "input": [ask], "tool_choice": "required", "seed": 7, **kwargs}
    check_stream(events_of(served, body), reply)
    with client.responses.stream(
        model="tiny", input=[ask], tool_choice="required", **kwargs, extra_body={"seed": 7}
    ) as stream:
        final = stream.get_final_response()  # the client's accumulation of the events
    accumulated = final.model_dump(mode="json", exclude_unset=True, exclude={"output": {0: {"parsed_arguments"}}})
    assert without_ids(accumulated["output"]) == without_ids(
        reply.model_dump(mode="json", exclude_unset=True)["output"]
    )

    named = create(client, input=[ask], tool_choice={"type": "function", "name": "pick_colour"}, **kwargs)
    assert [item.type for item in named.output] == ["function_call"] and named.output[0].name == "pick_colour"

    answered = [
        ask,
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "blue"},
    ]
    after = create(client, input=answered, tools=[PICK], max_output_tokens=8, temperature=0, extra_body={"seed": 2})
    messages = [
        ask,
        {"role": "assistant", "content": None, "tool_calls": [chat_call.model_dump()]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "blue"},
    ]
    expected = chat(client, messages, tools=[PICK_CHAT], max_tokens=8, temperature=0, seed=2)
    assert after.usage.input_tokens == expected.usage.prompt_tokens
    assert after.output_text == (expected.choices[0].message.content or "")


def test_json_schema_format(client: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    text = {"format": {"type": "json_schema", "name": "number", "schema": schema, "strict": True}}
    reply = create(client, input="Give a number.", text=text, max_output_tokens=200, temperature=0)
    assert reply.status == "completed"
    jsonschema.validate(json.loads(reply.output_text), schema)
    assert reply.text.format.type == "json_schema" and reply.text.format.name == "number"
    response_format = {"type": "json_schema", "json_schema": {"name": "number", "schema": schema, "strict": True}}
    expected = chat(
        client,
        [{"role": "user", "content": "Give a number."}],
        response_format=response_format,
        max_tokens=200,
        temperature=0,
    )
    assert reply.output_text == expected.choices[0].message.content
    as_object = create(
        client, input="Give an object.", text={"format": {"type": "json_object"}}, max_output_tokens=200, temperature=0
    )
    expected = chat(
        client,
        [{"role": "user", "content": "Give an object."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    assert as_object.output_text == expected.choices[0].message.content
    assert as_object.status == ("incomplete" if expected.choices[0].finish_reason == "length" else "completed")
    if as_object.status == "completed":
        assert isinstance(json.loads(as_object.output_text), dict)


# --- stored responses --------------------------------------------------------------------------


def test_previous_response_id_continues_the_conversation(client: Any) -> None:
    """The second request's prompt holds the first turn (input and output, not the instructions):
    the chat completion of that conversation written out has its input tokens and its reply."""
    first = create(client, instructions="Be brief.", input="Name a colour.", max_output_tokens=6, temperature=0)
    second = create(
        client,
        previous_response_id=first.id,
        input="Another one?",
        max_output_tokens=6,
        temperature=0,
        extra_body={"seed": 4},
    )
    assert second.previous_response_id == first.id and second.instructions is None
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Another one?"},
    ]
    expected = chat(client, messages, max_tokens=6, temperature=0, seed=4)
    assert second.usage.input_tokens == expected.usage.prompt_tokens
    assert second.output_text == expected.choices[0].message.content
    # the same history sent explicitly
    explicit = create(
        client,
        input=[messages[0], *[item.model_dump(exclude_none=True) for item in first.output], messages[2]],
        max_output_tokens=6,
        temperature=0,
    )
    assert explicit.usage.input_tokens == second.usage.input_tokens and explicit.output_text == second.output_text
    # a third turn goes on from the second, which holds the first
    third = create(client, previous_response_id=second.id, input="And a third?", max_output_tokens=4, temperature=0)
    longer = [
        *messages,
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "And a third?"},
    ]
    assert third.usage.input_tokens == chat(client, longer, max_tokens=1).usage.prompt_tokens

    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(first.id)
    assert info.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as bad:
        create(client, previous_response_id=first.id, input="Hi", max_output_tokens=2)
    assert bad.value.body["param"] == "previous_response_id"
    assert bad.value.body["code"] == "previous_response_not_found"


def test_a_cut_function_call_is_left_out_of_the_next_turn(client: Any) -> None:
    """A function call whose arguments max_output_tokens cut short is no call: the turn that
    continues its response holds the conversation without it, as chat renders it."""
    ask = {"role": "user", "content": "Pick a colour."}
    kwargs: dict[str, Any] = {"input": [ask], "tools": [PICK], "tool_choice": "required", "temperature": 0}

    seen: dict[int, Any] = {}

    def call_at(budget: int) -> Any:
        """The reply in ``budget`` tokens if it holds a function_call item, else None."""
        if budget not in seen:
            reply = create(client, max_output_tokens=budget, parallel_tool_calls=False, **kwargs)
            seen[budget] = reply if any(item.type == "function_call" for item in reply.output) else None
        return seen[budget]

    whole = call_at(200)
    assert whole is not None and whole.status == "completed"
    lo, hi = 0, whole.usage.output_tokens  # no call item within lo tokens; one within hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if call_at(mid) is not None else (mid, hi)
    cut = call_at(hi)  # the fewest tokens that open the call: its arguments have only begun
    assert cut.status == "incomplete" and cut.output[-1].type == "function_call"
    assert cut.output[-1].status == "incomplete"
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.output[-1].arguments)
    after = create(client, previous_response_id=cut.id, input="Well?", tools=[PICK], max_output_tokens=4, temperature=0)
    before_call = [{"role": "assistant", "content": item.content[0].text} for item in cut.output[:-1]]
    messages = [ask, *before_call, {"role": "user", "content": "Well?"}]
    expected = chat(client, messages, tools=[PICK_CHAT], max_tokens=4, temperature=0)
    assert after.usage.input_tokens == expected.usage.prompt_tokens
    # the whole call is kept
    again = create(
        client, previous_response_id=whole.id, input="Well?", tools=[PICK], max_output_tokens=4, temperature=0
    )
    assert again.usage.input_tokens > after.usage.input_tokens


def test_store_false(client: Any) -> None:
    unstored = create(client, input="Hi", max_output_tokens=1, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError):
        create(client, previous_response_id=unstored.id, input="Hi", max_output_tokens=1)


def test_the_store_keeps_the_most_recently_used(tiny_chat_model_path: Path) -> None:
    """``pyllama serve --max-stored-responses 2``: a third response drops the least recently used."""
    from live_server import LiveServer

    server = LiveServer(tiny_chat_model_path, 1, "--max-stored-responses", "2")
    try:
        few = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        a = few.responses.create(model="x", input="a", max_output_tokens=1)
        b = few.responses.create(model="x", input="b", max_output_tokens=1)
        few.responses.retrieve(a.id)  # a is now the more recently used
        c = few.responses.create(model="x", input="c", max_output_tokens=1)
        assert few.responses.retrieve(a.id).id == a.id and few.responses.retrieve(c.id).id == c.id
        with pytest.raises(openai.NotFoundError):
            few.responses.retrieve(b.id)
    finally:
        server.stop()


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": 5}, "input"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]}, "input[0].arguments"),
        (
            {
                "input": [
                    {"role": "user", "content": "x"},
                    {"type": "function_call_output", "call_id": "c", "output": "y"},
                ]
            },
            "input[1].call_id",
        ),
        ({"input": [{"type": "web_search_call", "id": "w"}]}, "input[0].type"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
        ({"input": "x", "tools": [PICK], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice.name"),
        ({"input": "x", "tool_choice": "sometimes"}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "temperature": "hot"}, "temperature"),
        ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"input": "x", "metadata": {"k": 1}}, "metadata.k"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "previous_response_id": "resp_none"}, "previous_response_id"),
        ({"input": "hello " * 3000}, "input"),
    ],
)
def test_bad_requests_are_400_naming_the_field(served: Running, client: Any, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="tiny", extra_body=body)
    error = info.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    # streamed, the same answer comes as the status, before any event
    streamed = httpx.post(
        served.url + "/v1/responses",
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert streamed.status_code == 400 and streamed.json()["error"] == error


def test_an_error_during_a_stream_ends_it(served: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error of the generation after the stream started: an ``error`` event with the error the
    server answers for it before a stream, then ``response.failed``."""
    from pyllama.server.app import translate
    from test_streams import failing_generations

    error = pyllama.LlamaError("decode failed")
    failing_generations(monkeypatch, [error])
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"input": "Hi", "max_output_tokens": 30, "stream": True}
    with httpx.stream("POST", served.url + "/v1/responses", json=body, headers=headers) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    events = [json.loads(block.split("\n")[1][len("data: ") :]) for block in raw.split("\n\n")[:-1]]
    for event in events:
        EVENT.validate_python(event)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    expected = translate(error, ()).body()["error"]
    assert {k: events[-2][k] for k in ("message", "code", "param")} == {
        k: expected[k] for k in ("message", "code", "param")
    }
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["code"] == "server_error"


# --- reasoning ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinker(tiny_chat_model_path: Path) -> Iterator[tuple[pyllama.Llama, Running]]:
    """The random model with QwQ's template, which opens a reasoning block in the generation prompt."""
    with pyllama.Llama(
        tiny_chat_model_path, n_ctx=1024, n_threads=1, chat_template=template_text("Qwen-QwQ-32B")
    ) as llm:
        running = Running(create_app(llm, alias="tiny"))
        yield llm, running
        running.stop()


def test_reasoning_items(thinker: tuple[pyllama.Llama, Running]) -> None:
    """The chat reply's reasoning_content is a reasoning item's text, before the message; its stream
    carries the same; reasoning_tokens count it."""
    llm, running = thinker
    client = running.client(key=None)
    reply = create(client, input="Think about colours.", max_output_tokens=12, temperature=0)
    expected = chat(client, [{"role": "user", "content": "Think about colours."}], max_tokens=12, temperature=0)
    reasoning = expected.choices[0].message.reasoning_content  # type: ignore[attr-defined]
    assert reasoning
    assert reply.output[0].type == "reasoning"
    assert reply.output[0].content[0].text == reasoning and reply.output[0].summary == []
    assert reply.output_text == (expected.choices[0].message.content or "")
    details = reply.usage.output_tokens_details
    assert details.reasoning_tokens == min(len(llm.tokenize(reasoning, False, False)), reply.usage.output_tokens)
    assert 0 < details.reasoning_tokens <= reply.usage.output_tokens
    body = {"input": "Think about colours.", "max_output_tokens": 12, "temperature": 0}
    check_stream(events_of(running, body), reply)


# --- the translation alone ---------------------------------------------------------------------


def test_items_to_chat_messages() -> None:
    """Responses items as the chat messages OpenAI's chat format writes for them."""
    from pyllama.server.responses import to_chat

    items = [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Look:"},
                {"type": "input_image", "image_url": "data:image/png;base64,AA==", "detail": "auto"},
            ],
        },
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Hm."}]},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}],
        },
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        {"role": "system", "content": "Now answer."},
    ]
    messages, origin = to_chat(items, "Be kind.", [f"input[{i}]" for i in range(len(items))])
    assert messages == [
        {"role": "system", "content": "Be kind."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "Hm.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "two"}]},
        {"role": "system", "content": "Now answer."},
    ]
    assert origin == ["instructions", "input[0]", "input[1]", "input[5]", "input[6]", "input[7]"]
