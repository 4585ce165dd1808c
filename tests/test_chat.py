"""ChatTemplate: llama.cpp's own Jinja engine and tool-call parsers, in process (first slice of the chat issue)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pyllama

from tiny_models import TEMPLATES, generate_from_chat, template_text

TEMPLATE_FILES = sorted(TEMPLATES.glob("*.jinja"))

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

PLAIN = [
    {"role": "system", "content": "You are a terse assistant named Zorblax."},
    {"role": "user", "content": "Name a colour of the sky quokka."},
    {"role": "assistant", "content": "Blue, said the wombat."},
    {"role": "user", "content": "And at dusk, platypus?"},
]
WITH_TOOLS = [
    {"role": "user", "content": "Weather in Reykjavik please, narwhal."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "abc123xyz",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Reykjavik"})},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abc123xyz", "content": "Sleet, minus 3 degrees (axolotl)."},
]


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.stem)
def test_every_vendored_template_renders_a_conversation(path: Path) -> None:
    tmpl = pyllama.ChatTemplate(template=path.read_text(encoding="utf-8"))
    prompt = tmpl.apply(PLAIN).prompt
    # Each message's text is in the prompt (templates may drop the system message only if they say so).
    for msg in PLAIN[1:]:
        assert msg["content"] in prompt, f"{path.stem}: {msg['content']!r} missing"
    if tmpl.caps["supports_system_role"]:
        assert "Zorblax" in prompt


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.stem)
def test_every_vendored_template_renders_tools_and_results(path: Path) -> None:
    """Templates that support tool calls show the call's result; the others (by their own caps) either render
    without it or refuse with a clear exception, never a crash. Rendering tool turns into such templates as text
    is left to the chat issue's next step."""
    tmpl = pyllama.ChatTemplate(template=path.read_text(encoding="utf-8"))
    if not tmpl.caps["supports_tool_calls"]:
        try:
            prompt = tmpl.apply(WITH_TOOLS, tools=[WEATHER_TOOL]).prompt
        except pyllama.TemplateError as e:  # the template's own refusal, of these messages
            assert e.param == "messages" and "the chat template failed" in str(e)
        else:
            assert "narwhal" in prompt
        return
    prompt = tmpl.apply(WITH_TOOLS, tools=[WEATHER_TOOL]).prompt
    assert "narwhal" in prompt
    assert "axolotl" in prompt, f"{path.stem}: the tool result is missing"


QWEN = "Qwen-Qwen2.5-7B-Instruct"


