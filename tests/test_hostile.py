"""Hostile input to the library: nothing a caller (or a client of the server) passes may crash the
process, and every refusal is a typed error naming the field.

Each case runs crash-isolated (isolated_cases.py): a stack overflow or an abort fails that case
instead of taking pytest down. The truths: the error's type and ``param``, the process surviving,
llama.cpp's own grammar matcher, ``json.loads`` of a parsed call's arguments, and the reply parsed
in one shot for the stream.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

import pyllama
from live_server import LiveServer

from isolated_cases import run_cases
from tiny_models import WEATHER, template_text

DEEP = 20000  # far beyond any limit: without the bounds, each of these overflowed an 8 MiB stack


def _nested_pattern(depth: int) -> dict[str, Any]:
    return {"type": "string", "pattern": "^" + "(" * depth + "a" + ")" * depth + "$"}


# name -> (code, expected type, expected param): every case must end with that type naming that param.
CASES: dict[str, tuple[str, str, str | None]] = {
    # 1. recursive parsers: bounded before llama.cpp sees the input
    "grammar nested": (
        f"pyllama.Sampler(m, grammar='root ::= ' + '(' * {DEEP} + '\"a\"' + ')' * {DEEP})",
        "GrammarError",
        "grammar",
    ),
    "grammar rule chain": (
        "pyllama.Sampler(m, grammar='root ::= r0\\n' + ''.join(f'r{i} ::= r{i + 1}\\n' for i in range(30000)) + "
        "'r30000 ::= \"a\"')",
        "GrammarError",
        "grammar",
    ),
    "grammar too large": (
        "pyllama.Sampler(m, grammar='root ::= \"' + 'a' * (2 << 20) + '\"')",
        "GrammarError",
        "grammar",
    ),
    "grammar_match nested": (
        f"pyllama.grammar_match('root ::= ' + '(' * {DEEP} + '\"a\"' + ')' * {DEEP}, 'a')",
        "GrammarError",
        "grammar",
    ),
    "json_schema_to_grammar pattern": (
        f"pyllama.json_schema_to_grammar(nested_pattern({DEEP}))",
        "InvalidRequestError",
        "json_schema",
    ),
    "sampler schema pattern": (
        f"pyllama.Sampler(m, json_schema=nested_pattern({DEEP}))",
        "InvalidRequestError",
        "json_schema",
    ),
    "schema nested arrays": (
        "s = {'type': 'string'}\nfor _ in range(5000):\n    s = {'type': 'array', 'items': s}\n"
        "pyllama.Sampler(m, json_schema=s)",
        "InvalidRequestError",
        "json_schema",
    ),
    "schema long pattern": (
        "pyllama.json_schema_to_grammar({'type': 'string', 'pattern': 'a' * 5000})",
        "InvalidRequestError",
        "json_schema",
    ),
    "schema many properties": (
        "props = {f'p{i}': {'type': 'string'} for i in range(600)}\n"
        "pyllama.json_schema_to_grammar({'type': 'object', 'properties': props})",
        "InvalidRequestError",
        "json_schema",
    ),
    "schema huge enum": (
        "pyllama.json_schema_to_grammar({'enum': list(range(20000))})",
        "InvalidRequestError",
        "json_schema",
    ),
    "chat response_format pattern": (
        "llm.chat([{'role': 'user', 'content': 'hi'}], max_tokens=2, response_format="
        f"{{'type': 'json_schema', 'json_schema': {{'name': 'x', 'schema': nested_pattern({DEEP})}}}})",
        "InvalidRequestError",
        "response_format",
    ),
    "chat tool parameters pattern": (
        f"llm.chat([{{'role': 'user', 'content': 'hi'}}], max_tokens=2, tools=[tool(nested_pattern({DEEP}))])",
        "InvalidRequestError",
        "tools",
    ),
    "chat grammar nested": (
        f"g = 'root ::= ' + '(' * {DEEP} + '\"a\"' + ')' * {DEEP}\n"
        "llm.chat([{'role': 'user', 'content': 'hi'}], max_tokens=2, grammar=g)",
        "GrammarError",
        "grammar",
    ),
    "compat grammar nested": (
        "from pyllama import compat\n"
        f"g = compat.LlamaGrammar.from_string('root ::= ' + '(' * {DEEP} + '\"a\"' + ')' * {DEEP})\n"
        "pyllama.Sampler(m, grammar=g.grammar)",
        "GrammarError",
        "grammar",
    ),
    # 5. one field, unbounded allocations
    "penalty_last_n huge": ("pyllama.Sampler(m, penalty_last_n=2**31 - 1)", "InvalidRequestError", "penalty_last_n"),
    "dry_penalty_last_n huge": (
        "pyllama.Sampler(m, dry_penalty_last_n=2**30)",
        "InvalidRequestError",
        "dry_penalty_last_n",
    ),
    "n_prev huge": ("pyllama.Sampler(m, n_prev=2**30)", "InvalidRequestError", "n_prev"),
    "dry breakers many": (
        "pyllama.Sampler(m, dry_multiplier=0.8, dry_sequence_breakers=[str(i) for i in range(1000)])",
        "InvalidRequestError",
        "dry_sequence_breakers",
    ),
    "dry breaker long": (
        "pyllama.Sampler(m, dry_sequence_breakers=['x' * 10000])",
        "InvalidRequestError",
        "dry_sequence_breakers",
    ),
    "samplers many": ("pyllama.Sampler(m, samplers=['top_k'] * 1000)", "InvalidRequestError", "samplers"),
    # 7. parameters llama.cpp asserts on
    "n_parallel over n_batch": (
        "pyllama.Llama(MODEL, n_ctx=512, n_batch=4, n_parallel=8)",
        "InvalidRequestError",
        "n_parallel",
    ),
    "n_seq_max over n_batch": (
        "pyllama.Context(m, n_ctx=512, n_batch=4, n_seq_max=8)",
        "InvalidRequestError",
        "n_seq_max",
    ),
    "n_threads hundreds of thousands": (
        "pyllama.Context(m, n_ctx=64, n_threads=100000)",
        "InvalidRequestError",
        "n_threads",
    ),
    "n_threads_batch huge": (
        "pyllama.Context(m, n_ctx=64, n_threads_batch=10**6)",
        "InvalidRequestError",
        "n_threads_batch",
    ),
    # 1b. regex patterns llama.cpp's converter loops on for ever, or reads out of bounds for (found by fuzzing)
    "pattern closing nothing": (
        "pyllama.json_schema_to_grammar({'type': 'string', 'pattern': '^a}+$'})",
        "InvalidRequestError",
        "json_schema",
    ),
    "pattern bracket closing nothing": (
        "pyllama.Sampler(m, json_schema={'type': 'string', 'pattern': '^a]$'})",
        "InvalidRequestError",
        "json_schema",
    ),
    "pattern quantifier first": (
        "llm.chat([{'role': 'user', 'content': 'hi'}], max_tokens=2, response_format={'type': 'json_schema', "
        "'json_schema': {'name': 'x', 'schema': {'type': 'string', 'pattern': '^(*a)$'}}})",
        "InvalidRequestError",
        "response_format",
    ),
    "pattern empty": (
        "llm.chat([{'role': 'user', 'content': 'hi'}], max_tokens=2, tools=[tool({'type': 'object', "
        "'properties': {'a': {'type': 'string', 'pattern': ''}}})], tool_choice='required')",
        "InvalidRequestError",
        "tools",
    ),
    # 3. templates that pass vetting (its sample messages hold no trigger word), then misbehave
    **{
        f"template {name}": (
            f"w = pyllama.Llama(MODEL, n_ctx=512, n_threads=1, chat_template=trap({body!r}, {head!r}))\n"
            f"{limits or 'pyllama.set_template_limits(seconds=1.0)'}\n"
            "assert w.chat([{'role': 'user', 'content': 'hi'}], max_tokens=2)['choices']\n"
            "try:\n"
            "    w.chat([{'role': 'user', 'content': 'a boom b'}], max_tokens=2)\n"
            "finally:\n"
            "    pyllama.set_template_limits(seconds=10.0, memory=1 << 30)\n"
            "    assert w.chat([{'role': 'user', 'content': 'hi'}], max_tokens=2)['choices']  # still usable",
            "TemplateError",
            "messages",
        )
        for name, body, head, limits in (
            ("loops", "{%- for i in range(1000000000) %}{%- endfor %}", "", ""),
            ("repeats a string", "{{- 'x' * 100000000000 }}", "", ""),
            ("repeats nothing", "{{- '' * 100000000000000 }}", "", ""),
            ("recurses", "{{- f(0) }}", "{%- macro f(n) %}{{- f(n + 1) }}{%- endmacro %}", ""),
            (
                "nests loops",
                "{%- for i in range(100000) %}{%- for j in range(100000) %}{%- endfor %}{%- endfor %}",
                "",
                "",
            ),
            (
                "builds a deep value",
                "{%- set ns = namespace(x=[]) %}{%- for i in range(10000000) %}{%- set ns.x = [ns.x] %}"
                "{%- endfor %}{{- ns.x }}",
                "",
                "",
            ),
            (
                "runs out of time",
                "{%- for i in range(100000) %}{%- for j in range(1000) %}{%- endfor %}{%- endfor %}",
                "",
                "pyllama.set_template_limits(seconds=0.2, memory=2**40)",
            ),
        )
    },
    # 5b. work per generated token: every stop string is checked after each one
    "too many stop strings": (
        "llm.complete('hi', max_tokens=2, stop=[str(i) for i in range(129)])",
        "InvalidRequestError",
        "stop",
    ),
    "stop string too long": (
        "llm.chat([{'role': 'user', 'content': 'hi'}], stop=['x' * 4097])",
        "InvalidRequestError",
        "stop",
    ),
    "n too large": ("llm.complete('hi', max_tokens=1, n=129)", "InvalidRequestError", "n"),
    # 9. silent acceptance and untyped errors
    "chat list of str": ("llm.chat(['hello'])", "InvalidRequestError", "messages[0]"),
    "chat a str": ("llm.chat('hello')", "InvalidRequestError", "messages"),
    "top_logprobs negative": (
        "llm.chat([{'role': 'user', 'content': 'hi'}], logprobs=True, top_logprobs=-5)",
        "InvalidRequestError",
        "top_logprobs",
    ),
    "completion logprobs negative": ("llm.complete('hi', logprobs=-1)", "InvalidRequestError", "logprobs"),
}

SETUP = """
import pyllama
def nested_pattern(depth):
    return {"type": "string", "pattern": "^" + "(" * depth + "a" + ")" * depth + "$"}
