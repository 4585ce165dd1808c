"""Context: decoding, logits, KV memory, state, threads and signals, each checked against an independent truth.

The independent truths used here: a fresh evaluation of the same tokens (one batch, token by token, or in another
Context), numpy on the returned logits, a Python thread's progress counter (for the GIL), the signal's own timing (for
Ctrl-C), and llama.cpp's documented exceptions. Bad input runs in a subprocess, so a crash fails a test instead of
taking pytest down.

Measured tolerances (tiny 2-layer random llama, logits of magnitude ~4, 1 or 2 threads): the same tokens evaluated in
one batch, token by token, or as a kept KV prefix plus the new suffix differ by at most 1.7e-3 with the default f16 KV
cache and flash attention "auto" (20 random 40-token prompts), and by at most 1.3e-4 with an f32 KV cache and flash
attention off. The tests use atol=1e-2 and atol=1e-3 respectively.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pyllama

from conftest import run_python
from isolated_cases import check_case, run_cases

Batch = pyllama.Batch

# The default f16 KV cache with flash attention "auto" (measured max 1.7e-3, see the module docstring).
ATOL_F16 = 1e-2
# An f32 KV cache without flash attention (measured max 1.3e-4).
ATOL_F32 = 1e-3


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> Iterator[pyllama.Model]:
    with pyllama.Model(str(tiny_model_path)) as m:
        yield m


def random_tokens(n: int, seed: int = 0) -> list[int]:
    """Random ids of ordinary tokens of the llama-spm vocabulary (ids 0-2 are <unk>, <s>, </s>)."""
    return [int(t) for t in np.random.default_rng(seed).integers(3, 32000, n)]


def fresh_last_logits(model: pyllama.Model, tokens: Sequence[int], **kwargs: object) -> np.ndarray:
    """The last logits of `tokens` evaluated in one batch by a brand-new Context: the reference."""
    kwargs.setdefault("n_ctx", 256)
    kwargs.setdefault("n_threads", 1)
    with pyllama.Context(model, **kwargs) as ctx:
        ctx.decode(Batch.from_tokens(list(tokens)))
        return ctx.logits()


# --- 3. one batch, token by token, kept prefix + suffix --------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "atol"),
    [({}, ATOL_F16), ({"type_k": "f32", "type_v": "f32", "flash_attn": "off"}, ATOL_F32)],
    ids=["f16-kv", "f32-kv-no-flash"],
)
def test_one_batch_token_by_token_and_kept_prefix_agree(
    model: pyllama.Model, kwargs: dict[str, object], atol: float
) -> None:
    """The last logits of a prompt do not depend on how it was fed: in one batch, one token per decode, or as a KV
    prefix kept from an earlier decode (seq_rm of everything after it) plus only the new suffix."""
    tokens = random_tokens(40, seed=3)
    with pyllama.Context(model, n_ctx=256, n_threads=1, **kwargs) as ctx:
        ctx.decode(Batch.from_tokens(tokens))
        one_batch = ctx.logits()

        ctx.memory_clear()
        for pos, tok in enumerate(tokens):
            ctx.decode(Batch.from_tokens([tok], pos0=pos))
        token_by_token = ctx.logits()
        assert ctx.seq_pos_max(0) == len(tokens) - 1

        # Keep positions 0..24, drop the rest, then decode only the suffix.
        assert ctx.seq_rm(0, 25, -1)
        assert (ctx.seq_pos_min(0), ctx.seq_pos_max(0)) == (0, 24)
        ctx.decode(Batch.from_tokens(tokens[25:], pos0=25))
        kept_prefix = ctx.logits()

    np.testing.assert_allclose(token_by_token, one_batch, atol=atol, rtol=0)
    np.testing.assert_allclose(kept_prefix, one_batch, atol=atol, rtol=0)


def test_logits_all_and_batch_indices(model: pyllama.Model) -> None:
    """logits_all() stacks the outputs of the batch in order; logits(i) with a batch index, logits(-k) counted back
    from the last output and logits(out=...) all give the same rows; and each row equals the last logits of a
    fresh evaluation of the prefix ending at that token."""
    tokens = random_tokens(12, seed=4)
    batch = Batch()
    for pos, tok in enumerate(tokens):
        batch.add(tok, pos, logits=pos in (3, 7, 11))
    assert batch.logits == [pos in (3, 7, 11) for pos in range(12)]
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.decode(batch)
        rows = ctx.logits_all()
        assert rows.shape == (3, model.n_vocab) and rows.dtype == np.float32
        np.testing.assert_array_equal(rows[0], ctx.logits(3))
        np.testing.assert_array_equal(rows[1], ctx.logits(7))
        np.testing.assert_array_equal(rows[2], ctx.logits(11))
        np.testing.assert_array_equal(rows[2], ctx.logits(-1))
        np.testing.assert_array_equal(rows[0], ctx.logits(-3))
        out = np.full(model.n_vocab, np.nan, dtype=np.float32)
        returned = ctx.logits(7, out=out)
        assert returned is out
        np.testing.assert_array_equal(out, rows[1])
        # A fresh copy each time: writing into one result leaves the next untouched.
        first = ctx.logits(3)
        first[:] = 0
        np.testing.assert_array_equal(ctx.logits(3), rows[0])
    for row, end in zip(rows, (4, 8, 12), strict=True):
        np.testing.assert_allclose(row, fresh_last_logits(model, tokens[:end]), atol=ATOL_F16, rtol=0)


# --- 6. two sequences in one batch -------------------------------------------------------------------------------


def test_two_sequences_in_one_batch_match_each_alone(model: pyllama.Model) -> None:
    """Two prompts of different lengths decoded together in one batch (sequences 0 and 1) give, for each, the
    logits that the prompt gives alone in its own Context; and each sequence then continues independently."""
    a, b = random_tokens(17, seed=5), random_tokens(9, seed=6)
    batch = Batch()
    for pos, tok in enumerate(a):
        batch.add(tok, pos, seq_id=0, logits=pos == len(a) - 1)
    for pos, tok in enumerate(b):
        batch.add(tok, pos, seq_id=1, logits=pos == len(b) - 1)
    with pyllama.Context(model, n_ctx=512, n_seq_max=2, n_threads=1) as ctx:
        ctx.decode(batch)
        np.testing.assert_allclose(ctx.logits(len(a) - 1), fresh_last_logits(model, a), atol=ATOL_F16, rtol=0)
        np.testing.assert_allclose(ctx.logits(-1), fresh_last_logits(model, b), atol=ATOL_F16, rtol=0)
        assert (ctx.seq_pos_max(0), ctx.seq_pos_max(1)) == (len(a) - 1, len(b) - 1)
        # One more token on sequence 1 only: it sees its own prompt, not sequence 0's.
        ctx.decode(Batch.from_tokens([42], pos0=len(b), seq_id=1))
        np.testing.assert_allclose(ctx.logits(), fresh_last_logits(model, [*b, 42]), atol=ATOL_F16, rtol=0)
        assert ctx.seq_pos_max(0) == len(a) - 1


def test_batch_with_a_token_in_two_sequences(model: pyllama.Model) -> None:
    """A shared prefix given once with seq_id=[0, 1] and then different suffixes per sequence gives the same logits
    as each full prompt alone."""
    prefix, s0, s1 = random_tokens(10, seed=7), [100, 200, 300], [400, 500]
    # A token in several sequences needs one KV buffer for all of them (kv_unified=True); without it llama.cpp
    # refuses the batch (see the "coupled sequences" bad-input case).
    with pyllama.Context(model, n_ctx=512, n_seq_max=2, kv_unified=True, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(prefix, seq_id=[0, 1], logits_last=False))
        assert ctx.seq_pos_max(0) == ctx.seq_pos_max(1) == len(prefix) - 1
        ctx.decode(Batch.from_tokens(s0, pos0=len(prefix), seq_id=0))
        np.testing.assert_allclose(ctx.logits(), fresh_last_logits(model, prefix + s0), atol=ATOL_F16, rtol=0)
        ctx.decode(Batch.from_tokens(s1, pos0=len(prefix), seq_id=1))
        np.testing.assert_allclose(ctx.logits(), fresh_last_logits(model, prefix + s1), atol=ATOL_F16, rtol=0)


# --- 4. state ----------------------------------------------------------------------------------------------------


def test_state_set_never_answers_stale_logits(model: pyllama.Model) -> None:
    """After state_get, more decoding, memory_clear and state_set, logits() raises IndexError rather than answering
    with the logits of a decode made after the state was saved.

    At the pinned llama.cpp a state holds no logits while llama.cpp's output buffer still holds a later decode's;
    pyllama forgets the outputs on state_set, so logits() raises IndexError instead of answering stale logits."""
    tokens = random_tokens(20, seed=8)
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(tokens))
        saved_logits = ctx.logits()
        state = ctx.state_get()
        ctx.decode(Batch.from_tokens([5], pos0=len(tokens)))
        later_logits = ctx.logits()
        ctx.memory_clear()
        ctx.state_set(state)
        assert ctx.seq_pos_max(0) == len(tokens) - 1
        with pytest.raises(IndexError):
            ctx.logits()
        assert not np.array_equal(saved_logits, later_logits)


def test_state_round_trip_continues_identically(model: pyllama.Model) -> None:
    """Decoding after state_get -> memory_clear -> state_set gives bit-identical logits to decoding the same tokens
    without the save/restore, in the same Context and in a second Context loaded from the same bytes."""
    tokens, more = random_tokens(20, seed=9), [11, 22, 33]
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(tokens))
        state = ctx.state_get()
        ctx.decode(Batch.from_tokens(more, pos0=len(tokens)))
        direct = ctx.logits()

        ctx.memory_clear()
        assert ctx.seq_pos_max(0) == -1
        ctx.state_set(state)
        assert (ctx.seq_pos_min(0), ctx.seq_pos_max(0)) == (0, len(tokens) - 1)
        ctx.decode(Batch.from_tokens(more, pos0=len(tokens)))
        np.testing.assert_array_equal(ctx.logits(), direct)

    with pyllama.Context(model, n_ctx=256, n_threads=1) as other:
        other.state_set(state)
        other.decode(Batch.from_tokens(more, pos0=len(tokens)))
        np.testing.assert_array_equal(other.logits(), direct)


def test_state_file_round_trip(model: pyllama.Model, tmp_path: Path) -> None:
    """state_save_file / state_load_file give back the saved token list, restore the KV memory, and continuing
    decodes bit-identically to the context that saved it."""
    tokens = random_tokens(30, seed=10)
    path = tmp_path / "state.bin"
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(tokens))
        ctx.state_save_file(str(path), tokens)
        ctx.decode(Batch.from_tokens([7, 8], pos0=len(tokens)))
        direct = ctx.logits()
    assert path.stat().st_size > 0
    with pyllama.Context(model, n_ctx=256, n_threads=1) as loaded:
        assert loaded.state_load_file(str(path)) == tokens
        assert loaded.seq_pos_max(0) == len(tokens) - 1
        loaded.decode(Batch.from_tokens([7, 8], pos0=len(tokens)))
        np.testing.assert_array_equal(loaded.logits(), direct)


def test_seq_state_into_another_sequence(model: pyllama.Model) -> None:
    """seq_state_get(0) loaded with seq_state_set into sequence 1 gives sequence 1 the same positions, and a token
    decoded on sequence 1 then has the logits of a fresh evaluation of the prompt plus that token (exactly: same
    Context size and batch shapes), while sequence 0 is untouched."""
    tokens = random_tokens(20, seed=11)
    with pyllama.Context(model, n_ctx=512, n_seq_max=2, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(tokens, seq_id=0))
        blob = ctx.seq_state_get(0)
        assert isinstance(blob, bytes) and len(blob) > 0
        assert ctx.seq_pos_max(1) == -1
        ctx.seq_state_set(blob, 1)
        assert (ctx.seq_pos_min(1), ctx.seq_pos_max(1)) == (0, len(tokens) - 1)
        ctx.decode(Batch.from_tokens([5], pos0=len(tokens), seq_id=1))
        via_seq1 = ctx.logits()
        ctx.decode(Batch.from_tokens([5], pos0=len(tokens), seq_id=0))
        via_seq0 = ctx.logits()
    np.testing.assert_array_equal(via_seq1, via_seq0)
    np.testing.assert_allclose(via_seq1, fresh_last_logits(model, [*tokens, 5]), atol=ATOL_F16, rtol=0)


@pytest.mark.parametrize("kv_unified", [True, False], ids=["unified", "per-sequence"])
def test_seq_cp_then_continue(model: pyllama.Model, kv_unified: bool) -> None:
    """After seq_cp(0, 1), continuing sequence 1 gives the same logits as continuing sequence 0 with the same token,
    and both equal a fresh evaluation."""
    tokens = random_tokens(20, seed=12)
    with pyllama.Context(model, n_ctx=512, n_seq_max=2, kv_unified=kv_unified, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(tokens, seq_id=0))
        ctx.seq_cp(0, 1)
        assert (ctx.seq_pos_min(1), ctx.seq_pos_max(1)) == (0, len(tokens) - 1)
        ctx.decode(Batch.from_tokens([9], pos0=len(tokens), seq_id=1))
        cont1 = ctx.logits()
        ctx.decode(Batch.from_tokens([9], pos0=len(tokens), seq_id=0))
        cont0 = ctx.logits()
        assert ctx.seq_pos_max(0) == ctx.seq_pos_max(1) == len(tokens)
    np.testing.assert_allclose(cont1, cont0, atol=ATOL_F16, rtol=0)
    np.testing.assert_allclose(cont1, fresh_last_logits(model, [*tokens, 9]), atol=ATOL_F16, rtol=0)


@pytest.mark.parametrize("kv_unified", [True, False], ids=["unified", "per-sequence"])
def test_seq_keep_drops_every_other_sequence(model: pyllama.Model, kv_unified: bool) -> None:
    """seq_keep(1) "removes all tokens that do not belong to the specified sequence" (llama.h): afterwards sequence
    0 is empty and sequence 1 is whole.

    With per-sequence KV buffers (kv_unified=False) llama.cpp's seq_keep only clears the kept sequence's own
    buffer; pyllama removes every other sequence instead, which is right in both layouts."""
    tokens = random_tokens(8, seed=21)
    with pyllama.Context(model, n_ctx=512, n_seq_max=2, kv_unified=kv_unified, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(tokens, seq_id=0))
        ctx.decode(Batch.from_tokens(tokens[:5], seq_id=1))
        ctx.seq_keep(1)
        assert ctx.seq_pos_max(1) == 4
        assert ctx.seq_pos_max(0) == -1


def test_seq_add_shifts_positions(model: pyllama.Model) -> None:
    """seq_add moves positions (can_shift is True for a llama KV cache): after removing the first 5 tokens and
    shifting the rest down by 5, the KV memory covers 0..14 and a further token decodes at position 15."""
    tokens = random_tokens(20, seed=13)
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        assert ctx.can_shift
        ctx.decode(Batch.from_tokens(tokens))
        assert ctx.seq_rm(0, 0, 5)
        ctx.seq_add(0, 5, -1, -5)
        assert (ctx.seq_pos_min(0), ctx.seq_pos_max(0)) == (0, 14)
        ctx.decode(Batch.from_tokens([3], pos0=15))
        assert ctx.seq_pos_max(0) == 15
        assert np.isfinite(ctx.logits()).all()


# --- 8/9. KV full: LlamaError, memory unchanged, context still usable ---------------------------------------------


def test_kv_full_raises_keeps_memory_and_recovers(model: pyllama.Model) -> None:
    """A decode that finds no free KV cell raises LlamaError and leaves the KV memory as it was (seq_pos_max of
    every sequence unchanged); after seq_rm frees cells the same decode succeeds and gives the logits of a fresh
    evaluation of the same tokens.

    llama.cpp pads n_ctx up to a multiple of 256, so n_ctx=32 is really 256, and with one sequence the position
    check (a ValueError) always comes before a full cache. A full cache needs several sequences sharing one unified
    KV buffer of 256 cells: 200 tokens in sequence 0, 50 in sequence 1, then 50 more for sequence 1."""
    a, b = random_tokens(200, seed=14), random_tokens(100, seed=15)
    with pyllama.Context(model, n_ctx=256, n_seq_max=2, kv_unified=True, n_threads=1) as ctx:
        assert ctx.n_ctx == 256 and ctx.n_ctx_seq == 256
        ctx.decode(Batch.from_tokens(a, seq_id=0))
        ctx.decode(Batch.from_tokens(b[:50], seq_id=1))
        before = (ctx.seq_pos_max(0), ctx.seq_pos_max(1))
        assert before == (199, 49)
        with pytest.raises(pyllama.LlamaError, match="no free KV slot"):
            ctx.decode(Batch.from_tokens(b[50:], pos0=50, seq_id=1))
        assert (ctx.seq_pos_max(0), ctx.seq_pos_max(1)) == before
        assert ctx.seq_pos_min(1) == 0
        with pytest.raises(IndexError):
            ctx.logits()  # the failed decode has no outputs
        # Free half of sequence 0 and retry: it fits now.
        assert ctx.seq_rm(0, 100, -1)
        ctx.decode(Batch.from_tokens(b[50:], pos0=50, seq_id=1))
        assert ctx.seq_pos_max(1) == 99
        recovered = ctx.logits()
    np.testing.assert_allclose(recovered, fresh_last_logits(model, b), atol=ATOL_F16, rtol=0)


# --- 11. perf counters -------------------------------------------------------------------------------------------


def test_perf_counts_prompt_tokens_of_a_decode(model: pyllama.Model) -> None:
    """perf() right after decode() counts the decode: a 12-token batch adds 12 to n_p_eval (and time to
    t_p_eval_ms); a 1-token batch adds 1 to n_eval.

    llama.cpp only books a decode into its counters at its next synchronize; pyllama's decode synchronizes before
    it returns, so perf() right after a decode counts it, and single-token decodes count as generated tokens."""
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.perf_reset()
        ctx.decode(Batch.from_tokens(random_tokens(12, seed=16)))
        perf = ctx.perf()
        assert perf["n_p_eval"] == 12, perf
        assert perf["t_p_eval_ms"] > 0, perf
        ctx.decode(Batch.from_tokens([5], pos0=12))
        ctx.decode(Batch.from_tokens([6], pos0=13))
        perf = ctx.perf()
        assert (perf["n_p_eval"], perf["n_eval"]) == (12, 2), perf


def test_perf_counts_once_outputs_are_read(model: pyllama.Model) -> None:
    """With the logits read after each decode (as a generation loop does), n_p_eval counts the prompt's tokens,
    n_eval the single-token decodes, perf_reset zeroes them (llama.cpp reports at least 1), and no_perf=True keeps
    the timings at zero."""
    prompt = random_tokens(12, seed=17)
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.perf_reset()
        ctx.decode(Batch.from_tokens(prompt))
        ctx.logits()
        perf = ctx.perf()
        assert perf["n_p_eval"] == 12 and perf["t_p_eval_ms"] > 0, perf
        for i in range(3):
            ctx.decode(Batch.from_tokens([5 + i], pos0=12 + i))
            ctx.logits()
        perf = ctx.perf()
        assert (perf["n_p_eval"], perf["n_eval"]) == (12, 3), perf
        ctx.perf_reset()
        perf = ctx.perf()
        assert (perf["n_p_eval"], perf["n_eval"]) == (1, 1), perf
    with pyllama.Context(model, n_ctx=256, n_threads=1, no_perf=True) as quiet:
        quiet.decode(Batch.from_tokens(prompt))
        quiet.logits()
        assert quiet.perf()["t_p_eval_ms"] == 0


# --- 7. the GIL ----------------------------------------------------------------------------------------------------


def test_decode_releases_the_gil(model: pyllama.Model) -> None:
    """While the main thread is inside a long decode (>= 200 ms: 2000 tokens in micro-batches of 32 on one thread),
    a pure-Python counter thread keeps running at most of its idle rate. The control: a pure-Python busy loop of
    the same duration in the main thread, which holds the GIL (the switch interval is raised to 5 s so the
    interpreter does not hand it over by itself), stalls the counter almost completely. So the measurement can
    tell a held GIL from a released one."""
    tokens = random_tokens(2000, seed=18)
    count = 0
    stop = threading.Event()

    def counter() -> None:
        nonlocal count
        while not stop.is_set():
            count += 1
            time.sleep(0)  # gives the GIL back every iteration, so the main thread never waits for it

    def rate(fn: Callable[[], object]) -> tuple[float, float]:
        c0, t0 = count, time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        return (count - c0) / dt, dt

    old = sys.getswitchinterval()
    with pyllama.Context(model, n_ctx=2048, n_batch=2048, n_ubatch=32, n_threads=1, n_threads_batch=1) as ctx:
        thread = threading.Thread(target=counter)
        sys.setswitchinterval(5.0)
        thread.start()
        try:
            idle, _ = rate(lambda: time.sleep(0.2))
            during_decode, duration = rate(lambda: ctx.decode(Batch.from_tokens(tokens)))

            def busy() -> None:
                end = time.perf_counter() + duration
                while time.perf_counter() < end:
                    pass

            during_busy, _ = rate(busy)
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(old)
    assert duration >= 0.2, f"the decode took only {duration:.3f} s; the measurement needs a longer one"
    assert idle > 0
    assert during_decode > 0.3 * idle, (idle, during_decode, during_busy)
    assert during_busy < 0.05 * idle, (idle, during_decode, during_busy)


# --- 10. Ctrl-C and cancel -----------------------------------------------------------------------------------------

SIGINT_CODE = """
import json, os, signal, sys, threading, time
import numpy as np
import pyllama

