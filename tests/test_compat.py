"""pyllama.compat: llama-cpp-python's API over pyllama, checked against pyllama's own calls with the
same settings, against llama-cpp-python's defaults and shapes, and against docs/compat.md."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pyllama
from pyllama import compat
from pyllama.compat import LLAMA_DEFAULT_SEED, Llama, LlamaDiskCache, LlamaGrammar, LlamaRAMCache

from conftest import run_python
from tiny_models import WEATHER

ASK = [{"role": "user", "content": "Weather in Paris?"}]
PROMPT = "Once upon a time"
WEATHER_FN = WEATHER["function"]
YES_NO = 'root ::= "yes" | "no"'


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path: Path) -> Any:
    # logits_all=True: accepted (llama-cpp-python needs it for logprobs), no effect here
    with Llama(str(tiny_chat_model_path), n_threads=1, seed=3, verbose=False, logits_all=True) as llm:
        yield llm


@pytest.fixture(scope="module")
def native(tiny_chat_model_path: Path) -> Any:
    """A pyllama.Llama with the context settings compat's defaults stand for."""
    with pyllama.Llama(
        tiny_chat_model_path, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=1, flash_attn=False, seed=3
    ) as native:
        yield native


@pytest.fixture
def restore_logging() -> Any:
    logger = logging.getLogger("pyllama")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.handlers[:] = handlers
    pyllama.set_log_level(level)


def fresh(*llms: Any) -> None:
    """Empty contexts, so that two Llamas evaluate the same batches (bit-identical logits)."""
    for x in llms:
        x.load_state(pyllama.LlamaState((), b"", x.fingerprint))


def text(out: dict[str, Any]) -> str:
    return str(out["choices"][0]["text"])


def message(out: dict[str, Any]) -> dict[str, Any]:
    return dict(out["choices"][0]["message"])


# --- construction ---------------------------------------------------------------------------


def test_defaults_are_llama_cpp_pythons(tiny_chat_model_path: Path, restore_logging: None) -> None:
    init = inspect.signature(Llama.__init__).parameters
    expected = {
        "n_gpu_layers": 0,
        "main_gpu": 0,
        "use_mmap": True,
        "use_mlock": False,
        "vocab_only": False,
        "seed": 0xFFFFFFFF,
        "n_ctx": 512,
        "n_batch": 512,
        "n_ubatch": 512,
        "n_threads": None,
        "rope_freq_base": 0.0,
        "logits_all": False,
        "embedding": False,
        "offload_kqv": True,
        "flash_attn": False,
        "last_n_tokens_size": 64,
        "chat_format": None,
        "verbose": True,
    }
    assert {k: init[k].default for k in expected} == expected
    completion = inspect.signature(Llama.create_completion).parameters
    assert [completion[k].default for k in ("max_tokens", "temperature", "top_p", "min_p", "top_k")] == [
        16,
        0.8,
        0.95,
        0.05,
        40,
    ]
    assert inspect.signature(Llama.__call__).parameters.keys() == completion.keys()
    chat = inspect.signature(Llama.create_chat_completion).parameters
    assert [chat[k].default for k in ("temperature", "max_tokens", "top_k")] == [0.2, None, 40]
    assert list(chat)[1:5] == ["messages", "functions", "function_call", "tools"]
    with Llama(str(tiny_chat_model_path), n_threads=1) as llm:  # n_threads=1: fast on a busy machine
        assert llm.n_ctx() == 512
        assert (llm.context.n_batch, llm.context.n_ubatch) == (512, 512)
        assert llm.verbose is True and llm.chat_format is None
        assert logging.getLogger("pyllama").getEffectiveLevel() <= logging.INFO  # verbose=True
        out = llm("Hello")
        assert out["usage"]["completion_tokens"] <= 16
        assert out["model"] == str(tiny_chat_model_path)  # llama-cpp-python names the model by its path


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("chat_handler", object()),
        ("draft_model", object()),
        ("tokenizer", object()),
        ("lora_path", "adapter.gguf"),
        ("lora_base", "base.gguf"),
        ("vocab_only", True),
        ("spm_infill", True),
        ("numa", True),
    ],
)
def test_unsupported_constructor_options_raise(tiny_chat_model_path: Path, option: str, value: Any) -> None:
    with pytest.raises(NotImplementedError, match=option):
        Llama(str(tiny_chat_model_path), verbose=False, **{option: value})


