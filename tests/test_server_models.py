"""A server of several models (llama-server's router mode), run for real on 127.0.0.1: each request is
answered by the model it names, as a local Llama over that file answers it; models load on first use,
at most models_max at once, the least recently used idle one unloaded first; /v1/models, /models/load,
/models/unload; the command line's --models-dir and --config."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import pyllama

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from pyllama import cli  # noqa: E402
from pyllama.server import ModelSpec, create_router  # noqa: E402
from test_server import Running  # noqa: E402

from conftest import free_port  # noqa: E402
from tiny_models import (  # noqa: E402
    template_text,
    write_tiny_llama,
    write_tiny_lora,
    write_tiny_mmproj_vision,
    write_tiny_reranker,
)

KEY = "sk-router"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Name a colour."}]
CHATS = ("alpha", "beta", "gamma")  # three chat models with the same vocabulary, different weights


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alpha, beta and gamma (random llamas, seeds 1, 2, 3, with Qwen 2.5's template) and a BERT reranker,
    whose vocabulary differs from theirs."""
    root = tmp_path_factory.mktemp("router")
    template = template_text("Qwen-Qwen2.5-7B-Instruct")
    for seed, name in enumerate(CHATS, start=1):
        write_tiny_llama(root / f"{name}.gguf", chat_template=template, seed=seed, name=name)
    write_tiny_reranker(root / "ranker.gguf")
    write_tiny_lora(root / "adapter.lora", seed=4)  # not a .gguf: no model of the directory
    return root


@pytest.fixture(scope="module")
def refs(models_dir: Path) -> Iterator[dict[str, pyllama.Llama]]:
    """An independent Llama over each file: what a request for that model must be answered."""
    llms = {name: pyllama.Llama(models_dir / f"{name}.gguf", n_ctx=512, n_threads=1) for name in (*CHATS, "ranker")}
    yield llms
    for llm in llms.values():
        llm.close()


def spec(models_dir: Path, name: str, **options: Any) -> ModelSpec:
    aliases = options.pop("aliases", ())
    return ModelSpec(
        name, models_dir / f"{name}.gguf", aliases=aliases, options={"n_ctx": 512, "n_threads": 1, **options}
    )


@pytest.fixture(scope="module")
def served(models_dir: Path) -> Iterator[Running]:
    """Every model, no limit on how many are loaded, an API key; beta has a LoRA adapter at scale 0."""
    models = [
        spec(models_dir, "alpha", aliases=("first", "a")),
        spec(models_dir, "beta", n_ctx=1024, lora=[(str(models_dir / "adapter.lora"), 0.0)]),
        spec(models_dir, "gamma"),
        spec(models_dir, "ranker"),
    ]
    running = Running(create_router(models, models_max=0, api_key=KEY, metrics=True))
    yield running
    running.stop()


@pytest.fixture
def router(models_dir: Path) -> Iterator[Any]:
    """A fresh router of the three chat models (no key): ``router(models_max=..., **options)``."""
    started: list[Running] = []

    def start(models_max: int, **kwargs: Any) -> Running:
        options = kwargs.pop("options", {})
        models = [spec(models_dir, name, **options.get(name, {})) for name in CHATS]
        running = Running(create_router(models, models_max=models_max, **kwargs))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


# --- helpers -----------------------------------------------------------------------------------


def post(running: Running, path: str, body: Any, headers: dict[str, str] | None = AUTH) -> httpx.Response:
    return httpx.post(running.url + path, json=body, headers=headers, timeout=60)


def get(running: Running, path: str, headers: dict[str, str] | None = AUTH) -> httpx.Response:
    return httpx.get(running.url + path, headers=headers, timeout=60)


def states(running: Running, headers: dict[str, str] | None = AUTH) -> dict[str, str]:
    listed = get(running, "/v1/models", headers).json()
    assert listed["object"] == "list"
    return {m["id"]: m["status"]["value"] for m in listed["data"]}


def openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


def chat_text(llm: pyllama.Llama, **kwargs: Any) -> str:
    reply = llm.chat(MESSAGES, **kwargs)
    assert isinstance(reply, dict)
    return str(reply["choices"][0]["message"]["content"])


def greedy(refs: dict[str, pyllama.Llama], name: str) -> str:
    """What ``ask`` must be answered: the greedy reply of a local Llama over the model's file."""
    return chat_text(refs[name], max_tokens=8, temperature=0)


def said(running: Running, model: str) -> str:
    return str(ask(running, model)["choices"][0]["message"]["content"])