B = pyllama.Batch
m = pyllama.Model(sys.argv[1])
kw = dict(n_ctx=2048, n_batch=2048, n_ubatch=16, n_threads=1, n_threads_batch=1)
ctx = pyllama.Context(m, **kw)
toks = np.random.default_rng(0).integers(3, 32000, 2000).tolist()
ctx.decode(B.from_tokens(toks[:10]))
# How long the long decode takes uninterrupted here, to signal at about 40% of it (at most 0.3 s).
t0 = time.perf_counter()
ctx.decode(B.from_tokens(toks[10:], pos0=10))
full = time.perf_counter() - t0
ctx.seq_rm(0, 10, -1)
before = ctx.seq_pos_max(0)
delay = max(0.02, min(0.3, 0.4 * full))
# The signal has to land while the decode runs. On a loaded machine the timer may fire late, after the decode
# has finished (the KeyboardInterrupt then comes after a complete decode); such a miss is retried, up to 3 times.
for attempt in range(3):
    sent = []
    def fire():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)
    timer = threading.Timer(delay, fire)
    t0 = time.perf_counter()
    timer.start()
    try:
        ctx.decode(B.from_tokens(toks[10:], pos0=10))
        outcome = "completed"
        timer.join()
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    t1 = time.perf_counter()
    timer.join()
    after = ctx.seq_pos_max(0)
    if after != len(toks) - 1:
        break
    try:
        time.sleep(0.5)  # a signal still in flight lands here
    except KeyboardInterrupt:
        pass
    ctx.seq_rm(0, 10, -1)
