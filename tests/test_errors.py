"""pyllama's typed errors: the hierarchy its docstring draws, the inputs that raise each type (from
the C++ core and from the Python layer), and what the server answers for each: the status, and
OpenAI's error JSON, as httpx and the official ``openai`` client see them.

The truths are the inputs themselves (the field a test breaks is the field the error must name, the
token counts are counted here with the model's tokenizer) and the rule of the house: the caller's
mistakes are 400 naming the field, CancelledError is 503, anything else is 500 with a generic
message and the details in the log."""

from __future__ import annotations

import builtins
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import pyllama
from pyllama import compat, errors
from pyllama.errors import (
    CancelledError,
    ContextLengthError,
    GrammarError,
    InvalidRequestError,
    LlamaError,
    ModelLoadError,
    TemplateError,
    invalid,
)

try:  # test_server skips without openai, uvicorn or fastapi; the rest of this file does not need them
    from test_server import Running, assert_error, openai, post
except pytest.skip.Exception:  # pragma: no cover - the test extras are not installed
    openai = None

needs_server = pytest.mark.skipif(openai is None, reason="the server's test dependencies are not installed")

DOCS = Path(__file__).resolve().parent.parent / "docs"
N_CTX = 256
HELLO = [{"role": "user", "content": "Hello"}]
# A chat template that refuses roles that do not alternate (as Gemma's and Mistral's do), ChatML otherwise.
# (One that refuses a system message would not do: llama.cpp sees that and folds the system message
# into the first user message.)
REFUSES = "Conversation roles must alternate user/assistant/user/assistant"
ALTERNATING = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('" + REFUSES + "') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TWO_USERS = [*HELLO, {"role": "user", "content": "Are you there?"}]
LONG = [{"role": "user", "content": "hello " * 400}]  # more tokens than N_CTX
BAD_GRAMMAR = 'root ::= "yes" | "no'  # an unterminated literal
BAD_SCHEMA = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}


@pytest.fixture(scope="module")
def model(tiny_chat_model_path: Path) -> Iterator[pyllama.Model]:
    with pyllama.Model(str(tiny_chat_model_path)) as m:
        yield m


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path: Path) -> Iterator[pyllama.Llama]:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=N_CTX, n_threads=1, seed=0) as llm:
        yield llm


def n_chat_prompt(model: pyllama.Model, messages: list[dict[str, Any]], template: str | None = None) -> int:
    """The prompt tokens of ``messages``: the template (the model's own by default) rendered by a
    ChatTemplate of its own, then tokenised (the template writes any special tokens as text)."""
    prompt = pyllama.ChatTemplate(model, template=template).apply(messages).prompt
    return len(model.tokenize(prompt, add_special=True, parse_special=True))


# --- the hierarchy -------------------------------------------------------------------------------


def documented_tree() -> dict[str, set[str]]:
    """Each exception of the tree in pyllama.errors' docstring, with the bases it draws for it: the
    parent one level up and the base named in parentheses."""
    assert errors.__doc__ is not None
    tree: dict[str, set[str]] = {}
    parents: dict[int, str] = {}
    for line in errors.__doc__.split("::", 1)[1].splitlines():
        m = re.match(r"^(?P<lead>[ │├└─]*)(?P<name>[A-Z]\w*Error)(?: \((?P<extra>\w+)\))?", line)
        if m is None:
            continue
        column = len(m.group("lead"))
        parents[column] = m.group("name")
        bases = {parents[column - 4]} if column - 4 in parents else set()
        if m.group("extra"):
            bases.add(m.group("extra"))
        tree[m.group("name")] = bases
    return tree


def test_the_classes_are_the_tree_the_docstring_draws() -> None:
    tree = documented_tree()
    assert set(tree) == set(errors.__all__)  # every type is drawn, and only these
    assert tree["LlamaError"] == {"RuntimeError"} and tree["GrammarError"] == {"InvalidRequestError"}
    for name, bases in tree.items():
        cls = getattr(errors, name)
        assert {b.__name__ for b in cls.__bases__} == bases, name
        # one class under each name: the core's, re-exported
        assert cls is getattr(pyllama, name) is getattr(pyllama._core, name)
        assert name in pyllama.__all__


