"""Llama beyond one call: shared models, prompt reuse measured by llama.cpp's own counters, saved
states and caches, truncation, prefill, fill-in-the-middle, embeddings and threads. Each result is
checked against an independent truth: the template's rendering, a fresh evaluation with the
low-level objects, numpy, or the same request without the feature."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pyllama

from tiny_models import write_tiny_llama

GREEDY: dict[str, Any] = {"temperature": 0.0}


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path: Path) -> Any:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1, seed=3) as llm:
        yield llm


def _turn(n: int, words: int = 12) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"conversation {n}: " + "tell me more " * words}]


# --- shared models --------------------------------------------------------------------------


def test_two_llamas_over_one_file_share_the_model(tiny_model_path: Path) -> None:
    a = pyllama.Llama(tiny_model_path, n_ctx=128, n_threads=1)
    b = pyllama.Llama(tiny_model_path, n_ctx=256, n_threads=1)
    c = pyllama.Llama(tiny_model_path, n_ctx=128, n_threads=1, use_mmap=False)  # other load options
    try:
        assert a.model is b.model
        assert c.model is not a.model
        expected = b.complete("Once upon", max_tokens=6, **GREEDY)["choices"][0]["text"]
        a.close()
        assert not b.model.closed  # b still uses it
        assert b.complete("Once upon", max_tokens=6, **GREEDY)["choices"][0]["text"] == expected
        model = b.model
        b.close()
        assert model.closed  # the last user freed it
        with pytest.raises(pyllama.LlamaError) as closed:
            b.complete("Once upon", max_tokens=2)
        assert not isinstance(closed.value, ValueError)  # a closed object, as a closed Context is
        assert c.complete("Once upon", max_tokens=6, **GREEDY)["choices"][0]["text"] == expected
    finally:
        for x in (a, b, c):
            x.close()


def test_missing_model_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pyllama.Llama(tmp_path / "nope.gguf")


# --- prompt reuse, measured by llama.cpp's performance counters -------------------------------


def test_second_turn_evaluates_only_the_new_tokens(llm: Any) -> None:
    history = [{"role": "system", "content": "You are terse."}, *_turn(1)]
    first = llm.chat(history, max_tokens=8, **GREEDY)
    history += [first["choices"][0]["message"], {"role": "user", "content": "and then?"}]
    llm.context.perf_reset()
    second = llm.chat(history, max_tokens=4, **GREEDY)
    perf = llm.context.perf()
    usage = second["usage"]
    new = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > usage["prompt_tokens"] // 2
    assert perf["n_p_eval"] == new  # llama.cpp decoded the new turn's tokens, not the history


# --- saved states ---------------------------------------------------------------------------


def test_state_round_trip_into_a_new_llama(llm: Any, tiny_chat_model_path: Path, tmp_path: Path) -> None:
    messages = _turn(2)
    llm.chat(messages, max_tokens=4, **GREEDY)
    state = llm.save_state(tmp_path / "turn.state")
    assert state.n_tokens == len(llm._engine.tokens()) > 0
    expected = llm.chat(messages, max_tokens=8, **GREEDY)
    with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1) as fresh:
        fresh.load_state(tmp_path / "turn.state")
        out = fresh.chat(messages, max_tokens=8, **GREEDY)
    assert out["choices"][0]["message"] == expected["choices"][0]["message"]
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == out["usage"]["prompt_tokens"] - 1


def test_state_of_other_settings_is_refused(llm: Any, tiny_chat_model_path: Path) -> None:
    llm.chat(_turn(3), max_tokens=2)
    state = llm.save_state()
    with pyllama.Llama(tiny_chat_model_path, n_ctx=256, n_threads=1) as other:
        with pytest.raises(ValueError, match="another model or context"):
            other.load_state(state)
        # and the other Llama still works
        assert other.complete("Hi", max_tokens=2)["usage"]["completion_tokens"] == 2
    with pytest.raises(ValueError, match="magic"):
        pyllama.LlamaState.from_bytes(b"garbage")


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_cache_serves_alternating_conversations(kind: str, tiny_chat_model_path: Path, tmp_path: Path) -> None:
    """Two conversations alternating on one sequence: with a cache, going back to the first loads its
    state (every prompt token but the last reused, one evaluated), and the reply is the uncached one.
    A RAMCache (the core's host cache) keeps what the sequence gives up; a DiskCache stores each call's
    state in a file, which a new cache over the directory finds after a restart."""

    def make_cache() -> pyllama.StateCache | pyllama.RAMCache:
        return pyllama.RAMCache() if kind == "ram" else pyllama.DiskCache(tmp_path / "states")

    a, b = _turn(4, 30), _turn(5, 30)
    with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1) as plain:
        plain.chat(a, max_tokens=4, **GREEDY)
        plain.chat(b, max_tokens=4, **GREEDY)
        uncached = plain.chat(a, max_tokens=6, **GREEDY)
    cache = make_cache()
    with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1, cache=cache) as llm:
        assert llm.cache is cache
        llm.chat(a, max_tokens=4, **GREEDY)
        llm.chat(b, max_tokens=4, **GREEDY)
        assert len(cache) == (1 if kind == "ram" else 2)  # RAM: a, which the sequence gave up to b
        llm.context.perf_reset()
        cached = llm.chat(a, max_tokens=6, **GREEDY)
        n_p_eval = llm.context.perf()["n_p_eval"]
        assert len(cache) == 2  # RAM: and now b
    usage = cached["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
    assert uncached["usage"]["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"] // 2
    assert n_p_eval == 1  # only the last prompt token, for its logits
    assert cached["choices"][0]["message"] == uncached["choices"][0]["message"]
    if kind == "ram":
        assert isinstance(cache, pyllama.RAMCache)
        assert cache.n_loaded == 1 and len(cache) == 0 and cache.size_bytes == 0  # the Llama closed
    if kind == "disk":  # a restart: a new cache object over the same directory
        with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1, cache=make_cache()) as again:
            out = again.chat(b, max_tokens=4, **GREEDY)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == out["usage"]["prompt_tokens"] - 1


def test_ram_cache_options(tiny_chat_model_path: Path) -> None:
    """cache_ram=N is cache=RAMCache(N); a RAMCache serves every sequence of n_parallel > 1, a
    DiskCache one only; bad values are typed errors."""
    with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1, cache_ram=1 << 20) as llm:
        assert isinstance(llm.cache, pyllama.RAMCache) and llm.cache.capacity_bytes == 1 << 20
        assert llm._engine.host_cache()["budget"] == 1 << 20
        llm.set_cache(None)
        assert llm.cache is None and llm._engine.host_cache()["budget"] == 0
    with pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_threads=1, n_parallel=2, cache=pyllama.RAMCache()) as llm:
        assert llm._engine.host_cache()["budget"] == 2 << 30
    with pytest.raises(pyllama.InvalidRequestError):
        pyllama.Llama(tiny_chat_model_path, n_ctx=512, cache_ram=-1)
    with pytest.raises(pyllama.InvalidRequestError):
        pyllama.Llama(tiny_chat_model_path, n_ctx=512, cache_ram=1, cache=pyllama.RAMCache())
    with pytest.raises(ValueError):
        pyllama.RAMCache(0)


def test_a_slots_state_moves_to_another_slot(tiny_chat_model_path: Path, tmp_path: Path) -> None:
    """With n_parallel=2, save_state(slot=) takes the sequence a prompt went to, load_state(slot=)
    puts it into the other one (through a file), and the same prompt then reuses all of it but the
    last token with the reply it had when evaluated afresh. A busy slot is LlamaError; a slot that
    does not exist or is not named is InvalidRequestError."""
    prompt = "A long shared prompt: " + "alpha beta gamma delta " * 30
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1, n_parallel=2) as llm:
        fresh = llm.complete(prompt, max_tokens=6, **GREEDY)
        held = [s for s in range(2) if llm._engine.tokens(s)]
        assert len(held) == 1
        src, dst = held[0], 1 - held[0]
        state = llm.save_state(tmp_path / "slot.bin", slot=src)
        assert state.n_tokens == len(llm._engine.tokens(src))
        llm._engine.reset()
        llm.load_state(tmp_path / "slot.bin", slot=dst)
        assert list(llm._engine.tokens(dst)) == list(state.tokens) and not llm._engine.tokens(src)
        again = llm.complete(prompt, max_tokens=6, **GREEDY)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
        assert again["choices"][0]["text"] == fresh["choices"][0]["text"]
        with pytest.raises(pyllama.InvalidRequestError):
            llm.save_state()
        with pytest.raises(pyllama.InvalidRequestError):
            llm.load_state(state, slot=2)
        for _ in range(5):  # a generation that is still running after both calls was running during them
            stream = llm.complete("Keep going", max_tokens=400, stream=True, ignore_eos=True)
            next(iter(stream))
            busy = next(s for s in range(2) if llm._engine.busy(s))
            raised = []
            for call in (
                functools.partial(llm.save_state, slot=busy),
                functools.partial(llm.load_state, state, slot=busy),
            ):
                try:
                    call()
                except pyllama.LlamaError:
                    raised.append(True)
                else:
                    raised.append(False)
            still_busy = llm._engine.busy(busy)
            stream.close()
            if still_busy:
                assert raised == [True, True]
                break
        else:
            pytest.fail("the generation never outlasted the two calls")


# --- context guard and truncation -----------------------------------------------------------


def test_complete_truncates_on_request(llm: Any) -> None:
    prompt = "one two three four five six seven " * 80
    tokens = llm.tokenize(prompt)
    assert len(tokens) + 16 > llm.n_ctx()
    with pytest.raises(ValueError, match="context holds 512"):
        llm.complete(prompt, max_tokens=16)
    out = llm.complete(prompt, max_tokens=16, truncate=True, **GREEDY)
    room = llm.n_ctx() - 16
    assert out["usage"]["prompt_tokens"] == room
    kept = llm._engine.tokens()[:room]
    head = tokens[:1] if tokens[0] == llm.model.token_bos else []
    assert kept == head + tokens[len(tokens) - (room - len(head)) :]


def test_chat_truncates_oldest_turns(llm: Any) -> None:
    system = {"role": "system", "content": "Be brief."}
    old = [{"role": "user", "content": "story " * 150}, {"role": "assistant", "content": "ok " * 100}]
    last = {"role": "user", "content": "What now?"}
    messages = [system, *old, last]
    with pytest.raises(ValueError, match="exceed the context"):
        llm.chat(messages, max_tokens=300)
    out = llm.chat(messages, max_tokens=300, truncate=True, **GREEDY)
    expected = llm.chat_template.apply([system, last]).prompt
    n = len(llm.model.tokenize(expected, add_special=True, parse_special=True))
    assert out["usage"]["prompt_tokens"] == n
    with pytest.raises(ValueError, match="does not fit"):
        llm.chat([system, {"role": "user", "content": "long " * 600}], max_tokens=16, truncate=True)


# --- prefill --------------------------------------------------------------------------------


def test_final_assistant_message_is_continued(llm: Any) -> None:
    messages = [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Autumn leaves"}]
    out = llm.chat(messages, max_tokens=6, **GREEDY)
    # the prompt is the conversation up to the reply's start, then the prefill, unclosed
    expected = llm.chat_template.apply(messages[:1]).prompt + "Autumn leaves"
    n = len(llm.model.tokenize(expected, add_special=True, parse_special=True))
    assert out["usage"]["prompt_tokens"] == n
    assert llm._engine.tokens()[:n] == list(llm.model.tokenize(expected, add_special=True, parse_special=True))
    # the reply is what the model added, streamed or not
    chunks = list(llm.chat(messages, max_tokens=6, stream=True, **GREEDY))
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == out["choices"][0]["message"]["content"]
    assert not streamed.startswith("Autumn leaves")
    closed = llm.chat(messages, max_tokens=2, continue_final_message=False, **GREEDY)
    assert closed["usage"]["prompt_tokens"] > n  # a closed message and a new reply's header


# --- fill in the middle ---------------------------------------------------------------------


def test_suffix_builds_the_fim_prompt(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "coder.gguf", vocab="starcoder", name="tiny-coder")
    with pyllama.Llama(path, n_ctx=256, n_threads=1) as llm:
        m = llm.model
        out = llm.complete("def add(a, b):\n", suffix="\n    return c\n", max_tokens=4, **GREEDY)
        expected = [m.token_fim_pre, *m.tokenize("def add(a, b):\n", add_special=False), m.token_fim_suf]
        expected += [*m.tokenize("\n    return c\n", add_special=False), m.token_fim_mid]
        assert out["usage"]["prompt_tokens"] == len(expected)
        assert llm._engine.tokens()[: len(expected)] == expected
        # the first token is the argmax of a fresh evaluation of that prompt
        with pyllama.Context(m, n_ctx=256, n_threads=1) as ctx:
            ctx.decode(pyllama.Batch.from_tokens(expected))
            first = int(np.argmax(ctx.logits()))
        assert out["usage"]["completion_tokens"] >= 1
        assert llm._engine.tokens()[len(expected)] == first
    with pyllama.Llama(write_tiny_llama(tmp_path / "plain.gguf"), n_ctx=128, n_threads=1) as plain:
        with pytest.raises(ValueError, match="fill-in-the-middle"):
            plain.complete("a", suffix="b")


# --- embeddings -----------------------------------------------------------------------------


def _token_embeddings(model: pyllama.Model, tokens: list[int]) -> np.ndarray:
    with pyllama.Context(
        model, n_ctx=256, n_batch=256, n_ubatch=256, n_threads=1, embeddings=True, pooling_type="none"
    ) as ctx:
        batch = pyllama.Batch()
        for i, t in enumerate(tokens):
            batch.add(t, i, 0, True)
        ctx.decode(batch)
        return np.stack([ctx.embeddings(i) for i in range(len(tokens))])


def test_embed_is_the_mean_of_token_embeddings(tiny_model_path: Path) -> None:
    texts = ["hello world", "a longer sentence about the weather"]
    with pyllama.Llama(tiny_model_path, n_ctx=256, n_threads=1) as llm:
        got = llm.embed(texts)
        raw = llm.embed(texts, normalize=False)
        truth = [_token_embeddings(llm.model, llm.tokenize(t)).mean(axis=0) for t in texts]
        assert got.shape == (2, llm.model.n_embd) and got.dtype == np.float32
        np.testing.assert_allclose(raw, np.stack(truth), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
        resp = llm.create_embedding(texts)
        assert [d["index"] for d in resp["data"]] == [0, 1]
        np.testing.assert_allclose(np.array(resp["data"][1]["embedding"]), got[1], rtol=1e-6)
        with pytest.raises(ValueError, match="truncate=True"):
            llm.embed("word " * 400)
        assert llm.embed("word " * 400, truncate=True).shape == (1, llm.model.n_embd)
    with pyllama.Llama(tiny_model_path, n_ctx=256, n_threads=1, embedding=True) as eager:
        assert eager._embed_ctx is not None  # made at construction
        np.testing.assert_allclose(eager.embed(texts), got, rtol=1e-5, atol=1e-6)
    with pyllama.Llama(tiny_model_path, n_ctx=256, n_threads=1, pooling_type="last") as last:
        tokens = last.tokenize(texts[1])
        truth_last = _token_embeddings(last.model, tokens)[-1]
        np.testing.assert_allclose(last.embed(texts[1], normalize=False)[0], truth_last, rtol=1e-4, atol=1e-5)


# --- threads --------------------------------------------------------------------------------


def test_eight_threads_on_one_llama(llm: Any) -> None:
    prompts = [f"Thread {i} says" for i in range(8)]
    solo = {p: llm.complete(p, max_tokens=6, **GREEDY)["choices"][0]["text"] for p in prompts}
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def work(p: str, i: int) -> None:
        try:
            if i % 2:
                chunks = list(llm.complete(p, max_tokens=6, stream=True, **GREEDY))
                results[p] = "".join(c["choices"][0]["text"] for c in chunks)
            else:
                results[p] = llm.complete(p, max_tokens=6, **GREEDY)["choices"][0]["text"]
            llm.chat([{"role": "user", "content": p}], max_tokens=3)
            llm.tokenize(p)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p, i)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert results == solo


# --- the real model -------------------------------------------------------------------------


@pytest.mark.real_model
def test_gemma_greedy_complete_equals_the_argmax_loop(gemma_path: Path) -> None:
    prompt, n = "The capital of France is", 24
    with pyllama.Llama(gemma_path, n_ctx=256, n_threads=2) as llm:
        out = llm.complete(prompt, max_tokens=n, ignore_eos=True, **GREEDY)
        got = list(llm._engine.tokens())
        tokens = llm.tokenize(prompt)
        with pyllama.Context(llm.model, n_ctx=256, n_threads=2) as ctx:
            ctx.decode(pyllama.Batch.from_tokens(tokens))
            loop = list(tokens)
            for _ in range(n):
                tok = int(np.argmax(ctx.logits()))
                loop.append(tok)
                ctx.decode(pyllama.Batch.from_tokens([tok], pos0=len(loop) - 1))
    assert out["usage"]["completion_tokens"] == n
    # the Generator holds every token but the last sampled one
    assert got == loop[: len(got)] and len(got) == len(loop) - 1
    assert out["choices"][0]["text"] == llm_text(gemma_path, loop[len(tokens) :])


def _greedy_with_margins(llm: pyllama.Llama, prompt: list[int], n: int) -> tuple[list[str], list[float], int]:
    """The greedy tokens of a completion, the top-2 logprob margin at each, and the prompt tokens reused."""
    out = llm.complete(prompt, max_tokens=n, ignore_eos=True, logprobs=2, temperature=0.0)
    lp = out["choices"][0]["logprobs"]
    margins = []
    for top in lp["top_logprobs"]:
        best = sorted(top.values(), reverse=True)
        margins.append(best[0] - best[1] if len(best) > 1 else float("inf"))
    return lp["tokens"], margins, out["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.real_model
@pytest.mark.parametrize("swa_full", [True, False])
def test_gemma_reuses_a_prefix_only_where_its_sliding_window_is_whole(gemma_path: Path, swa_full: bool) -> None:
    """Gemma 3's sliding-window layers (512 positions) keep every position with swa_full (llama.cpp's
    default), and without it only what their cache holds (512 + n_ubatch cells). After an 800-token
    prompt, a prompt sharing its first 448 tokens reuses them with swa_full, and is evaluated afresh
    without (the cells its window reaches back to are gone); either way its greedy tokens are a fresh
    Llama's, up to the first near-tie (top-2 margin under 1e-3).

    The shared prefix ends where a batch of 64 does, so that its cells were computed in the same
    batches as a fresh evaluation computes them: Gemma's logprobs move by up to 0.5 when the same
    prompt is cut into other batches (n_ubatch 32 against 64), which is no defect of the reuse."""
    words = " ".join(f"item{i}" for i in range(800))
    settings: dict[str, Any] = {"n_ctx": 1024, "n_batch": 64, "n_ubatch": 64, "n_threads": 2, "swa_full": swa_full}
    with pyllama.Llama(gemma_path, **settings) as llm:
        first = llm.tokenize("List: " + words)[:800]
        assert len(first) == 800 and llm.model.n_swa == 512
        second = first[:448] + llm.tokenize(" and now the sky is", add_special=False)
        llm.complete(first, max_tokens=4, temperature=0.0)
        got, _, reused = _greedy_with_margins(llm, second, 12)
    with pyllama.Llama(gemma_path, **settings) as fresh:
        want, margins, _ = _greedy_with_margins(fresh, second, 12)
    assert reused == (448 if swa_full else 0)
    for g, w, margin in zip(got, want, margins, strict=True):
        if margin < 1e-3:
            break
        assert g == w


@pytest.mark.real_model
def test_gemma_loads_a_prefix_back_from_ram_where_its_sliding_window_is_whole(gemma_path: Path) -> None:
    """The host cache on Gemma 3 without swa_full: a 768-token prompt given up to another prompt is
    kept in RAM (its sliding-window cache holds the last 512 + n_ubatch positions). The same prompt
    with a new ending loads it back and reuses all 768 tokens (the window of the next token is whole);
    a prompt sharing only its first 500 tokens is evaluated afresh (the cells its window reaches back
    to are gone). Greedy tokens are a fresh Llama's up to the first near-tie either way (the prompt
    ends where a batch of 64 does, so that the reused cells were computed in a fresh run's batches)."""
    words = " ".join(f"item{i}" for i in range(800))
    settings: dict[str, Any] = {"n_ctx": 1024, "n_batch": 64, "n_ubatch": 64, "n_threads": 2, "swa_full": False}
    with pyllama.Llama(gemma_path, cache_ram=256 << 20, **settings) as llm:
        first = llm.tokenize("List: " + words)[:768]
        longer = first + llm.tokenize(" and now the sky is", add_special=False)
        shorter = first[:500] + llm.tokenize(" and now the sky is", add_special=False)
        llm.complete(first, max_tokens=2, temperature=0.0)
        llm.complete("Something else entirely, " * 20, max_tokens=2, temperature=0.0)
        assert llm.cache is not None and llm.cache.n_saved == 1
        got_longer, _, reused_longer = _greedy_with_margins(llm, longer, 8)
        assert llm.cache.n_loaded == 1
        llm.complete("Something else entirely, " * 20, max_tokens=2, temperature=0.0)
        got_shorter, _, reused_shorter = _greedy_with_margins(llm, shorter, 8)
    assert (reused_longer, reused_shorter) == (768, 0)
    with pyllama.Llama(gemma_path, **settings) as fresh:
        for got, prompt in ((got_longer, longer), (got_shorter, shorter)):
            fresh.reset()
            want, margins, _ = _greedy_with_margins(fresh, prompt, 8)
            for g, w, margin in zip(got, want, margins, strict=True):
                if margin < 1e-3:
                    break
                assert g == w