ctx.decode(B.from_tokens(toks[10:14], pos0=10))
resumed = ctx.logits()
fresh = pyllama.Context(m, **kw)
fresh.decode(B.from_tokens(toks[:14]))
print(json.dumps({
    "outcome": outcome, "attempts": attempt + 1, "full": full, "delay": delay,
    "latency": t1 - sent[0] if sent else None,
    "before": before, "after": after, "pos_after_resume": ctx.seq_pos_max(0),
    "max_diff": float(np.abs(resumed - fresh.logits()).max()),
}))
"""


def test_ctrl_c_interrupts_a_decode(tiny_model_path: Path) -> None:
    """SIGINT during a long decode on the main thread raises KeyboardInterrupt within a micro-batch (well under
    1 s of the signal, measured from when it was sent), rolls the KV memory back to its state before the call
    (seq_pos_max as before), and the context then decodes the same tokens to the logits of a fresh evaluation."""
    proc = run_python(SIGINT_CODE, str(tiny_model_path), timeout=120)
    assert proc.returncode == 0, f"crashed with {proc.returncode}: {proc.stderr[-2000:]}"
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["outcome"] == "KeyboardInterrupt", r
    assert r["latency"] is not None and r["latency"] < 1.0, r
    assert r["before"] == r["after"] == 9, r
    assert r["pos_after_resume"] == 13, r
    assert r["max_diff"] <= ATOL_F16, r


def _long_decode_duration(ctx: pyllama.Context, tokens: list[int]) -> float:
    t0 = time.perf_counter()
    ctx.decode(Batch.from_tokens(tokens, pos0=10))
    duration = time.perf_counter() - t0
    ctx.seq_rm(0, 10, -1)
    return duration


def test_cancel_from_another_thread(model: pyllama.Model) -> None:
    """ctx.cancel() from another thread stops a decode in progress with LlamaError mentioning "cancelled", before
    it would have finished; the KV memory is rolled back and the next decode works and matches a fresh
    evaluation."""
    tokens = random_tokens(2000, seed=19)
    kw = {"n_ctx": 2048, "n_batch": 2048, "n_ubatch": 16, "n_threads": 1, "n_threads_batch": 1}
    with pyllama.Context(model, **kw) as ctx:
        ctx.decode(Batch.from_tokens(tokens[:10]))
        full = _long_decode_duration(ctx, tokens[10:])
        timer = threading.Timer(max(0.02, 0.4 * full), ctx.cancel)
        t0 = time.perf_counter()
        timer.start()
        with pytest.raises(pyllama.LlamaError, match="cancelled"):
            ctx.decode(Batch.from_tokens(tokens[10:], pos0=10))
        elapsed = time.perf_counter() - t0
        timer.join()
        assert elapsed < full, (elapsed, full)
        assert ctx.seq_pos_max(0) == 9
        ctx.decode(Batch.from_tokens(tokens[10:14], pos0=10))
        resumed = ctx.logits()
    np.testing.assert_allclose(resumed, fresh_last_logits(model, tokens[:14], **kw), atol=ATOL_F16, rtol=0)


def test_cancel_with_no_decode_in_progress_does_not_cancel_the_next(model: pyllama.Model) -> None:
    """cancel() is documented as "Ask a decode in progress (in another thread) to stop". Called while no decode is
    running (e.g. a Stop button pressed just after generation ended) it should not make the *next* decode fail.

    cancel() stops a decode in progress; it must not leave a flag behind that fails the next decode."""
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens([1, 2, 3]))
        ctx.cancel()
        ctx.decode(Batch.from_tokens([4], pos0=3))
        assert ctx.seq_pos_max(0) == 3


# --- 8. bad input, crash-isolated in subprocesses ---------------------------------------------------------------

# Each case: code run with `m` (the tiny model), `B` (Batch), `np`, `TMP` and `ctx` (n_ctx=256 -> n_ctx_seq 256,
# n_batch=32, n_ubatch=16, n_seq_max=2); the exception type it must raise and a fragment of its message.
CASES: dict[str, tuple[str, str, str]] = {
    # Batch / decode validation
    "empty batch": ("ctx.decode(B())", "ValueError", "empty"),
    "token id == n_vocab": ("ctx.decode(B.from_tokens([32000]))", "ValueError", "out of range"),
    "token id negative": ("ctx.decode(B.from_tokens([-1]))", "ValueError", "out of range"),
    "token id huge": ("ctx.decode(B.from_tokens([2**40]))", "ValueError", "out of range"),
    "position past n_ctx_seq": ("ctx.decode(B.from_tokens([1, 2], pos0=255))", "ValueError", "position 256"),
    "position negative": ("b = B(); b.add(1, -1)", "ValueError", "position"),
    "seq id == n_seq_max": ("ctx.decode(B.from_tokens([1], seq_id=2))", "ValueError", "sequence id 2"),
    "seq id negative": ("ctx.decode(B.from_tokens([1], seq_id=-1))", "ValueError", "sequence id -1"),
    "no seq id": ("ctx.decode(B.from_tokens([1], seq_id=[]))", "ValueError", "no sequence id"),
    "more tokens than n_batch": ("ctx.decode(B.from_tokens([1] * 33))", "ValueError", "n_batch is 32"),
    "non-causal over n_ubatch": (
        "c = pyllama.Context(m, n_ctx=256, n_ubatch=8, attention_type='non_causal'); c.decode(B.from_tokens([1] * 9))",
        "ValueError",
        "n_ubatch is 8",
    ),
    "embeddings batch width": (
        "ctx.decode(B.from_embeddings(np.zeros((2, 3), np.float32)))",
        "ValueError",
        "values per token",
    ),
    "set_logits out of range": ("B.from_tokens([1, 2]).set_logits(2)", "IndexError", "out of range"),
    "positions not consecutive": (
        "ctx.decode(B.from_tokens([1, 2, 3])); ctx.decode(B.from_tokens([4], pos0=10))",
        "ValueError",
        "llama.cpp refused the batch",
    ),
    # llama.cpp refuses a token in two sequences when each sequence has its own KV buffer and logs why
    # ("coupled sequences ... -kvu") but returns the "no KV slot" code: the logged reason must be in the message.
    "coupled sequences without kv_unified": (
        "ctx.decode(B.from_tokens([1, 2, 3], seq_id=[0, 1]))",
        "LlamaError",
        "coupled",
    ),
    # outputs
    "logits of a non-output": ("ctx.decode(B.from_tokens([1, 2, 3])); ctx.logits(0)", "IndexError", "not an output"),
    "logits past the batch": ("ctx.decode(B.from_tokens([1, 2, 3])); ctx.logits(3)", "IndexError", "past the last"),
    "logits -2 with 1 output": ("ctx.decode(B.from_tokens([1, 2, 3])); ctx.logits(-2)", "IndexError", "1 outputs"),
    "logits before any decode": ("ctx.logits()", "IndexError", "no outputs"),
    "logits out float64": (
        "ctx.decode(B.from_tokens([1])); ctx.logits(out=np.zeros(32000, np.float64))",
        "TypeError",
        "float32",
    ),
    "logits out list": ("ctx.decode(B.from_tokens([1])); ctx.logits(out=[0.0] * 32000)", "TypeError", "float32"),
    "logits out short": (
        "ctx.decode(B.from_tokens([1])); ctx.logits(out=np.zeros(31999, np.float32))",
        "ValueError",
        "32000",
    ),
    "logits out 2-D wrong size": (
        "ctx.decode(B.from_tokens([1])); ctx.logits(out=np.zeros((2, 32000), np.float32))",
        "ValueError",
        "32000",
    ),
    "logits out strided": (
        "ctx.decode(B.from_tokens([1])); ctx.logits(out=np.zeros(64000, np.float32)[::2])",
        "ValueError",
        "C-contiguous",
    ),
    "logits out read-only": (
        "ctx.decode(B.from_tokens([1])); a = np.zeros(32000, np.float32); a.flags.writeable = False; ctx.logits(out=a)",
        "ValueError",
        "writable",
    ),
    "embeddings without embeddings=True": (
        "ctx.decode(B.from_tokens([1])); ctx.embeddings()",
        "IndexError",
        "embeddings=True",
    ),
    # memory functions
    "seq_rm seq out of range": ("ctx.seq_rm(2)", "ValueError", "seq_id 2"),
    "seq_rm seq -2": ("ctx.seq_rm(-2)", "ValueError", "seq_id -2"),
    "seq_cp dst out of range": ("ctx.seq_cp(0, 2)", "ValueError", "seq_id 2"),
    "seq_cp src -1": ("ctx.seq_cp(-1, 1)", "ValueError", "seq_id -1"),
    "seq_keep out of range": ("ctx.seq_keep(5)", "ValueError", "seq_id 5"),
    "seq_add out of range": ("ctx.seq_add(2, 0, 1, 1)", "ValueError", "seq_id 2"),
    "seq_div out of range": ("ctx.seq_div(2, 0, 1, 2)", "ValueError", "seq_id 2"),
    "seq_div by zero": ("ctx.seq_div(0, 0, 1, 0)", "ValueError", "d must be"),
    "seq_pos_min out of range": ("ctx.seq_pos_min(2)", "ValueError", "seq_id 2"),
    "seq_pos_max -1": ("ctx.seq_pos_max(-1)", "ValueError", "seq_id -1"),
    "seq_state_get out of range": ("ctx.seq_state_get(2)", "ValueError", "seq_id 2"),
    "seq_state_set out of range": ("ctx.seq_state_set(ctx.seq_state_get(0), 7)", "ValueError", "seq_id 7"),
    # state
    "state_set garbage": ("ctx.state_set(b'garbage')", "LlamaError", "could not load the state"),
    "state_set empty": ("ctx.state_set(b'')", "LlamaError", "could not load the state"),
    "state_set truncated half": (
        "ctx.decode(B.from_tokens([1, 2, 3, 4, 5])); s = ctx.state_get(); ctx.state_set(s[: len(s) // 2])",
        "LlamaError",
        "could not load the state",
    ),
    "state_set truncated by one byte": (
        "ctx.decode(B.from_tokens([1, 2, 3, 4, 5])); s = ctx.state_get(); ctx.state_set(s[:-1])",
        "LlamaError",
        "could not load the state",
    ),
    "state_set other architecture": (
        "ctx.decode(B.from_tokens([1, 2])); s = ctx.state_get(); ctx.state_set(s.replace(b'llama', b'gemma', 1))",
        "LlamaError",
        "wrong model arch",
    ),
    # llama.cpp's message quotes the state's architecture string; non-UTF-8 bytes there must not turn the
    # LlamaError into a UnicodeDecodeError.
    "state_set non-UTF-8 architecture": (
        "ctx.decode(B.from_tokens([1, 2])); s = ctx.state_get(); ctx.state_set(s.replace(b'llama', b'\\xffllm', 1))",
        "LlamaError",
        "wrong model arch",
    ),
    "seq_state_set garbage": ("ctx.seq_state_set(b'garbage', 1)", "LlamaError", "magic"),
    "seq_state_set truncated": (
        "ctx.decode(B.from_tokens([1, 2, 3])); s = ctx.seq_state_get(0); ctx.seq_state_set(s[:-3], 1)",
        "LlamaError",
        "could not load the sequence state",
    ),
    "state_load_file missing": ("ctx.state_load_file(TMP + '/none.bin')", "LlamaError", "could not load"),
    "state_load_file garbage": (
        "open(TMP + '/g.bin', 'wb').write(b'garbage' * 100); ctx.state_load_file(TMP + '/g.bin')",
        "LlamaError",
        "could not load",
    ),
    "state_load_file truncated": (
        "ctx.decode(B.from_tokens([1, 2, 3])); ctx.state_save_file(TMP + '/s.bin', [1, 2, 3]); "
        "d = open(TMP + '/s.bin', 'rb').read(); open(TMP + '/t.bin', 'wb').write(d[: len(d) // 2]); "
        "ctx.state_load_file(TMP + '/t.bin')",
        "LlamaError",
        "could not load",
    ),
    "state_save_file bad dir": ("ctx.state_save_file(TMP + '/no/such/dir/s.bin', [1])", "LlamaError", "could not"),
    # Context construction
    "n_seq_max 1000": ("pyllama.Context(m, n_seq_max=1000)", "ValueError", "n_seq_max"),
    "n_seq_max 0": ("pyllama.Context(m, n_seq_max=0)", "ValueError", "n_seq_max"),
    "n_ctx negative": ("pyllama.Context(m, n_ctx=-1)", "ValueError", "n_ctx"),
    "unknown kwarg": ("pyllama.Context(m, n_ctxx=64)", "TypeError", "n_ctxx"),
    "flash_attn bogus": ("pyllama.Context(m, flash_attn='maybe')", "ValueError", "flash_attn"),
    "type_k bogus": ("pyllama.Context(m, type_k='f13')", "ValueError", "f13"),
    "pooling bogus": ("pyllama.Context(m, pooling_type='max')", "ValueError", "pooling_type"),
    "n_ctx wrong type": ("pyllama.Context(m, n_ctx='big')", "TypeError", "n_ctx"),
    # closed context
    "decode closed": ("ctx.close(); ctx.decode(B.from_tokens([1]))", "LlamaError", "closed"),
    "logits closed": ("ctx.close(); ctx.logits()", "LlamaError", "closed"),
    "seq_pos_max closed": ("ctx.close(); ctx.seq_pos_max(0)", "LlamaError", "closed"),
    "seq_rm closed": ("ctx.close(); ctx.seq_rm(0)", "LlamaError", "closed"),
    "state_get closed": ("ctx.close(); ctx.state_get()", "LlamaError", "closed"),
    "n_ctx closed": ("ctx.close(); ctx.n_ctx", "LlamaError", "closed"),
    "perf closed": ("ctx.close(); ctx.perf()", "LlamaError", "closed"),
    "sample closed": ("ctx.close(); pyllama.Sampler(m).sample(ctx)", "LlamaError", "closed"),
    "with block then decode": (
        "with pyllama.Context(m, n_ctx=64) as c:\n    pass\nc.decode(B.from_tokens([1]))",
        "LlamaError",
        "closed",
    ),
}

SETUP = """
import numpy as np
import pyllama