def test_unknown_keywords_raise_and_pyllama_keywords_pass(tiny_chat_model_path: Path) -> None:
    with pytest.raises(TypeError, match="n_ctxx"):
        Llama(str(tiny_chat_model_path), verbose=False, n_ctxx=10)
    with Llama(str(tiny_chat_model_path), verbose=False, n_threads=1, n_ctx=256, kv_unified=True) as small:
        assert small.n_ctx() == 256


def test_enums_take_llama_cpp_pythons_ints(tiny_chat_model_path: Path) -> None:
    with Llama(
        str(tiny_chat_model_path),
        verbose=False,
        n_threads=1,
        split_mode=compat.LLAMA_SPLIT_MODE_NONE,
        type_k=8,  # GGML_TYPE_Q8_0
        rope_scaling_type=compat.LLAMA_ROPE_SCALING_TYPE_LINEAR,
        attention_type=compat.LLAMA_ATTENTION_TYPE_CAUSAL,
        pooling_type=compat.LLAMA_POOLING_TYPE_MEAN,
    ) as x:
        assert x("Hello", max_tokens=2)["usage"]["completion_tokens"] <= 2
    with pytest.raises(ValueError, match="pooling_type: unknown value 9"):
        Llama(str(tiny_chat_model_path), verbose=False, pooling_type=9)
    with pytest.raises(ValueError, match="unknown KV cache type"):
        Llama(str(tiny_chat_model_path), verbose=False, type_k="q9_9")


def test_chat_format_maps_to_llama_cpp_builtins(tiny_chat_model_path: Path, llm: Any) -> None:
    with Llama(str(tiny_chat_model_path), verbose=False, n_threads=1, chat_format="llama-3") as l3:
        assert l3.chat_template.builtin == "llama3" and l3.chat_format == "llama-3"
        out = l3.create_chat_completion(ASK, max_tokens=2)
        prompt = pyllama.ChatTemplate(l3.model, template="llama3").apply(ASK).prompt
        assert out["usage"]["prompt_tokens"] == len(l3.model.tokenize(prompt, parse_special=True))
    with Llama(str(tiny_chat_model_path), verbose=False, n_threads=1, chat_format="chat_template.default") as own:
        assert own.chat_template.source == llm.chat_template.source and own.chat_template.builtin is None
    for name in ("mistral-instruct", "gemma", "llama-2"):
        assert compat.CHAT_FORMATS[name] in pyllama.ChatTemplate.builtin_names()
    with pytest.raises(ValueError, match="'alpaca' has no equivalent"):
        Llama(str(tiny_chat_model_path), verbose=False, chat_format="alpaca")


def test_verbose_prints_llama_cpp_log_to_stderr(tiny_chat_model_path: Path) -> None:
    code = """
        import sys, time
        from pyllama import _logging
        from pyllama.compat import Llama
        llm = Llama(sys.argv[1], n_threads=1, verbose=sys.argv[2] == "1")
        llm("Hello", max_tokens=1)
        time.sleep(0.2)
        _logging.flush()
    """
    loud = run_python(code, str(tiny_chat_model_path), "1")
    quiet = run_python(code, str(tiny_chat_model_path), "0")
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "llama_model_loader" in loud.stderr and "llama_context" in loud.stderr
    assert "llama_" not in quiet.stderr


# --- tokens ---------------------------------------------------------------------------------