def test_the_callers_mistakes_are_value_errors_and_the_engines_are_not() -> None:
    for cls in (InvalidRequestError, ContextLengthError, TemplateError, GrammarError):
        assert issubclass(cls, ValueError) and issubclass(cls, LlamaError) and issubclass(cls, RuntimeError)
    for cls in (LlamaError, ModelLoadError, CancelledError):
        assert issubclass(cls, RuntimeError) and not issubclass(cls, ValueError)
    # siblings are apart: an except clause for one never catches another
    siblings = [ContextLengthError, TemplateError, GrammarError]
    for a in siblings:
        assert [b for b in siblings if issubclass(a, b)] == [a]
    assert not issubclass(ModelLoadError, CancelledError) and not issubclass(CancelledError, ModelLoadError)
    assert not issubclass(CancelledError, InvalidRequestError)
    # asyncio's CancelledError is another thing altogether: cancelling a task must not look like ours
    import asyncio

    assert not issubclass(CancelledError, asyncio.CancelledError)
    assert not issubclass(asyncio.CancelledError, CancelledError)


def test_param_defaults_to_none_and_invalid_sets_it_on_the_instance() -> None:
    for cls in (InvalidRequestError, ContextLengthError, TemplateError, GrammarError):
        assert cls.param is None
        error = cls("what went wrong")
        assert error.param is None and str(error) == "what went wrong"
    error = invalid("messages[2].role: 'robot' is not a role", "messages[2].role")
    assert type(error) is InvalidRequestError and error.param == "messages[2].role"
    assert str(error) == "messages[2].role: 'robot' is not a role"
    grammar = invalid("bad", "grammar", GrammarError)
    assert type(grammar) is GrammarError and grammar.param == "grammar"
    # set on the instance, not on the class: a later error does not inherit it
    assert InvalidRequestError("x").param is None and GrammarError("x").param is None
    assert invalid("no param").param is None
    with pytest.raises(ValueError):  # what callers that know only ValueError catch
        raise error


# --- raised by the core --------------------------------------------------------------------------


def test_a_grammar_that_does_not_parse_is_a_grammar_error(model: pyllama.Model) -> None:
    pyllama.Sampler(model, grammar='root ::= "yes" | "no"')  # the same grammar, terminated, is fine
    for bad in (BAD_GRAMMAR, 'root ::= ("yes"', "root ::= undefined-rule"):
        with pytest.raises(GrammarError) as info:
            pyllama.Sampler(model, grammar=bad)
        assert info.value.param == "grammar", bad


def test_a_json_schema_that_does_not_compile_is_a_grammar_error(model: pyllama.Model) -> None:
    good = {"type": "object", "properties": {"a": {"type": "integer"}}}
    pyllama.Sampler(model, json_schema=good)
    for bad in (BAD_SCHEMA, {"type": 12}, "{not json"):
        with pytest.raises(GrammarError) as info:
            pyllama.Sampler(model, json_schema=bad)
        assert info.value.param == "json_schema", bad
    with pytest.raises(GrammarError):
        pyllama.json_schema_to_grammar(BAD_SCHEMA)


SAMPLER_MISTAKES = [
    ({"mirostat": 3}, "mirostat"),
    ({"penalty_last_n": -2}, "penalty_last_n"),
    ({"dry_penalty_last_n": -5}, "dry_penalty_last_n"),
    ({"min_keep": -1}, "min_keep"),
    ({"dry_allowed_length": -1}, "dry_allowed_length"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("inf")}, "top_p"),
    ({"seed": 2**32}, "seed"),
    ({"samplers": ["top_k", "no_such_sampler"]}, "samplers"),
    ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
    ({"logit_bias": {1: float("nan")}}, "logit_bias"),
    ({"grammar": 'root ::= "a"', "json_schema": {"type": "object"}}, "grammar"),
]


