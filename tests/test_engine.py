"""Continuous batching (pyllama.Engine, Llama(n_parallel=N)): requests decoded together give what
each gives alone (up to near-ties, since batched arithmetic is not bit-identical), really run at the
same time, reuse cached prefixes, and stop or fail one at a time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import random
import select
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pyllama


@pytest.fixture(scope="module")
def model(tiny_chat_model_path: Path) -> Any:
    with pyllama.Model(str(tiny_chat_model_path)) as m:
        yield m


def greedy(model: pyllama.Model) -> pyllama.Sampler:
    return pyllama.Sampler(model, temperature=0.0)


def solo_run(model: pyllama.Model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """The tokens of a greedy run alone, decoded one token at a time through Context.decode and picked
    by numpy's argmax of the logits (not through the generation core under test), and at each step
    the margin between the two best logits (the same order as between the two best logprobs)."""
    with pyllama.Context(model, n_ctx=512, n_threads=1) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(prompt))
        tokens: list[int] = []
        margins: list[float] = []
        for i in range(n):
            logits = ctx.logits(-1)
            best = np.argsort(logits)[::-1][:2]
            tokens.append(int(best[0]))
            margins.append(float(logits[best[0]] - logits[best[1]]))
            if model.token_is_eog(int(best[0])) or i + 1 == n:
                break
            ctx.decode(pyllama.Batch.from_tokens([int(best[0])], pos0=len(prompt) + i))
        if tokens and model.token_is_eog(tokens[-1]):
            tokens.pop()
        return tokens, margins


def agree_until_near_tie(batched: list[int], solo: list[int], margins: list[float]) -> bool:
    for i, (a, b) in enumerate(zip(batched, solo, strict=False)):
        if margins[i] < 1e-3:
            return True  # a near-tie: the runs may part here
        if a != b:
            return False
    return len(batched) == len(solo)


def solo_chats(path: Path, prompts: list[str]) -> dict[str, tuple[str, float]]:
    """Each prompt's greedy 12-token chat reply from a Llama alone, and the smallest margin between
    the two best logprobs along it (batched runs may part from it at a near-tie)."""
    truth = {}
    with pyllama.Llama(path, n_ctx=512, n_threads=1) as solo:
        for p in prompts:
            out = solo.chat(
                [{"role": "user", "content": p}], max_tokens=12, temperature=0.0, logprobs=True, top_logprobs=2
            )
            content = out["choices"][0]["logprobs"]["content"]
            truth[p] = (
                out["choices"][0]["message"]["content"],
                min(c["top_logprobs"][0]["logprob"] - c["top_logprobs"][1]["logprob"] for c in content),
            )
    return truth


def test_batched_requests_equal_solo_runs(model: pyllama.Model) -> None:
    prompts = [list(model.tokenize(f"Request {i}: once upon a time")) for i in range(7)]
    with pyllama.Context(model, n_ctx=2048, n_seq_max=3, n_threads=1, n_batch=64) as ctx:
        engine = pyllama.Engine(ctx, 3)
        reqs = [engine.submit(p, greedy(model), max_tokens=16) for p in prompts]  # more than 3: some wait
        texts = [r.run() for r in reqs]
        for p, r, text in zip(prompts, reqs, texts, strict=True):
            solo, margins = solo_run(model, p, 16)
            assert agree_until_near_tie(r.completion_tokens, solo, margins)
            assert r.finish_reason in ("stop", "length") and r.n_prompt == len(p)
            assert text == str(model.detokenize(r.completion_tokens)) or r.finish_reason == "stop"
        engine.close()


def test_requests_run_at_the_same_time(model: pyllama.Model) -> None:
    with pyllama.Context(model, n_ctx=2048, n_seq_max=4, n_threads=1) as ctx:
        engine = pyllama.Engine(ctx, 4)
        reqs = [
            engine.submit(list(model.tokenize(f"story {i}")), greedy(model), max_tokens=400, ignore_eos=True)
            for i in range(4)
        ]
        firsts = [next(iter(r)) for r in reqs]
        # every request produced text while the first is far from done: they were decoded together
        assert all(firsts) and reqs[0].finish_reason is None and reqs[0].n_completion < 200
        for r in reqs:
            r.cancel()
        for r in reqs:
            r.run()
            assert r.finish_reason == "cancelled"
        engine.close()


def test_cancelled_request_frees_its_sequence(model: pyllama.Model) -> None:
    with pyllama.Context(model, n_ctx=4096, n_threads=1) as ctx:
        engine = pyllama.Engine(ctx, 1)
        long = engine.submit(list(model.tokenize("long")), greedy(model), max_tokens=3000, ignore_eos=True)
        nxt = engine.submit(list(model.tokenize("next")), greedy(model), max_tokens=4)
        next(iter(long))
        t0 = time.monotonic()
        long.cancel()
        assert next(iter(nxt))
        assert time.monotonic() - t0 < 2.0
        assert long.finish_reason == "cancelled" and long.n_completion < 3000
        engine.close()


def test_a_sequence_reuses_its_cached_prefix(model: pyllama.Model) -> None:
    base = list(model.tokenize("A shared system prompt that is fairly long, " * 4))
    with pyllama.Context(model, n_ctx=2048, n_seq_max=2, n_threads=1) as ctx:
        engine = pyllama.Engine(ctx, 2)
        first = engine.submit(base + list(model.tokenize("question one")), greedy(model), max_tokens=4)
        first.run()
        second = engine.submit(base + list(model.tokenize("question two")), greedy(model), max_tokens=4)
        second.run()
        assert second.n_reused >= len(base)
        solo, margins = solo_run(model, base + list(model.tokenize("question two")), 4)
        assert agree_until_near_tie(second.completion_tokens, solo, margins)
        engine.close()


def test_a_request_takes_the_lowest_free_sequence_unless_another_saves_64_tokens(model: pyllama.Model) -> None:
    """Busy sequences with gaps between them cost llama.cpp one more pass per gap (kv_unified=False), so a
    request takes the lowest free sequence unless another one holds at least 64 more of its prompt's tokens."""
    words = " ".join(f"w{i}" for i in range(200))
    long = list(model.tokenize(words))
    short = list(model.tokenize("short"))
    tail = list(model.tokenize(" and then something else"))
    assert len(long) > 150
    with pyllama.Context(model, n_ctx=3072, n_seq_max=3, n_threads=1) as ctx:
        # inline: a and b are both queued before the first step (a worker thread could finish a before
        # b comes, and b would then take sequence 0)
        engine = pyllama.Engine(ctx, 3, threaded=False)
        a = engine.submit(short, greedy(model), max_tokens=2, ignore_eos=True)  # sequence 0
        b = engine.submit(long, greedy(model), max_tokens=2, ignore_eos=True)  # sequence 1
        a.run(), b.run()
        assert ctx.seq_pos_max(0) == len(short) and ctx.seq_pos_max(1) == len(long)

        # 30 tokens in common with sequence 1: not worth a gap, sequence 0 is taken
        c_prompt = long[:30] + tail
        c = engine.submit(c_prompt, greedy(model), max_tokens=2, ignore_eos=True)
        c.run()
        shared_with_0 = next(i for i, (x, y) in enumerate(zip(short, c_prompt, strict=False)) if x != y)
        assert c.n_reused == shared_with_0 < 30
        assert ctx.seq_pos_max(0) == len(c_prompt) and ctx.seq_pos_max(1) == len(long)

        # 120 tokens in common with sequence 1: it is taken, and those tokens are not evaluated again
        d_prompt = long[:120] + tail
        d = engine.submit(d_prompt, greedy(model), max_tokens=2, ignore_eos=True)
        d.run()
        assert d.n_reused == 120
        assert ctx.seq_pos_max(1) == len(d_prompt) and ctx.seq_pos_max(0) == len(c_prompt)
        solo, margins = solo_run(model, d_prompt, 2)
        assert agree_until_near_tie(d.completion_tokens, solo, margins)
        engine.close()


