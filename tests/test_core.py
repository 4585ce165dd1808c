"""The one generation core (pyllama.Engine) that every call goes through: with one sequence it steps
inline on the caller's thread (Ctrl-C and cancel() stop a long prompt), calls from many threads queue
for the sequence without a Python lock, and the sequence calls (snapshot, restore, reset) refuse a
sequence that a generation is using instead of corrupting it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pyllama

from conftest import run_python

KW = {"n_ctx": 2048, "n_batch": 2048, "n_ubatch": 16, "n_threads": 1, "n_threads_batch": 1}


def random_tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 32000, n).tolist()  # type: ignore[no-any-return]


def greedy_argmax(model: pyllama.Model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens by numpy's argmax over Context.decode's logits, one token at a time."""
    with pyllama.Context(model, **KW) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(prompt))
        out: list[int] = []
        for i in range(n):
            tok = int(np.argmax(ctx.logits(-1)))
            out.append(tok)
            ctx.decode(pyllama.Batch.from_tokens([tok], pos0=len(prompt) + i))
        return out


SIGINT_LLAMA = """
import json, os, signal, sys, threading, time
import numpy as np
import pyllama

llm = pyllama.Llama(sys.argv[1], n_ctx=2048, n_batch=2048, n_ubatch=16, n_threads=1, n_threads_batch=1, seed=1)
toks = np.random.default_rng(3).integers(3, 32000, 2000).tolist()
assert not llm._engine.threaded
t0 = time.perf_counter()
llm.complete(toks, max_tokens=1, temperature=0.0)
full = time.perf_counter() - t0
delay = max(0.02, min(0.3, 0.4 * full))
for attempt in range(3):
    llm._engine.reset()
    sent = []
    def fire():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)
    timer = threading.Timer(delay, fire)
    timer.start()
    try:
        llm.complete(toks, max_tokens=1, temperature=0.0)
        outcome = "completed"
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    t1 = time.perf_counter()
    timer.join()
    if outcome == "KeyboardInterrupt":
        break
    try:
        time.sleep(0.5)  # a signal that came after the call lands here; try again
    except KeyboardInterrupt:
        pass
active = llm._engine.n_active
again = llm.complete(toks[:40], max_tokens=4, temperature=0.0)
with pyllama.Llama(sys.argv[1], n_ctx=2048, n_threads=1) as fresh:
    truth = fresh.complete(toks[:40], max_tokens=4, temperature=0.0)
print(json.dumps({
    "outcome": outcome, "attempts": attempt + 1, "full": full,
    "latency": t1 - sent[0] if sent else None, "active": active,
    "again": again["choices"][0]["text"], "truth": truth["choices"][0]["text"],
}))
"""


def test_ctrl_c_interrupts_a_long_prompt_of_a_single_sequence_llama(tiny_model_path: Path) -> None:
    """Llama(n_parallel=1) evaluates its prompt on the caller's thread: SIGINT on the main thread during a
    2000-token prompt raises KeyboardInterrupt well under a second after the signal, nothing is left
    running, and the next call gives what a fresh Llama gives."""
    proc = run_python(SIGINT_LLAMA, str(tiny_model_path), timeout=180)
    assert proc.returncode == 0, f"crashed with {proc.returncode}: {proc.stderr[-2000:]}"
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["outcome"] == "KeyboardInterrupt", r
    assert r["latency"] is not None and r["latency"] < 1.0, r
    assert r["active"] == 0, r
    assert r["again"] == r["truth"], r


def test_cancel_stops_the_prompt_evaluation_of_a_sole_request(tiny_model_path: Path) -> None:
    """cancel() from another thread while the only request's 2000-token prompt is being decoded stops that
    decode (not at the end of it): the stream ends as cancelled well before the prompt would have taken,
    and the sequence is free for the next call, whose greedy tokens equal numpy's argmax."""
    with pyllama.Model(str(tiny_model_path)) as model, pyllama.Context(model, **KW) as ctx:
        engine = pyllama.Engine(ctx)
        toks = random_tokens(2000, seed=5)
        t0 = time.perf_counter()
        engine.submit(toks, pyllama.Sampler(model, temperature=0.0), max_tokens=1).run()
        full = time.perf_counter() - t0
        for _attempt in range(3):
            engine.reset()
            req = engine.submit(toks, pyllama.Sampler(model, temperature=0.0), max_tokens=1)
            timer = threading.Timer(max(0.02, 0.3 * full), req.cancel)
            t0 = time.perf_counter()
            timer.start()
            text = req.run()
            elapsed = time.perf_counter() - t0
            timer.join()
            if req.finish_reason == "cancelled":
                break
        assert req.finish_reason == "cancelled" and text == "" and req.n_completion == 0
        assert elapsed < 0.8 * full + 0.05, (elapsed, full)
        assert engine.n_active == 0
        prompt = toks[:30]
        got = engine.submit(prompt, pyllama.Sampler(model, temperature=0.0), max_tokens=5, ignore_eos=True)
        got.run()
        assert list(got.completion_tokens) == greedy_argmax(model, prompt, 5)