def llm_text(path: Path, tokens: list[int]) -> str:
    model = pyllama.Model(str(path), vocab_only=True)
    return str(model.detokenize(tokens))


# --- the default context: the training context, fitted to memory ------------------------------


def test_fit_n_ctx() -> None:
    from pyllama.llama import fit_n_ctx

    assert fit_n_ctx(32768, 1000, 1 << 40) == 32768  # everything fits: the training context
    assert fit_n_ctx(32768, 1000, 10_000 * 1000) == 9984  # what fits, a multiple of 256
    assert fit_n_ctx(32768, 1000, 0) == 4096  # never below 4096
    assert fit_n_ctx(2048, 1000, 0) == 2048  # nor above the training context


def _state_bytes_per_token(path: Path, n: int, **ctx_kwargs: Any) -> float:
    with pyllama.Model(str(path)) as model, pyllama.Context(model, n_ctx=1024, n_threads=1, **ctx_kwargs) as ctx:
        tokens = [int(t) % 100 + 10 for t in range(2 * n)]
        ctx.decode(pyllama.Batch.from_tokens(tokens[:n]))
        small = len(ctx.seq_state_get(0))
        ctx.decode(pyllama.Batch.from_tokens(tokens[n:], pos0=n))
        return (len(ctx.seq_state_get(0)) - small) / n