@pytest.mark.parametrize(("kwargs", "param"), SAMPLER_MISTAKES, ids=[p for _, p in SAMPLER_MISTAKES])
def test_a_sampler_mistake_names_its_keyword(model: pyllama.Model, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        pyllama.Sampler(model, **kwargs)
    assert info.value.param == param


def test_a_prompt_token_outside_the_vocabulary_names_the_prompt(model: pyllama.Model) -> None:
    bad = int(model.n_vocab)
    with pyllama.Context(model, n_ctx=128, n_threads=1) as ctx:
        engine = pyllama.Engine(ctx)
        for prompt in ([1, bad], [-1]):
            with pytest.raises(InvalidRequestError) as info:
                engine.submit(prompt, pyllama.Sampler(model))
            assert info.value.param == "prompt"
        with pytest.raises(InvalidRequestError) as info:
            engine.submit([], pyllama.Sampler(model))
        assert info.value.param == "prompt"
        with pytest.raises(InvalidRequestError) as info:
            engine.submit([1, 2], pyllama.Sampler(model), stop=[""])
        assert info.value.param == "stop"
        assert engine.submit([1, 2], pyllama.Sampler(model), max_tokens=2).run() is not None  # still usable


def test_a_file_that_is_not_gguf_is_a_model_load_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("these are notes, not a model\n" * 10)
    truncated = tmp_path / "magic-only.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic and the version, then nothing
    for path in (text, truncated, tmp_path):  # tmp_path: a directory
        with pytest.raises(ModelLoadError):
            pyllama.Model(str(path))
    with pytest.raises(ModelLoadError):
        pyllama.Llama(text, n_threads=1)
    for make in (lambda p: pyllama.Model(str(p)), lambda p: pyllama.Llama(p, n_threads=1)):
        with pytest.raises(FileNotFoundError) as missing:
            make(tmp_path / "missing.gguf")
        assert not isinstance(missing.value, LlamaError)


def test_a_prompt_longer_than_the_sequence_is_a_context_length_error(model: pyllama.Model) -> None:
    word = model.tokenize("hello", add_special=False)[0]
    with pyllama.Context(model, n_ctx=N_CTX, n_threads=1) as ctx:
        engine = pyllama.Engine(ctx, 1)
        try:
            n = engine.n_ctx_seq
            with pytest.raises(ContextLengthError):
                engine.submit([word] * n, pyllama.Sampler(model, temperature=0.0), max_tokens=1)
            # one token less leaves room for one token: it runs
            ok = engine.submit([word] * (n - 1), pyllama.Sampler(model, temperature=0.0), max_tokens=1)
            ok.run()
            assert ok.n_completion <= 1
        finally:
            engine.close()


@pytest.mark.parametrize("n_parallel", [1, 2], ids=["inline", "threaded"])
def test_an_engine_that_is_closed_is_cancelled(model: pyllama.Model, n_parallel: int) -> None:
    tokens = list(model.tokenize("Once upon a time"))
    with pyllama.Context(model, n_ctx=4096, n_threads=1, n_seq_max=n_parallel) as ctx:
        engine = pyllama.Engine(ctx, n_parallel)
        assert engine.threaded == (n_parallel > 1)
        running = engine.submit(tokens, pyllama.Sampler(model, temperature=0.0), max_tokens=3000, ignore_eos=True)
        next(running)
        engine.close()
        with pytest.raises(CancelledError):  # the request in progress ends
            for _ in running:
                pass
        assert running.finish_reason == "cancelled"
        with pytest.raises(CancelledError):  # and no new one starts
            engine.submit(tokens, pyllama.Sampler(model, temperature=0.0), max_tokens=4)


def test_a_load_stopped_by_its_progress_callback_is_cancelled(tiny_chat_model_path: Path) -> None:
    seen: list[float] = []

    def stop(fraction: float) -> bool:
        seen.append(fraction)
        return False

    with pytest.raises(CancelledError):
        pyllama.Model(str(tiny_chat_model_path), progress_callback=stop)
    assert seen  # it was called, and its False stopped the load
    with pytest.raises(CancelledError):
        pyllama.Llama(tiny_chat_model_path, n_threads=1, progress=lambda _: False)
    with pyllama.Model(str(tiny_chat_model_path), progress_callback=lambda _: True) as loaded:
        assert loaded.n_vocab > 0  # True lets it load


def test_a_stream_of_a_llama_that_is_closed_is_cancelled(tiny_chat_model_path: Path) -> None:
    llm = pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1)
    stream = llm.complete("Once upon a time", max_tokens=900, stream=True, ignore_eos=True)
    next(iter(stream))
    llm.close()
    with pytest.raises(CancelledError):
        for _ in stream:
            pass


def test_a_template_refusing_the_messages_is_a_template_error(llm: pyllama.Llama) -> None:
    template = pyllama.ChatTemplate(template=ALTERNATING)
    assert template.apply(HELLO).prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TemplateError) as info:
        template.apply(TWO_USERS)
    assert info.value.param == "messages"
    assert REFUSES in str(info.value)  # the template's own words reach the caller


