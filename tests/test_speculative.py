"""Speculative decoding and predicted outputs: drafts verified by the request's own sampler give what
decoding without drafts gives (the truth: the same model without speculation, in the same run)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pyllama

from tiny_models import write_tiny_llama

NEAR_TIE = 1e-3
PROMPT = "The cat sat on the mat. The dog sat on the log. The cat sat on the"


@pytest.fixture(scope="module")
def base(tiny_model_path: Path) -> Iterator[pyllama.Llama]:
    with pyllama.Llama(tiny_model_path, n_ctx=1024, n_threads=1, seed=1) as llm:
        yield llm


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another random model over the same vocabulary: its drafts are mostly rejected."""
    return write_tiny_llama(tmp_path_factory.mktemp("draft") / "draft.gguf", seed=7, n_layer=1)


def reference(llm: pyllama.Llama, prompt: str, **kwargs: Any) -> tuple[str, int]:
    """The reply without drafts, and how many of its characters come before its first near-tie
    (where the two best tokens' logprobs are within NEAR_TIE: batch shapes may part there)."""
    out = llm.complete(prompt, temperature=0, logprobs=2, speculative=False, **kwargs)
    text = out["choices"][0]["text"]
    lp = out["choices"][0]["logprobs"]
    upto = len(text)
    offset = 0
    for piece, top in zip(lp["tokens"], lp["top_logprobs"], strict=True):
        values = sorted(top.values(), reverse=True)
        if len(values) >= 2 and values[0] - values[1] < NEAR_TIE:
            upto = offset
            break
        offset += len(piece)
    return text, upto


def agree(text: str, truth: tuple[str, int]) -> None:
    expected, upto = truth
    if upto == len(expected):
        assert text == expected
    else:
        assert text[:upto] == expected[:upto]


def drafts(out: dict[str, Any]) -> tuple[int, int]:
    d = out["usage"]["completion_tokens_details"]
    return d["accepted_prediction_tokens"], d["rejected_prediction_tokens"]


@pytest.mark.parametrize("kind", ["ngram-simple", "ngram-map-k", "ngram-mod"])
def test_ngram_types_give_the_plain_output(tiny_model_path: Path, base: pyllama.Llama, kind: str) -> None:
    truth = reference(base, PROMPT, max_tokens=80)
    spec: dict[str, Any] = {"type": kind, "n_max": 8}
    if kind != "ngram-mod":
        spec.update(ngram_size_n=1, ngram_size_m=8)
    with pyllama.Llama(tiny_model_path, n_ctx=1024, n_threads=1, speculative=spec) as llm:
        assert llm.speculative is not None and kind in llm.speculative["types"]
        out = llm.complete(PROMPT, temperature=0, max_tokens=80)
        agree(out["choices"][0]["text"], truth)
        if kind == "ngram-simple":
            accepted, rejected = drafts(out)
            assert accepted + rejected > 0  # it drafted: a random model repeats itself
        off = llm.complete(PROMPT, temperature=0, max_tokens=80, speculative=False)
        assert drafts(off) == (0, 0)
        agree(off["choices"][0]["text"], truth)