def test_tokenize_takes_bytes_and_llama_cpp_pythons_flags(llm: Any) -> None:
    raw = "Hello <|im_start|>user"
    assert llm.tokenize(raw.encode()) == llm.model.tokenize(raw, add_special=True, parse_special=False)
    assert llm.tokenize(raw.encode(), special=True) == llm.model.tokenize(raw, parse_special=True)
    assert llm.tokenize(raw.encode(), add_bos=False, special=True) == llm.model.tokenize(
        raw, add_special=False, parse_special=True
    )
    assert llm.model.token_id("<|im_start|>") in llm.tokenize(raw.encode(), special=True)
    assert llm.model.token_id("<|im_start|>") not in llm.tokenize(raw.encode())


def test_detokenize_returns_bytes(llm: Any) -> None:
    raw = "Hello, wörld <|im_start|>"
    tokens = llm.tokenize(raw.encode(), special=True)
    out = llm.detokenize(tokens)
    assert isinstance(out, bytes) and out.decode() == "Hello, wörld "
    assert llm.detokenize(tokens, special=True).decode() == raw
    assert llm.detokenize(tokens, prev_tokens=tokens[:1]) == out
    # the bytes of a split character come back whole once joined
    pieces = [llm.detokenize([t]) for t in llm.tokenize("ö".encode(), add_bos=False)]
    assert b"".join(pieces) == "ö".encode()


def test_detokenize_drops_the_space_after_a_bos(tiny_model_path: Path) -> None:
    with Llama(str(tiny_model_path), verbose=False, n_threads=1, n_ctx=64) as spm:
        with_bos = spm.tokenize(b"Hello world")
        assert with_bos[0] == spm.token_bos() != -1
        assert spm.detokenize(with_bos) == b"Hello world"
        assert spm.detokenize(spm.tokenize(b"Hello world", add_bos=False)) == b" Hello world"


def test_model_facts(llm: Any) -> None:
    model = llm.model
    assert (llm.n_vocab(), llm.n_embd()) == (model.n_vocab, model.n_embd)
    assert llm.token_eos() == model.token_eos
    assert llm.token_bos() == (model.token_bos if model.token_bos is not None else -1)
    assert llm.metadata["general.architecture"] == "llama"


# --- completion -----------------------------------------------------------------------------


def test_greedy_completion_equals_native(llm: Any, native: Any) -> None:
    fresh(llm, native)
    ours = llm.create_completion(PROMPT, max_tokens=12, temperature=0)
    fresh(llm)
    called = llm(PROMPT, max_tokens=12, temperature=0, tfs_z=0.5)  # tfs_z: ignored, as in llama-cpp-python
    fresh(native)
    theirs = native.complete(PROMPT, max_tokens=12, temperature=0)
    assert text(ours) == text(called) == text(theirs) != ""
    assert ours["object"] == "text_completion" and ours["choices"][0]["finish_reason"] in ("stop", "length")
    assert ours["usage"]["completion_tokens"] == theirs["usage"]["completion_tokens"]


def test_every_sampling_option_reaches_the_sampler(llm: Any, native: Any) -> None:
    options = {
        "temperature": 1.3,
        "top_k": 7,
        "top_p": 0.8,
        "min_p": 0.02,
        "typical_p": 0.9,
        "repeat_penalty": 1.2,
        "presence_penalty": 0.3,
        "frequency_penalty": 0.2,
    }
    fresh(llm, native)
    ours = text(llm.create_completion(PROMPT, max_tokens=24, seed=11, logit_bias={"13": 2.0}, **options))
    theirs = text(native.complete(PROMPT, max_tokens=24, seed=11, logit_bias={13: 2.0}, penalty_last_n=64, **options))
    assert ours == theirs
    fresh(native)
    assert theirs != text(native.complete(PROMPT, max_tokens=24, seed=11, temperature=1.3))  # the options matter