@pytest.mark.parametrize("kv_unified", [False, True], ids=["streams", "unified"])
def test_a_prefix_another_sequence_holds_is_copied_not_evaluated(model: pyllama.Model, kv_unified: bool) -> None:
    """A prompt sharing 120 tokens with what a busy sequence holds takes a free sequence and gets those
    tokens' KV copied into it (llama_memory_seq_cp: the whole stream, then cut; or shared cells with
    kv_unified) instead of evaluating them. It reuses exactly 120; its greedy tokens are those of a solo
    run, which a copy one token too long or too short would change; and the sequence copied from goes
    on as it would alone."""
    words = " ".join(f"w{i}" for i in range(80))
    long = list(model.tokenize(words))
    tail = list(model.tokenize(" and then something else", add_special=False))
    assert len(long) > 150 and tail[0] != long[120]
    with pyllama.Context(model, n_ctx=3072, n_seq_max=3, n_threads=1, kv_unified=kv_unified) as ctx:
        engine = pyllama.Engine(ctx, 3)
        a = engine.submit(long, greedy(model), max_tokens=40, ignore_eos=True)  # sequence 0
        next(a)  # its prompt is in sequence 0, and it goes on generating
        d_prompt = long[:120] + tail
        d = engine.submit(d_prompt, greedy(model), max_tokens=8, ignore_eos=True)
        d.run()
        a.run()
        assert d.n_reused == 120
        engine.close()
    solo_d, margins_d = solo_run(model, d_prompt, 8)
    assert agree_until_near_tie(d.completion_tokens, solo_d, margins_d)
    solo_a, margins_a = solo_run(model, long, 40)
    assert agree_until_near_tie(a.completion_tokens, solo_a, margins_a)