def test_prediction_of_the_reply_is_accepted(base: pyllama.Llama) -> None:
    truth = reference(base, PROMPT, max_tokens=60)
    prediction = {"type": "content", "content": truth[0]}
    out = base.complete(PROMPT, temperature=0, max_tokens=60, prediction=prediction)
    agree(out["choices"][0]["text"], truth)
    accepted, _ = drafts(out)
    if truth[1] == len(truth[0]):
        assert accepted >= out["usage"]["completion_tokens"] // 2
    # an edited prediction (its middle replaced): still the plain output
    text = truth[0]
    edited = text[: len(text) // 3] + " something else entirely " + text[2 * len(text) // 3 :]
    out = base.complete(PROMPT, temperature=0, max_tokens=60, prediction={"type": "content", "content": edited})
    agree(out["choices"][0]["text"], truth)
    assert sum(drafts(out)) > 0


def test_prediction_in_chat_and_stream(tiny_chat_model_path: Path) -> None:
    messages = [{"role": "user", "content": "Repeat: one two three four five six seven"}]
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1) as llm:
        plain = llm.chat(messages, temperature=0, max_tokens=40, speculative=False)
        text = plain["choices"][0]["message"]["content"]
        pred = {"type": "content", "content": [{"type": "text", "text": text}]}
        out = llm.chat(messages, temperature=0, max_tokens=40, prediction=pred)
        if _tie_free(llm, messages):
            assert out["choices"][0]["message"]["content"] == text
        chunks = list(llm.chat(messages, temperature=0, max_tokens=40, prediction=pred, stream=True))
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert streamed == out["choices"][0]["message"]["content"]
        assert chunks[-1]["usage"]["completion_tokens_details"] == out["usage"]["completion_tokens_details"]
        assert out["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0


def _tie_free(llm: pyllama.Llama, messages: list[dict[str, Any]]) -> bool:
    out = llm.chat(messages, temperature=0, max_tokens=40, logprobs=True, top_logprobs=2, speculative=False)
    for entry in out["choices"][0]["logprobs"]["content"]:
        top = sorted((t["logprob"] for t in entry["top_logprobs"]), reverse=True)
        if len(top) >= 2 and top[0] - top[1] < NEAR_TIE:
            return False
    return True


def test_draft_model_gives_the_plain_output(tiny_model_path: Path, base: pyllama.Llama, other_draft: Path) -> None:
    truth = reference(base, PROMPT, max_tokens=60)
    # the same model as its own draft: its drafts are accepted; another model's: mostly rejected
    for draft, accepts in ((tiny_model_path, True), (other_draft, False)):
        with pyllama.Llama(
            tiny_model_path, n_ctx=1024, n_threads=1, draft_model=draft, speculative={"n_max": 6}
        ) as llm:
            assert llm.speculative is not None and llm.speculative["draft_model"]
            out = llm.complete(PROMPT, temperature=0, max_tokens=60)
            agree(out["choices"][0]["text"], truth)
            accepted, rejected = drafts(out)
            assert accepted + rejected > 0
            if accepts and truth[1] == len(truth[0]):
                assert accepted > rejected


def test_batched_requests_each_give_their_plain_output(tiny_model_path: Path, base: pyllama.Llama) -> None:
    prompts = [PROMPT, "One two three one two three one two", "a b c d a b c d a b", "Hello hello hello"]
    truths = [reference(base, p, max_tokens=48) for p in prompts]
    spec = {"type": "ngram-simple", "ngram_size_n": 1, "ngram_size_m": 6}
    with pyllama.Llama(tiny_model_path, n_ctx=2048, n_threads=1, n_parallel=4, speculative=spec) as llm:
        outs: list[Any] = [None] * len(prompts)

        def run(i: int) -> None:
            pred = {"type": "content", "content": truths[i][0]} if i % 2 else None
            outs[i] = llm.complete(prompts[i], temperature=0, max_tokens=48, prediction=pred)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for out, truth in zip(outs, truths, strict=True):
            agree(out["choices"][0]["text"], truth)
        assert sum(sum(drafts(o)) for o in outs) > 0


def test_stop_strings_max_tokens_and_grammar_stay_exact(tiny_model_path: Path, base: pyllama.Llama) -> None:
    spec = {"type": "ngram-simple", "ngram_size_n": 1, "ngram_size_m": 8}
    plain_full = base.complete(PROMPT, temperature=0, max_tokens=60, speculative=False)["choices"][0]["text"]
    with pyllama.Llama(tiny_model_path, n_ctx=1024, n_threads=1, speculative=spec) as llm:
        pred = {"type": "content", "content": plain_full}
        for max_tokens in (1, 2, 7, 23):
            plain = base.complete(PROMPT, temperature=0, max_tokens=max_tokens, speculative=False)
            out = llm.complete(PROMPT, temperature=0, max_tokens=max_tokens, prediction=pred)
            assert out["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
            assert out["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
            assert out["choices"][0]["text"] == plain["choices"][0]["text"]
        if len(plain_full) > 12:
            stop = plain_full[8:12]
            plain = base.complete(PROMPT, temperature=0, max_tokens=60, stop=[stop], speculative=False)
            out = llm.complete(PROMPT, temperature=0, max_tokens=60, stop=[stop], prediction=pred)
            assert out["choices"][0]["text"] == plain["choices"][0]["text"]
            assert out["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"] == "stop"
        grammar = 'root ::= ("ab" | "cd" | " ")+'
        plain = base.complete(PROMPT, temperature=0, max_tokens=30, grammar=grammar, speculative=False)
        out = llm.complete(PROMPT, temperature=0, max_tokens=30, grammar=grammar)
        assert out["choices"][0]["text"] == plain["choices"][0]["text"]
        # seeded sampling draws the same tokens with drafts as without
        plain = base.complete(PROMPT, temperature=0.9, seed=5, max_tokens=40, speculative=False)
        out = llm.complete(PROMPT, temperature=0.9, seed=5, max_tokens=40, prediction=pred)
        assert out["choices"][0]["text"] == plain["choices"][0]["text"]


def test_bad_speculative_settings_are_refused(tiny_model_path: Path, base: pyllama.Llama) -> None:
    for bad in ("no-such-type", "draft-mtp", {"type": "ngram-simple", "n_max": 0}, {"type": "x", "bogus": 1}):
        with pytest.raises(pyllama.InvalidRequestError):
            pyllama.Llama(tiny_model_path, n_ctx=256, n_threads=1, speculative=bad)
    with pytest.raises(pyllama.InvalidRequestError):
        pyllama.Llama(tiny_model_path, n_ctx=256, n_threads=1, speculative="draft-simple")  # no draft model
    with pytest.raises(FileNotFoundError):
        pyllama.Llama(tiny_model_path, n_ctx=256, n_threads=1, draft_model="/nonexistent/draft.gguf")
    for bad_pred in ({"type": "text", "content": "x"}, {"type": "content", "content": 3}, "x"):
        with pytest.raises(pyllama.InvalidRequestError):
            base.complete(PROMPT, max_tokens=2, prediction=bad_pred)  # type: ignore[arg-type]
    with pytest.raises(pyllama.InvalidRequestError):
        base.complete(PROMPT, max_tokens=2, speculative="yes")  # type: ignore[arg-type]


def test_server_passes_prediction_through(tiny_chat_model_path: Path) -> None:
    from fastapi.testclient import TestClient

    from pyllama.server import create_app

    messages = [{"role": "user", "content": "Repeat: one two three four five six seven"}]
    body = {"messages": messages, "temperature": 0, "max_tokens": 30}
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1) as llm, TestClient(create_app(llm)) as client:
        plain = client.post("/v1/chat/completions", json={**body, "speculative": False}).json()
        text = plain["choices"][0]["message"]["content"]
        pred = {"type": "content", "content": text}
        out = client.post("/v1/chat/completions", json={**body, "prediction": pred}).json()
        if _tie_free(llm, messages):
            assert out["choices"][0]["message"]["content"] == text
        assert out["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0
        bad = client.post("/v1/chat/completions", json={**body, "prediction": {"type": "x"}})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "prediction"
        bad = client.post("/v1/completions", json={"prompt": "a", "speculative": "yes"})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "speculative"
