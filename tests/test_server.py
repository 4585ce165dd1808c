"""The OpenAI-compatible server, run for real (uvicorn on 127.0.0.1) and driven by the official client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import pyllama

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from pyllama.server import create_app  # noqa: E402

from conftest import free_port  # noqa: E402

KEY = "sk-test-key"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
PICK = {
    "type": "function",
    "function": {
        "name": "pick_colour",
        "description": "Pick a colour.",
        "parameters": {
            "type": "object",
            "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
            "required": ["colour"],
        },
    },
}


class Running:
    """A uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    def client(self, key: str | None = KEY, **kwargs: Any) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path: Path) -> Iterator[pyllama.Llama]:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=2048, n_threads=1, n_parallel=4, seed=0) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(tiny_chat_model_path: Path) -> Iterator[pyllama.Llama]:
    """An independent Llama over the same file: what a request's answer must equal."""
    with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1) as ref:
        yield ref


@pytest.fixture(scope="module")
def served(llm: pyllama.Llama) -> Iterator[Running]:
    running = Running(create_app(llm, api_key=[KEY, "sk-other"], alias="tiny", max_request_bytes=256 * 1024))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def single(tiny_chat_model_path: Path) -> Iterator[Running]:
    """One slot, one place in the queue, a context long enough for a stream of many seconds."""
    with pyllama.Llama(tiny_chat_model_path, n_ctx=8192, n_threads=1, n_parallel=1) as one:
        running = Running(create_app(one, max_queue=1))
        yield running
        running.stop()