def test_requests_that_come_together_with_one_prefix_evaluate_it_once(model: pyllama.Model) -> None:
    """Two requests queued together whose prompts share a long prefix: the second waits while the
    first evaluates it, then copies it (n_reused is the whole common prefix), and a third request with
    another prompt does not wait behind them. Each one's greedy tokens are its solo run's. (An inline
    engine, stepped by the caller, makes the order of admissions and steps deterministic.)"""
    words = " ".join(f"w{i}" for i in range(80))
    shared = list(model.tokenize(words))
    one = shared + list(model.tokenize(" first question", add_special=False))
    two = shared + list(model.tokenize(" second question", add_special=False))
    other = list(model.tokenize("Something unrelated"))
    common = next(i for i, (x, y) in enumerate(zip(one, two, strict=False)) if x != y)
    assert common >= len(shared)
    with pyllama.Context(model, n_ctx=3072, n_seq_max=3, n_threads=1) as ctx:
        engine = pyllama.Engine(ctx, 3, threaded=False)
        a = engine.submit(one, greedy(model), max_tokens=6, ignore_eos=True)
        b = engine.submit(two, greedy(model), max_tokens=6, ignore_eos=True)
        c = engine.submit(other, greedy(model), max_tokens=6, ignore_eos=True)
        c.run()
        assert c.n_reused == 0
        b.run()
        a.run()
        assert a.n_reused == 0
        assert b.n_reused == common
        engine.close()
    for req, prompt in ((a, one), (b, two), (c, other)):
        solo, margins = solo_run(model, prompt, 6)
        assert agree_until_near_tie(req.completion_tokens, solo, margins)


