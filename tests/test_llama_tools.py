"""Llama with Python tools, the agent loop, chat sessions and Pydantic output, on a tiny random model
whose tool calls are forced by llama.cpp's grammar. Truths: the functions' own records of how they
were called, the template's rendering of the conversation the loop built, and pydantic's validation."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any, Literal

import pydantic
import pytest

import pyllama


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path: Path) -> Any:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1, seed=11) as llm:
        yield llm


CALLS: list[tuple[str, str]] = []


def get_weather(city: Literal["Paris", "Rome"], unit: Literal["C", "F"]) -> dict[str, Any]:
    """Current weather in a city.

    Args:
        city: The city.
        unit: Degrees Celsius or Fahrenheit.
    """
    CALLS.append((city, unit))
    return {"city": city, "temperature": 21 if unit == "C" else 70}


def _rendered_tokens(llm: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[int]:
    prompt = llm.chat_template.apply(messages, tools=tools, tool_choice="none").prompt
    return list(llm.model.tokenize(prompt, add_special=True, parse_special=True))


def test_run_tools_calls_the_function_and_answers(llm: Any) -> None:
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    spec = pyllama.tools.function_tool(get_weather)
    completed = 0
    for seed in range(1, 6):
        CALLS.clear()
        out = llm.chat(
            ask,
            tools=[get_weather],
            tool_choice="required",
            parallel_tool_calls=False,  # a random model would call again and again until max_tokens
            run_tools=True,
            max_tool_rounds=2,
            max_tokens=160,
            seed=seed,
        )
        added = out["messages"]
        if added[0]["tool_calls"] and out["choices"][0]["finish_reason"] == "length" and len(added) == 1:
            assert CALLS == []  # a call cut at max_tokens is not run
            continue
        completed += 1
        assert [m["role"] for m in added] == ["assistant"] + ["tool"] * len(added[0]["tool_calls"]) + ["assistant"]
        # each function call ran once, with the arguments the model wrote
        written = [json.loads(c["function"]["arguments"]) for c in added[0]["tool_calls"]]
        assert CALLS == [(a["city"], a["unit"]) for a in written]
        for call, result, args in zip(added[0]["tool_calls"], added[1:-1], written, strict=True):
            assert result["tool_call_id"] == call["id"]
            assert json.loads(result["content"]) == {
                "city": args["city"],
                "temperature": 21 if args["unit"] == "C" else 70,
            }
        # the answer is the last round's (tool_choice "none"), whose prompt held the tool results
        assert out["choices"][0]["finish_reason"] in ("stop", "length")
        assert out["choices"][0]["message"] == added[-1] and not added[-1].get("tool_calls")
        expected = _rendered_tokens(llm, ask + added[:-1], [spec])
        assert llm._engine.tokens()[: len(expected)] == expected
        assert out["usage"]["prompt_tokens"] > len(expected)  # the two rounds' prompts, summed
    assert completed >= 2


def test_run_tools_stream(llm: Any) -> None:
    CALLS.clear()
    ask = [{"role": "user", "content": "Weather in Rome?"}]
    stream = llm.chat(
        ask, tools=[get_weather], tool_choice="required", run_tools=True, max_tool_rounds=2, max_tokens=160, stream=True
    )
    chunks = list(stream)
    if len(stream.tool_messages) == 0:  # the call was cut at max_tokens: nothing ran
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and CALLS == []
        pytest.skip("this random model's call did not finish within max_tokens")
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes[0] == "tool_calls" and finishes[-1] in ("stop", "length") and len(finishes) == 2
    calls = stream.tool_messages
    n = len(calls[0]["tool_calls"])
    assert [m["role"] for m in calls] == ["assistant"] + ["tool"] * n
    written = [json.loads(c["function"]["arguments"]) for c in calls[0]["tool_calls"]]
    assert CALLS == [(a["city"], a["unit"]) for a in written]


def test_run_tools_needs_tools_and_rounds(llm: Any) -> None:
    with pytest.raises(ValueError, match="needs tools"):
        llm.chat([{"role": "user", "content": "x"}], run_tools=True)
    with pytest.raises(ValueError, match="max_tool_rounds"):
        llm.chat([{"role": "user", "content": "x"}], tools=[get_weather], run_tools=True, max_tool_rounds=0)


def test_callables_as_tools_without_running_them(llm: Any) -> None:
    CALLS.clear()
    out = llm.chat(
        [{"role": "user", "content": "Weather?"}],
        tools=[get_weather],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=160,
    )
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert CALLS == []  # not run without run_tools


class Mood(enum.Enum):
    GOOD = "good"
    BAD = "bad"


class Verdict(pydantic.BaseModel):
    mood: Mood
    sure: bool


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pydantic_response_format(llm: Any, seed: int) -> None:
    out = llm.chat([{"role": "user", "content": "How are you?"}], response_format=Verdict, max_tokens=64, seed=seed)
    message = out["choices"][0]["message"]
    parsed = message["parsed"]
    assert isinstance(parsed, Verdict)
    assert parsed == Verdict.model_validate_json(message["content"])


def test_chat_session_keeps_the_history(llm: Any) -> None:
    session = pyllama.ChatSession(llm, system="Be brief.", max_tokens=8, temperature=0.0)
    first = session.send("Hello")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[-1]["content"] == first
    pieces = list(session.stream("More"))
    assert session.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    # the same conversation through chat() gives the same reply (greedy), and reuses the history
    again = llm.chat(session.messages[:-1], max_tokens=8, temperature=0.0)
    assert again["choices"][0]["message"]["content"] == "".join(pieces)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_chat_session_runs_tools(llm: Any) -> None:
    CALLS.clear()
    session = pyllama.ChatSession(
        llm, tools=[get_weather], max_tool_rounds=2, max_tokens=160, tool_choice="required", parallel_tool_calls=False
    )
    session.send("Weather in Paris?", seed=1)
    roles = [m["role"] for m in session.messages]
    n = len(CALLS)
    assert n >= 1 and roles == ["user", "assistant"] + ["tool"] * n + ["assistant"]
    assert [m["content"] for m in session.messages[2 : 2 + n]] == [
        json.dumps({"city": c, "temperature": 21 if u == "C" else 70}) for c, u in CALLS
    ]