def tool(parameters):
    return {"type": "function", "function": {"name": "f", "description": "d", "parameters": parameters}}
def trap(body, head=""):  # ChatML, plus body run for a message that holds the word boom
    return (head + "{%- for m in messages %}{%- if 'boom' in m.content %}" + body + "{%- endif %}"
            "<|im_start|>{{ m.role }}\\n{{ m.content }}<|im_end|>\\n{%- endfor %}"
            "{%- if add_generation_prompt %}<|im_start|>assistant\\n{%- endif %}")
m = pyllama.Model(MODEL)
llm = pyllama.Llama(MODEL, n_ctx=512, n_threads=1)
"""


@pytest.fixture(scope="module")
def results(tiny_chat_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    setup = f"MODEL = {str(tiny_chat_model_path)!r}\n" + SETUP
    return run_cases(setup, {name: code for name, (code, _, _) in CASES.items()}, tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_a_typed_error_naming_its_field(case: str, results: dict[str, dict[str, Any]]) -> None:
    _, expected, param = CASES[case]
    result = results[case]
    assert "crash" not in result, f"crashed with {result['crash']}: {result['stderr']}"
    assert "setup_error" not in result, result["setup_error"]
    assert expected in result.get("types", []), result
    assert result["param"] == param, result


def test_the_bounds_admit_llama_cpps_grammars_and_large_real_schemas(tiny_model_path: Path) -> None:
    """Every grammar llama.cpp ships builds a sampler; generous real-world shapes pass the bounds."""
    root = Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp" / "grammars"
    grammars = sorted(root.glob("*.gbnf"))
    assert len(grammars) >= 8
    with pyllama.Model(str(tiny_model_path)) as m:
        for path in grammars:
            pyllama.Sampler(m, grammar=path.read_text())
        wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(300)}}
        pyllama.Sampler(m, json_schema=wide)
        pyllama.Sampler(m, json_schema={"enum": [f"v{i}" for i in range(5000)]})
        pyllama.Sampler(m, json_schema=_nested_pattern(200))
        nested: dict[str, Any] = {"type": "integer"}
        for _ in range(25):
            nested = {"type": "object", "properties": {"a": nested}, "required": ["a"]}
        pyllama.Sampler(m, json_schema=nested)
        deep = "root ::= " + "(" * 400 + '"a"' + ")" * 400
        pyllama.Sampler(m, grammar=deep)
        assert pyllama.grammar_match(deep, "a") == "complete"


def _qwen_result() -> Any:
    template = pyllama.ChatTemplate(template=template_text("Qwen-Qwen2.5-7B-Instruct"))
    return template.apply([{"role": "user", "content": "hi"}], tools=[WEATHER])


def _call(arguments: str) -> str:
    return '<tool_call>\n{"name": "get_weather", "arguments": ' + arguments + "}\n</tool_call>"


def test_the_render_limits_leave_a_wide_margin_over_every_vendored_template() -> None:
    """Every template llama.cpp ships, rendering a 200-message conversation (2 KB a message) with a
    tool, spends at most a tenth of each render limit (the time limit as scaled to that input);
    and the guard is on in Linux builds."""
    import sys

    from tiny_models import TEMPLATES

    limits = pyllama.template_limits()
    assert limits["active"] == sys.platform.startswith("linux")
    words = " ".join(f"word{i}" for i in range(300))
    conversation = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} {words}"[:2048]} for i in range(200)
    ]
    pyllama.template_render_peaks(reset=True)
    rendered = 0
    for path in sorted(TEMPLATES.glob("*.jinja")):
        try:
            template = pyllama.ChatTemplate(template=path.read_text(encoding="utf-8"), vet=False)
        except (pyllama.TemplateError, ValueError):
            continue  # one the engine does not parse at this commit
        try:
            template.apply(conversation, tools=[WEATHER])
            rendered += 1
        except pyllama.InvalidRequestError:
            pass  # a template that refuses these messages: no limit was crossed
    peaks = pyllama.template_render_peaks()
    assert rendered > 25
    size = sum(len(m["content"]) + len(m["role"]) for m in conversation)
    allowed = {**limits, "seconds": limits["seconds"] * (1 + size / limits["seconds_per_input_bytes"])}
    for what in ("seconds", "memory", "stack"):
        assert peaks[what] * 10 < allowed[what], (what, peaks, allowed)


def test_model_output_nested_deeply_is_content_not_a_crash() -> None:
    """A reply whose arguments nest thousands of levels deep (a client can provoke one) does not reach
    llama.cpp's recursive parser: it is output that does not parse, whose text comes back as content
    after what its longest parsable beginning holds, one-shot and streamed alike."""
    from pyllama.reply import ReplyStream, parse_reply

    result = _qwen_result()
    text = _call("[" * DEEP + "]" * DEEP)
    message = parse_reply(result, text, 1)
    assert text.endswith(message["content"]) and len(message["content"]) > 2 * DEEP - 600  # no text lost
    stream = ReplyStream(result, 1)
    rng = random.Random(0)
    streamed, i = [], 0
    while i < len(text):
        n = rng.randint(1, 400)
        streamed += list(stream.feed(text[i : i + n]))
        i += n
    final, rest = stream.finish()
    streamed += list(rest)
    assert final == message
    assert "".join(d.get("content") or "" for d in streamed) == message["content"]


def test_model_output_nested_within_the_bound_parses_on_the_large_stack() -> None:
    """Nesting within the bound is parsed by llama.cpp's parser, whatever the caller's stack."""
    result = _qwen_result()
    arguments = json.dumps({"city": "[" * 100 + "]" * 100, "deep": json.loads("[" * 200 + "]" * 200)})
    message = result.parse(_call(arguments))
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == json.loads(arguments)


@pytest.mark.parametrize("seed", [3, 11])
def test_tool_call_ids_of_a_stream_and_a_one_shot_reply_with_the_same_seed_agree(
    tiny_chat_model_path: Path, seed: int
) -> None:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1) as llm:
        ask = [{"role": "user", "content": "Weather in Paris?"}]
        kwargs = {"tools": [WEATHER], "tool_choice": "required", "max_tokens": 80, "seed": seed, "temperature": 0.9}
        one = llm.chat(ask, **kwargs)
        assert isinstance(one, dict)
        ids = [c["id"] for c in one["choices"][0]["message"].get("tool_calls") or []]
        streamed = [
            tc["id"]
            for chunk in llm.chat(ask, stream=True, **kwargs)
            for choice in chunk["choices"]
            for tc in choice["delta"].get("tool_calls") or []
            if tc.get("id")
        ]
    assert ids, "tool_choice='required' gives a call"
    assert streamed == ids


# --- streams and closing (family 8) --------------------------------------------------------------

ASK = [{"role": "user", "content": "Tell me a story."}]


def _text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_a_thread_that_reuses_the_id_of_a_streams_starter_does_not_end_the_stream(tiny_chat_model_path: Path) -> None:
    """A stream started in a thread that has ended belongs to no later thread, even one that Python gives
    the same id: that thread's call waits its turn, and the stream carries the whole one-shot reply."""
    import threading
    import time

    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1) as llm:
        kwargs: dict[str, Any] = {"max_tokens": 24, "seed": 5, "temperature": 1.0}
        expected = llm.chat(ASK, **kwargs)
        box: dict[str, Any] = {}

        def start() -> None:
            box["stream"] = llm.chat(ASK, stream=True, **kwargs)
            box["ident"] = threading.get_ident()

        starter = threading.Thread(target=start)
        starter.start()
        starter.join()
        stream = box["stream"]
        chunks = [next(stream), next(stream)]
        later: threading.Thread | None = None
        answers: list[dict[str, Any]] = []
        for _ in range(50):  # a new thread commonly gets the id of one that has ended
            hit = threading.Event()

            def probe(hit: threading.Event = hit) -> None:
                if threading.get_ident() == box["ident"]:
                    hit.set()
                    answers.append(llm.chat(ASK, max_tokens=3, seed=1))  # queued behind the stream

            thread = threading.Thread(target=probe)
            thread.start()
            thread.join(timeout=0.5)
            if hit.is_set():
                later = thread
                time.sleep(0.3)  # its call is in while the stream is suspended
                break
        chunks += list(stream)
        if later is not None:
            later.join(timeout=60)
            assert answers and answers[0]["usage"]["completion_tokens"] <= 3
    assert _text(chunks) == expected["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]


@pytest.mark.parametrize("n_parallel", [1, 2])
def test_a_dropped_stream_stops_generating_at_once(tiny_chat_model_path: Path, n_parallel: int) -> None:
    """A stream dropped after two chunks (no close) stops when it is collected: it does not hold its
    sequence, or the next call, for the rest of its max_tokens."""
    import gc
    import threading

    with pyllama.Llama(tiny_chat_model_path, n_ctx=4096, n_threads=1, n_parallel=n_parallel) as llm:
        stream: Any = llm.complete("Once", max_tokens=1500, ignore_eos=True, stream=True)
        next(stream)
        next(stream)
        gen = stream._use.generation
        del stream
        gc.collect()
        out: list[dict[str, Any]] = []
        other = threading.Thread(target=lambda: out.append(llm.complete("Once", max_tokens=2, seed=1)))
        other.start()
        other.join(timeout=120)
        assert out and out[0]["usage"]["completion_tokens"] == 2
        assert gen.finish_reason == "cancelled"
        assert gen.n_completion < 1500


def test_one_thread_interleaves_streams_up_to_n_parallel(tiny_chat_model_path: Path) -> None:
    """With two sequences, one thread can read two streams in turn, each the whole of its one-shot reply;
    a third stream from the same thread ends the oldest suspended one, with a typed error."""
    with pyllama.Llama(tiny_chat_model_path, n_ctx=2048, n_threads=1, n_parallel=2) as llm:
        solo = [llm.chat(ASK, max_tokens=16, seed=s, temperature=0.0) for s in (1, 2)]
        one = llm.chat(ASK, max_tokens=16, seed=1, temperature=0.0, stream=True)
        two = llm.chat(ASK, max_tokens=16, seed=2, temperature=0.0, stream=True)
        a: list[dict[str, Any]] = []
        b: list[dict[str, Any]] = []
        for x, y in zip(one, two, strict=False):
            a.append(x)
            b.append(y)
        a += list(one)
        b += list(two)
        assert [_text(a), _text(b)] == [r["choices"][0]["message"]["content"] for r in solo]
        first = llm.chat(ASK, max_tokens=40, seed=1, stream=True)
        second = llm.chat(ASK, max_tokens=40, seed=2, stream=True)
        next(first)
        next(second)
        third = list(llm.chat(ASK, max_tokens=4, seed=3, stream=True))
        assert third[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        with pytest.raises(pyllama.CancelledError):
            next(first)
        assert _text([next(second), *second]) is not None  # the younger one goes on


def test_close_ends_a_stream_another_thread_holds_with_a_typed_error(tiny_chat_model_path: Path) -> None:
    import threading
    import time

    llm = pyllama.Llama(tiny_chat_model_path, n_ctx=2048, n_threads=1)
    started = threading.Event()
    release = threading.Event()
    ending: list[BaseException | None] = []

    def hold() -> None:
        stream = llm.complete("Once", max_tokens=1500, ignore_eos=True, stream=True)
        next(stream)
        started.set()
        release.wait(30)
        try:
            for _ in stream:
                pass
            ending.append(None)
        except BaseException as e:
            ending.append(e)

    holder = threading.Thread(target=hold)
    holder.start()
    assert started.wait(60)
    t0 = time.monotonic()
    llm.close()  # does not wait for the holder
    closing = time.monotonic() - t0
    release.set()
    holder.join(timeout=60)
    assert closing < 10
    assert len(ending) == 1 and isinstance(ending[0], pyllama.CancelledError)
    with pytest.raises(pyllama.LlamaError):
        llm.complete("Once", max_tokens=1)


def test_cancelling_an_async_stream_frees_a_single_sequence_llama(tiny_chat_model_path: Path) -> None:
    """n_parallel=1: a task cancelled in the middle of a stream leaves the Llama free, and the next task's
    call gets what a fresh Llama answers."""
    import asyncio

    with pyllama.Llama(tiny_chat_model_path, n_ctx=2048, n_threads=1) as fresh:
        expected = fresh.chat(ASK, max_tokens=8, seed=4, temperature=0.0)

    async def main(llm: pyllama.Llama) -> dict[str, Any]:
        async def consume() -> None:
            stream = await llm.achat(ASK, max_tokens=1500, seed=2, stream=True)
            async for _ in stream:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        result: dict[str, Any] = await asyncio.wait_for(llm.achat(ASK, max_tokens=8, seed=4, temperature=0.0), 60)
        return result

    with pyllama.Llama(tiny_chat_model_path, n_ctx=2048, n_threads=1) as llm:
        got = asyncio.run(main(llm))
    assert got["choices"][0]["message"] == expected["choices"][0]["message"]


# --- the server, in a process of its own on 127.0.0.1 ------------------------------------------------


GREEDY_CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12, "temperature": 0}

# path, body (a dict is sent as JSON; bytes as they are), expected status, expected param
SERVER_CASES: list[tuple[str, Any, int, str | None]] = [
    ("/v1/completions", {"prompt": "hi", "grammar": "root ::= " + "(" * DEEP + '"a"' + ")" * DEEP}, 400, "grammar"),
    ("/v1/chat/completions", {**GREEDY_CHAT, "grammar": "root ::= " + "(" * DEEP + '"a"' + ")" * DEEP}, 400, "grammar"),
    (
        "/v1/chat/completions",
        {**GREEDY_CHAT, "stream": True, "grammar": "root ::= " + "(" * DEEP + '"a"' + ")" * DEEP},
        400,
        "grammar",
    ),
    (
        "/v1/chat/completions",
        {
            **GREEDY_CHAT,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested_pattern(DEEP)}},
        },
        400,
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {
            **GREEDY_CHAT,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": _nested_pattern(DEEP)}}],
        },
        400,
        "tools",
    ),
    ("/v1/completions", {"prompt": "hi", "json_schema": {"enum": list(range(20000))}}, 400, "json_schema"),
    ("/v1/completions", {"prompt": "hi", "dry_penalty_last_n": 2**30}, 400, "dry_penalty_last_n"),
    ("/v1/completions", {"prompt": "hi", "penalty_last_n": 2**31 - 1}, 400, "penalty_last_n"),
    (
        "/v1/completions",
        {"prompt": "hi", "dry_sequence_breakers": [str(i) for i in range(1000)]},
        400,
        "dry_sequence_breakers",
    ),
    # a body nested far deeper than Python's json can read (a RecursionError, once a 500)
    ("/v1/completions", b'{"prompt": "hi", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None),
    # what a web page can send without a preflight
    (
        "/v1/completions",
        json.dumps({"prompt": "hi", "grammar": "root ::= " + "(" * DEEP + '"a"' + ")" * DEEP}).encode(),
        400,
        "grammar",
    ),
]


