"""Tool calling per model family: llama.cpp's parsers on outputs written by hand from each family's
documented format, streaming that adds up to the one-shot parse, and strict tool_choice="required"
(checked with llama.cpp's own grammar engine and end to end on tiny random models)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import pyllama

from tiny_models import TEMPLATES, generate_from_chat, template_text, write_tiny_llama

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "Weather in Paris, and the time in CET?"}]
W = '{"city": "Paris", "unit": "c"}'
W_ARGS = {"city": "Paris", "unit": "c"}
T_ARGS = {"tz": "CET"}
BAR = "\uff5c"  # DeepSeek's full-width bar
MINIMAX_CALL = (
    '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
    '<parameter name="unit">c</parameter>\n</invoke>\n</minimax:tool_call>'
)


@dataclass
class Case:
    template: str
    # the model's output as the family documents it: text before, the call(s), text after
    text: str
    calls: list[tuple[str, dict[str, Any]]]
    content: str | None = None
    reasoning: str | None = None
    # the same reply as a bare call (no text before it), for the strict "required" grammar
    call_only: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "llama-3.1": Case(
        "meta-llama-Llama-3.1-8B-Instruct",
        '{"name": "get_weather", "parameters": ' + W + "}",
        [("get_weather", W_ARGS)],
    ),
    "llama-3.2": Case(
        "meta-llama-Llama-3.2-3B-Instruct",
        '{"type": "function", "name": "get_weather", "parameters": ' + W + "}",
        [("get_weather", W_ARGS)],
    ),
    "llama-3.3": Case(
        "meta-llama-Llama-3.3-70B-Instruct",
        '{"name": "get_time", "parameters": {"tz": "CET"}}',
        [("get_time", T_ARGS)],
    ),
    "qwen-2.5": Case(
        "Qwen-Qwen2.5-7B-Instruct",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        + W
        + '}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
        [("get_weather", W_ARGS), ("get_time", T_ARGS)],
        content="Let me check.",
        call_only='<tool_call>\n{"name": "get_weather", "arguments": ' + W + "}\n</tool_call>",
        kwargs={"parallel_tool_calls": True},
    ),
    "qwen3-thinking": Case(
        "Qwen-Qwen3-0.6B",
        '<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        + W
        + "}\n</tool_call>",
        [("get_weather", W_ARGS)],
        reasoning="The user wants the weather.",
        kwargs={"enable_thinking": True},
    ),
    "hermes-2-pro": Case(
        "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
        '<tool_call>\n{"name": "get_weather", "arguments": ' + W + "}\n</tool_call>",
        [("get_weather", W_ARGS)],
    ),
    "hermes-3": Case(
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
        'Sure.<tool_call>\n{"name": "get_weather", "arguments": '
        + W
        + '}\n</tool_call><tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
        [("get_weather", W_ARGS), ("get_time", T_ARGS)],
        content="Sure.",
        call_only='<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
        kwargs={"parallel_tool_calls": True},
    ),
    "mistral-nemo": Case(
        "mistralai-Mistral-Nemo-Instruct-2407",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": '
        + W
        + ', "id": "abcDEF123"}, {"name": "get_time", "arguments": {"tz": "CET"}, "id": "xyzXYZ987"}]',
        [("get_weather", W_ARGS), ("get_time", T_ARGS)],
        call_only='[TOOL_CALLS][{"name": "get_weather", "arguments": ' + W + ', "id": "abcDEF123"}]',
        kwargs={"parallel_tool_calls": True},
    ),
    "functionary-v3.1": Case(
        "meetkai-functionary-medium-v3.1",
        "<function=get_weather>" + W + "</function>",
        [("get_weather", W_ARGS)],
    ),
    # The generation prompt ends with ">>>"; at this commit llama.cpp parses one call per reply here.
    "functionary-v3.2": Case("meetkai-functionary-medium-v3.2", "get_weather\n" + W, [("get_weather", W_ARGS)]),
    "deepseek-r1": Case(
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
        "I need the weather.\n</think>\n\n"
        + f"<{BAR}tool▁calls▁begin{BAR}><{BAR}tool▁call▁begin{BAR}>function<{BAR}tool▁sep{BAR}>get_weather\n```json\n"
        + W
        + f"\n```<{BAR}tool▁call▁end{BAR}><{BAR}tool▁calls▁end{BAR}>",
        [("get_weather", W_ARGS)],
        reasoning="I need the weather.",
        kwargs={"enable_thinking": True},
    ),
    "command-r7b": Case(
        "CohereForAI-c4ai-command-r7b-12-2024-tool_use",
        '<|START_THINKING|>Two lookups.<|END_THINKING|><|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": '
        '"get_weather", "parameters": ' + W + '},\n    {"tool_call_id": "1", "tool_name": "get_time", "parameters": '
        '{"tz": "CET"}}\n]<|END_ACTION|>',
        [("get_weather", W_ARGS), ("get_time", T_ARGS)],
        reasoning="Two lookups.",
        call_only='<|START_ACTION|>[\n    {"tool_call_id": "0", "tool_name": "get_weather", "parameters": '
        + W
        + "}\n]<|END_ACTION|>",
        kwargs={"parallel_tool_calls": True},
    ),
    "granite-4": Case(
        "ibm-granite-granite-4.0",
        'Checking.<tool_call>\n{"name": "get_weather", "arguments": ' + W + "}\n</tool_call>",
        [("get_weather", W_ARGS)],
        content="Checking.",
        call_only='<tool_call>\n{"name": "get_weather", "arguments": ' + W + "}\n</tool_call>",
    ),
    "gpt-oss": Case(
        "openai-gpt-oss-120b",
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather"
        "<|channel|>commentary json<|message|>" + W,
        [("get_weather", W_ARGS)],
        reasoning="Need the weather.",
    ),
    "kimi-k2": Case(
        "moonshotai-Kimi-K2",
        "Let me look.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        "<|tool_call_argument_begin|>" + W + "<|tool_call_end|><|tool_call_begin|>functions.get_time:1"
        '<|tool_call_argument_begin|>{"tz": "CET"}<|tool_call_end|><|tool_calls_section_end|>',
        [("get_weather", W_ARGS), ("get_time", T_ARGS)],
        content="Let me look.",
        call_only="<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        "<|tool_call_argument_begin|>" + W + "<|tool_call_end|><|tool_calls_section_end|>",
        kwargs={"parallel_tool_calls": True},
    ),
    "glm-4.6": Case(
        "GLM-4.6",
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>unit</arg_key>\n"
        "<arg_value>c</arg_value>\n</tool_call>",
        [("get_weather", W_ARGS)],
    ),
    # At this commit llama.cpp's MiniMax-M2 grammar and parser take one invoke per reply as the template writes it.
    "minimax-m2": Case(
        "MiniMax-M2",
        "Weather first.\n</think>\n\nOne moment.\n" + MINIMAX_CALL,
        [("get_weather", W_ARGS)],
        content="One moment.",
        reasoning="Weather first.",
        call_only="Weather first.\n</think>\n\n" + MINIMAX_CALL,
        kwargs={"enable_thinking": True},
    ),
}


def _template(case: Case) -> pyllama.ChatTemplate:
    return pyllama.ChatTemplate(template=template_text(case.template), bos_token="<s>", eos_token="</s>")


def _check_message(msg: dict[str, Any], case: Case) -> None:
    calls = msg.get("tool_calls") or []
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == case.calls
    assert all(c["type"] == "function" and len(c["id"]) == 9 and c["id"].isalnum() for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)
    assert (msg["content"] or "").strip() == (case.content or "")
    assert (msg.get("reasoning_content") or "").strip() == (case.reasoning or "")


@pytest.mark.parametrize("name", CASES)
def test_family_tool_calls_parse(name: str) -> None:
    case = CASES[name]
    result = _template(case).apply(ASK, tools=TOOLS, **case.kwargs)
    _check_message(result.parse(case.text), case)


@pytest.mark.parametrize("name", CASES)
def test_family_stream_adds_up_to_the_parse(name: str) -> None:
    case = CASES[name]
    result = _template(case).apply(ASK, tools=TOOLS, **case.kwargs)
    one_shot = result.parse(case.text, id_seed=7)
    stream = result.stream(id_seed=7)
    deltas: list[dict[str, Any]] = []
    for i in range(0, len(case.text), 4):
        deltas += stream.feed(case.text[i : i + 4])
    before_end = len(deltas)
    deltas += stream.finish()

    # rebuild the message from the deltas as an OpenAI client does
    content = "".join(d.get("content", "") for d in deltas)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    calls: dict[int, dict[str, str]] = {}
    name_at: dict[int, int] = {}
    last_args_at: dict[int, int] = {}
    for n, d in enumerate(deltas):
        for tc in d.get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.get("id", "")
            if "name" in tc["function"]:
                slot["name"] += tc["function"]["name"]
                name_at.setdefault(tc["index"], n)
            if tc["function"]["arguments"]:
                slot["arguments"] += tc["function"]["arguments"]
                last_args_at[tc["index"]] = n
    assert content == (one_shot["content"] or "")
    assert reasoning == one_shot.get("reasoning_content", "")
    assert [calls[i] for i in sorted(calls)] == [
        {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in one_shot["tool_calls"]
    ]
    assert before_end >= 2  # deltas arrive while the text is still coming
    for i in calls:
        assert name_at[i] <= last_args_at[i]  # a call's name arrives before its arguments are complete
    assert any(name_at[i] < last_args_at[i] for i in calls) or all(len(calls[i]["arguments"]) <= 4 for i in calls)


# --- strict tool_choice="required" ------------------------------------------------------------


def _after_open_reasoning(result: pyllama.ChatResult, text: str) -> str:
    """Where the generation prompt opens a reasoning block, the reply's text comes after it closes."""
    start, prompt = result.thinking_start_tag.strip(), result.generation_prompt
    if start and start in prompt and not any(end in prompt.split(start)[-1] for end in result.thinking_end_tags):
        return "thinking" + result.thinking_end_tags[0] + text
    return text