def test_default_sampling_is_llama_cpp_pythons(llm: Any, native: Any) -> None:
    llama_cpp_python = {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "typical_p": 1.0, "repeat_penalty": 1.0}
    fresh(llm, native)
    ours = text(llm.create_completion(PROMPT, max_tokens=24, seed=5))
    assert ours == text(native.complete(PROMPT, max_tokens=24, seed=5, temperature=0.8, **llama_cpp_python))
    fresh(llm, native)
    reply = message(llm.create_chat_completion(ASK, max_tokens=24, seed=5))
    assert reply == message(native.chat(ASK, max_tokens=24, seed=5, temperature=0.2, **llama_cpp_python))
    fresh(native)
    assert reply != message(native.chat(ASK, max_tokens=24, seed=5, temperature=0.8))  # 0.2 is not pyllama's


def test_negative_temperature_samples_the_whole_distribution(llm: Any, native: Any) -> None:
    fresh(llm, native)
    ours = text(llm.create_completion(PROMPT, max_tokens=16, seed=2, temperature=-1))
    theirs = text(native.complete(PROMPT, max_tokens=16, seed=2, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0))
    assert ours == theirs
    fresh(native)
    assert ours != text(native.complete(PROMPT, max_tokens=16, seed=2, temperature=0))


def test_special_tokens_in_a_text_prompt_are_parsed(llm: Any, native: Any) -> None:
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tokens = llm.model.tokenize(prompt, add_special=True, parse_special=True)
    fresh(llm, native)
    ours = llm.create_completion(prompt, max_tokens=6, temperature=0, echo=True, logprobs=1)
    theirs = native.complete(tokens, max_tokens=6, temperature=0)
    assert ours["usage"]["prompt_tokens"] == len(tokens)
    assert text(ours) == prompt + text(theirs)  # the prompt echoes as written
    assert ours["choices"][0]["logprobs"]["text_offset"][0] == len(prompt)
    # a token list prompt, and pyllama's own complete on the compat object, still work
    fresh(llm)
    assert text(llm.create_completion(list(tokens), max_tokens=6, temperature=0)) == text(theirs)
    fresh(llm)
    assert text(llm.complete(list(tokens), max_tokens=6, temperature=0)) == text(theirs)


def test_max_tokens_is_lowered_to_what_the_context_holds(llm: Any) -> None:
    prompt = "word " * 300
    n_prompt = len(llm.tokenize(prompt.encode()))
    out = llm.create_completion(prompt, max_tokens=400, temperature=0)
    assert out["usage"]["prompt_tokens"] == n_prompt
    assert out["usage"]["total_tokens"] == 512 or out["choices"][0]["finish_reason"] == "stop"
    with pytest.raises(ValueError, match="exceed the context"):
        llm.complete(prompt, max_tokens=400)  # pyllama's own call refuses
    with pytest.raises(ValueError, match="context holds"):
        llm.create_completion("word " * 600, max_tokens=4)  # a prompt that does not fit still raises
    unlimited = llm.create_completion("Hi", max_tokens=0, temperature=0)
    assert unlimited["usage"]["total_tokens"] == 512 or unlimited["choices"][0]["finish_reason"] == "stop"


