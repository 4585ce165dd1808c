"""Fuzzing within a time budget: random deep and wide grammars, JSON schemas and request bodies.

The truth is the ending of every input: a result, or an error of pyllama's hierarchy (the caller's
mistake as an ``InvalidRequestError``, which is a ``ValueError``); for the server a status below 500
in OpenAI's error shape, with ``/health`` answering after each request. A crash, an untyped error or a
500 fails the test and names the seed and the input (written to a file before it is tried).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from live_server import LiveServer

from conftest import run_python

BUDGET_S = 10.0  # per fuzz test (a new seed each run)

# --- generators (shared by the library fuzz, which runs them in a child process) -------------------

GENERATORS = r'''
import json, random, string

def rand_text(rng, n):
    alphabet = string.ascii_letters + string.digits + " \\\"'()[]{}|*+?^$.-:,\n\t\u00e9\u4e2d"
    return "".join(rng.choice(alphabet) for _ in range(n))

def rand_grammar(rng):
    """GBNF: nested groups, alternations, repetitions, character classes, chains of rules, junk."""
    kind = rng.choice(["nested", "wide", "chain", "junk", "mixed"])
    if kind == "nested":
        d = rng.choice([1, 10, 100, 511, 512, 513, 2000, 20000])
        return "root ::= " + "(" * d + '"a"' + ")" * d
    if kind == "wide":
        n = rng.choice([1, 100, 1000, 10000])
        words = ('"' + rand_text(rng, 3).replace('"', "").replace("\\", "") + '"' for _ in range(n))
        return "root ::= " + " | ".join(words)
    if kind == "chain":
        n = rng.choice([1, 100, 19999, 20001, 40000])
        return "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(n)) + f'r{n} ::= "a"'
    if kind == "junk":
        return rand_text(rng, rng.choice([1, 10, 100, 5000]))

    budget = [rng.choice([50, 500, 3000])]  # nodes: a branching generator must not blow up itself

    def expr(depth):
        budget[0] -= 1
        if depth <= 0 or budget[0] <= 0 or rng.random() < 0.2:
            return rng.choice(['"x"', "[a-z]", "[^\\n]", '"\\u00e9"', "r1", "root"])
        op = rng.choice(["seq", "alt", "rep", "group"])
        if op == "seq":
            return " ".join(expr(depth - 1) for _ in range(rng.randint(1, 4)))
        if op == "alt":
            return " | ".join(expr(depth - 1) for _ in range(rng.randint(2, 4)))
        if op == "rep":
            return "(" + expr(depth - 1) + ")" + rng.choice(["*", "+", "?", "{2,5}", "{0,1000}", "{3}"])
        return "(" + expr(depth - 1) + ")"

    depth = rng.choice([2, 5, 10, 40])
    return "root ::= " + expr(depth) + "\nr1 ::= " + expr(depth)

def rand_schema(rng, depth=0, budget=None):
    """JSON schemas: deep, wide, enums, patterns, combinators, references and plain junk."""
    if budget is None:
        budget = [rng.choice([20, 300, 3000])]  # nodes, so that the generator itself stays small
    budget[0] -= 1
    if budget[0] <= 0 or depth > rng.choice([3, 10, 70, 600]) or rng.random() < 0.15:
        return rng.choice([
            {"type": "string"}, {"type": "integer", "minimum": rng.randint(-10, 10)}, {"type": "boolean"},
            {"type": "string", "pattern": rand_pattern(rng)}, {"enum": list(range(rng.choice([1, 100, 10001])))},
            {"type": "string", "minLength": rng.randint(0, 5), "maxLength": rng.randint(0, 10**6)},
            {"$ref": rng.choice(["#", "#/definitions/x", "#/$defs/nope", "http://example.com/x"])},
            rng.choice([None, 1, "x", [], True]),
        ])
    kind = rng.choice(["object", "array", "anyOf", "allOf", "oneOf", "wide"])
    if kind == "object":
        props = {f"p{i}": rand_schema(rng, depth + 1, budget) for i in range(rng.randint(0, 4))}
        return {"type": "object", "properties": props, "required": list(props)[: rng.randint(0, len(props))]}
    if kind == "array":
        return {"type": "array", "items": rand_schema(rng, depth + 1, budget), "minItems": rng.randint(0, 3),
                "maxItems": rng.choice([3, 10, 10**9])}
    if kind == "wide":
        n = rng.choice([10, 513, 2000, 5000])
        return {"type": "object", "properties": {f"w{i}": {"type": "integer"} for i in range(n)}}
    return {kind: [rand_schema(rng, depth + 1, budget) for _ in range(rng.randint(1, 3))]}

def rand_pattern(rng):
    kind = rng.choice(["nested", "long", "random", "classes"])
    if kind == "nested":
        d = rng.choice([10, 255, 256, 257, 3000])
        return "^" + "(" * d + "a" + ")" * d + "$"
    if kind == "long":
        return "^" + "a" * rng.choice([100, 4096, 4097, 50000]) + "$"
    if kind == "classes":
        return "^[a-z0-9]{1,64}(\\.[a-z]+)*$"
    return "^" + rand_text(rng, rng.randint(1, 40)) + "$"
'''


def test_fuzzed_grammars_and_schemas_end_in_results_or_typed_errors(tiny_chat_model_path: Path, tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    code = (
        GENERATORS
        + r"""
