"""llama-server's extra endpoints, served for real (uvicorn on 127.0.0.1): /v1/rerank against
Llama.rerank on the same tiny reranker; /infill against the fill-in-the-middle prompt built here from
the vocabulary's token ids (as llama-server's format_prompt_infill lays it out) and the completion of
those tokens by Llama.complete; /props against the Llama's own values; /metrics parsed by
prometheus_client, its counters against the usage of known requests and llama.cpp's own counters;
the token count of a chat request against the chat reply's usage."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import pyllama

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

from live_server import LiveServer
from pyllama.server import create_app
from test_server import KEY, MESSAGES, PICK, Running, assert_error, post

from tiny_models import write_tiny_llama, write_tiny_reranker

AUTH = {"Authorization": f"Bearer {KEY}"}
QUERY = "what is a panda?"
DOCS = ["hi", "The giant panda is a bear native to China.", "Pandas eat bamboo.", "A stock market report."]
FIM = {"n_ctx": 1024, "n_batch": 64, "n_threads": 1}  # a small batch: the prefix and suffix are cut to it


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_llm(tiny_chat_model_path: Path) -> Iterator[pyllama.Llama]:
    # a context long enough for a stream of several seconds
    with pyllama.Llama(tiny_chat_model_path, n_ctx=4096, n_threads=1, seed=0) as llm:
        yield llm


@pytest.fixture(scope="module")
def served(chat_llm: pyllama.Llama) -> Iterator[Running]:
    """A chat model with metrics, one slot and one place in the queue; ``perf0``: llama.cpp's counters
    of its context when the app was made."""
    perf0 = chat_llm.context.perf()
    running = Running(create_app(chat_llm, api_key=KEY, alias="tiny", metrics=True, max_queue=1))
    running.perf0 = perf0  # type: ignore[attr-defined]
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_reranker(tmp_path_factory.mktemp("rerank") / "tiny-reranker.gguf")


@pytest.fixture(scope="module")
def reranker(reranker_path: Path) -> Iterator[pyllama.Llama]:
    """An independent Llama over the reranker: what the server's scores must equal."""
    with pyllama.Llama(reranker_path, n_ctx=512, n_threads=1) as llm:
        yield llm


@pytest.fixture(scope="module")
def rr_served(reranker_path: Path) -> Iterator[Running]:
    with pyllama.Llama(reranker_path, n_ctx=512, n_threads=1) as llm:
        running = Running(create_app(llm, alias="rr"))
        yield running
        running.stop()


@pytest.fixture(scope="module")
def coder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random llama over StarCoder's vocabulary (<fim_prefix>, <fim_suffix>, <fim_middle>)."""
    return write_tiny_llama(tmp_path_factory.mktemp("coder") / "tiny-coder.gguf", vocab="starcoder", name="coder")


@pytest.fixture(scope="module")
def repo_tokens(coder_path: Path) -> dict[str, int]:
    """The vocabulary's repository tokens as FIM_REP and FIM_SEP (llama.cpp does not find StarCoder 2's
    <repo_name> and <file_sep> by their text): the repo-level pattern."""
    with pyllama.Model(str(coder_path), vocab_only=True) as m:
        return {
            "tokenizer.ggml.fim_rep_token_id": m.token_id("<repo_name>"),
            "tokenizer.ggml.fim_sep_token_id": m.token_id("<file_sep>"),
        }


@pytest.fixture(scope="module")
def fim_llm(coder_path: Path, repo_tokens: dict[str, int]) -> Iterator[pyllama.Llama]:
    with pyllama.Llama(coder_path, kv_overrides=repo_tokens, **FIM) as llm:
        yield llm


@pytest.fixture(scope="module")
def fim_served(fim_llm: pyllama.Llama) -> Iterator[Running]:
    running = Running(create_app(fim_llm, metrics=True))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def fim_reference(coder_path: Path, repo_tokens: dict[str, int]) -> Iterator[pyllama.Llama]:
    with pyllama.Llama(coder_path, kv_overrides=repo_tokens, **FIM) as llm:
        yield llm