def test_a_llama_whose_template_refuses_the_messages_raises_template_error(tiny_chat_model_path: Path) -> None:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=N_CTX, n_threads=1, chat_template=ALTERNATING) as strict:
        assert strict.chat(HELLO, max_tokens=1)["object"] == "chat.completion"
        for stream in (False, True):
            with pytest.raises(TemplateError) as info:
                strict.chat(TWO_USERS, max_tokens=1, stream=stream)
            assert info.value.param == "messages"


TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
MALFORMED = [
    ([{"role": "robot", "content": "Hi"}], "messages[0].role"),
    ([*HELLO, {"role": "robot", "content": "Hi"}], "messages[1].role"),
    ([{"content": "Hi"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 7}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0].type"),
    ([*HELLO, {"role": "tool", "content": "42"}], "messages[1].tool_call_id"),
    (
        [*HELLO, {"role": "assistant", "content": None, "tool_calls": [{**TOOL_CALL, "function": {"name": "f"}}]}],
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        [
            *HELLO,
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            {"role": "tool", "tool_call_id": "call_2", "content": "42"},
        ],
        "messages[2].tool_call_id",
    ),
]


@pytest.mark.parametrize(("messages", "param"), MALFORMED, ids=[p for _, p in MALFORMED])
def test_malformed_messages_name_the_field(llm: pyllama.Llama, messages: list[Any], param: str) -> None:
    for call in (lambda: llm.chat_template.apply(messages), lambda: llm.chat(messages, max_tokens=1)):
        with pytest.raises(InvalidRequestError) as info:
            call()
        assert type(info.value) is InvalidRequestError  # not a template's or a grammar's failure
        assert info.value.param == param
        assert str(info.value).startswith(param + ":")  # the message says where, too


def get_time(city: str) -> str:
    """The time in a city."""
    return "12:00"


def test_malformed_tools_name_the_field(llm: pyllama.Llama) -> None:
    bad_name = {"type": "function", "function": {"name": "get weather", "parameters": {"type": "object"}}}
    bad_params = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
    bad_type = {"type": "retrieval", "function": {"name": "f"}}
    twice = {"type": "function", "function": {"name": "get_time"}}
    cases = [
        ([bad_name], "tools[0].function.name"),  # dicts only: checked with the messages
        ([get_time, bad_name], "tools[1].function.name"),  # with a function: checked by pyllama.tools.Tools
        ([get_time, bad_params], "tools[1].function.parameters"),
        ([get_time, bad_type], "tools[1].type"),
        ([get_time, twice], "tools[1].function.name"),  # a second tool of the same name
    ]
    for tools, param in cases:
        with pytest.raises(InvalidRequestError) as info:
            llm.chat(HELLO, tools=tools, max_tokens=1)
        assert type(info.value) is InvalidRequestError and info.value.param == param, tools
    with pytest.raises(InvalidRequestError) as info:
        pyllama.tools.Tools([get_time, twice])
    assert info.value.param == "tools[1].function.name"


# --- Llama.chat / complete: the context guard ----------------------------------------------------


def test_a_prompt_that_does_not_fit_is_a_context_length_error(llm: pyllama.Llama, model: pyllama.Model) -> None:
    assert n_chat_prompt(model, LONG) > N_CTX
    calls = [
        lambda **kw: llm.chat(LONG, **kw),
        lambda **kw: llm.complete(LONG[0]["content"], **kw),
        lambda **kw: llm.complete([model.tokenize("hello", add_special=False)[0]] * N_CTX, **kw),
    ]
    for call in calls:
        for kwargs in ({"max_tokens": 4}, {"max_tokens": None}, {"max_tokens": 4, "stream": True}):
            with pytest.raises(ContextLengthError) as info:
                call(**kwargs)
            # the prompt alone is too long: lowering max_tokens would not help, and the error says not to
            assert info.value.param != "max_tokens"


def test_max_tokens_that_overflow_the_context_are_named(llm: pyllama.Llama, model: pyllama.Model) -> None:
    n_prompt = n_chat_prompt(model, HELLO)
    room = N_CTX - n_prompt
    assert room > 4
    for stream in (False, True):
        with pytest.raises(ContextLengthError) as info:
            llm.chat(HELLO, max_tokens=room + 1, stream=stream)
        assert info.value.param == "max_tokens"
    # exactly what is left fits (the first token that does not fit is the one refused)
    out = llm.chat(HELLO, max_tokens=room, temperature=0)
    assert isinstance(out, dict) and out["usage"]["prompt_tokens"] == n_prompt

    tokens = list(model.tokenize("Once upon a time there was", add_special=False))
    with pytest.raises(ContextLengthError) as info:
        llm.complete(tokens, max_tokens=N_CTX - len(tokens) + 1)
    assert info.value.param == "max_tokens"
    done = llm.complete(tokens, max_tokens=N_CTX - len(tokens), temperature=0)
    assert isinstance(done, dict) and done["usage"]["prompt_tokens"] == len(tokens)


# --- pyllama.compat: llama-cpp-python lowers max_tokens --------------------------------------------


@pytest.fixture(scope="module")
def compat_llm(tiny_chat_model_path: Path) -> Iterator[compat.Llama]:
    with compat.Llama(str(tiny_chat_model_path), n_ctx=N_CTX, n_threads=1, seed=3, verbose=False) as llm:
        yield llm


def test_compat_lowers_max_tokens_to_what_the_context_holds(compat_llm: compat.Llama, model: pyllama.Model) -> None:
    tokens = list(model.tokenize("word " * 200, add_special=False))[:200]
    out = compat_llm.create_completion(tokens, max_tokens=400, temperature=0)
    assert out["usage"]["prompt_tokens"] == len(tokens)
    assert out["usage"]["total_tokens"] <= N_CTX
    assert out["usage"]["total_tokens"] == N_CTX or out["choices"][0]["finish_reason"] == "stop"
    reply = compat_llm.create_chat_completion(HELLO, max_tokens=10 * N_CTX, temperature=0)
    assert reply["usage"]["prompt_tokens"] == n_chat_prompt(model, HELLO)
    assert reply["usage"]["total_tokens"] <= N_CTX
    # the prompt alone does not fit: nothing can be lowered, it raises
    for max_tokens in (4, 400, None):
        with pytest.raises(ContextLengthError):
            compat_llm.create_completion(tokens * 2, max_tokens=max_tokens)
    with pytest.raises(ContextLengthError):
        compat_llm.create_chat_completion(LONG, max_tokens=400)


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        # decided by the param, not by the words: each message says the opposite of its param
        (invalid("the prompt has 999 tokens and the context holds 256", "max_tokens", ContextLengthError), True),
        (ContextLengthError("the prompt (3 tokens) and max_tokens (400) exceed the context (256 tokens)"), False),
        (invalid("messages do not fit", "messages", ContextLengthError), False),
        (invalid("max_tokens must be >= 1", "max_tokens"), False),  # no context length error at all
    ],
    ids=["max_tokens", "no param", "messages", "not a context length error"],
)
def test_compat_lowers_max_tokens_by_the_errors_param(
    compat_llm: compat.Llama, monkeypatch: pytest.MonkeyPatch, error: Exception, retried: bool
) -> None:
    asked: list[int | None] = []
    answer = {"id": "x", "object": "text_completion", "choices": [{"text": "", "index": 0}], "usage": {}}

    def complete(prompt: Any, *, max_tokens: int | None, **kwargs: Any) -> dict[str, Any]:
        asked.append(max_tokens)
        if len(asked) == 1:
            raise error
        return answer

    monkeypatch.setattr(compat_llm, "complete", complete)
    if retried:
        assert compat_llm.create_completion("Hi", max_tokens=400) is answer
        assert asked == [400, None]  # lowered to what the context holds
    else:
        with pytest.raises(type(error)) as info:
            compat_llm.create_completion("Hi", max_tokens=400)
        assert info.value is error and asked == [400]
    asked.clear()
    with pytest.raises(type(error)):  # without max_tokens there is nothing to lower
        compat_llm.create_completion("Hi", max_tokens=None)
    assert asked == [None]