B = pyllama.Batch
m = pyllama.Model(MODEL)
ctx = pyllama.Context(m, n_ctx=256, n_batch=32, n_ubatch=16, n_seq_max=2, n_threads=1)
"""


@pytest.fixture(scope="module")
def bad_input_results(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every case of CASES, run crash-isolated (see isolated_cases.py), in as few interpreters as possible."""
    setup = f"MODEL = {str(tiny_model_path)!r}\n" + SETUP
    return run_cases(setup, {name: code for name, (code, _, _) in CASES.items()}, tmp_path_factory.mktemp("bad"))


def test_kv_cache_types_are_llama_cpps(tiny_model_path: Path) -> None:
    """pyllama.kv_cache_types() lists the types llama.cpp's tools accept (common/arg.cpp) with ggml's
    enum values (ggml.h); a Context takes each of them and refuses any other type by its parameter."""
    import re

    root = Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp"
    arg = (root / "common" / "arg.cpp").read_text()
    listed = re.search(r"kv_cache_types = \{(.*?)\};", arg, re.S)
    assert listed is not None
    names = [n.lower() for n in re.findall(r"GGML_TYPE_(\w+)", listed.group(1))]
    enum = {
        n.lower(): int(v)
        for n, v in re.findall(r"GGML_TYPE_(\w+)\s*=\s*(\d+),", (root / "ggml" / "include" / "ggml.h").read_text())
    }
    table = pyllama.kv_cache_types()
    assert sorted(table) == sorted(names)
    assert {name: t["id"] for name, t in table.items()} == {n: enum[n] for n in names}
    assert table["f32"]["bytes_per_element"] == 4 and table["f16"]["bytes_per_element"] == 2
    assert table["q8_0"]["bytes_per_element"] == (2 + 32) / 32  # block_q8_0: a half scale and 32 int8
    with pyllama.Model(str(tiny_model_path)) as m:
        for bad in ("q9_9", "q2_K", "F16"):  # unknown; a ggml type that is no KV cache type; names are exact
            for param in ("type_k", "type_v"):
                with pytest.raises(pyllama.InvalidRequestError) as e:
                    pyllama.Context(m, n_ctx=64, **{param: bad})
                assert e.value.param == param


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises(case: str, bad_input_results: dict[str, dict[str, Any]]) -> None:
    """Each bad call raises the documented exception type with a useful message, and never crashes the process."""
    _, exc_type, fragment = CASES[case]
    check_case(bad_input_results[case], exc_type, fragment)