# --- helpers -------------------------------------------------------------------------------------


def scrape(running: Running) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, parsed by prometheus_client: (name, labels) -> value."""
    response = httpx.get(running.url + "/metrics", headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def grew(
    before: dict[tuple[str, frozenset[tuple[str, str]]], float],
    after: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def tokens(m: pyllama.Model, text: str, special: bool = False) -> list[int]:
    return list(m.tokenize(text, add_special=False, parse_special=special))


def events(response: httpx.Response) -> list[dict[str, Any]]:
    raw = response.read().decode()
    parts = raw.split("\n\n")
    assert parts[-1] == "" and all(p.startswith("data: ") for p in parts[:-1]), raw
    return [json.loads(p[len("data: ") :]) for p in parts[:-1]]


# --- reranking -----------------------------------------------------------------------------------


def test_rerank_equals_llama_rerank(rr_served: Running, reranker: pyllama.Llama) -> None:
    """Every path of llama-server's gives Llama.rerank's scores in Jina's shape; top_n keeps the most
    relevant; TEI's shape (``texts``) is the bare results with ``score`` and the text when asked."""
    full = reranker.rerank(QUERY, DOCS)
    assert len({r["relevance_score"] for r in full["results"]}) == len(DOCS)  # the documents are told apart
    for path in ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking"):
        got = post(rr_served, path, {"query": QUERY, "documents": DOCS, "model": "whatever"}).json()
        assert got["model"] == "rr" and got["object"] == "list" and got["usage"] == full["usage"]
        assert [r["index"] for r in got["results"]] == [r["index"] for r in full["results"]]
        np.testing.assert_allclose(
            [r["relevance_score"] for r in got["results"]], [r["relevance_score"] for r in full["results"]], rtol=1e-6
        )
    top = post(rr_served, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2}).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:2]]
    assert top["usage"] == full["usage"]  # every pair was scored
    tei = post(rr_served, "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True}).json()
    assert [(r["index"], r["text"]) for r in tei] == [(r["index"], DOCS[r["index"]]) for r in full["results"]]
    np.testing.assert_allclose([r["score"] for r in tei], [r["relevance_score"] for r in full["results"]], rtol=1e-6)
    assert all("text" not in r for r in post(rr_served, "/rerank", {"query": QUERY, "texts": DOCS}).json())


def test_rerank_bad_input_is_400(rr_served: Running) -> None:
    assert_error(post(rr_served, "/v1/rerank", {"documents": DOCS}), 400, "query")
    assert_error(post(rr_served, "/v1/rerank", {"query": 3, "documents": DOCS}), 400, "query")
    assert_error(post(rr_served, "/v1/rerank", {"query": QUERY}), 400, "documents")
    assert_error(post(rr_served, "/v1/rerank", {"query": QUERY, "documents": []}), 400, "documents")
    assert_error(post(rr_served, "/v1/rerank", {"query": QUERY, "documents": ["a", 7]}), 400, "documents[1]")
    assert_error(post(rr_served, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}), 400, "top_n")
    long = ["short", "panda " * 600]
    error = assert_error(post(rr_served, "/v1/rerank", {"query": QUERY, "documents": long}), 400, "documents[1]")
    assert error["code"] == "context_length_exceeded"
    assert_error(post(rr_served, "/rerank", {"query": QUERY, "texts": long}), 400, "texts[1]")


def test_rerank_needs_a_reranker(served: Running) -> None:
    """A generation model answers what llama-server answers without --reranking: 501."""
    error = assert_error(post(served, "/v1/rerank", {"query": QUERY, "documents": DOCS}), 501)
    assert error["type"] == "not_supported_error" and "--reranking" in error["message"]