# --- the server ------------------------------------------------------------------------------------

# What the server answers for an exception raised while it serves a request, by the rule of the
# house (written out here, not read from the server's table): (status, type, code).
EXPECTED: list[tuple[BaseException, int, str, str | None]] = [
    (invalid("x", None, ContextLengthError), 400, "invalid_request_error", "context_length_exceeded"),
    (invalid("x", None, TemplateError), 400, "invalid_request_error", "template_error"),
    (invalid("x", None, GrammarError), 400, "invalid_request_error", "invalid_grammar"),
    (InvalidRequestError("x"), 400, "invalid_request_error", None),
    (TypeError("x"), 400, "invalid_request_error", None),
    (CancelledError("x"), 503, "server_error", "cancelled"),
    (ModelLoadError("x"), 500, "server_error", None),
    (LlamaError("x"), 500, "server_error", None),
    (ValueError("x"), 500, "server_error", None),
    (IndexError("x"), 500, "server_error", None),
    (KeyError("x"), 500, "server_error", None),
    (RuntimeError("x"), 500, "server_error", None),
]


@needs_server
@pytest.mark.parametrize(("error", "status", "type_", "code"), EXPECTED, ids=[type(e[0]).__name__ for e in EXPECTED])
def test_translate_maps_each_type_to_its_status(
    error: BaseException, status: int, type_: str, code: str | None
) -> None:
    from pyllama.server.app import translate

    answer = translate(error, ["messages", "max_tokens"])
    assert (answer.status, answer.type, answer.code) == (status, type_, code)
    if status == 500:
        assert answer.message != str(error) and answer.param is None