def _constrains_tool_calls(path: Path) -> bool:
    try:
        pyllama.ChatTemplate(template=path.read_text(encoding="utf-8")).apply(ASK, tools=TOOLS, tool_choice="required")
    except pyllama.InvalidRequestError as e:  # a template without a tool-call format
        assert type(e) is pyllama.InvalidRequestError, e  # not the template failing: that is a TemplateError
        assert "cannot be honoured" in str(e)
        return False
    return True


TOOL_TEMPLATES = [p for p in sorted(TEMPLATES.glob("*.jinja")) if _constrains_tool_calls(p)]


@pytest.mark.parametrize("path", TOOL_TEMPLATES, ids=lambda p: p.stem)
def test_required_grammar_refuses_a_reply_that_starts_with_text(path: Path) -> None:
    tmpl = pyllama.ChatTemplate(template=path.read_text(encoding="utf-8"), bos_token="<s>", eos_token="</s>")
    loose = tmpl.apply(ASK, tools=TOOLS, tool_choice="required", strict_tool_choice=False)
    strict = tmpl.apply(ASK, tools=TOOLS, tool_choice="required")
    assert strict.strict and strict.strict_failure is None and not loose.strict
    assert strict.grammar is not None and not strict.grammar_lazy
    reply = strict.generation_prompt + _after_open_reasoning(strict, "Hello, I will look that up.")
    assert pyllama.grammar_match(strict.grammar, reply) == "rejected"
    # the same text is what llama.cpp's own grammar lets through for "required", where it has free text
    if pyllama.grammar_match(loose.grammar, reply) != "rejected":
        assert loose.grammar != strict.grammar