def test_kv_estimate_matches_llama_cpp_state(tiny_model_path: Path) -> None:
    from pyllama.llama import kv_bytes_per_token

    with pyllama.Model(str(tiny_model_path)) as model:
        estimate = kv_bytes_per_token(model)
    measured = _state_bytes_per_token(tiny_model_path, 128)  # K and V of each cell, plus its position
    assert estimate <= measured <= estimate + 16


@pytest.mark.parametrize("kv", ["f32", "q8_0", "q4_0"])
def test_kv_estimate_of_each_cache_type_matches_llama_cpp_state(tmp_path: Path, kv: str) -> None:
    """The estimate takes each type's size from the C++ table (pyllama.kv_cache_types), and llama.cpp's
    own state of a context with that cache type is the truth (heads of 32, a block of the quantised types)."""
    from pyllama.llama import kv_bytes_per_token

    path = write_tiny_llama(tmp_path / "heads32.gguf", n_embd=128, n_head=4, n_head_kv=2)
    with pyllama.Model(str(path)) as model:
        estimate = kv_bytes_per_token(model, kv, kv)
    measured = _state_bytes_per_token(path, 128, type_k=kv, type_v=kv, flash_attn="on")
    assert estimate <= measured <= estimate + 16


@pytest.mark.real_model
def test_gemma_default_context_and_kv_estimate(gemma_path: Path) -> None:
    from pyllama.llama import kv_bytes_per_token

    with pyllama.Model(str(gemma_path)) as model:
        estimate = kv_bytes_per_token(model)
        train = int(model.n_ctx_train)
    measured = _state_bytes_per_token(gemma_path, 128)
    assert estimate <= measured <= estimate * 1.01
    with pyllama.Llama(gemma_path, n_threads=2) as llm:  # 0.6 GB of KV fits this machine's memory
        assert llm.n_ctx() == train