@needs_server
def test_translate_keeps_only_params_that_are_fields_of_the_request() -> None:
    from pyllama.server.app import translate

    fields = ["messages", "max_tokens"]
    assert translate(invalid("x", "messages[3].content[0].text"), fields).param == "messages[3].content[0].text"
    assert translate(invalid("x", "max_tokens", ContextLengthError), fields).param == "max_tokens"
    assert translate(invalid("x", "max_tool_rounds"), fields).param is None  # the Python API's name only
    assert translate(invalid("x", "messagesx"), fields).param is None
    # a context length or template error without a param is the prompt's: the messages, or the prompt
    assert translate(ContextLengthError("x"), fields).param == "messages"
    assert translate(ContextLengthError("x"), ["prompt"]).param == "prompt"
    assert translate(TemplateError("x"), fields).param == "messages"
    assert translate(GrammarError("x"), fields).param is None


@pytest.fixture(scope="module")
def strict_server(tiny_chat_model_path: Path) -> Iterator[tuple[pyllama.Llama, Any]]:
    """A server over a Llama whose template refuses roles that do not alternate, without API keys."""
    if openai is None:  # pragma: no cover
        pytest.skip("the server's test dependencies are not installed")
    from pyllama.server import create_app

    with pyllama.Llama(tiny_chat_model_path, n_ctx=N_CTX, n_threads=1, chat_template=ALTERNATING) as strict:
        running = Running(create_app(strict))
        try:
            yield strict, running
        finally:
            running.stop()


def chat(running: Any, body: dict[str, Any]) -> httpx.Response:
    return post(running, "/v1/chat/completions", body, key=None)


def openai_error(running: Any, kind: type[Exception], **request: Any) -> Any:
    """The exception the official client raises for a chat request (a completion's with ``prompt``)."""
    client = running.client(key=None)
    with pytest.raises(kind) as info:
        if "prompt" in request:
            client.completions.create(model="x", **request)
        else:
            result = client.chat.completions.create(model="x", **request)
            if request.get("stream"):
                list(result)
    return info.value


@needs_server
def test_server_a_malformed_message_is_400_naming_the_field(strict_server: tuple[pyllama.Llama, Any]) -> None:
    _, running = strict_server
    bad = [{"role": "robot", "content": "Hi"}]
    for stream in (False, True):
        error = assert_error(chat(running, {"messages": bad, "stream": stream}), 400, "messages[0].role")
        assert error["type"] == "invalid_request_error" and "robot" in error["message"]
        e = openai_error(running, openai.BadRequestError, messages=bad, stream=stream)
        assert e.status_code == 400 and e.param == "messages[0].role" and e.type == "invalid_request_error"
    second = [*HELLO, {"role": "tool", "content": "42"}]
    assert_error(chat(running, {"messages": second}), 400, "messages[1].tool_call_id")