def test_calls_from_many_threads_queue_for_one_sequence(tiny_chat_model_path: Path) -> None:
    """Llama(n_parallel=1) from 6 threads at once: the core queues the calls for its one sequence (no
    worker thread, no Python lock); each reply equals the same call made alone."""
    prompts = [f"Question {i}: what is it?" for i in range(6)]
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1) as solo:
        truth = {p: solo.complete(p, max_tokens=8, temperature=0.0)["choices"][0]["text"] for p in prompts}
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1) as llm:
        assert not llm._engine.threaded

        def call(p: str) -> None:
            try:
                results[p] = llm.complete(p, max_tokens=8, temperature=0.0)["choices"][0]["text"]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert results == truth
        assert llm._engine.n_active == 0


def test_streams_of_two_threads_interleave_on_one_sequence(tiny_chat_model_path: Path) -> None:
    """Two threads iterate one stream each of a one-sequence Llama at the same time: whoever waits steps
    the core, the second request runs once the first has ended, and each stream's text is its one-shot
    reply."""
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1) as llm:
        truth = [llm.complete(p, max_tokens=10, temperature=0.0)["choices"][0]["text"] for p in ("Alpha", "Beta")]
        texts: list[str] = ["", ""]

        def consume(i: int, prompt: str) -> None:
            for chunk in llm.complete(prompt, max_tokens=10, temperature=0.0, stream=True):
                texts[i] += chunk["choices"][0]["text"]

        threads = [threading.Thread(target=consume, args=(i, p)) for i, p in enumerate(("Alpha", "Beta"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert texts == truth


def test_sequence_calls_refuse_a_sequence_in_use(tiny_chat_model_path: Path) -> None:
    """While a request runs in sequence 0, snapshot() says so (None) and reset()/restore() raise LlamaError
    and leave it alone: the request's text is what it is without them. Once it has ended they work, and a
    restored snapshot makes the next request reuse its tokens."""
    with pyllama.Model(str(tiny_chat_model_path)) as model, pyllama.Context(model, n_ctx=1024, n_threads=1) as ctx:
        engine = pyllama.Engine(ctx)
        prompt = list(model.tokenize("A sequence in use", add_special=True))
        alone = engine.submit(prompt, pyllama.Sampler(model, temperature=0.0), max_tokens=12, ignore_eos=True)
        text_alone = alone.run()
        engine.reset()
        req = engine.submit(prompt, pyllama.Sampler(model, temperature=0.0), max_tokens=12, ignore_eos=True)
        first = next(req)  # running now, in sequence 0
        assert engine.snapshot(0) is None
        with pytest.raises(pyllama.LlamaError):
            engine.reset(0)
        with pytest.raises(pyllama.LlamaError):
            engine.restore([], b"", 0)
        assert first + req.run() == text_alone
        taken = engine.snapshot(0)
        assert taken is not None
        tokens, state, lora = taken
        assert tokens[: len(prompt)] == prompt and len(tokens) == len(prompt) + 11
        assert lora == ([], 0)  # computed without LoRA adapters
        engine.reset()
        assert engine.tokens(0) == []
        engine.restore(tokens, state, 0)
        assert engine.tokens(0) == tokens
        # the restored KV memory is the sequence's: one more token gives a fresh evaluation's logits
        ctx.decode(pyllama.Batch.from_tokens([tokens[-1]], pos0=len(tokens)))
        with pyllama.Context(model, n_ctx=1024, n_threads=1) as fresh:
            fresh.decode(pyllama.Batch.from_tokens([*tokens, tokens[-1]]))
            assert np.abs(ctx.logits(-1) - fresh.logits(-1)).max() <= 1e-2
        ctx.seq_rm(0, len(tokens), -1)
        again = engine.submit(prompt, pyllama.Sampler(model, temperature=0.0), max_tokens=3)
        again.run()
        assert again.n_reused == len(prompt) - 1  # taken from the restored sequence


def test_an_abandoned_stream_gives_its_sequence_to_the_next_call(tiny_chat_model_path: Path) -> None:
    """A stream left suspended by its thread is ended by that thread's next call, which does not wait for
    the stream's max_tokens: save_state() then finds the sequence free."""
    with pyllama.Llama(tiny_chat_model_path, n_ctx=2048, n_threads=1) as llm:
        stream: Any = llm.complete("Once", max_tokens=1500, ignore_eos=True, stream=True)
        next(stream)
        t0 = time.perf_counter()
        state = llm.save_state()
        assert time.perf_counter() - t0 < 5.0
        assert state.n_tokens > 0
        with pytest.raises(pyllama.CancelledError):
            next(stream)
        assert stream._use.generation.finish_reason == "cancelled"
