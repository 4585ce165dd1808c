"""Many threads on one Context and one Sampler: calls are serialised, nothing races or dangles."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import pyllama


def test_eight_threads_on_one_context(tiny_model_path: Path) -> None:
    model = pyllama.Model(str(tiny_model_path))
    ctx = pyllama.Context(model, n_ctx=8 * 64, n_seq_max=8, kv_unified=True, n_threads=1)
    sampler = pyllama.Sampler(model, temperature=0)
    prompts = [model.tokenize(f"Thread number {i} says hello " * (i + 1)) for i in range(8)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            toks = prompts[i]
            for start in range(0, len(toks), 5):  # several decodes per thread, interleaving with the others
                chunk = toks[start : start + 5]
                ctx.decode(pyllama.Batch.from_tokens(chunk, pos0=start, seq_id=i))
                sampler.sample(ctx, -1)
                ctx.logits(-1)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # Every sequence holds exactly its own prompt...
    for i in range(8):
        assert ctx.seq_pos_min(i) == 0
        assert ctx.seq_pos_max(i) == len(prompts[i]) - 1
    # ...and continues exactly like a fresh evaluation of that prompt alone.
    fresh = pyllama.Context(model, n_ctx=64 * 8)
    for i in (0, 7):
        ctx.decode(pyllama.Batch.from_tokens([42], pos0=len(prompts[i]), seq_id=i))
        fresh.memory_clear()
        fresh.decode(pyllama.Batch.from_tokens([*prompts[i], 42]))
        np.testing.assert_allclose(ctx.logits(-1), fresh.logits(-1), atol=1e-3)


def test_close_during_decode_waits_and_never_crashes(tiny_model_path: Path) -> None:
    model = pyllama.Model(str(tiny_model_path))
    ctx = pyllama.Context(model, n_ctx=2048, n_batch=2048, n_ubatch=64, n_threads=1)
    tokens = model.tokenize("word " * 1500)[:2000]
    started = threading.Event()
    outcome: list[str] = []

    def decode_forever() -> None:
        try:
            while True:
                ctx.memory_clear()
                started.set()
                ctx.decode(pyllama.Batch.from_tokens(tokens))
        except pyllama.LlamaError as e:
            outcome.append(str(e))

    t = threading.Thread(target=decode_forever)
    t.start()
    started.wait()
    ctx.close()
    t.join(timeout=30)
    assert not t.is_alive()
    assert outcome and ("closed" in outcome[0] or "cancelled" in outcome[0])
    with pytest.raises(pyllama.LlamaError, match="closed"):
        ctx.logits()


def test_context_keeps_its_model_alive(tiny_model_path: Path) -> None:
    model = pyllama.Model(str(tiny_model_path))
    ctx = pyllama.Context(model, n_ctx=64)
    sampler = pyllama.Sampler(model, temperature=0)
    model.close()  # the weights stay while the Context and the Sampler use them
    del model
    ctx.decode(pyllama.Batch.from_tokens([1, 15043, 3186]))
    assert sampler.sample(ctx) == int(np.argmax(ctx.logits()))