@pytest.mark.parametrize(("n_parallel", "kv_unified"), [(1, False), (2, True)], ids=["one", "two-unified"])
def test_a_prefix_given_up_is_kept_in_ram_and_loaded_back(
    model: pyllama.Model, n_parallel: int, kv_unified: bool
) -> None:
    """The host cache (llama-server's --cache-ram): a sequence that gives up a long prefix to an
    unrelated prompt keeps its state in RAM; a later prompt sharing 130 tokens of it loads it back and
    evaluates only the rest. It reuses exactly 130 and its greedy tokens are its solo run's, which a
    state one token too long or too short would change; the unrelated prompt went by unchanged."""
    long = list(model.tokenize(" ".join(f"w{i}" for i in range(80))))
    other = list(model.tokenize(" ".join(f"z{i}" for i in range(40))))
    tail = list(model.tokenize(" and then something else", add_special=False))
    assert len(long) > 150 and len(other) > 70 and tail[0] != long[130]
    again = long[:130] + tail
    with pyllama.Context(
        model, n_ctx=1024 * n_parallel, n_seq_max=n_parallel, n_threads=1, kv_unified=kv_unified
    ) as ctx:
        engine = pyllama.Engine(ctx, n_parallel, threaded=False)
        engine.set_host_cache(64 << 20)
        first = engine.submit(long, greedy(model), max_tokens=4, ignore_eos=True)
        first.run()
        b = engine.submit(other, greedy(model), max_tokens=6, ignore_eos=True)
        b.run()  # takes the lowest sequence: `long` goes to RAM
        stats = engine.host_cache()
        assert stats["n_saved"] == 1 and stats["entries"] == 1 and 0 < stats["bytes"] <= 64 << 20
        assert all(engine.tokens(s)[: len(long)] != long for s in range(n_parallel))  # no sequence holds it
        c = engine.submit(again, greedy(model), max_tokens=8, ignore_eos=True)
        c.run()
        assert c.n_reused == 130
        assert engine.host_cache()["n_loaded"] == 1
        engine.close()
    for req, prompt, n in ((b, other, 6), (c, again, 8)):
        solo, margins = solo_run(model, prompt, n)
        assert agree_until_near_tie(req.completion_tokens, solo, margins)