@pytest.mark.parametrize("name", CASES)
def test_required_grammar_accepts_each_familys_calls(name: str) -> None:
    case = CASES[name]
    tmpl = _template(case)
    text = case.call_only or case.text
    first = tmpl.apply(ASK, tools=TOOLS, **case.kwargs).parse(text)["tool_calls"][0]["function"]["name"]
    for choice in ("required", {"type": "function", "function": {"name": first}}):
        result = tmpl.apply(ASK, tools=TOOLS, tool_choice=choice, **case.kwargs)
        assert result.strict
        verdict = pyllama.grammar_match(result.grammar, result.generation_prompt + text)
        assert verdict in ("complete", "partial"), verdict
        msg = result.parse(text)
        assert msg["tool_calls"] and msg["tool_calls"][0]["function"]["name"] in {n for n, _ in case.calls}
        # and a reply that opens with prose instead of the call is refused
        prose = result.generation_prompt + _after_open_reasoning(result, "Hello")
        assert pyllama.grammar_match(result.grammar, prose) == "rejected"


def test_grammar_match_uses_llama_cpps_engine() -> None:
    g = 'root ::= "a" [0-9]+ "z"'
    assert pyllama.grammar_match(g, "a12z") == "complete"
    assert pyllama.grammar_match(g, "a12") == "partial"
    assert pyllama.grammar_match(g, "ab") == "rejected"
    with pytest.raises(ValueError, match="does not parse"):
        pyllama.grammar_match("root ::= (", "x")