@needs_server
def test_server_context_length_exceeded_is_400(strict_server: tuple[pyllama.Llama, Any]) -> None:
    strict, running = strict_server
    for stream in (False, True):
        error = assert_error(chat(running, {"messages": LONG, "stream": stream, "max_tokens": 4}), 400, "messages")
        assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
        e = openai_error(running, openai.BadRequestError, messages=LONG, max_tokens=4, stream=stream)
        assert e.code == "context_length_exceeded" and e.param == "messages"
    # the prompt fits, max_tokens does not: max_tokens is the field to change
    n_prompt = n_chat_prompt(strict.model, HELLO, ALTERNATING)
    too_many = {"messages": HELLO, "max_tokens": N_CTX - n_prompt + 1}
    error = assert_error(chat(running, too_many), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"
    e = openai_error(running, openai.BadRequestError, messages=HELLO, max_tokens=N_CTX - n_prompt + 1)
    assert e.param == "max_tokens"
    ok = chat(running, {"messages": HELLO, "max_tokens": N_CTX - n_prompt})
    assert ok.status_code == 200, ok.text
    error = assert_error(post(running, "/v1/completions", {"prompt": "hello " * 400}, key=None), 400, "prompt")
    assert error["code"] == "context_length_exceeded"


@needs_server
def test_server_a_template_refusing_the_messages_is_400(strict_server: tuple[pyllama.Llama, Any]) -> None:
    _, running = strict_server
    for stream in (False, True):
        error = assert_error(chat(running, {"messages": TWO_USERS, "stream": stream}), 400, "messages")
        assert error["code"] == "template_error" and REFUSES in error["message"]
        e = openai_error(running, openai.BadRequestError, messages=TWO_USERS, stream=stream)
        assert e.code == "template_error" and e.param == "messages"
    assert chat(running, {"messages": HELLO, "max_tokens": 2}).status_code == 200  # the same, alternating


@needs_server
def test_server_an_invalid_grammar_is_400(strict_server: tuple[pyllama.Llama, Any]) -> None:
    _, running = strict_server
    for field, value in (("grammar", BAD_GRAMMAR), ("json_schema", BAD_SCHEMA)):
        for stream in (False, True):
            body = {"prompt": "Answer:", "max_tokens": 2, "stream": stream, field: value}
            error = assert_error(post(running, "/v1/completions", body, key=None), 400, field)
            assert error["code"] == "invalid_grammar" and error["type"] == "invalid_request_error"
        e = openai_error(running, openai.BadRequestError, prompt="Answer:", max_tokens=2, extra_body={field: value})
        assert e.code == "invalid_grammar" and e.param == field
    good = {"prompt": "Answer:", "max_tokens": 2, "grammar": 'root ::= "yes" | "no"'}
    answer = post(running, "/v1/completions", good, key=None)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] in ("yes", "no", "y", "n", "ye")


@needs_server
def test_server_a_response_format_schema_that_does_not_compile_is_an_invalid_grammar(
    strict_server: tuple[pyllama.Llama, Any],
) -> None:
    _, running = strict_server
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_SCHEMA}}
    error = assert_error(chat(running, {"messages": HELLO, "response_format": fmt}), 400)
    assert error["code"] == "invalid_grammar" and str(error["param"]).startswith("response_format")


