"""parallel_tool_calls: False means at most one tool call, in the grammar that constrains sampling (tool_choice
"auto" and a strict "required") and in what the parser returns; the default, as OpenAI's, allows several.

The truth is each template's own rendering of an assistant message with two calls: the grammar of
parallel_tool_calls=True accepts that text up into the second call, the grammar of False stops where the
second call begins; the parser returns both calls, or only the first."""

from __future__ import annotations

from typing import Any

import pytest

import pyllama

from tiny_models import template_text, write_tiny_llama


def _tool(name: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                "required": ["city"],
            },
        },
    }


TOOLS = [_tool("get_weather"), _tool("get_time")]
USER = [{"role": "user", "content": "Weather in Paris and time in Rome?"}]
CALLS = [
    {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "jklmnopqr", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Rome"}'}},
]
FAMILIES = [
    ("qwen2", "Qwen-Qwen2.5-7B-Instruct"),
    ("llama-bpe", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use"),
    ("llama-spm", "mistralai-Mistral-Nemo-Instruct-2407"),
    ("llama-bpe", "meta-llama-Llama-3.1-8B-Instruct"),
]


@pytest.fixture(scope="module", params=FAMILIES, ids=[t for _, t in FAMILIES])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    vocab, template = request.param
    path = write_tiny_llama(
        tmp_path_factory.mktemp("ptc") / f"{vocab}.gguf", vocab=vocab, chat_template=template_text(template)
    )
    with pyllama.Model(str(path)) as model:
        yield path, model, pyllama.ChatTemplate(model)


def rendered_calls(tmpl: pyllama.ChatTemplate) -> tuple[str, str]:
    """(the generation prompt, the assistant's two-call reply) as the template itself writes them."""
    base = tmpl.apply(USER, tools=TOOLS, add_generation_prompt=False).prompt
    with_prompt = tmpl.apply(USER, tools=TOOLS).prompt
    try:
        full = tmpl.apply(
            [*USER, {"role": "assistant", "content": "", "tool_calls": CALLS}], tools=TOOLS, add_generation_prompt=False
        ).prompt
    except pyllama.TemplateError:
        pytest.skip("the template itself refuses two calls in one message (Llama 3.1: one call at a time)")
    assert with_prompt.startswith(base) and full.startswith(with_prompt), "the template does not extend its prompt"
    return with_prompt[len(base) :], full[len(with_prompt) :]


def accepted_prefix(grammar: str, text: str, model: pyllama.Model) -> int:
    """The length of the longest prefix of `text` the grammar accepts (acceptance is prefix-closed)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pyllama.grammar_match(grammar, text[:mid], model=model) != "rejected":
            lo = mid
        else:
            hi = mid - 1
    return lo


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_false_allows_one_call_in_the_grammar(family: Any, choice: str) -> None:
    _, model, tmpl = family
    gen_prompt, reply = rendered_calls(tmpl)
    first, second = reply.find("get_weather"), reply.find("get_time")
    assert 0 <= first < second
    grammars = {}
    for parallel in (True, False):
        result = tmpl.apply(USER, tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel)
        if result.grammar is None:
            pytest.skip(f"llama.cpp constrains no {choice!r} tool call of this template")
        grammars[parallel] = result.grammar
    # a strict "required" grammar starts with the generation prompt, a lazy "auto" one at the call's trigger:
    # the text is the one the parallel grammar follows further into the reply
    text = max((gen_prompt + reply, reply), key=lambda t: accepted_prefix(grammars[True], t, model) - len(t))
    offset = len(text) - len(reply)
    got_true = accepted_prefix(grammars[True], text, model)
    got_false = accepted_prefix(grammars[False], text, model)
    assert got_true >= offset + second + len("get_time"), (choice, text[:got_true])
    assert offset + first + len("get_weather") <= got_false < offset + second, (choice, text[:got_false])


def test_the_default_allows_several_calls(family: Any) -> None:
    _, _, tmpl = family
    default = tmpl.apply(USER, tools=TOOLS, tool_choice="auto").grammar
    explicit = tmpl.apply(USER, tools=TOOLS, tool_choice="auto", parallel_tool_calls=True).grammar
    assert default == explicit


def test_false_parses_one_call(family: Any) -> None:
    _, _, tmpl = family
    _, reply = rendered_calls(tmpl)
    parallel = tmpl.apply(USER, tools=TOOLS, parallel_tool_calls=True)
    # the reply without the template's end of turn (<|im_end|>, </s>, ...): the longest prefix that parses
    for end in range(len(reply), max(0, len(reply) - 40), -1):
        try:
            both = parallel.parse(reply[:end])
            break
        except pyllama.InvalidRequestError:
            continue
    else:
        pytest.fail(f"no prefix of the rendered reply parses: {reply!r}")
    one = tmpl.apply(USER, tools=TOOLS, parallel_tool_calls=False).parse(reply[:end])
    names = [c["function"]["name"] for c in both.get("tool_calls") or []]
    assert names == ["get_weather", "get_time"]
    assert [c["function"]["name"] for c in one.get("tool_calls") or []] == ["get_weather"]


def test_replies_never_carry_two_calls(family: Any) -> None:
    """Over several seeds, chat() with a required call and parallel_tool_calls=False returns one call, and
    its stream carries the same."""
    path, _, _ = family
    with pyllama.Llama(path, n_ctx=1024, n_threads=1) as llm:
        for seed in range(6):
            kw: dict[str, Any] = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
            out = llm.chat(USER, max_tokens=60, seed=seed, temperature=1.0, **kw)
            calls = out["choices"][0]["message"].get("tool_calls") or []
            assert len(calls) <= 1, calls
            streamed = set()
            for chunk in llm.chat(USER, max_tokens=60, seed=seed, temperature=1.0, stream=True, **kw):
                for call in chunk["choices"][0]["delta"].get("tool_calls") or []:
                    streamed.add(call["index"])
            assert len(streamed) == len(calls)