def test_the_server_survives_hostile_requests_and_answers_as_a_fresh_one(tiny_chat_model_path: Path) -> None:
    """Each request is refused with 400 naming its field; meanwhile /health answers, the process lives,
    and afterwards a greedy request gets what a freshly started server answers."""
    import httpx

    server = LiveServer(tiny_chat_model_path, parallel=2)
    try:
        for path, body, status, param in SERVER_CASES:
            if isinstance(body, bytes):
                kind = "application/json" if body.startswith(b'{"prompt": "hi", "x"') else "text/plain"
                r = httpx.post(server.url + path, content=body, headers={"Content-Type": kind}, timeout=60)
            else:
                r = httpx.post(server.url + path, json=body, timeout=60)
            assert r.status_code == status, (path, r.text[:300])
            assert r.json()["error"]["param"] == param, r.text[:300]
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert server.proc.poll() is None
            assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        after = httpx.post(server.url + "/v1/chat/completions", json=GREEDY_CHAT, timeout=60).json()
    finally:
        server.stop()
    fresh = LiveServer(tiny_chat_model_path, parallel=2)
    try:
        expected = httpx.post(fresh.url + "/v1/chat/completions", json=GREEDY_CHAT, timeout=60).json()
    finally:
        fresh.stop()
    assert after["choices"][0]["message"] == expected["choices"][0]["message"]