def test_serve_reranking_and_metrics_from_the_command(reranker_path: Path, reranker: pyllama.Llama) -> None:
    """``pyllama serve --reranking --metrics`` over an encoder alone: it starts, reranks as Llama.rerank
    and exports its metrics."""
    server = LiveServer(reranker_path, 1, "--reranking", "--metrics")
    try:
        got = httpx.post(server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60).json()
        full = reranker.rerank(QUERY, DOCS)
        assert [r["index"] for r in got["results"]] == [r["index"] for r in full["results"]]
        np.testing.assert_allclose(
            [r["relevance_score"] for r in got["results"]], [r["relevance_score"] for r in full["results"]], rtol=1e-6
        )
        text = httpx.get(server.url + "/metrics", timeout=60).text
        samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples["pyllama_requests_total"].labels == {"endpoint": "/v1/rerank", "status": "200"}
        assert httpx.get(server.url + "/props", timeout=60).json()["endpoint_metrics"] is True
    finally:
        server.stop()


# --- infill --------------------------------------------------------------------------------------


def test_infill_builds_llama_servers_prompt(
    fim_served: Running, fim_llm: pyllama.Llama, fim_reference: pyllama.Llama
) -> None:
    """The repo-level pattern: REP myproject, SEP filename text per extra chunk, SEP filename, then PRE
    prefix prompt SUF suffix MID. The server evaluates exactly those tokens, and the text equals
    Llama.complete's of them with the same seed, streamed or not."""
    m = fim_reference.model
    rep, sep = m.token_fim_rep, m.token_fim_sep
    assert rep is not None and sep is not None
    prefix, suffix, prompt = "def add(a, b):\n", "\n    return c\n", "    c = "
    extra = [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"}, {"text": "X = 1\n"}]
    expected = [rep, *tokens(m, "myproject\n"), sep, *tokens(m, "util.py\n"), *tokens(m, extra[0]["text"])]
    expected += [sep, *tokens(m, "tmp\n"), *tokens(m, "X = 1\n"), sep, *tokens(m, "filename\n")]
    expected += [m.token_fim_pre, *tokens(m, prefix), *tokens(m, prompt, special=True)]
    expected += [m.token_fim_suf, *tokens(m, suffix), m.token_fim_mid]
    sampling = {"seed": 7, "temperature": 0.8}
    truth = fim_reference.complete(expected, max_tokens=8, **sampling)
    body = {"input_prefix": prefix, "input_suffix": suffix, "input_extra": extra, "prompt": prompt}
    body.update(n_predict=8, **sampling)

    fim_llm._engine.reset()  # a fresh evaluation, as the reference's
    got = post(fim_served, "/infill", body).json()
    assert fim_llm._engine.tokens(0)[: len(expected)] == expected
    assert got["content"] == truth["choices"][0]["text"] and got["stop"] is True
    assert got["tokens_evaluated"] == len(expected) == truth["usage"]["prompt_tokens"]
    assert got["tokens_predicted"] == truth["usage"]["completion_tokens"]
    assert got["prompt"] == fim_reference.detokenize(expected, special=True)
    assert got["model"] == "tiny-coder" and got["truncated"] is False
    assert got["has_new_line"] == ("\n" in got["content"])
    timings = got["timings"]
    assert (timings["cache_n"], timings["prompt_n"]) == (0, len(expected))
    assert timings["predicted_n"] == got["tokens_predicted"] and timings["prompt_ms"] >= 0

    fim_llm._engine.reset()
    with httpx.stream("POST", fim_served.url + "/infill", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        data = events(response)
    assert all(d["stop"] is False and d["content"] for d in data[:-1]) and data[-1]["stop"] is True
    assert "".join(d["content"] for d in data) == got["content"]
    final = data[-1]
    assert final["content"] == "" and final["tokens_evaluated"] == len(expected)
    assert final["tokens_predicted"] == got["tokens_predicted"] and final["prompt"] == got["prompt"]


def test_infill_cuts_prefix_suffix_and_extra_to_fit(
    fim_served: Running, fim_llm: pyllama.Llama, fim_reference: pyllama.Llama
) -> None:
    """As llama-server: the prefix keeps its last 3 * (n_batch / 4) tokens, the suffix its first
    n_batch / 4 - 2 - len(prompt), the extra context its last n_ctx - n_batch - 2 * n_predict."""
    m = fim_reference.model
    rep, sep = m.token_fim_rep, m.token_fim_sep
    prefix, suffix, prompt, text = "x = 1\n" * 30, "y = 2\n" * 30, "z", "w = 3\n" * 250
    n_predict = 4
    head = [rep, *tokens(m, "myproject\n"), sep, *tokens(m, "lib.py\n"), *tokens(m, text), sep]
    head += tokens(m, "filename\n")
    n_batch = FIM["n_batch"]
    keep = FIM["n_ctx"] - n_batch - 2 * n_predict
    assert len(head) > keep  # the extra context is cut
    middle = tokens(m, prompt, special=True)
    expected = [*head[-keep:], m.token_fim_pre, *tokens(m, prefix)[-(3 * (n_batch // 4)) :], *middle]
    expected += [m.token_fim_suf, *tokens(m, suffix)[: n_batch // 4 - 2 - len(middle)], m.token_fim_mid]
    body = {
        "input_prefix": prefix,
        "input_suffix": suffix,
        "input_extra": [{"filename": "lib.py", "text": text}],
        "prompt": prompt,
        "n_predict": n_predict,
        "temperature": 0,
    }
    fim_llm._engine.reset()
    got = post(fim_served, "/infill", body).json()
    assert got["tokens_evaluated"] == len(expected)
    assert fim_llm._engine.tokens(0)[: len(expected)] == expected
    truth = fim_reference.complete(expected, max_tokens=n_predict, temperature=0)
    assert got["content"] == truth["choices"][0]["text"]
    # token ids mixed with text in the prefix and suffix, as llama-server's tokenize_mixed takes them
    mixed = {"input_prefix": ["def f(", 7, "):\n"], "input_suffix": [12], "n_predict": 1, "temperature": 0}
    got = post(fim_served, "/infill", mixed).json()
    want = [rep, *tokens(m, "myproject\n"), sep, *tokens(m, "filename\n"), m.token_fim_pre]
    want += [*tokens(m, "def f("), 7, *tokens(m, "):\n"), m.token_fim_suf, 12, m.token_fim_mid]
    assert got["tokens_evaluated"] == len(want) and fim_llm._engine.tokens(0)[: len(want)] == want


def test_infill_without_repo_tokens_and_spm(coder_path: Path) -> None:
    """A vocabulary without FIM_REP and FIM_SEP: each extra chunk after a snippet line, no repository
    header; with spm_infill the suffix comes first."""
    with pyllama.Llama(coder_path, **FIM) as llm:
        m = llm.model
        assert m.token_fim_rep is None and m.token_fim_sep is None
        running = Running(create_app(llm, spm_infill=True))
        try:
            body = {
                "input_prefix": "a = 1\n",
                "input_suffix": "b = 2\n",
                "input_extra": [{"filename": "ignored.py", "text": "c = 3\n"}],
                "n_predict": 2,
                "temperature": 0,
            }
            got = post(running, "/infill", body).json()
            expected = [*tokens(m, "\n\n--- snippet ---\n\n"), *tokens(m, "c = 3\n")]
            expected += [m.token_fim_suf, *tokens(m, "b = 2\n"), m.token_fim_pre, *tokens(m, "a = 1\n")]
            expected += [m.token_fim_mid]
            assert got["tokens_evaluated"] == len(expected)
            assert llm._engine.tokens(0)[: len(expected)] == expected
        finally:
            running.stop()


def test_infill_errors(fim_served: Running, served: Running) -> None:
    error = assert_error(post(served, "/infill", {"input_prefix": "a", "input_suffix": "b"}), 501)
    assert error["type"] == "not_supported_error"  # a vocabulary without FIM tokens, as llama-server
    assert_error(post(fim_served, "/infill", {"input_suffix": "b"}), 400, "input_prefix")
    assert_error(post(fim_served, "/infill", {"input_prefix": "a"}), 400, "input_suffix")
    assert_error(post(fim_served, "/infill", {"input_prefix": "a", "input_suffix": "b", "prompt": 3}), 400, "prompt")
    bad_extra = {"input_prefix": "a", "input_suffix": "b", "input_extra": [{"filename": "x"}]}
    assert_error(post(fim_served, "/infill", bad_extra), 400, "input_extra[0].text")
    bad_extra = {"input_prefix": "a", "input_suffix": "b", "input_extra": {"text": "x"}}
    assert_error(post(fim_served, "/infill", bad_extra), 400, "input_extra")
    too_long = {"input_prefix": "a", "input_suffix": "b", "n_predict": 5000}
    assert assert_error(post(fim_served, "/infill", too_long), 400, "n_predict")["code"] == "context_length_exceeded"
    for field, bad in (("temperature", "hot"), ("n_predict", 0), ("n_probs", 3)):
        assert_error(post(fim_served, "/infill", {"input_prefix": "a", "input_suffix": "b", field: bad}), 400, field)


# --- props ---------------------------------------------------------------------------------------


def test_props(served: Running, chat_llm: pyllama.Llama, tiny_chat_model_path: Path, rr_served: Running) -> None:
    props = httpx.get(served.url + "/props", headers=AUTH).json()
    m = chat_llm.model
    assert props["total_slots"] == chat_llm.n_parallel == 1
    assert props["default_generation_settings"]["n_ctx"] == chat_llm.n_ctx_seq() == 4096
    assert props["default_generation_settings"]["params"]["seed"] == 0  # the Llama's seed
    assert props["model_alias"] == "tiny" and props["model_path"] == str(tiny_chat_model_path)
    assert props["chat_template"] == chat_llm.chat_template.source
    assert props["chat_template"].strip() == m.get_chat_template().strip()
    assert props["chat_template_caps"] == chat_llm.chat_template.caps and props["chat_template_caps"]["supports_tools"]
    assert props["bos_token"] == m.token_to_piece(m.token_bos, special=True).decode()
    assert props["eos_token"] == m.token_to_piece(m.token_eos, special=True).decode() == "<|endoftext|>"
    assert props["modalities"] == {"vision": False, "video": False, "audio": False}
    assert props["endpoint_metrics"] is True and props["endpoint_slots"] is True and props["endpoint_props"] is False
    assert pyllama._core.LLAMA_CPP_COMMIT in props["build_info"]
    rr = httpx.get(rr_served.url + "/props").json()
    assert rr["endpoint_metrics"] is False and rr["default_generation_settings"]["params"]["seed"] == 0xFFFFFFFF
    error = assert_error(post(served, "/props", {"n_ctx": 1}), 501)  # llama-server's answer without --props
    assert error["type"] == "not_supported_error"


# --- token counting ------------------------------------------------------------------------------


def test_chat_input_tokens_equal_the_replys_prompt_tokens(served: Running) -> None:
    prefill = [*MESSAGES, {"role": "assistant", "content": "Blue, because"}]
    for extra in ({}, {"tools": [PICK], "tool_choice": "auto"}, {"messages": prefill}, {"reasoning_effort": "low"}):
        body = {"messages": MESSAGES, **extra}
        counted = post(served, "/v1/chat/completions/input_tokens", body).json()
        assert counted["object"] == "response.input_tokens"
        reply = post(served, "/v1/chat/completions", {**body, "max_tokens": 1}).json()
        assert counted["input_tokens"] == reply["usage"]["prompt_tokens"], extra
    with_tools = post(served, "/v1/chat/completions/input_tokens", {"messages": MESSAGES, "tools": [PICK]}).json()
    plain = post(served, "/v1/chat/completions/input_tokens", {"messages": MESSAGES}).json()
    assert with_tools["input_tokens"] > plain["input_tokens"]  # the tools are in the prompt
    assert_error(post(served, "/v1/chat/completions/input_tokens", {"messages": []}), 400, "messages")
    assert_error(post(served, "/v1/chat/completions/input_tokens", {"messages": "hi"}), 400, "messages")


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_count_requests_and_tokens(served: Running) -> None:
    """The token counters grow by the usage of each generation (prompt tokens split into evaluated and
    cached), the request counter by one per request under its endpoint and status."""
    chat = {"messages": [{"role": "user", "content": "Count my tokens, please."}], "max_tokens": 4}
    before = scrape(served)
    first = post(served, "/v1/chat/completions", chat).json()["usage"]
    again = post(served, "/v1/chat/completions", chat).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] > 0  # a prefix-cache hit
    with httpx.stream(
        "POST",
        served.url + "/v1/completions",
        json={"prompt": "Once upon a time", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}},
        headers=AUTH,
        timeout=60,
    ) as response:
        streamed = [json.loads(e[len("data: ") :]) for e in response.read().decode().split("\n\n")[:-2]][-1]["usage"]
    message = post(served, "/v1/messages", {"model": "x", "max_tokens": 3, "messages": MESSAGES}).json()["usage"]
    response = post(served, "/v1/responses", {"input": "Say hi.", "max_output_tokens": 3}).json()["usage"]
    assert_error(post(served, "/v1/chat/completions", {**chat, "temperature": "hot"}), 400, "temperature")
    assert_error(post(served, "/v1/chat/completions", chat, key="sk-wrong"), 401)
    assert httpx.get(served.url + "/no/such/path", headers=AUTH).status_code == 404
    after = scrape(served)

    prompts = [first, again, streamed]
    n_prompt = sum(u["prompt_tokens"] for u in prompts)
    n_prompt += message["input_tokens"] + message["cache_read_input_tokens"] + response["input_tokens"]
    n_cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in prompts)
    n_cached += message["cache_read_input_tokens"] + response["input_tokens_details"]["cached_tokens"]
    n_generated = sum(u["completion_tokens"] for u in prompts) + message["output_tokens"]
    n_generated += response["output_tokens"]
    assert grew(before, after, "llamacpp:prompt_tokens_total") + grew(
        before, after, "llamacpp:prompt_tokens_cached_total"
    ) == pytest.approx(n_prompt)
    assert grew(before, after, "llamacpp:prompt_tokens_cached_total") == n_cached
    assert grew(before, after, "llamacpp:tokens_predicted_total") == n_generated
    assert grew(before, after, "pyllama_generations_total") == 5
    assert value(after, "llamacpp:n_tokens_max") >= max(u["total_tokens"] for u in prompts)
    requests = {
        ("/v1/chat/completions", "200"): 2,
        ("/v1/completions", "200"): 1,
        ("/v1/messages", "200"): 1,
        ("/v1/responses", "200"): 1,
        ("/v1/chat/completions", "400"): 1,
        ("/v1/chat/completions", "401"): 1,  # answered by the key check, before the route
        ("unmatched", "404"): 1,
        ("/metrics", "200"): 1,  # the first scrape
    }
    for (endpoint, status), n in requests.items():
        assert grew(before, after, "pyllama_requests_total", endpoint=endpoint, status=status) == n, endpoint
    assert grew(before, after, "pyllama_request_duration_seconds_count", endpoint="/v1/chat/completions") == 4


def test_metrics_timings_are_llama_cpps_counters(served: Running, chat_llm: pyllama.Llama) -> None:
    """The time counters are llama.cpp's own (since the app was made); the throughput gauges are the
    tokens over the time of the window since the last scrape."""

    def counts(perf: dict[str, float]) -> tuple[float, int, float, int]:
        # llama.cpp reports a count of at least 1: no time means nothing was evaluated
        t_p, t_e = perf["t_p_eval_ms"], perf["t_eval_ms"]
        return t_p, int(perf["n_p_eval"]) if t_p > 0 else 0, t_e, int(perf["n_eval"]) if t_e > 0 else 0

    first = scrape(served)
    a = counts(chat_llm.context.perf())
    post(served, "/v1/chat/completions", {"messages": [{"role": "user", "content": "A new prompt."}], "max_tokens": 5})
    b = counts(chat_llm.context.perf())
    second = scrape(served)
    perf0 = served.perf0  # type: ignore[attr-defined]
    assert value(second, "llamacpp:prompt_seconds_total") == pytest.approx((b[0] - perf0["t_p_eval_ms"]) / 1e3)
    assert value(second, "llamacpp:tokens_predicted_seconds_total") == pytest.approx((b[2] - perf0["t_eval_ms"]) / 1e3)
    assert grew(first, second, "llamacpp:prompt_seconds_total") > 0
    assert grew(first, second, "llamacpp:tokens_predicted_seconds_total") > 0
    prompt_rate = (b[1] - a[1]) / ((b[0] - a[0]) / 1e3)
    eval_rate = (b[3] - a[3]) / ((b[2] - a[2]) / 1e3)
    assert value(second, "llamacpp:prompt_tokens_seconds") == pytest.approx(prompt_rate)
    assert value(second, "llamacpp:predicted_tokens_seconds") == pytest.approx(eval_rate)
    assert value(scrape(served), "llamacpp:prompt_tokens_seconds") == 0  # nothing evaluated since


def test_metrics_slots_queue_and_kv(served: Running, chat_llm: pyllama.Llama) -> None:
    """requests_processing and requests_deferred while a stream holds the one slot and another request
    waits; the KV tokens each slot holds."""
    long = {"prompt": "Hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=long, headers=AUTH, timeout=60) as holder:
        lines = holder.iter_lines()  # kept: a dropped iterator would close the response
        next(lines)  # it holds the slot
        held = scrape(served)
        assert value(held, "llamacpp:requests_processing") == 1 and value(held, "llamacpp:requests_deferred") == 0
        waiter = threading.Thread(
            target=lambda: post(served, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}), daemon=True
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while httpx.get(served.url + "/health").json()["requests_queued"] < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.02)
        queued = scrape(served)
        assert value(queued, "llamacpp:requests_deferred") == 1 and value(queued, "llamacpp:requests_processing") == 1
    waiter.join(timeout=30)
    done = scrape(served)
    assert value(done, "llamacpp:requests_processing") == 0 and value(done, "llamacpp:requests_deferred") == 0
    assert value(done, "pyllama_kv_tokens", slot="0") == len(chat_llm._engine.tokens(0)) > 0
    assert value(done, "pyllama_kv_tokens_per_slot") == chat_llm.n_ctx_seq()
    assert value(done, "pyllama_slots") == 1


def test_each_app_counts_its_own(served: Running, fim_served: Running) -> None:
    """Two apps with metrics in one process: each counts in its own registry."""
    chat_before, fim_before = scrape(served), scrape(fim_served)
    got = post(fim_served, "/infill", {"input_prefix": "a = ", "input_suffix": "\n", "n_predict": 2}).json()
    chat_after, fim_after = scrape(served), scrape(fim_served)
    evaluated = got["timings"]["prompt_n"]
    assert grew(fim_before, fim_after, "llamacpp:prompt_tokens_total") == evaluated
    assert grew(fim_before, fim_after, "llamacpp:tokens_predicted_total") == got["tokens_predicted"]
    assert grew(fim_before, fim_after, "pyllama_requests_total", endpoint="/infill", status="200") == 1
    assert grew(chat_before, chat_after, "llamacpp:prompt_tokens_total") == 0
    assert grew(chat_before, chat_after, "pyllama_requests_total", endpoint="/infill", status="200") == 0


def test_metrics_need_the_option(rr_served: Running) -> None:
    error = assert_error(httpx.get(rr_served.url + "/metrics"), 501)  # llama-server's answer without --metrics
    assert error["type"] == "not_supported_error" and "--metrics" in error["message"]