# --- reranking --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import write_tiny_reranker

    return write_tiny_reranker(tmp_path_factory.mktemp("rerank") / "tiny-reranker.gguf")


def _pair_tokens(model: pyllama.Model, query: str, doc: str) -> list[int]:
    """llama-server's pair without a rerank template: [BOS] query [EOS] [SEP] document [EOS], each
    special token where the vocabulary adds it (tools/server format_prompt_rerank)."""
    eos = model.token_eos if model.token_eos is not None else model.token_sep
    out = [model.token_bos] if model.add_bos else []
    out += list(model.tokenize(query, add_special=False))
    out += [eos] if model.add_eos else []
    out += [model.token_sep] if model.add_sep else []
    out += list(model.tokenize(doc, add_special=False))
    out += [eos] if model.add_eos else []
    return out


def test_rerank_scores_equal_the_rank_pooled_output(reranker_path: Path) -> None:
    """Llama.rerank gives llama-server's /v1/rerank shape: each document's score is the rank-pooled
    output of a low-level Context over the pair, the most relevant first, top_n of them, and usage
    counts the pairs' tokens. A reranker refuses embed() and generation (an encoder: the Llama still
    loads); bad arguments are InvalidRequestErrors."""
    query = "what is a panda?"
    docs = ["hi", "The giant panda is a bear native to China.", "Pandas eat bamboo.", "A stock market report."]
    with pyllama.Llama(reranker_path, n_ctx=512, n_threads=1) as llm:
        out = llm.rerank(query, docs, top_n=3)
        full = llm.rerank(query, docs)
        with pytest.raises(pyllama.InvalidRequestError):
            llm.embed("text")
        with pytest.raises(pyllama.InvalidRequestError) as e:
            llm.complete("an encoder generates nothing", max_tokens=2)
        assert e.value.param == "model"
        for bad in ({"top_n": 0}, {"top_n": True}):
            with pytest.raises(pyllama.InvalidRequestError):
                llm.rerank(query, docs, **bad)
        with pytest.raises(pyllama.InvalidRequestError):
            llm.rerank(query, "not a list")  # type: ignore[arg-type]
    with (
        pyllama.Model(str(reranker_path)) as model,
        pyllama.Context(model, n_ctx=512, n_threads=1, embeddings=True, pooling_type="rank") as ctx,
    ):
        want = []
        n_tokens = 0
        for doc in docs:
            tokens = _pair_tokens(model, query, doc)
            n_tokens += len(tokens)
            ctx.memory_clear()
            ctx.encode(pyllama.Batch.from_tokens(tokens))
            want.append(float(ctx.embeddings_seq(0)[0]))
    order = sorted(range(len(docs)), key=lambda i: -want[i])
    assert [r["index"] for r in full["results"]] == order
    np.testing.assert_allclose([r["relevance_score"] for r in full["results"]], [want[i] for i in order], rtol=1e-5)
    assert out["results"] == full["results"][:3] and out["object"] == "list"
    assert out["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    assert len(set(want)) == len(want)  # the documents are told apart


def test_rerank_needs_a_reranker(tiny_chat_model_path: Path) -> None:
    with pyllama.Llama(tiny_chat_model_path, n_ctx=256, n_threads=1) as llm:
        with pytest.raises(pyllama.InvalidRequestError) as e:
            llm.rerank("q", ["d"])
        assert e.value.param == "model"