# a grammar that no token can satisfy: its string ends at the NUL, and no reply can be empty
UNSATISFIABLE = 'root ::= "\\x00\\x00zzqq"'


@pytest.mark.parametrize("parallel", [1, 2])
def test_an_unsatisfiable_grammar_is_400_with_one_slot_or_many(tiny_chat_model_path: Path, parallel: int) -> None:
    import httpx

    server = LiveServer(tiny_chat_model_path, parallel)
    try:
        for path, body in (
            ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "grammar": UNSATISFIABLE}),
            ("/v1/chat/completions", {**GREEDY_CHAT, "grammar": UNSATISFIABLE}),
        ):
            for stream in (False, True):
                r = httpx.post(server.url + path, json={**body, "stream": stream}, timeout=60)
                assert r.status_code == 400, (path, stream, r.text[:300])
                error = r.json()["error"]
                expected = ("invalid_request_error", "grammar", "invalid_grammar")
                assert (error["type"], error["param"], error["code"]) == expected
        assert httpx.get(server.url + "/health", timeout=5).json()["slots_idle"] == parallel
    finally:
        server.stop()


def _wide_schema(objects: int, properties: int) -> dict[str, Any]:
    inner = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(properties)}}
    return {"type": "object", "properties": {f"o{j}": inner for j in range(objects)}}