def test_qwen_prompt_is_the_template_rendering() -> None:
    """The prompt of a plain chat equals the ChatML the Qwen 2.5 template is documented to produce."""
    tmpl = pyllama.ChatTemplate(template=template_text(QWEN))
    prompt = tmpl.apply([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]).prompt
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_qwen_tool_call_parses_into_openai_shape() -> None:
    tmpl = pyllama.ChatTemplate(template=template_text(QWEN))
    result = tmpl.apply([{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL, TIME_TOOL])
    assert result.grammar_lazy and result.grammar is not None
    assert any(t["value"].startswith("<tool_call>") for t in result.grammar_triggers)
    out = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    msg = result.parse(out)
    assert msg["role"] == "assistant"
    assert msg["content"].strip() == "Let me check."
    calls = msg["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Oslo"}, {"city": "Oslo"}]
    assert all(c["type"] == "function" and c["id"] for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_streamed_deltas_add_up_to_the_one_shot_parse() -> None:
    tmpl = pyllama.ChatTemplate(template=template_text(QWEN))
    result = tmpl.apply([{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL])
    out = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "unit": "celsius"}}\n</tool_call>'
    one_shot = result.parse(out)
    stream = result.stream()
    deltas = []
    name_seen_at = args_closed_at = None
    for i in range(0, len(out), 3):
        for d in stream.feed(out[i : i + 3]):
            deltas.append(d)
            for tc in d.get("tool_calls", []):
                if "name" in tc["function"] and name_seen_at is None:
                    name_seen_at = len(deltas)
    deltas += stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    args = "".join(tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls", []))
    assert content == one_shot["content"]
    assert args == one_shot["tool_calls"][0]["function"]["arguments"]
    assert len(deltas) > 3  # it really streams
    args_closed_at = max(i for i, d in enumerate(deltas, 1) if d.get("tool_calls"))
    assert name_seen_at is not None and name_seen_at < args_closed_at  # the name arrives before the arguments end
    assert stream.message["tool_calls"][0]["function"]["name"] == "get_weather"


def test_named_tool_choice_renders_all_tools_but_constrains_to_one() -> None:
    tmpl = pyllama.ChatTemplate(template=template_text(QWEN))
    msgs = [{"role": "user", "content": "time?"}]
    named = tmpl.apply(
        msgs, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice={"type": "function", "function": {"name": "get_time"}}
    )
    assert "get_weather" in named.prompt and "get_time" in named.prompt
    assert named.grammar is not None and "get_time" in named.grammar and "get_weather" not in named.grammar


def test_model_without_template_gets_chatml(tiny_model_path: Path) -> None:
    with pyllama.Model(str(tiny_model_path)) as model:
        tmpl = pyllama.ChatTemplate(model)
        assert tmpl.apply([{"role": "user", "content": "hi"}]).prompt == (
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        )


def test_model_template_is_used(tiny_chat_model_path: Path) -> None:
    with pyllama.Model(str(tiny_chat_model_path)) as model:
        from_model = pyllama.ChatTemplate(model).apply(PLAIN).prompt
        from_text = pyllama.ChatTemplate(template=template_text(QWEN)).apply(PLAIN).prompt
        assert from_model == from_text
        with pytest.raises(ValueError, match="no chat template named"):
            pyllama.ChatTemplate(model, name="tool_use")


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"messages": "hello"}, ValueError, "messages: must be a list"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}, ValueError, "tool_choice"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, ValueError, "needs tools"),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            ValueError,
            "not among the tools",
        ),
        ({"messages": [{"role": "user", "content": {1, 2}}]}, ValueError, r"messages\[0\]\.content: must be"),
        ({"messages": [1]}, ValueError, r"messages\[0\]: must be an object"),
        ({"messages": [{"content": "x"}]}, ValueError, r"messages\[0\]\.role: is required"),
        ({"messages": [{"role": 3, "content": "x"}]}, ValueError, r"messages\[0\]\.role: is required"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, ValueError, r"messages\[0\]\.role: 'wizard' is not one"),
        ({"messages": [{"role": "user", "content": 5}]}, ValueError, r"messages\[0\]\.content: must be a string"),
        ({"messages": [{"role": "user"}]}, ValueError, r"messages\[0\]\.content: is required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            ValueError,
            r"messages\[0\]\.content\[0\]\.type: 'image_url' is not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            ValueError,
            r"messages\[0\]\.content\[0\]\.text: must be a string",
        ),
        ({"messages": [*WITH_TOOLS[:2], {"role": "tool", "content": "r"}]}, ValueError, r"messages\[2\]\.tool_call_id"),
        (
            {"messages": [*WITH_TOOLS[:2], {"role": "tool", "tool_call_id": "zzz", "content": "r"}]},
            ValueError,
            r"messages\[2\]\.tool_call_id: 'zzz' answers no tool call",
        ),
        (
            {
                "messages": [
                    WITH_TOOLS[0],
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "a", "function": {"name": "get_weather", "arguments": "{nope"}}],
                    },
                ]
            },
            ValueError,
            r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: is not valid JSON",
        ),
        (
            {"messages": [{"role": "assistant", "content": "", "tool_calls": {"id": "a"}}]},
            ValueError,
            r"messages\[0\]\.tool_calls: must be a list",
        ),
        (
            {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "a", "type": "function"}]}]},
            ValueError,
            r"messages\[0\]\.tool_calls\[0\]\.function: is required",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "reasoning_content": 5}]},
            ValueError,
            r"messages\[0\]\.reasoning_content",
        ),
        ({"messages": PLAIN, "tools": {"a": 1}}, ValueError, "tools: must be a list"),
        ({"messages": PLAIN, "tools": [{"type": "function"}]}, ValueError, r"tools\[0\]\.function: is required"),
        (
            {"messages": PLAIN, "tools": [{"type": "function", "function": {"parameters": {}}}]},
            ValueError,
            r"tools\[0\]\.function\.name",
        ),
        (
            {"messages": PLAIN, "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            ValueError,
            r"tools\[0\]\.function\.parameters",
        ),
        ({"messages": PLAIN, "tools": [{"type": "x", "function": {"name": "f"}}]}, ValueError, r"tools\[0\]\.type"),
        ({"messages": PLAIN, "tools": [WEATHER_TOOL, WEATHER_TOOL]}, ValueError, "declared twice"),
    ],
)
def test_bad_requests_raise(kwargs: dict, exc: type[Exception], fragment: str) -> None:
    tmpl = pyllama.ChatTemplate(template=template_text(QWEN))
    messages = kwargs.pop("messages")
    with pytest.raises(exc, match=fragment):
        tmpl.apply(messages, **kwargs)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sampler_from_a_chat_result_constrains_real_generation(tiny_chat_model_path: Path, seed: int) -> None:
    """The template's prompt, its grammar from a json_schema, a random model: the reply validates."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "n": {"type": "integer", "maximum": 9}},
        "required": ["answer", "n"],
        "additionalProperties": False,
    }
    with pyllama.Model(str(tiny_chat_model_path)) as model:
        tmpl = pyllama.ChatTemplate(model)
        result = tmpl.apply([{"role": "user", "content": "Answer in JSON."}], json_schema=schema)
        assert result.grammar is not None and not result.grammar_lazy
        text = generate_from_chat(model, result, seed, max_tokens=60)
        msg = result.parse(text)
        jsonschema.validate(json.loads(msg["content"]), schema)


def test_sampler_from_chat_refuses_a_second_grammar(tiny_chat_model_path: Path) -> None:
    with pyllama.Model(str(tiny_chat_model_path), vocab_only=True) as model:
        result = pyllama.ChatTemplate(model).apply([{"role": "user", "content": "x"}], tools=[WEATHER_TOOL])
        with pytest.raises(ValueError, match="own grammar"):
            pyllama.Sampler(model, chat=result, grammar="json")
        # The lazy tool-call grammar comes along with its trigger: before "<tool_call>" the reply may end,
        # after it the grammar is active and an end-of-generation token is refused until the call is complete.
        sampler = pyllama.Sampler(model, chat=result)
        sampler.clone().accept(model.token_eos)
        trigger_word = next(t["value"] for t in result.grammar_triggers if t["type"] == "word")
        for tok in model.tokenize(trigger_word, add_special=False, parse_special=True):
            sampler.accept(tok)
        with pytest.raises(ValueError, match="grammar is not complete"):
            sampler.accept(model.token_eos)


# llama.cpp's tests/test-chat-template.cpp: its conversation and its expected outputs for built-in formats.
LLAMA_CPP_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
BUILTIN_EXPECTED = {
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|><|start_header_id|>"
    "user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    "\n\nI am an assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n<start_of_turn>model\nHi there"
    "<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\nI am an assistant"
    "<end_of_turn>\n<start_of_turn>user\nAnother question<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n"
    "<|user|>\nWho are you<|end|>\n<|assistant|>\n   I am an assistant   <|end|>\n<|user|>\nAnother question<|end|>\n"
    "<|assistant|>\n",
}


@pytest.mark.parametrize("name", sorted(BUILTIN_EXPECTED))
def test_builtin_formats_render_plain_chat_as_llama_cpp_does(name: str) -> None:
    assert name in pyllama.ChatTemplate.builtin_names()
    tmpl = pyllama.ChatTemplate(template=name)
    assert tmpl.builtin == name and tmpl.source == name
    assert not tmpl.caps["supports_tools"] and tmpl.caps["supports_system_role"]
    result = tmpl.apply(LLAMA_CPP_CONVERSATION)
    assert result.prompt == BUILTIN_EXPECTED[name]
    assert result.parse("Plain reply.") == {"role": "assistant", "content": "Plain reply."}
    # text parts are joined; a JSON schema still constrains the reply
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    assert "Hello" in tmpl.apply(parts).prompt
    constrained = tmpl.apply(parts, json_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    assert constrained.grammar is not None
    assert pyllama.grammar_match(constrained.grammar, '{"a": 1}') == "complete"


def test_builtin_formats_refuse_tools() -> None:
    tmpl = pyllama.ChatTemplate(template="llama3")
    with pytest.raises(ValueError, match="carries no tools"):
        tmpl.apply(PLAIN, tools=[WEATHER_TOOL])
    with pytest.raises(ValueError, match="carries no tool calls"):
        tmpl.apply(WITH_TOOLS)


@pytest.mark.parametrize("name", ["google-gemma-2-2b-it", "microsoft-Phi-3.5-mini-instruct", "llama-cpp-rwkv-world"])
def test_templates_without_tools_refuse_required_and_warn(name: str, caplog: pytest.LogCaptureFixture) -> None:
    tmpl = pyllama.ChatTemplate(template=template_text(name))
    assert not tmpl.caps["supports_tools"]
    with pytest.raises(ValueError, match="cannot be honoured"):
        tmpl.apply([{"role": "user", "content": "x"}], tools=[WEATHER_TOOL], tool_choice="required")
    with caplog.at_level("WARNING", logger="pyllama"):
        result = tmpl.apply([{"role": "user", "content": "x"}], tools=[WEATHER_TOOL])
    assert "does not support tools" in caplog.text
    assert result.grammar is None and "get_weather" not in result.prompt


def test_a_result_carries_its_prompt_tokens_and_stops(tmp_path: Path) -> None:
    """Chat crosses into C++ once: the result holds the prompt tokenised as the model's tokenizer does it
    (special tokens parsed, one BOS even when the template writes one), and the stop strings: the end of a
    turn as the template itself renders it, where that is text rather than one end-of-generation token."""
    from tiny_models import template_text, write_tiny_llama

    cases = [
        ("llama-spm", None, ["<|im_end|>"]),  # no template: ChatML, whose <|im_end|> this vocabulary lacks
        ("qwen2", template_text("Qwen-Qwen2.5-7B-Instruct"), []),  # <|im_end|> is an end-of-generation token
        ("llama-bpe", template_text("meta-llama-Llama-3.1-8B-Instruct"), []),  # <|eot_id|> too
    ]
    for i, (vocab, template, stops) in enumerate(cases):
        path = write_tiny_llama(tmp_path / f"m{i}.gguf", vocab=vocab, chat_template=template)
        with pyllama.Model(str(path)) as model:
            result = pyllama.ChatTemplate(model).apply([{"role": "user", "content": "Hello there"}])
            expected = list(model.tokenize(result.prompt, add_special=True, parse_special=True))
            if len(expected) > 1 and expected[0] == expected[1] == model.token_bos:
                expected = expected[1:]
            assert result.prompt_tokens == expected
            assert result.prompt_tokens.count(model.token_bos) <= 1
            assert result.stops == stops
