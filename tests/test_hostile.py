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

from conftest import free_port
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


# --- the server, in a process of its own on 127.0.0.1 ------------------------------------------------


class _Server:
    def __init__(self, model: Path, parallel: int) -> None:
        import subprocess
        import sys
        import tempfile
        import time

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "pyllama.server", str(model), "--port", str(self.port), "--n-ctx", "2048"]
        argv += ["--parallel", str(parallel), "--n-threads", "1", "--log-level", "warning"]
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise AssertionError(self.log.read().decode(errors="replace"))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


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

    server = _Server(tiny_chat_model_path, parallel=2)
    try:
        for path, body, status, param in SERVER_CASES:
            if isinstance(body, bytes):
                r = httpx.post(server.url + path, content=body, headers={"Content-Type": "text/plain"}, timeout=60)
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
    fresh = _Server(tiny_chat_model_path, parallel=2)
    try:
        expected = httpx.post(fresh.url + "/v1/chat/completions", json=GREEDY_CHAT, timeout=60).json()
    finally:
        fresh.stop()
    assert after["choices"][0]["message"] == expected["choices"][0]["message"]