# Three tool-capable templates on tiny random models with their own vocabularies: even random weights,
# held to the strict grammar, emit a call that parses, names a declared tool and whose arguments validate.
E2E = [
    ("Qwen-Qwen2.5-7B-Instruct", "qwen2"),
    ("meta-llama-Llama-3.1-8B-Instruct", "llama-bpe"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "llama-spm"),
]
ENUM_TOOL = {
    "type": "function",
    "function": {
        "name": "set_mode",
        "description": "Set the mode",
        "parameters": {
            "type": "object",
            "properties": {"mode": {"type": "string", "enum": ["eco", "turbo", "off"]}},
            "required": ["mode"],
            "additionalProperties": False,
        },
    },
}
COLOUR_TOOL = {
    "type": "function",
    "function": {
        "name": "paint",
        "description": "Paint it",
        "parameters": {
            "type": "object",
            "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}, "coats": {"type": "integer"}},
            "required": ["colour", "coats"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def e2e_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for template, vocab in E2E:
        out[template] = write_tiny_llama(
            tmp_path_factory.mktemp("models") / f"{vocab}.gguf",
            vocab=vocab,
            chat_template=template_text(template),
            name=f"tiny-{vocab}",
        )
    return out


@pytest.mark.parametrize("template", [t for t, _ in E2E])
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_required_makes_a_random_model_call_a_tool(e2e_models: dict[str, Path], template: str, seed: int) -> None:
    import jsonschema

    tools = [ENUM_TOOL, COLOUR_TOOL]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    with pyllama.Model(str(e2e_models[template])) as model:
        result = pyllama.ChatTemplate(model).apply(
            [{"role": "user", "content": "Paint the fence."}], tools=tools, tool_choice="required"
        )
        assert result.strict
        text = generate_from_chat(model, result, seed, max_tokens=96)
    msg = result.parse(text)
    assert msg.get("tool_calls"), text
    call = msg["tool_calls"][0]["function"]
    assert call["name"] in schemas
    jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])


@pytest.mark.parametrize("name", ["qwen-2.5", "hermes-2-pro", "glm-4.6", "kimi-k2", "llama-3.1", "mistral-nemo"])
def test_text_after_calls(name: str) -> None:
    """At this commit llama.cpp's parsers end a reply at its calls: the strict grammar refuses text after
    them, and parse() of an unconstrained reply that goes on raises a clear ValueError."""
    case = CASES[name]
    tmpl = _template(case)
    call = case.call_only or case.text
    strict = tmpl.apply(ASK, tools=TOOLS, tool_choice="required", **case.kwargs)
    assert pyllama.grammar_match(strict.grammar, strict.generation_prompt + call + "\nDone.") == "rejected"
    auto = tmpl.apply(ASK, tools=TOOLS, **case.kwargs)
    with pytest.raises(ValueError, match="does not parse as this template's format"):
        auto.parse(case.text + "\nDone.")