import sys, time, json, traceback
import pyllama
model_path, seed, budget, last = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
m = pyllama.Model(model_path)
rng = random.Random(seed)
bad, n = [], 0
end = time.monotonic() + budget
while time.monotonic() < end:
    what = rng.choice(["sampler grammar", "grammar_match", "schema", "sampler schema", "template"])
    arg = rand_grammar(rng) if what in ("sampler grammar", "grammar_match") else rand_schema(rng)
    with open(last, "w") as f:
        json.dump({"what": what, "arg": arg}, f)
    t0 = time.monotonic()
    try:
        if what == "sampler grammar":
            pyllama.Sampler(m, grammar=arg)
        elif what == "grammar_match":
            pyllama.grammar_match(arg, rand_text(rng, 5))
        elif what == "schema":
            pyllama.json_schema_to_grammar(arg)
        elif what == "sampler schema":
            pyllama.Sampler(m, json_schema=arg)
        else:
            pyllama.ChatTemplate(m).apply([{"role": "user", "content": "hi"}], json_schema=arg)
    except (pyllama.LlamaError, ValueError) as e:
        pass  # typed: InvalidRequestError (a ValueError), GrammarError, TemplateError, LlamaError
    except BaseException as e:
        bad.append({"what": what, "error": "".join(traceback.format_exception_only(type(e), e))[-300:],
                    "arg": json.dumps(arg)[:300]})
    if time.monotonic() - t0 > 30:
        bad.append({"what": what, "slow_s": time.monotonic() - t0, "arg": json.dumps(arg)[:300]})
    n += 1
print(json.dumps({"n": n, "bad": bad}))
"""
    )
    last = tmp_path / "last-input.json"
    proc = run_python(code, str(tiny_chat_model_path), str(seed), str(BUDGET_S), str(last), timeout=BUDGET_S + 120)
    assert proc.returncode == 0, (
        f"seed {seed}: the process ended with {proc.returncode} on {last.read_text()[:500]}\n{proc.stderr[-2000:]}"
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["n"] > 20, report
    assert report["bad"] == [], f"seed {seed}: {report['bad'][:5]}"


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    if depth > rng.choice([2, 5, 40]) or rng.random() < 0.3:
        return rng.choice(
            [
                None,
                True,
                0,
                -1,
                2**31,
                2**64,
                2**70,
                -(2**63),
                1.5,
                1e308,
                "",
                "x",
                "\u0000",
                "\ud7ff",
                "a" * rng.choice([10, 10000]),
            ]
        )
    if rng.random() < 0.5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["role", "content", "type", "name", "x", "0", str(2**70), "-1"]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


FIELDS = {
    "/v1/chat/completions": [
        "messages",
        "tools",
        "tool_choice",
        "response_format",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "logit_bias",
        "grammar",
        "logprobs",
        "top_logprobs",
        "n",
        "stream",
        "stream_options",
        "parallel_tool_calls",
        "chat_template_kwargs",
        "dry_sequence_breakers",
        "penalty_last_n",
        "samplers",
    ],
    "/v1/completions": [
        "prompt",
        "max_tokens",
        "temperature",
        "seed",
        "stop",
        "logit_bias",
        "grammar",
        "json_schema",
        "logprobs",
        "n",
        "stream",
        "echo",
        "suffix",
        "n_probs",
        "min_p",
        "mirostat",
    ],
    "/v1/embeddings": ["input", "encoding_format", "dimensions"],
    "/tokenize": ["content", "add_special", "with_pieces"],
    "/detokenize": ["tokens"],
    "/apply-template": ["messages", "tools", "add_generation_prompt"],
}


def _random_body(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.1:  # not JSON, or JSON nested deeper than any reader goes
        return rng.choice([b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100000 + b"]" * 100000, b'{"a": NaN}'])
    path_fields = FIELDS[rng.choice(list(FIELDS))]
    body: dict[str, Any] = {}
    if rng.random() < 0.7:  # mostly well-formed enough to reach the deeper checks
        body["messages"] = [{"role": "user", "content": "hi"}]
        body["prompt"] = "hi"
        body["max_tokens"] = rng.choice([1, 2, 4])
    for field in rng.sample(path_fields, rng.randint(1, min(4, len(path_fields)))):
        body[field] = _random_value(rng)
    return json.dumps(body).encode()


def test_fuzzed_request_bodies_never_get_a_500_nor_stop_the_server(tiny_chat_model_path: Path) -> None:
    import httpx

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    server = LiveServer(tiny_chat_model_path, 2)
    seen: dict[int, int] = {}
    try:
        with httpx.Client(timeout=60) as client:
            end = time.monotonic() + BUDGET_S
            n = 0
            while time.monotonic() < end:
                path = rng.choice(list(FIELDS))
                body = _random_body(rng)
                r = client.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                assert r.status_code < 500, f"seed {seed}: {path} {body[:300]!r} -> {r.status_code} {r.text[:300]}"
                if r.status_code >= 400:
                    error = r.json()["error"]
                    assert error["type"] == "invalid_request_error" and isinstance(error["message"], str)
                assert server.proc.poll() is None, f"seed {seed}: the server died on {path} {body[:300]!r}"
                assert client.get(server.url + "/health").status_code == 200
                n += 1
    finally:
        log = server.stop()
    assert n > 20 and seen.get(400, 0) > 0, seen
    assert "Traceback" not in log, log[-3000:]