@needs_server
def test_server_integers_the_engine_cannot_take_are_400_naming_the_field(
    strict_server: tuple[pyllama.Llama, Any],
) -> None:
    """JSON integers have no bounds; the engine's seed is 32 bits unsigned and a token id 32 bits
    signed. A value past them is the caller's mistake, not a failed conversion (a 500)."""
    _, running = strict_server
    huge = 2**70
    cases = [
        ("/v1/chat/completions", {"messages": HELLO, "seed": huge}, "seed"),
        ("/v1/chat/completions", {"messages": HELLO, "seed": 2**32}, "seed"),
        ("/v1/completions", {"prompt": "Hi", "seed": -1}, "seed"),
        ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {str(huge): 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "Hi", "logit_bias": {"-3": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": [1, huge]}, "prompt[1]"),
        ("/detokenize", {"tokens": [1, huge]}, "tokens[1]"),
    ]
    for path, body, param in cases:
        error = assert_error(post(running, path, {**body, "max_tokens": 1}, key=None), 400, param)
        assert error["type"] == "invalid_request_error", body
    ok = post(running, "/v1/chat/completions", {"messages": HELLO, "seed": 2**32 - 1, "max_tokens": 1}, key=None)
    assert ok.status_code == 200, ok.text  # the largest seed is taken


SECRET = "secret detail 7f3a"
INTERNAL = [RuntimeError(SECRET), IndexError(SECRET), ValueError(SECRET), KeyError(SECRET), LlamaError(SECRET)]


def failing(error: BaseException) -> Any:
    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    return fail


@needs_server
@pytest.mark.parametrize("error", INTERNAL, ids=lambda e: type(e).__name__)
def test_server_an_internal_failure_is_500_with_a_generic_message_and_a_logged_traceback(
    strict_server: tuple[pyllama.Llama, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: BaseException,
) -> None:
    strict, running = strict_server
    monkeypatch.setattr(strict, "achat", failing(error))
    monkeypatch.setattr(strict, "acomplete", failing(error))
    requests = [
        ("/v1/chat/completions", {"messages": HELLO}),
        ("/v1/chat/completions", {"messages": HELLO, "stream": True}),
        ("/v1/completions", {"prompt": "Hi"}),
        ("/v1/completions", {"prompt": "Hi", "stream": True}),
    ]
    with caplog.at_level(logging.ERROR, logger="pyllama.server"):
        for path, body in requests:
            caplog.clear()
            error_json = assert_error(post(running, path, body, key=None), 500)
            assert error_json["type"] == "server_error" and error_json["param"] is None
            assert SECRET not in error_json["message"] and type(error).__name__ not in error_json["message"]
            logged = [r for r in caplog.records if r.name == "pyllama.server" and r.exc_info]
            assert len(logged) == 1 and logged[0].exc_info is not None and logged[0].exc_info[1] is error
            assert SECRET in caplog.text and "Traceback" in caplog.text  # the details are in the log
    e = openai_error(running, openai.InternalServerError, messages=HELLO)
    assert e.status_code == 500 and SECRET not in str(e)
    e = openai_error(running, openai.InternalServerError, messages=HELLO, stream=True)
    assert e.status_code == 500 and SECRET not in str(e)
    monkeypatch.undo()
    assert chat(running, {"messages": HELLO, "max_tokens": 2}).status_code == 200  # the server is fine


@needs_server
def test_server_cancelled_is_503(
    strict_server: tuple[pyllama.Llama, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    strict, running = strict_server
    monkeypatch.setattr(strict, "achat", failing(CancelledError("the engine was closed")))
    with caplog.at_level(logging.ERROR, logger="pyllama.server"):
        for stream in (False, True):
            error = assert_error(chat(running, {"messages": HELLO, "stream": stream}), 503)
            assert error["type"] == "server_error" and error["code"] == "cancelled"
            e = openai_error(running, openai.InternalServerError, messages=HELLO, stream=stream)
            assert e.status_code == 503 and e.code == "cancelled"
    assert not [r for r in caplog.records if r.name == "pyllama.server"]  # an expected outcome, not a failure


@needs_server
def test_server_a_type_error_is_400(strict_server: tuple[pyllama.Llama, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    strict, running = strict_server
    monkeypatch.setattr(strict, "achat", failing(TypeError("stop[0]: stop strings must be non-empty str")))
    error = assert_error(chat(running, {"messages": HELLO}), 400)
    assert error["type"] == "invalid_request_error" and "stop strings" in error["message"]
    e = openai_error(running, openai.BadRequestError, messages=HELLO)
    assert e.status_code == 400


# --- the documentation ----------------------------------------------------------------------------


def documented_statuses() -> list[tuple[str, int, str, str | None]]:
    """The rows of docs/errors.md's table: (exception, status, type, code)."""
    text = (DOCS / "errors.md").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        m = re.match(r"^\| `(\w+)` \|.*\| (\d{3}) \| `(\w+)` \| (?:`(\w+)`|null) \|$", line)
        if m:
            rows.append((m.group(1), int(m.group(2)), m.group(3), m.group(4)))
    return rows


@needs_server
def test_the_documented_statuses_are_what_the_server_answers() -> None:
    from pyllama.server.app import _STATUS, translate

    rows = documented_statuses()
    names = [name for name, *_ in rows]
    assert set(names) >= set(errors.__all__) | {"TypeError"}
    assert {kind.__name__ for kind, *_ in _STATUS} <= set(names)  # every row of the server's table
    for name, status, type_, code in rows:
        cls = getattr(pyllama, name, None) or getattr(builtins, name)
        answer = translate(cls("x"), ["messages"])
        assert (answer.status, answer.type, answer.code) == (status, type_, code), name