def test_the_host_cache_keeps_to_its_budget(model: pyllama.Model) -> None:
    """With room for one state, the least recently used goes; with a budget of 0 nothing is kept. What
    is dropped is evaluated again (n_reused 0), with the solo run's tokens."""
    prompts = [list(model.tokenize(" ".join(f"{c}{i}" for i in range(40)))) for c in "xyz"]
    with pyllama.Context(model, n_ctx=1024, n_threads=1) as ctx:
        engine = pyllama.Engine(ctx, 1, threaded=False)
        engine.set_host_cache(1 << 30)
        engine.submit(prompts[0], greedy(model), max_tokens=1).run()
        engine.submit(prompts[1], greedy(model), max_tokens=1).run()
        one = engine.host_cache()["bytes"]  # the state of prompts[0]
        assert one > 0
        engine.set_host_cache(one + one // 2)  # room for one state of this size
        engine.submit(prompts[2], greedy(model), max_tokens=1).run()  # saves prompts[1], drops prompts[0]
        stats = engine.host_cache()
        assert stats["entries"] == 1 and stats["bytes"] <= one + one // 2
        # prompts[1] comes back while the sequence holds prompts[2]: the state to load stays, and
        # prompts[2], which does not fit beside it, is not kept
        hit_prompt = prompts[1] + [prompts[1][5]]
        hit = engine.submit(hit_prompt, greedy(model), max_tokens=4, ignore_eos=True)
        hit.run()
        assert hit.n_reused == len(prompts[1])
        stats = engine.host_cache()
        assert stats["n_loaded"] == 1 and stats["entries"] == 1 and stats["bytes"] <= one + one // 2
        back = engine.submit(prompts[0] + [prompts[0][5]], greedy(model), max_tokens=4, ignore_eos=True)
        back.run()
        assert back.n_reused == 0
        engine.set_host_cache(0)
        assert engine.host_cache()["entries"] == 0 and engine.host_cache()["bytes"] == 0
        engine.submit(prompts[1], greedy(model), max_tokens=1).run()
        assert engine.host_cache()["entries"] == 0
        with pytest.raises(ValueError):
            engine.set_host_cache(-1)
        engine.close()
    for req, prompt in ((back, prompts[0] + [prompts[0][5]]), (hit, hit_prompt)):
        solo, margins = solo_run(model, prompt, 4)
        assert agree_until_near_tie(req.completion_tokens, solo, margins)


def test_engine_errors(model: pyllama.Model) -> None:
    with pyllama.Context(model, n_ctx=512, n_seq_max=2, n_threads=1) as ctx:
        with pytest.raises(ValueError, match="n_seq_max"):
            pyllama.Engine(ctx, 3)
        engine = pyllama.Engine(ctx, 2)
        with pytest.raises(ValueError, match="a sequence holds"):
            engine.submit([1] * 300, greedy(model))  # each of 2 sequences holds 256 tokens
        with pytest.raises(ValueError, match="empty"):
            engine.submit([], greedy(model))
        running = engine.submit(list(model.tokenize("x")), greedy(model), max_tokens=5000, ignore_eos=True)
        next(iter(running))
        engine.close()
        with pytest.raises(pyllama.LlamaError, match="closed"):
            running.run()
        with pytest.raises(pyllama.LlamaError, match="closed"):
            engine.submit([1, 2], greedy(model))


def test_a_notifier_signals_new_text_and_the_end(model: pyllama.Model) -> None:
    """With a Notifier, the request's descriptor becomes readable when text is ready or the request has
    ended, and next_nowait() then gives it without waiting: the pieces read that way are the text of
    the same request run to the end with run()."""
    prompt = list(model.tokenize("Once upon a time"))
    with pyllama.Context(model, n_ctx=1024, n_seq_max=2, n_threads=1) as ctx:
        engine = pyllama.Engine(ctx, 2)
        truth = engine.submit(prompt, greedy(model), max_tokens=24, ignore_eos=True)
        expected = truth.run()
        notifier = pyllama.Notifier()
        req = engine.submit(prompt, greedy(model), max_tokens=24, ignore_eos=True, notifier=notifier)
        pieces: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readable, _, _ = select.select([notifier.fileno()], [], [], 5.0)
            assert readable, "the descriptor was not signalled"
            notifier.drain()
            assert req.ready
            piece = req.next_nowait()
            while piece:  # everything that is ready, then None (running) or "" (ended)
                pieces.append(piece)
                piece = req.next_nowait()
            if piece == "":
                break
            assert piece is None and not req.ready
        assert "".join(pieces) == expected and req.finish_reason == "length"
        assert req.next_nowait() == ""
        engine.close()


def test_async_engine_streams_run_in_the_event_loop_without_threads(tiny_chat_model_path: Path) -> None:
    """Async streams of a Llama with n_parallel > 1 wait on the event loop, woken by the engine: each
    takes one job of the executor (its preparation: template, sampler) and none while it streams, at
    the same time as the others, the text of solo runs (up to near-ties)."""
    prompts = [f"Client {i} wants" for i in range(6)]
    truth = solo_chats(tiny_chat_model_path, prompts)
    jobs: list[str] = []

    class Counting(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            jobs.append("job")
            return super().submit(fn, *args, **kwargs)

    with pyllama.Llama(tiny_chat_model_path, n_ctx=2048, n_threads=1, n_parallel=3) as llm:

        async def one(i: int, p: str) -> str:
            messages = [{"role": "user", "content": p}]
            if i % 2:
                stream = await llm.acomplete(p, max_tokens=12, temperature=0.0, stream=True)
                text = "".join([c["choices"][0]["text"] async for c in stream])
                return "complete:" + text
            stream = await llm.achat(messages, max_tokens=12, temperature=0.0, stream=True)
            parts = []
            async for c in stream:
                parts.append(c["choices"][0]["delta"].get("content") or "")
            return "".join(parts)

        async def main() -> list[str]:
            asyncio.get_running_loop().set_default_executor(Counting(4))
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

        results = asyncio.run(main())
        assert len(jobs) == len(prompts)  # one preparation each, no thread while streaming
        for i, (p, got) in enumerate(zip(prompts, results, strict=True)):
            if i % 2:
                want = llm.complete(p, max_tokens=12, temperature=0.0)["choices"][0]["text"]
                assert got == "complete:" + want
            else:
                text, margin = truth[p]
                assert got == text or margin < 1e-3


def eventfds() -> int:
    """The process's open eventfd descriptors (other tests' threads may open and close sockets meanwhile)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            pass  # closed meanwhile
    return n


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts eventfd descriptors in /proc")
def test_each_event_loop_gives_its_descriptor_back(tiny_chat_model_path: Path) -> None:
    """An event loop's Notifier lives as long as the loop: 30 asyncio.run() calls with an engine stream
    each leave no descriptor open behind them."""
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1024, n_threads=1, n_parallel=2) as llm:

        async def one() -> list[dict[str, Any]]:
            return [c async for c in await llm.acomplete("Once", max_tokens=3, ignore_eos=True, stream=True)]

        # the stream ran to its end (pieces may merge, a character split across tokens, so count tokens)
        last = asyncio.run(one())[-1]
        assert last["usage"]["completion_tokens"] == 3 and last["choices"][0]["finish_reason"] == "length"
        gc.collect()
        before = eventfds()
        for _ in range(30):
            asyncio.run(one())
        gc.collect()
        assert eventfds() <= before


def test_cancelling_an_async_engine_stream_frees_its_sequence(tiny_chat_model_path: Path) -> None:
    """Cancelling the task that iterates an engine stream (which waits on the event loop, not in a
    thread) cancels the request: the engine has nothing running soon after, and the Llama serves the
    next call."""
    with pyllama.Llama(tiny_chat_model_path, n_ctx=8192, n_threads=1, n_parallel=2) as llm:
        engine = llm._engine

        async def main() -> None:
            async def consume() -> None:
                async for _ in await llm.acomplete("Once", max_tokens=3000, ignore_eos=True, stream=True):
                    pass

            task = asyncio.create_task(consume())
            while engine.n_active == 0:
                if task.done():
                    task.result()  # it failed: raise why
                    pytest.fail("the stream ended before it started")
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 5
            while engine.n_active and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert engine.n_active == 0  # the request was cancelled, not left running
            out = await llm.acomplete("Once", max_tokens=3, ignore_eos=True)
            assert out["usage"]["completion_tokens"] == 3

        asyncio.run(main())


def test_llama_with_n_parallel(tiny_chat_model_path: Path, tmp_path: Path) -> None:
    prompts = [f"Thread {i} asks" for i in range(8)]
    truth = solo_chats(tiny_chat_model_path, prompts)
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    with pyllama.Llama(tiny_chat_model_path, n_ctx=2048, n_threads=1, n_parallel=4) as llm:
        assert llm._n_ctx_seq() == 512

        def work(p: str, i: int) -> None:
            try:
                if i % 2:
                    chunks = list(
                        llm.chat([{"role": "user", "content": p}], max_tokens=12, temperature=0.0, stream=True)
                    )
                    results[p] = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
                else:
                    out = llm.chat([{"role": "user", "content": p}], max_tokens=12, temperature=0.0)
                    results[p] = out["choices"][0]["message"]["content"]
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(p, i)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        for p in prompts:
            text, margin = truth[p]
            assert results[p] == text or margin < 1e-3
        with pytest.raises(ValueError, match="context holds 512"):
            llm.complete("word " * 600)
        with pytest.raises(pyllama.InvalidRequestError):
            llm.save_state()  # which slot?
    with pytest.raises(ValueError, match="DiskCache needs n_parallel=1"):
        pyllama.Llama(tiny_chat_model_path, n_ctx=512, n_parallel=2, cache=pyllama.DiskCache(tmp_path))


@pytest.mark.parametrize("n_parallel", [1, 3])
def test_n_choices_and_prompt_lists(tiny_chat_model_path: Path, n_parallel: int) -> None:
    ask = [{"role": "user", "content": "hi"}]
    with pyllama.Llama(tiny_chat_model_path, n_ctx=1536, n_threads=1, n_parallel=n_parallel) as llm:
        out = llm.chat(ask, n=3, max_tokens=6, seed=5)
        singles = [llm.chat(ask, max_tokens=6, seed=s) for s in (5, 6, 7)]
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        # choice i is the request with seed + i (sampled, not greedy: the seeds matter)
        assert [c["message"] for c in out["choices"]] == [s["choices"][0]["message"] for s in singles]
        assert out["usage"]["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]  # one prompt, counted once
        assert out["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
        many = llm.complete(["one two", "three four"], n=2, max_tokens=4, seed=1)
        expected = [
            llm.complete(p, max_tokens=4, seed=s)["choices"][0]["text"]
            for p in ("one two", "three four")
            for s in (1, 2)
        ]
        assert [c["text"] for c in many["choices"]] == expected
        with pytest.raises(ValueError, match="n=1"):
            llm.chat(ask, n=2, stream=True)


@pytest.mark.parametrize("kv_unified", [False, True], ids=["streams", "unified"])
def test_a_long_random_mix_keeps_memory_and_tokens_in_step(model: pyllama.Model, kv_unified: bool) -> None:
    """Waves of requests (a seeded random mix: three shared prefixes and unrelated prompts, prompts
    that repeat, some cancelled after their first token) through four sequences with a small host
    cache. After every wave each sequence's KV memory holds exactly the positions of the tokens the
    core says it holds (a copied or loaded prefix one token too long or too short, or cells left
    behind, breaks this), the memory never runs out (at most 4 x 288 positions ever needed), the
    host cache keeps to its budget, and every request that ran to its end gave its solo run's tokens."""
    rng = random.Random(15)
    prefixes = [
        list(model.tokenize(" ".join(f"{c}{i}" for i in range(n)))) for c, n in (("p", 60), ("q", 45), ("r", 30))
    ]
    tails = [list(model.tokenize(f" question {i} about it", add_special=False)) for i in range(6)]
    unrelated = [list(model.tokenize(f"Something else entirely, number {i}")) for i in range(4)]
    pool = [p + t for p in prefixes for t in tails] + unrelated
    assert max(len(p) for p in pool) + 24 <= 288
    truth: dict[tuple[tuple[int, ...], int], tuple[list[int], list[float]]] = {}
    budget = 3 << 20
    with pyllama.Context(model, n_ctx=4 * 288, n_seq_max=4, n_threads=1, kv_unified=kv_unified) as ctx:
        engine = pyllama.Engine(ctx, 4, threaded=False)
        engine.set_host_cache(budget)
        n_requests = 0
        for _ in range(14):
            wave = []
            for _ in range(rng.randint(1, 6)):
                prompt = rng.choice(pool)
                n = rng.randint(1, 24)
                wave.append((prompt, n, engine.submit(prompt, greedy(model), max_tokens=n, ignore_eos=True)))
            for _, _, req in wave:
                if rng.random() < 0.2:
                    next(iter(req))
                    req.cancel()
            for prompt, n, req in wave:
                req.run()
                n_requests += 1
                assert req.finish_reason in ("length", "cancelled")
                if req.finish_reason == "length":
                    key = (tuple(prompt), n)
                    if key not in truth:
                        truth[key] = solo_run(model, prompt, n)
                    assert agree_until_near_tie(req.completion_tokens, *truth[key]), (prompt, n)
            assert engine.n_active == 0
            for s in range(4):
                held = engine.tokens(s)
                assert ctx.seq_pos_max(s) == len(held) - 1, (s, len(held))
                if held:
                    assert ctx.seq_pos_min(s) == 0
            stats = engine.host_cache()
            assert stats["bytes"] <= budget
        assert stats["n_saved"] > 0 and stats["n_loaded"] > 0 and n_requests > 40
        engine.close()


def test_the_stop_word_is_the_stop_string_that_ended_it(model: pyllama.Model) -> None:
    """EngineRequest.stop_word names the stop string that ended a generation: of several that appear,
    the one that begins first in the text (the reply is cut before it); None when none did."""
    with pyllama.Context(model, n_ctx=512, n_threads=1) as ctx:
        engine = pyllama.Engine(ctx, 1)
        prompt = list(model.tokenize("Once upon a time"))
        free = engine.submit(prompt, greedy(model), max_tokens=24, ignore_eos=True)
        text = free.run()
        assert free.stop_word is None and free.finish_reason == "length"
        assert len(text) > 12
        stops = [text[8:12], text[4:7], "\x00never"]
        # the truth: where each stop string first begins in the free text (the longest among equals)
        found = sorted((text.find(s), -len(s), s) for s in stops if s in text)
        at, _, first = found[0]
        stopped = engine.submit(prompt, greedy(model), max_tokens=24, ignore_eos=True, stop=stops)
        out = stopped.run()
        assert stopped.finish_reason == "stop" and stopped.stop_word == first
        assert out == text[:at]
        engine.close()