def ask(running: Running, model: str, max_tokens: int = 8) -> dict[str, Any]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    response = post(running, "/v1/chat/completions", body, None)
    assert response.status_code == 200, response.text
    return dict(response.json())


def scrape(running: Running, model: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = get(running, f"/metrics?model={model}").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


# --- each request goes to the model it names -------------------------------------------------------


def test_each_request_is_answered_by_the_model_it_names(served: Running, refs: dict[str, pyllama.Llama]) -> None:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    replies = {}
    for name in CHATS:
        reply = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0)
        assert reply.model == name
        assert reply.choices[0].message.content == chat_text(refs[name], max_tokens=8, temperature=0)
        replies[name] = reply.choices[0].message.content
    assert len(set(replies.values())) == 3  # three models, three answers: the routing is seen

    sampled = client.chat.completions.create(model="gamma", messages=MESSAGES, max_tokens=8, temperature=1, seed=7)
    assert sampled.choices[0].message.content == chat_text(refs["gamma"], max_tokens=8, temperature=1, seed=7)
    chunks = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == replies["beta"]

    for name in ("alpha", "beta"):
        done = client.completions.create(model=name, prompt="Once upon a time", max_tokens=8, temperature=0)
        expected = refs[name].complete("Once upon a time", max_tokens=8, temperature=0)
        assert isinstance(expected, dict)
        assert done.model == name and done.choices[0].text == expected["choices"][0]["text"]
        vectors = client.embeddings.create(model=name, input=["hello world"])
        np.testing.assert_allclose(
            vectors.data[0].embedding, refs[name].embed(["hello world"])[0], rtol=1e-5, atol=1e-6
        )