def test_health_answers_while_a_request_is_prepared_within_a_time_limit(tiny_chat_model_path: Path) -> None:
    """A schema within the bounds that takes seconds to convert (4 x 512 properties) is prepared off the
    event loop: /health keeps answering meanwhile. With a limit shorter than that, the streamed request
    is answered 400 at the limit and the one-shot request when its preparation ends; a plain request
    under the same limit is answered as usual."""
    import statistics
    import threading
    import time

    import httpx

    schema = {"type": "json_schema", "json_schema": {"name": "wide", "schema": _wide_schema(4, 512)}}
    heavy = {**GREEDY_CHAT, "max_tokens": 1, "response_format": schema}
    server = LiveServer(tiny_chat_model_path, 2, "--prepare-timeout", "0.5")
    try:
        with httpx.Client(timeout=60) as client:
            for stream in (True, False):
                answer: dict[str, Any] = {}

                def send(stream: bool = stream, answer: dict[str, Any] = answer) -> None:
                    t0 = time.monotonic()
                    r = httpx.post(server.url + "/v1/chat/completions", json={**heavy, "stream": stream}, timeout=120)
                    answer.update(status=r.status_code, body=r.json(), seconds=time.monotonic() - t0)

                sender = threading.Thread(target=send)
                sender.start()
                latencies = []
                while sender.is_alive():
                    t0 = time.monotonic()
                    assert client.get(server.url + "/health").status_code == 200
                    latencies.append(time.monotonic() - t0)
                    time.sleep(0.02)
                sender.join()
                assert answer["status"] == 400, answer
                assert answer["body"]["error"]["code"] == "request_too_complex"
                if stream:
                    assert answer["seconds"] < 5  # answered at the limit, not when the work ends
                assert statistics.median(latencies) < 0.1 and max(latencies) < 0.5, latencies
            plain = client.post(server.url + "/v1/chat/completions", json=GREEDY_CHAT)
            assert plain.status_code == 200, plain.text[:300]
    finally:
        server.stop()