def test_streamed_completion_adds_up(llm: Any) -> None:
    whole = llm.create_completion(PROMPT, max_tokens=20, seed=7)
    chunks = list(llm.create_completion(PROMPT, max_tokens=20, seed=7, stream=True, model="custom"))
    assert "".join(c["choices"][0]["text"] for c in chunks) == text(whole)
    assert all(c["model"] == "custom" and c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert llm.create_completion(PROMPT, max_tokens=1, model="other")["model"] == "other"


def test_stream_can_be_closed(llm: Any) -> None:
    stream = llm.create_completion(PROMPT, max_tokens=50, seed=1, stream=True, model="m")
    next(stream)
    stream.close()
    assert llm(PROMPT, max_tokens=2)["usage"]["completion_tokens"] <= 2


def test_set_seed_and_the_constructor_seed(llm: Any) -> None:
    def run(**kw: Any) -> str:
        fresh(llm)
        return text(llm.create_completion(PROMPT, max_tokens=16, temperature=1.0, **kw))

    assert run() == run() == run(seed=3)  # the constructor's seed=3
    llm.set_seed(7)
    try:
        assert run() == run(seed=7) != run(seed=3)
        llm.set_seed(LLAMA_DEFAULT_SEED)
        assert len({run() for _ in range(3)}) > 1  # random
    finally:
        llm.set_seed(3)


def test_unsupported_call_arguments_raise(llm: Any) -> None:
    with pytest.raises(NotImplementedError, match="stopping_criteria"):
        llm.create_completion(PROMPT, stopping_criteria=[lambda ids, logits: False])
    with pytest.raises(NotImplementedError, match="logits_processor"):
        llm(PROMPT, logits_processor=[lambda ids, scores: scores])
    with pytest.raises(NotImplementedError, match="logits_processor"):
        llm.create_chat_completion(ASK, logits_processor=[lambda ids, scores: scores])

    class ForeignGrammar:  # e.g. a llama_cpp.LlamaGrammar
        _grammar = YES_NO

    with pytest.raises(NotImplementedError, match="ForeignGrammar"):
        llm.create_completion(PROMPT, grammar=ForeignGrammar())


# --- grammars -------------------------------------------------------------------------------


def test_grammar_constrains_completion_and_chat(llm: Any) -> None:
    grammar = LlamaGrammar.from_string(YES_NO)
    for g in (grammar, YES_NO):
        assert text(llm.create_completion(PROMPT, grammar=g, max_tokens=8, seed=1)) in ("yes", "no")
        assert message(llm.create_chat_completion(ASK, grammar=g, max_tokens=8, seed=1))["content"] in ("yes", "no")
    assert message(llm.create_chat_completion(ASK, max_tokens=8, seed=1))["content"] not in ("yes", "no")
    chunks = list(llm.create_chat_completion(ASK, grammar=grammar, max_tokens=8, seed=1, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) in ("yes", "no")
    with pytest.raises(ValueError, match="cannot be combined"):
        llm.create_chat_completion(ASK, grammar=grammar, tools=[{"type": "function", "function": WEATHER_FN}])
    with pytest.raises(ValueError, match="invalid grammar"):
        llm.create_completion(PROMPT, grammar=LlamaGrammar.from_string('root ::= "a" | ('))


def test_grammar_from_json_schema(llm: Any, tmp_path: Path) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    grammar = LlamaGrammar.from_json_schema(json.dumps(schema))
    assert grammar.grammar == pyllama.json_schema_to_grammar(schema)
    out = llm.create_completion(PROMPT, grammar=grammar, max_tokens=60, seed=2)
    jsonschema.validate(json.loads(text(out)), schema)
    path = tmp_path / "yes_no.gbnf"
    path.write_text(YES_NO)
    assert LlamaGrammar.from_file(path).grammar == YES_NO


# --- chat -----------------------------------------------------------------------------------


def test_greedy_chat_equals_native(llm: Any, native: Any) -> None:
    fresh(llm, native)
    ours = llm.create_chat_completion(ASK, temperature=0, max_tokens=12)
    fresh(native)
    theirs = native.chat(ASK, temperature=0, max_tokens=12)
    assert message(ours) == message(theirs) and message(ours)["content"]
    assert ours["object"] == "chat.completion" and ours["id"].startswith("chatcmpl-")
    assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"]
    fresh(llm)
    chunks = list(llm.create_chat_completion(ASK, temperature=0, max_tokens=12, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == message(ours)["content"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_chat_logprobs_equal_native(llm: Any, native: Any) -> None:
    fresh(llm, native)
    ours = llm.create_chat_completion(ASK, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2)
    theirs = native.chat(ASK, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2)
    content = ours["choices"][0]["logprobs"]["content"]
    assert content == theirs["choices"][0]["logprobs"]["content"]
    assert len(content) == ours["usage"]["completion_tokens"] and len(content[0]["top_logprobs"]) == 2
    assert llm.create_chat_completion(ASK, max_tokens=2)["choices"][0]["logprobs"] is None


def test_tools_equal_native(llm: Any, native: Any) -> None:
    tools = [{"type": "function", "function": WEATHER_FN}]
    fresh(llm, native)
    ours = llm.create_chat_completion(ASK, tools=tools, tool_choice="required", seed=1, max_tokens=80)
    theirs = native.chat(ASK, tools=tools, tool_choice="required", seed=1, temperature=0.2, max_tokens=80)
    assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"]
    calls, expected = message(ours)["tool_calls"], message(theirs)["tool_calls"]
    assert [c["function"] for c in calls] == [c["function"] for c in expected]
    assert json.loads(calls[0]["function"]["arguments"])["city"] in ("Paris", "Rome")
    assert "function_call" not in message(ours)  # only for the legacy functions


def test_legacy_functions_produce_a_tool_call(llm: Any) -> None:
    named = {"name": "get_weather"}
    out = llm.create_chat_completion(ASK, functions=[WEATHER_FN], function_call=named, seed=1, max_tokens=80)
    msg = message(out)
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    call = msg["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")
    assert msg["function_call"] == call["function"]
    chunks = list(
        llm.create_chat_completion(ASK, functions=[WEATHER_FN], function_call=named, seed=1, max_tokens=80, stream=True)
    )
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d["function_call"].get("name", "") for d in deltas if "function_call" in d) == "get_weather"
    args = "".join(d["function_call"].get("arguments", "") for d in deltas if "function_call" in d)
    assert args == call["function"]["arguments"]
    # function_call="none": the model answers in text
    free = llm.create_chat_completion(ASK, functions=[WEATHER_FN], function_call="none", max_tokens=8, seed=1)
    assert "tool_calls" not in message(free) and "function_call" not in message(free)
    with pytest.raises(ValueError, match="not both"):
        llm.create_chat_completion(ASK, functions=[WEATHER_FN], tools=[{"type": "function", "function": WEATHER_FN}])


def test_response_format_json_object_with_schema(llm: Any) -> None:
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    out = llm.create_chat_completion(
        ASK, response_format={"type": "json_object", "schema": schema}, max_tokens=60, seed=3
    )
    jsonschema.validate(json.loads(message(out)["content"]), schema)


def test_chat_max_tokens_is_lowered_too(llm: Any) -> None:
    long = [{"role": "user", "content": "word " * 400}]
    reply = llm.create_chat_completion(long, max_tokens=300, temperature=0)
    assert reply["usage"]["total_tokens"] == 512 or reply["choices"][0]["finish_reason"] == "stop"


# --- embeddings -----------------------------------------------------------------------------


def test_embed_returns_lists_equal_to_native(llm: Any, native: Any) -> None:
    one = llm.embed("hello world")
    assert isinstance(one, list) and all(type(x) is float for x in one) and len(one) == llm.n_embd()
    np.testing.assert_array_equal(np.array(one, dtype=np.float32), native.embed("hello world", normalize=False)[0])
    many = llm.embed(["hello", "world"], normalize=True)
    assert isinstance(many, list) and len(many) == 2 and isinstance(many[0], list)
    np.testing.assert_array_equal(np.array(many, dtype=np.float32), native.embed(["hello", "world"], normalize=True))
    assert np.linalg.norm(many[0]) == pytest.approx(1.0, abs=1e-5)
    assert np.linalg.norm(one) != pytest.approx(1.0, abs=1e-3)  # normalize=False by default
    data, count = llm.embed(["hello", "world"], return_count=True)
    assert data == llm.embed(["hello", "world"])
    assert count == len(llm.tokenize(b"hello")) + len(llm.tokenize(b"world"))
    # truncate=True (the default) cuts a text longer than the context; False raises
    assert len(llm.embed("word " * 600)) == llm.n_embd()
    with pytest.raises(ValueError, match="truncate=True"):
        llm.embed("word " * 600, truncate=False)


def test_create_embedding(llm: Any) -> None:
    out = llm.create_embedding(["hello", "world"])
    assert out["object"] == "list" and out["model"] == llm.model_path
    assert [d["index"] for d in out["data"]] == [0, 1] and all(d["object"] == "embedding" for d in out["data"])
    assert [d["embedding"] for d in out["data"]] == llm.embed(["hello", "world"])  # not normalised
    n = len(llm.tokenize(b"hello")) + len(llm.tokenize(b"world"))
    assert out["usage"] == {"prompt_tokens": n, "total_tokens": n}
    assert llm.create_embedding("hello", model="emb")["model"] == "emb"


def test_per_token_embeddings_are_refused(tiny_chat_model_path: Path) -> None:
    with Llama(str(tiny_chat_model_path), verbose=False, n_threads=1, pooling_type=compat.LLAMA_POOLING_TYPE_NONE) as x:
        with pytest.raises(NotImplementedError, match="per-token"):
            x.embed("hello")


# --- state, caches, downloads ---------------------------------------------------------------


def test_reset_save_and_load_state(llm: Any) -> None:
    llm(PROMPT, max_tokens=4, seed=1)
    again = llm(PROMPT, max_tokens=4, seed=1)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    state = llm.save_state()
    llm.reset()
    after_reset = llm(PROMPT, max_tokens=4, seed=1)
    assert after_reset["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    llm.reset()
    llm.load_state(state)
    assert llm(PROMPT, max_tokens=4, seed=1)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert text(after_reset) == text(again)


def test_caches(llm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ram = LlamaRAMCache()
    assert ram.capacity_bytes == 2 << 30 and compat.LlamaCache is LlamaRAMCache
    assert isinstance(ram, pyllama.RAMCache)
    monkeypatch.chdir(tmp_path)
    disk = LlamaDiskCache()
    assert disk.directory == Path(".cache/llama_cache") and disk.capacity_bytes == 2 << 30
    try:
        cached = "A cached prompt " + "and some more words " * 20  # RAM keeps prefixes of 64 tokens or more
        for cache in (ram, disk):
            llm.set_cache(cache)
            assert llm.cache is cache
            llm.reset()
            llm(cached, max_tokens=2, seed=1)
            llm("Something else entirely", max_tokens=2, seed=1)
            assert len(cache) >= 1 and cache.cache_size > 0
            back = llm(cached, max_tokens=2, seed=1)
            assert back["usage"]["prompt_tokens_details"]["cached_tokens"] > 64
    finally:
        llm.set_cache(None)


def test_from_pretrained_downloads_then_loads(
    tiny_chat_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyllama import models

    calls: list[tuple[str, str, dict[str, Any]]] = []

    def fake(repo_id: str, filename: str, **kwargs: Any) -> Path:
        calls.append((repo_id, filename, kwargs))
        return tiny_chat_model_path

    monkeypatch.setattr(models, "hf_download", fake)
    with Llama.from_pretrained(
        "org/repo", "*q8_0.gguf", additional_files=["extra.gguf"], local_dir=tmp_path, verbose=False, n_threads=1
    ) as x:
        assert isinstance(x, Llama) and x.n_ctx() == 512
    assert [c[:2] for c in calls] == [("org/repo", "*q8_0.gguf"), ("org/repo", "extra.gguf")]
    assert all(c[2]["local_dir"] == str(tmp_path) for c in calls)


# --- the docs -------------------------------------------------------------------------------


def test_docs_example_runs(
    tiny_chat_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "compat.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", doc, re.S)
    assert code is not None
    (tmp_path / "model.gguf").symlink_to(tiny_chat_model_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compat, "Llama", functools.partial(Llama, n_threads=1))  # fast on a busy machine
    exec(compile(code.group(1), "docs/compat.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("Q: Name the planets in the solar system. A: ")
    assert out.splitlines()[-4:] == ["assistant", "True", "b'Hello, world!'", "True"]