def test_context_after_failed_state_set_is_usable(model: pyllama.Model) -> None:
    """A refused (truncated) state clears the KV memory as the message says, and the context then decodes to the
    logits of a fresh evaluation."""
    tokens = random_tokens(10, seed=20)
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(tokens))
        state = ctx.state_get()
        with pytest.raises(pyllama.LlamaError, match="cleared"):
            ctx.state_set(state[: len(state) // 2])
        assert ctx.seq_pos_max(0) == -1
        ctx.decode(Batch.from_tokens(tokens))
        np.testing.assert_array_equal(ctx.logits(), fresh_last_logits(model, tokens))


SEQ_STATE_CELLS_CODE = """
import json, resource, struct, sys
import pyllama

m = pyllama.Model(sys.argv[1])
ctx = pyllama.Context(m, n_ctx=256, n_seq_max=2, n_threads=1)
ctx.decode(pyllama.Batch.from_tokens([1, 450, 4996]))
blob = bytearray(ctx.seq_state_get(0))
# Layout at the pinned llama.cpp: u32 magic, i32 seq_id, u32 n_stream, then per stream a u32 cell count.
magic, seq, n_stream, cells = struct.unpack_from("<IiII", blob)
assert (magic, seq, cells) == (0xAF143CD8, 0, 3), (hex(magic), seq, cells)
struct.pack_into("<I", blob, 12, 50_000_000)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    ctx.seq_state_set(bytes(blob), 1)
    outcome = None
except Exception as e:
    outcome = [type(e).__name__, str(e)]
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "grew_mib": (rss1 - rss0) / 1024}))
"""


def test_seq_state_with_a_corrupt_cell_count_is_refused_cheaply(tiny_model_path: Path) -> None:
    """A 1.4 KB sequence state whose cell count was corrupted to 50 million (the KV cache has 256 cells) must be
    refused with LlamaError without first allocating memory proportional to the bogus count.

    llama_kv_cache::state_read_meta sizes a ubatch for cell_count tokens before reading a single cell, so
    unchecked this input grows the process by ~1 GiB, and a count near 3e9 gets it OOM-killed. pyllama checks the
    count against the context size and the data length before llama.cpp sees it."""
    proc = run_python(SEQ_STATE_CELLS_CODE, str(tiny_model_path))
    assert proc.returncode == 0, f"crashed with {proc.returncode}: {proc.stderr[-2000:]}"
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["outcome"] is not None and r["outcome"][0] == "LlamaError", r
    assert r["grew_mib"] < 200, r


# --- a real model ------------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_gemma_state_round_trip_with_sliding_window_cache(gemma_path: Path) -> None:
    """Gemma 3 uses a sliding-window (iSWA) KV cache. Saving the state after a prompt, decoding a continuation,
    then restoring the state (after memory_clear) and decoding the same continuation gives bit-identical logits at
    every step; and a second Context restored from the bytes agrees too."""
    with pyllama.Model(str(gemma_path)) as gemma:
        prompt = gemma.tokenize("The capital of France is Paris. The capital of Germany is")
        continuation = gemma.tokenize(" Berlin. The capital of Italy is", add_special=False)

        def run(ctx: pyllama.Context) -> list[np.ndarray]:
            out = []
            for i, tok in enumerate(continuation):
                ctx.decode(Batch.from_tokens([tok], pos0=len(prompt) + i))
                out.append(ctx.logits())
            return out

        with pyllama.Context(gemma, n_ctx=256, n_threads=1) as ctx:
            ctx.decode(Batch.from_tokens(prompt))
            state = ctx.state_get()
            first = run(ctx)
            ctx.memory_clear()
            ctx.state_set(state)
            assert ctx.seq_pos_max(0) == len(prompt) - 1
            second = run(ctx)
        with pyllama.Context(gemma, n_ctx=256, n_threads=1) as other:
            other.state_set(state)
            third = run(other)
        prompt_logits = fresh_last_logits(gemma, prompt)
    for a, b, c in zip(first, second, third, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # The model agrees with the text: after "... Germany is", " Berlin" is the most likely next token.
    assert int(np.argmax(prompt_logits)) == continuation[0]