def test_tokenize_and_detokenize_take_a_slot_and_have_a_size_limit(tiny_chat_model_path: Path) -> None:
    import httpx

    server = LiveServer(tiny_chat_model_path, 1)
    try:
        with httpx.Client(timeout=120) as client:
            limit = 4 * 2048  # 4 x the tiny model's n_ctx_train, below the floor of 65,536
            limit = max(limit, 65536)
            r = client.post(server.url + "/tokenize", json={"content": "a b " * (limit // 2 + 10), "with_pieces": True})
            assert r.status_code == 413, r.text[:300]
            assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("content", "too_many_tokens")
            r = client.post(server.url + "/detokenize", json={"tokens": [1] * (limit + 1)})
            assert r.status_code == 413 and r.json()["error"]["param"] == "tokens"
            small = client.post(server.url + "/tokenize", json={"content": "Hello world", "with_pieces": True})
            assert small.status_code == 200
            ids = [t["id"] for t in small.json()["tokens"]]
            back = client.post(server.url + "/detokenize", json={"tokens": ids})
            assert back.json()["content"] == "Hello world"
            # with the one slot busy, a tokenize waits for it (the queue is what /health counts)
            import threading

            busy = threading.Thread(
                target=lambda: client.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 400})
            )
            busy.start()
            seen_busy = False
            for _ in range(200):
                health = client.get(server.url + "/health").json()
                if health["slots_processing"] == 1:
                    seen_busy = True
                    break
            waiting = threading.Thread(target=lambda: client.post(server.url + "/tokenize", json={"content": "x"}))
            waiting.start()
            queued = 0
            for _ in range(200):
                queued = max(queued, client.get(server.url + "/health").json()["requests_queued"])
                if queued or not busy.is_alive():
                    break
            busy.join()
            waiting.join()
            assert seen_busy and queued == 1
    finally:
        server.stop()


def test_clients_that_hang_up_leave_no_memory_or_tracebacks_behind(tiny_chat_model_path: Path) -> None:
    """200 one-shot and streamed requests whose clients hang up mid-generation: the slots are free after,
    memory grows by less than 48 MiB (it grew by about 1 MiB per request when cancelled requests were
    kept), and nothing is logged about exceptions never retrieved."""
    import socket
    import time

    import httpx

    server = LiveServer(tiny_chat_model_path, 2)

    def drop(stream: bool) -> None:
        body = json.dumps({**GREEDY_CHAT, "max_tokens": 500, "temperature": 1.0, "stream": stream}).encode()
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head.encode() + body)
            time.sleep(0.03)

    try:
        for i in range(40):  # warm up: the allocator's arenas and the caches settle
            drop(i % 2 == 1)
        before = server.rss_mib()
        for i in range(200):
            drop(i % 2 == 1)
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health", timeout=5).json()["slots_idle"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        grown = server.rss_mib() - before
    finally:
        log = server.stop()
    assert grown < 48, grown
    assert "never retrieved" not in log and "Traceback" not in log, log[-2000:]