def post(running: Running, path: str, body: Any, key: str | None = KEY, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(running.url + path, json=body, headers=headers, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return dict(error)


def streamed_text(chunks: Any) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- chat ----------------------------------------------------------------------------------------


def test_chat_and_its_stream_agree(served: Running, reference: pyllama.Llama) -> None:
    client = served.client()
    reply = client.chat.completions.create(model="anything", messages=MESSAGES, max_tokens=12, temperature=0, seed=3)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12
    expected = reference.chat(MESSAGES, max_tokens=12, temperature=0)
    assert isinstance(expected, dict)
    assert reply.choices[0].message.content == expected["choices"][0]["message"]["content"]

    chunks = list(
        client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=12, temperature=0, seed=3, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no usage unless stream_options asks for it
    assert all(c.model == "tiny" and c.object == "chat.completion.chunk" for c in chunks)
    assert streamed_text(chunks) == reply.choices[0].message.content


def test_stream_usage_comes_last_when_asked(served: Running) -> None:
    chunks = list(
        served.client().chat.completions.create(
            model="x",
            messages=MESSAGES,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    n = chunks[-1].usage.completion_tokens
    assert chunks[-1].choices == [] and n <= 5
    assert all(c.usage is None for c in chunks[:-1])
    finish = chunks[-2].choices[0].finish_reason
    assert (finish == "length" and n == 5) or finish == "stop"  # a random model may end its reply first


def test_sse_wire_format(served: Running) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", served.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        json.loads(event[len("data: ") :])


@pytest.mark.parametrize("error", [ValueError("bad batch"), pyllama.LlamaError("decode failed")], ids=repr)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_an_error_during_a_stream_is_its_last_event(
    served: Running, monkeypatch: pytest.MonkeyPatch, error: Exception, path: str
) -> None:
    """An error raised by the generation after the stream has started ends it with one
    ``data: {"error": {...}}`` event in OpenAI's shape, as llama-server does: no finish_reason, no [DONE]."""
    from pyllama.server.app import translate
    from test_streams import failing_generations

    failing_generations(monkeypatch, [error])
    body: dict[str, Any] = {"max_tokens": 30, "stream": True}
    body.update({"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "Hi", "ignore_eos": True})
    with httpx.stream("POST", served.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200  # the stream had started
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1])
    data = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert data[:-1] and all(d["choices"][0]["finish_reason"] is None for d in data[:-1])
    assert set(data[-1]) == {"error"} and set(data[-1]["error"]) == {"message", "type", "param", "code"}
    assert data[-1] == translate(error, body).body()  # what a request failing before its stream is answered
    # the official client raises it
    with pytest.raises(openai.APIError, match=re.escape(data[-1]["error"]["message"])):
        list(served.client().chat.completions.create(model="x", messages=MESSAGES, max_tokens=30, stream=True))


def test_tools_required(served: Running) -> None:
    reply = served.client().chat.completions.create(
        model="x", messages=MESSAGES, tools=[PICK], tool_choice="required", max_tokens=48, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("tool_calls", "length")
    calls = choice.message.tool_calls
    assert calls and calls[0].function.name == "pick_colour" and calls[0].id
    if choice.finish_reason == "tool_calls":
        assert json.loads(calls[0].function.arguments)["colour"] in ("red", "green", "blue")


def test_logprobs(served: Running) -> None:
    reply = served.client().chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in content)
    # greedy: the chosen token is the most likely one
    assert all(entry.logprob >= entry.top_logprobs[0].logprob - 1e-5 for entry in content)


def test_response_format_json_schema(served: Running) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    reply = served.client().chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content)["n"], int)


def test_chat_grammar(served: Running, reference: pyllama.Llama) -> None:
    """llama-server's grammar field on chat: the reply is the reference Llama's with the same grammar
    (and matches it); with tools it is a 400 naming the field."""
    grammar = 'root ::= ("yes" | "no") " " [0-9] [0-9]? "."'
    client = served.client()
    reply = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"grammar": grammar}
    )
    expected = reference.chat(MESSAGES, max_tokens=12, temperature=0, grammar=grammar)
    assert isinstance(expected, dict)
    assert reply.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert pyllama.grammar_match(grammar, reply.choices[0].message.content or "") == "complete"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="x", messages=MESSAGES, max_tokens=4, tools=[PICK], extra_body={"grammar": grammar}
        )
    assert e.value.body["param"] == "grammar"  # type: ignore[index]


# --- completions, embeddings, models --------------------------------------------------------------


def test_completions(served: Running, reference: pyllama.Llama) -> None:
    client = served.client()
    out = client.completions.create(model="x", prompt="The sky is", max_tokens=6, temperature=0)
    expected = reference.complete("The sky is", max_tokens=6, temperature=0)
    assert isinstance(expected, dict)
    assert out.object == "text_completion" and out.model == "tiny"
    assert out.choices[0].text == expected["choices"][0]["text"]
    assert out.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    chunks = list(client.completions.create(model="x", prompt="The sky is", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert all(c.usage is None for c in chunks)
    with_usage = list(
        client.completions.create(
            model="x", prompt="The sky is", max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == out.usage.completion_tokens
    tokens = reference.tokenize("The sky is")
    by_tokens = client.completions.create(model="x", prompt=tokens, max_tokens=6, temperature=0)
    assert by_tokens.choices[0].text == out.choices[0].text


def test_embeddings_equal_llama_embed(served: Running, reference: pyllama.Llama) -> None:
    texts = ["hello world", "a second, longer sentence"]
    client = served.client()
    out = client.embeddings.create(model="x", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in out.data], dtype=np.float32)
    expected = reference.embed(texts)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert [d.index for d in out.data] == [0, 1]
    assert out.usage.prompt_tokens == sum(len(reference.tokenize(t)) for t in texts)
    as_floats = post(served, "/v1/embeddings", {"input": texts[0], "encoding_format": "float"}).json()
    np.testing.assert_allclose(as_floats["data"][0]["embedding"], expected[0], rtol=1e-5, atol=1e-6)
    as_base64 = post(served, "/v1/embeddings", {"input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(as_base64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, expected[0], rtol=1e-5, atol=1e-6)


def test_models_and_health(served: Running, llm: pyllama.Llama) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert served.client().models.retrieve("tiny").id == "tiny"
    health = httpx.get(served.url + "/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["slots_idle"] == llm.n_parallel


# --- llama-server's extras ------------------------------------------------------------------------


def test_tokenize_detokenize_apply_template(served: Running, tiny_chat_model_path: Path) -> None:
    text = "Hello <|im_end|> world"
    with pyllama.Model(str(tiny_chat_model_path), vocab_only=True) as model:
        tokens = model.tokenize(text, add_special=False, parse_special=True)
        assert post(served, "/tokenize", {"content": text}).json() == {"tokens": tokens}
        with_bos = model.tokenize(text, add_special=True, parse_special=True)
        assert post(served, "/tokenize", {"content": text, "add_special": True}).json()["tokens"] == with_bos
        pieces = post(served, "/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
        assert [p["id"] for p in pieces] == tokens
        assert "".join(p["piece"] for p in pieces) == text
        content = post(served, "/detokenize", {"tokens": tokens}).json()["content"]
        assert content == model.detokenize(tokens, unparse_special=True) == text
        template = pyllama.ChatTemplate(model)
        prompt = post(served, "/apply-template", {"messages": MESSAGES, "tools": [PICK]}).json()["prompt"]
        assert prompt == template.apply(MESSAGES, tools=[PICK]).prompt
        assert "pick_colour" in prompt
    assert_error(post(served, "/detokenize", {"tokens": [10**9]}), 400)
    assert_error(post(served, "/apply-template", {"messages": [{"role": "robot", "content": "x"}]}), 400)


# --- errors --------------------------------------------------------------------------------------


def test_wrong_or_missing_key_is_401(served: Running) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        served.client(key="sk-wrong").models.list()
    assert info.value.status_code == 401
    error = assert_error(post(served, "/v1/models", {}, key=None), 401)
    assert error["code"] == "invalid_api_key"
    assert served.client(key="sk-other").models.list().data  # any of the keys


def test_bad_fields_are_400_naming_the_field(served: Running) -> None:
    assert_error(post(served, "/v1/chat/completions", {"model": "x"}), 400, "messages")
    assert_error(post(served, "/v1/chat/completions", {"messages": []}), 400, "messages")
    with pytest.raises(openai.BadRequestError) as info:
        served.client().chat.completions.create(model="x", messages=[{"role": "robot", "content": "hi"}])
    assert info.value.body["param"] == "messages[0].role"
    assert_error(post(served, "/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}), 400, "temperature")
    assert_error(post(served, "/v1/chat/completions", {"messages": MESSAGES, "n": 2}), 400, "n")
    bad_format = {"messages": MESSAGES, "response_format": {"type": "xml"}}
    assert_error(post(served, "/v1/chat/completions", bad_format), 400, "response_format.type")
    bad_choice = {"messages": MESSAGES, "tools": [PICK], "tool_choice": {"type": "function", "function": {"name": "z"}}}
    assert_error(post(served, "/v1/chat/completions", bad_choice), 400)
    assert_error(post(served, "/v1/completions", {"prompt": "x", "logprobs": 99}), 400, "logprobs")
    assert_error(post(served, "/v1/embeddings", {"input": [[1, 2, 3]]}), 400, "input[0]")
    not_json = httpx.post(
        served.url + "/v1/chat/completions", content=b"{", headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert_error(not_json, 400)
    # harmless fields OpenAI defines are ignored
    ok = post(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "user": "u", "store": False})
    assert ok.status_code == 200, ok.text


def test_prompt_too_long_is_400(served: Running) -> None:
    long = [{"role": "user", "content": "hello " * 2000}]
    with pytest.raises(openai.BadRequestError) as info:
        served.client().chat.completions.create(model="x", messages=long, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded"
    error = assert_error(post(served, "/v1/chat/completions", {"messages": long, "stream": True}), 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert_error(post(served, "/v1/completions", {"prompt": "hello " * 2000}), 400, "prompt")
    error = assert_error(post(served, "/v1/embeddings", {"input": ["hi", "hello " * 3000]}), 400, "input[1]")
    assert error["code"] == "context_length_exceeded"


def test_a_template_refusing_the_messages_is_400(tiny_chat_model_path: Path) -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be the user\\'s') }}"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n"
    )
    with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1, chat_template=template) as strict:
        running = Running(create_app(strict))
        try:
            bad = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]
            error = assert_error(post(running, "/v1/chat/completions", {"messages": bad}), 400, "messages")
            assert error["code"] == "template_error" and "the first message must be the user's" in error["message"]
            ok = post(running, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
            assert ok.status_code == 200, ok.text
        finally:
            running.stop()


def test_slots_save_restore_and_erase(served: Running, tiny_chat_model_path: Path, tmp_path: Path) -> None:
    """llama-server's slot actions: without --slot-save-path they are 501; with it, a slot's prompt is
    saved to a file, erased, restored into the other slot, and the same prompt then reuses all of it
    but the last token, with the reply it had when evaluated afresh. File names that leave the
    directory, a missing file, a file of other context settings, a bad slot or action are errors."""
    assert_error(post(served, "/slots/0?action=save", {"filename": "x.bin"}), 501)
    slots_dir = tmp_path / "slots"
    prompt = "A long shared prompt: " + "alpha beta gamma delta " * 30
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1, n_parallel=2) as llm:
        running = Running(create_app(llm, slot_save_path=slots_dir))
        try:
            body = {"model": "m", "prompt": prompt, "max_tokens": 6, "temperature": 0}
            fresh = post(running, "/v1/completions", body).json()
            listed = httpx.get(running.url + "/slots").json()
            assert [s["id"] for s in listed] == [0, 1] and not any(s["is_processing"] for s in listed)
            src = next(s["id"] for s in listed if s["n_tokens"] > 0)
            n_held = listed[src]["n_tokens"]
            saved = post(running, f"/slots/{src}?action=save", {"filename": "p.bin"}).json()
            assert saved["n_saved"] == n_held and saved["n_written"] == (slots_dir / "p.bin").stat().st_size
            assert post(running, f"/slots/{src}?action=erase", None).json() == {"id_slot": src, "n_erased": n_held}
            assert httpx.get(running.url + "/slots").json()[src]["n_tokens"] == 0
            restored = post(running, f"/slots/{1 - src}?action=restore", {"filename": "p.bin"}).json()
            assert restored["n_restored"] == n_held and restored["id_slot"] == 1 - src
            again = post(running, "/v1/completions", body).json()
            usage = again["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
            assert again["choices"][0]["text"] == fresh["choices"][0]["text"]

            outside = tmp_path / "secret.bin"
            outside.write_bytes(b"x")
            (slots_dir / "link.bin").symlink_to(outside)
            for name in ("../secret.bin", "a/b.bin", "..", "", "x\\y", "bad\x00name", "link.bin", 7):
                assert_error(post(running, "/slots/0?action=restore", {"filename": name}), 400, "filename")
            assert_error(post(running, "/slots/0?action=save", {}), 400, "filename")
            assert_error(post(running, "/slots/0?action=restore", {"filename": "none.bin"}), 404, "filename")
            (slots_dir / "junk.bin").write_bytes(b"not a state")
            assert_error(post(running, "/slots/0?action=restore", {"filename": "junk.bin"}), 400, "filename")
            with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1) as other:
                other.complete("Hello there", max_tokens=1)
                other.save_state(slots_dir / "other.bin")
            assert_error(post(running, "/slots/0?action=restore", {"filename": "other.bin"}), 400, "filename")
            assert_error(post(running, "/slots/2?action=save", {"filename": "p.bin"}), 400, "id_slot")
            assert_error(post(running, "/slots/x?action=save", {"filename": "p.bin"}), 400, "id_slot")
            assert_error(post(running, "/slots/0?action=fly", {"filename": "p.bin"}), 400, "action")
            assert outside.read_bytes() == b"x"  # never touched
        finally:
            running.stop()


def test_huge_body_is_413(served: Running) -> None:
    huge = {"messages": [{"role": "user", "content": "x" * (300 * 1024)}]}
    error = assert_error(post(served, "/v1/chat/completions", huge), 413)
    assert error["code"] == "request_too_large"
    # the server is still fine
    assert post(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}).status_code == 200


# --- concurrency ---------------------------------------------------------------------------------


def test_concurrent_streams_equal_their_solo_runs(served: Running) -> None:
    prompts = [f"Tell me about the number {i}." for i in range(4)]
    client = served.client()

    def ask(prompt: str) -> str:
        chunks = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0, stream=True
        )
        return streamed_text(chunks)

    solo = [ask(p) for p in prompts]
    results: list[str | BaseException] = [""] * len(prompts)

    def worker(i: int) -> None:
        try:
            results[i] = ask(prompts[i])
        except BaseException as e:  # pragma: no cover - reported below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == solo


def test_disconnect_frees_the_slot(single: Running) -> None:
    client = single.client()
    long = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=8000, temperature=0, stream=True
    )  # about 15 s of generation when nobody stops it
    next(iter(long))
    long.close()  # the client goes away
    start = time.monotonic()
    chunks = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=4, temperature=0, stream=True)
    first = next(iter(chunks))
    elapsed = time.monotonic() - start
    assert first.choices[0].delta.role == "assistant"
    assert elapsed < 2, f"the next request waited {elapsed:.1f} s"
    assert streamed_text(chunks) is not None


def test_disconnect_of_a_plain_request_frees_the_slot(single: Running) -> None:
    body = {"prompt": "Hello", "max_tokens": 8000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(single.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    start = time.monotonic()
    chunks = single.client().completions.create(model="x", prompt="Hi", max_tokens=4, stream=True)
    next(iter(chunks))
    assert time.monotonic() - start < 2
    chunks.close()


def test_slots_are_first_in_first_out() -> None:
    from pyllama.server.app import QueueFull, Slots

    async def main() -> None:
        slots = Slots(1, max_queue=3)
        await slots.acquire()
        order: list[int] = []

        async def waiter(i: int) -> None:
            await slots.acquire()
            order.append(i)
            await asyncio.sleep(0)
            slots.release()

        tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert slots.queued == 3
        with pytest.raises(QueueFull):
            await slots.acquire()
        tasks[1].cancel()  # it leaves the queue
        slots.release()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert order == [0, 2] and slots.free == 1 and slots.queued == 0

    asyncio.run(main())


def test_full_queue_is_503_with_retry_after(single: Running) -> None:
    client = single.client()
    holder = client.completions.create(
        model="x", prompt="Hello", max_tokens=8000, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(holder))  # it holds the only slot
    queued: list[Any] = []
    waiter = threading.Thread(
        target=lambda: queued.append(client.completions.create(model="x", prompt="Hi", max_tokens=2)), daemon=True
    )
    waiter.start()
    deadline = time.monotonic() + 10
    while httpx.get(single.url + "/health").json()["requests_queued"] < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)
    busy = post(single, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    error = assert_error(busy, 503)
    assert error["type"] == "server_error" and int(busy.headers["Retry-After"]) >= 1
    busy_stream = post(single, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "stream": True})
    assert_error(busy_stream, 503)
    holder.close()  # the queued request runs now
    waiter.join(timeout=10)
    assert queued and queued[0].choices[0].finish_reason in ("stop", "length")
    health = httpx.get(single.url + "/health").json()
    assert health["requests_queued"] == 0


# --- the command ---------------------------------------------------------------------------------


def test_python_m_pyllama_server_serves_and_shuts_down(tiny_chat_model_path: Path) -> None:
    port = free_port()
    args = [str(tiny_chat_model_path), "--port", str(port), "--n-ctx", "512", "--n-threads", "1"]
    args += ["--api-key", "k1", "--alias", "served-tiny", "--log-level", "warning"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyllama.server", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, GGML_NO_BACKTRACE="1"),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["served-tiny"]
        reply = client.chat.completions.create(model="served-tiny", messages=MESSAGES, max_tokens=3)
        assert reply.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