def test_other_apis_go_to_the_model_they_name(served: Running, refs: dict[str, pyllama.Llama]) -> None:
    """Responses and Anthropic's Messages take the model from their body too; a stored response is found
    without naming its model."""
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    for name in ("gamma", "alpha"):
        response = client.responses.create(model=name, input=MESSAGES[0]["content"], max_output_tokens=8, temperature=0)
        assert response.model == name
        assert response.output_text == chat_text(refs[name], max_tokens=8, temperature=0)
        assert client.responses.retrieve(response.id).output_text == response.output_text  # no model named
    assert httpx.get(served.url + f"/v1/responses/{response.id}?model=gamma", headers=AUTH).status_code == 404
    deleted = httpx.delete(served.url + f"/v1/responses/{response.id}", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    openai_error(httpx.get(served.url + f"/v1/responses/{response.id}", headers=AUTH), 404)

    claude = anthropic.Anthropic(base_url=served.url, api_key=KEY, max_retries=0, timeout=60)
    message = claude.messages.create(model="beta", max_tokens=8, messages=MESSAGES, extra_body={"seed": 3})
    assert message.model == "beta"
    assert message.content[0].text == chat_text(refs["beta"], max_tokens=8, seed=3)


def test_llama_servers_endpoints_work_per_model(served: Running, refs: dict[str, pyllama.Llama]) -> None:
    text = "Hello, world: a router."
    for name in ("alpha", "ranker"):  # two vocabularies
        tokens = post(served, "/tokenize", {"model": name, "content": text}).json()["tokens"]
        assert tokens == refs[name].tokenize(text, False, True)
        back = post(served, "/detokenize", {"model": name, "tokens": tokens}).json()["content"]
        assert back == refs[name].detokenize(tokens, True)
    assert refs["alpha"].tokenize(text, False, True) != refs["ranker"].tokenize(text, False, True)

    docs = ["a red apple", "the blue sea", "green grass"]
    ranked = post(served, "/v1/rerank", {"model": "ranker", "query": "colours", "documents": docs}).json()
    expected = refs["ranker"].rerank("colours", docs)
    assert ranked["model"] == "ranker"
    assert [r["index"] for r in ranked["results"]] == [r["index"] for r in expected["results"]]
    np.testing.assert_allclose(
        [r["relevance_score"] for r in ranked["results"]],
        [r["relevance_score"] for r in expected["results"]],
        rtol=1e-6,
    )
    openai_error(post(served, "/v1/rerank", {"model": "alpha", "query": "q", "documents": docs}), 501)

    for name, n_ctx in (("alpha", 512), ("beta", 1024)):
        props = get(served, f"/props?model={name}").json()
        assert props["model_alias"] == name and props["default_generation_settings"]["n_ctx"] == n_ctx
        assert props["model_path"] == str(Path(refs[name].model_path))
        slots = get(served, f"/slots?model={name}").json()
        assert [s["n_ctx"] for s in slots] == [n_ctx]
    adapters = get(served, "/lora-adapters?model=beta").json()
    assert [(Path(a["path"]).name, a["scale"]) for a in adapters] == [("adapter.lora", 0.0)]
    assert get(served, "/lora-adapters?model=alpha").json() == []
    router = get(served, "/props").json()  # no model: the router's own, as llama-server's
    assert router["role"] == "router" and router["max_instances"] == 0


def test_metrics_count_each_models_own_requests(served: Running) -> None:
    pytest.importorskip("prometheus_client")
    before = {name: scrape(served, name) for name in ("alpha", "gamma")}
    reply = post(served, "/v1/chat/completions", {"model": "gamma", "messages": MESSAGES, "max_tokens": 6}).json()
    usage = reply["usage"]
    after = {name: scrape(served, name) for name in ("alpha", "gamma")}
    predicted = "llamacpp:tokens_predicted_total"
    assert after["gamma"][predicted] - before["gamma"][predicted] == usage["completion_tokens"] > 0
    assert after["alpha"][predicted] == before["alpha"][predicted]
    openai_error(get(served, "/metrics"), 400, "missing_required_parameter")


# --- names -----------------------------------------------------------------------------------------


def test_aliases_pick_their_model(served: Running, refs: dict[str, pyllama.Llama]) -> None:
    expected = chat_text(refs["alpha"], max_tokens=8, temperature=0)
    for name in ("first", "a"):
        body = {"model": name, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
        reply = post(served, "/v1/chat/completions", body).json()
        assert reply["model"] == "alpha" and reply["choices"][0]["message"]["content"] == expected
    card = get(served, "/v1/models/first").json()
    assert card["id"] == "alpha" and card["aliases"] == ["first", "a"]


def test_an_unknown_model_is_404_in_the_apis_shape(served: Running) -> None:
    body = {"model": "nope", "messages": MESSAGES, "max_tokens": 4}
    error = openai_error(post(served, "/v1/chat/completions", body), 404, "model_not_found")
    assert error["param"] == "model" and "nope" in error["message"]
    openai_error(get(served, "/props?model=nope"), 404, "model_not_found")
    openai_error(get(served, "/v1/models/nope"), 404, "model_not_found")
    openai_error(post(served, "/models/load", {"model": "nope"}), 404, "model_not_found")

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    claude = anthropic.Anthropic(base_url=served.url, api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nope", max_tokens=4, messages=MESSAGES)
    raw = post(served, "/v1/messages", {"model": "nope", "max_tokens": 4, "messages": MESSAGES})
    assert raw.status_code == 404 and raw.json()["type"] == "error"
    assert raw.json()["error"]["type"] == "not_found_error" and "nope" in raw.json()["error"]["message"]


def test_a_request_without_a_model_is_400_when_there_are_several(served: Running) -> None:
    error = openai_error(
        post(served, "/v1/chat/completions", {"messages": MESSAGES}), 400, "missing_required_parameter"
    )
    assert error["param"] == "model" and "'alpha'" in error["message"]
    openai_error(get(served, "/slots"), 400, "missing_required_parameter")
    raw = post(served, "/v1/messages", {"max_tokens": 4, "messages": MESSAGES})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


def test_the_key_and_the_size_are_checked_once_before_any_model(served: Running) -> None:
    before = states(served)
    body = {"model": "alpha", "messages": MESSAGES, "max_tokens": 4}
    openai_error(post(served, "/v1/chat/completions", body, None), 401, "invalid_api_key")
    openai_error(get(served, "/v1/models", {"Authorization": "Bearer sk-wrong"}), 401, "invalid_api_key")
    raw = post(served, "/v1/messages", {**body, "max_tokens": 4}, {"x-api-key": "sk-wrong"})
    assert raw.status_code == 401 and raw.json()["error"]["type"] == "authentication_error"
    huge = {"model": "alpha", "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    openai_error(post(served, "/v1/chat/completions", huge), 413, "request_too_large")
    assert httpx.get(served.url + "/health").json()["status"] == "ok"  # public
    assert states(served) == before


# --- loading and unloading -------------------------------------------------------------------------


def test_models_list_their_state_and_load_and_unload(router: Any, refs: dict[str, pyllama.Llama]) -> None:
    running = router(0, options={"beta": {"n_ctx": 768}})
    listed = get(running, "/models", None).json()["data"]  # llama-server's path, the same list
    assert [m["id"] for m in listed] == list(CHATS)
    assert all(m["status"] == {"value": "unloaded"} and m["object"] == "model" for m in listed)
    assert all(m["architecture"]["input_modalities"] == ["text"] and "meta" not in m for m in listed)

    assert post(running, "/models/load", {"model": "beta"}, None).json() == {"success": True}
    assert states(running, None) == {"alpha": "unloaded", "beta": "loaded", "gamma": "unloaded"}
    card = get(running, "/v1/models/beta", None).json()
    with pyllama.Llama(refs["beta"].model_path, n_ctx=768, n_threads=1) as same:
        assert card["meta"]["n_ctx"] == same.n_ctx()
    openai_error(post(running, "/models/load", {"model": "beta"}, None), 400)  # already loaded
    assert said(running, "beta") == greedy(refs, "beta")

    assert post(running, "/models/unload", {"model": "beta"}, None).json() == {"success": True}
    assert states(running, None) == {"alpha": "unloaded", "beta": "unloaded", "gamma": "unloaded"}
    openai_error(post(running, "/models/unload", {"model": "beta"}, None), 400, "model_not_loaded")
    openai_error(post(running, "/models/unload", {}, None), 400, "missing_required_parameter")
    openai_error(post(running, "/models/unload", {"model": "nope"}, None), 404, "model_not_found")
    assert said(running, "beta") == greedy(refs, "beta")
    assert states(running, None)["beta"] == "loaded"  # loaded again by the request


def test_models_max_unloads_the_least_recently_used(router: Any, refs: dict[str, pyllama.Llama]) -> None:
    running = router(2)
    expected = {name: chat_text(refs[name], max_tokens=8, temperature=0) for name in CHATS}

    def answer(name: str) -> None:
        assert ask(running, name)["choices"][0]["message"]["content"] == expected[name]

    answer("alpha")
    answer("beta")
    answer("alpha")  # alpha used last: beta is the least recently used
    assert states(running, None) == {"alpha": "loaded", "beta": "loaded", "gamma": "unloaded"}
    answer("gamma")
    assert states(running, None) == {"alpha": "loaded", "beta": "unloaded", "gamma": "loaded"}
    answer("beta")  # loaded again; alpha is now the least recently used
    assert states(running, None) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loaded"}
    get(running, "/props?model=gamma", None)  # a GET keeps no model in use (llama-server's rule)
    answer("alpha")
    assert states(running, None) == {"alpha": "loaded", "beta": "loaded", "gamma": "unloaded"}


def test_models_max_1_swaps_the_model(router: Any, refs: dict[str, pyllama.Llama]) -> None:
    running = router(1)
    for name in ("alpha", "beta", "alpha"):
        assert said(running, name) == greedy(refs, name)
        assert states(running, None) == {n: "loaded" if n == name else "unloaded" for n in CHATS}
    # the router's properties name the limit
    assert get(running, "/props", None).json()["max_instances"] == 1


def test_requests_that_come_together_load_the_model_once(
    router: Any, refs: dict[str, pyllama.Llama], caplog: pytest.LogCaptureFixture
) -> None:
    running = router(1)
    caplog.set_level(logging.INFO, logger="pyllama.server.models")
    expected = chat_text(refs["gamma"], max_tokens=8, temperature=0)
    barrier = threading.Barrier(4)
    answers: list[str] = []

    def one() -> None:
        barrier.wait()
        answers.append(ask(running, "gamma")["choices"][0]["message"]["content"])

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers == [expected] * 4
    loads = [r for r in caplog.records if r.getMessage().startswith("loading model 'gamma' from")]
    assert len(loads) == 1


def test_a_busy_model_is_not_unloaded(router: Any, refs: dict[str, pyllama.Llama]) -> None:
    """With models_max 1, a request for beta waits while alpha streams, and goes once alpha's stream ends;
    alpha's stream is never cut."""
    running = router(1, options={"alpha": {"n_ctx": 16384}})
    body = {"model": "alpha", "prompt": "Once", "max_tokens": 16000, "ignore_eos": True, "stream": True}
    result: dict[str, Any] = {}

    def beta() -> None:
        result["reply"] = ask(running, "beta")
        result["at"] = time.monotonic()

    with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first
        waiter = threading.Thread(target=beta)
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # beta waits: alpha has a request in flight
        assert states(running, None) == {"alpha": "loaded", "beta": "unloaded", "gamma": "unloaded"}
        more = [line for _, line in zip(range(20), (x for x in lines if x.startswith("data: ")), strict=False)]
        assert len(more) == 20 and all(line != "data: [DONE]" for line in more)  # still streaming
        ended = time.monotonic()
    waiter.join(timeout=60)
    assert result["at"] >= ended
    assert result["reply"]["choices"][0]["message"]["content"] == greedy(refs, "beta")
    assert states(running, None) == {"alpha": "unloaded", "beta": "loaded", "gamma": "unloaded"}


def test_a_model_that_fails_to_load_is_listed_as_failed(models_dir: Path, refs: dict[str, pyllama.Llama]) -> None:
    broken = models_dir / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))  # a header that no loader takes
    models = [spec(models_dir, "alpha"), spec(models_dir, "broken")]
    running = Running(create_router(models, models_max=0))
    try:
        body = {"model": "broken", "messages": MESSAGES, "max_tokens": 4}
        error = openai_error(post(running, "/v1/chat/completions", body, None), 500, "model_load_failed")
        assert error["type"] == "server_error" and "'broken'" in error["message"]
        raw = post(running, "/v1/messages", body, None)  # a second try, in Anthropic's shape
        assert raw.status_code == 500 and raw.json()["error"]["type"] == "api_error"
        listed = {m["id"]: m["status"] for m in get(running, "/v1/models", None).json()["data"]}
        assert listed["broken"]["value"] == "unloaded" and listed["broken"]["failed"] is True
        assert listed["broken"]["error"] and listed["alpha"] == {"value": "unloaded"}
        openai_error(post(running, "/models/load", {"model": "broken"}, None), 500, "model_load_failed")
        assert said(running, "alpha") == greedy(refs, "alpha")
    finally:
        running.stop()
        broken.unlink()


def test_without_autoload_a_model_must_be_loaded_first(router: Any) -> None:
    running = router(0, autoload=False)
    openai_error(post(running, "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES}, None), 400)
    assert states(running, None)["alpha"] == "unloaded"
    ok = httpx.post(running.url + "/tokenize?autoload=true", json={"model": "alpha", "content": "hi"}, timeout=60)
    assert ok.status_code == 200 and states(running, None)["alpha"] == "loaded"


def test_a_single_model_needs_no_name(models_dir: Path, refs: dict[str, pyllama.Llama]) -> None:
    running = Running(create_router([spec(models_dir, "gamma")]))
    try:
        body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
        reply = post(running, "/v1/chat/completions", body, None).json()
        assert reply["model"] == "gamma" and reply["choices"][0]["message"]["content"] == greedy(refs, "gamma")
        assert get(running, "/props", None).json()["model_alias"] == "gamma"  # the model's own
    finally:
        running.stop()


# --- the command line --------------------------------------------------------------------------------


class Served:
    """``python -m pyllama.server ARGS`` on a free port of 127.0.0.1, logging to a file."""

    def __init__(self, *args: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "pyllama.server", "--port", self.url.rsplit(":", 1)[1], *args]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stop()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def test_config_file_gives_each_model_its_options(
    models_dir: Path, refs: dict[str, pyllama.Llama], tmp_path: Path
) -> None:
    config = tmp_path / "models.toml"
    config.write_text(
        f"""
[defaults]
n-ctx = 768
n_threads = 1

[models.alpha]
path = "{os.path.relpath(models_dir / "alpha.gguf", tmp_path)}"   # relative to this file
aliases = ["first", "a"]

[models.beta]
model = "{models_dir / "beta.gguf"}"
n_ctx = 1280
parallel = 2
load-on-startup = true
""",
        encoding="utf-8",
    )
    served = Served("--config", str(config), "--log-level", "info")
    try:
        deadline = time.monotonic() + 30
        while (listed := {m["id"]: m for m in httpx.get(served.url + "/v1/models").json()["data"]})["beta"]["status"][
            "value"
        ] != "loaded":
            assert time.monotonic() < deadline, listed
            time.sleep(0.1)
        assert listed["alpha"]["status"] == {"value": "unloaded"} and listed["alpha"]["aliases"] == ["first", "a"]
        assert listed["alpha"]["path"] == str(models_dir / "alpha.gguf") and listed["alpha"]["source"] == "config"

        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="first", messages=MESSAGES, max_tokens=8, temperature=0)
        assert reply.model == "alpha"
        assert reply.choices[0].message.content == chat_text(refs["alpha"], max_tokens=8, temperature=0)

        cards = {m.id: m.model_dump() for m in client.models.list().data}
        for name, n_ctx, parallel in (("alpha", 768, 1), ("beta", 1280, 2)):
            with pyllama.Llama(models_dir / f"{name}.gguf", n_ctx=n_ctx, n_threads=1, n_parallel=parallel) as same:
                assert cards[name]["meta"]["n_ctx"] == same.n_ctx()
            assert httpx.get(served.url + f"/props?model={name}").json()["total_slots"] == parallel
    finally:
        log = served.stop()
    assert "loading model 'alpha' from" in log and "loading model 'beta' from" in log


def test_models_dir_serves_every_model_with_its_projector(
    models_dir: Path, refs: dict[str, pyllama.Llama], tmp_path: Path
) -> None:
    root = tmp_path / "models"
    (root / "vis").mkdir(parents=True)
    for name in ("alpha", "beta"):
        os.link(models_dir / f"{name}.gguf", root / f"{name}.gguf")
    os.link(models_dir / "gamma.gguf", root / "vis" / "gamma-q8_0.gguf")
    write_tiny_mmproj_vision(root / "vis" / "mmproj-gamma-f16.gguf")
    os.link(root / "vis" / "mmproj-gamma-f16.gguf", root / "mmproj-stray.gguf")  # a companion, no model
    (root / "notes.txt").write_text("not a model")
    served = Served("--models-dir", str(root), "--n-ctx", "512", "--n-threads", "1", "--models-max", "1")
    try:
        listed = {m["id"]: m for m in httpx.get(served.url + "/v1/models").json()["data"]}
        assert list(listed) == ["alpha", "beta", "vis"]
        assert all(m["source"] == "models_dir" and m["status"] == {"value": "unloaded"} for m in listed.values())
        assert listed["vis"]["architecture"]["input_modalities"] == ["text", "image"]
        assert listed["vis"]["path"] == str(root / "vis" / "gamma-q8_0.gguf")
        assert listed["alpha"]["architecture"]["input_modalities"] == ["text"]
        for name, ref in (("beta", "beta"), ("vis", "gamma")):
            body = {"model": name, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
            reply = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60).json()
            assert reply["choices"][0]["message"]["content"] == chat_text(refs[ref], max_tokens=8, temperature=0)
        vis = httpx.get(served.url + "/v1/models/vis").json()
        assert vis["status"] == {"value": "loaded"} and vis["capabilities"] == ["completion", "multimodal"]
        assert httpx.get(served.url + "/v1/models/beta").json()["status"] == {"value": "unloaded"}  # models_max 1
    finally:
        served.stop()


def serve_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """What ``pyllama serve ARGV`` says when it refuses to start."""
    try:
        status = cli.main(["serve", *argv])
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    assert status != 0
    return capsys.readouterr().err


def test_the_command_line_refuses_what_it_cannot_serve(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alpha = str(models_dir / "alpha.gguf")
    assert "not both" in serve_error(capsys, alpha, "--models-dir", str(models_dir))
    assert "--alias" in serve_error(capsys, "--models-dir", str(models_dir), "--alias", "x")
    assert "go with several models" in serve_error(capsys, alpha, "--models-max", "2")
    assert "--models-max must be >= 0" in serve_error(capsys, "--models-dir", str(models_dir), "--models-max", "-1")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no model in" in serve_error(capsys, "--models-dir", str(empty))
    config = tmp_path / "bad.toml"
    cases = {
        f'[models.a]\npath = "{alpha}"\nn-cxt = 512\n': "[models.a]: unknown option 'n_cxt'",
        f'[models.a]\npath = "{alpha}"\nn_ctx = "many"\n': "invalid int value",
        f'[models.a]\npath = "{alpha}"\nno-mmproj-offload = "yes"\n': "must be true or false",
        f'[models.a]\npath = "{alpha}"\nparallel = 0\n': "[models.a]: --parallel",
        '[models.a]\npath = "missing.gguf"\n': "model file not found",
        "[models.a]\nn_ctx = 512\n": "no path",
        "[defaults]\nn_ctx = 512\n": "no model",
        f'[models.a]\npath = "{alpha}"\n[models.b]\npath = "{alpha}"\naliases = ["a"]\n': "'a' is given twice",
        f'[defaults]\nload-on-startup = true\n[models.a]\npath = "{alpha}"\n[models.b]\npath = "{alpha}"\n': (
            "more than models_max (1)"
        ),
        "[models.a\n": "not a valid TOML file",
    }
    for text, message in cases.items():
        config.write_text(text, encoding="utf-8")
        said = serve_error(capsys, "--config", str(config), "--models-max", "1")
        assert message in said, (text, said)
