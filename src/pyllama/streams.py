"""Streams and their owners: ``Stream`` (an iterator of chunks), ``AsyncStream`` (``async for``),
a use of a Llama (a call, or a stream from its first chunk to its last) and the per-event-loop waker
that the generation core signals when a request has new text."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from . import _core
from .errors import RequestTooComplexError

__all__ = ["AsyncStream", "Stream"]

# a generation in progress: a request to the generation core
Gen = _core.EngineRequest

# What a stream driven by an event loop yields while the engine has no new text for it yet.
WAIT: dict[str, Any] = {}


class Waker:
    """One per event loop: the C++ engine signals its Notifier's descriptor when a request submitted
    with it has new text or has ended, and the loop wakes the streams waiting for those requests. No
    thread waits for a piece on the streams' behalf."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # no reference to the loop: it keys the weak registry below, and would never be freed
        self.notifier = _core.Notifier()
        self.waiting: dict[asyncio.Future[None], _core.EngineRequest] = {}
        loop.add_reader(self.notifier.fileno(), self._woken)

    def _woken(self) -> None:
        self.notifier.drain()
        for fut, req in list(self.waiting.items()):
            if req.ready and not fut.done():
                fut.set_result(None)

    async def wait(self, req: _core.EngineRequest) -> None:
        """Returns once ``req`` has a piece or has ended."""
        if req.ready:
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiting[fut] = req
        try:
            await fut
        finally:
            del self.waiting[fut]


_WAKERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Waker | None] = weakref.WeakKeyDictionary()


def waker() -> Waker | None:
    """The running loop's waker; None where the loop cannot watch a descriptor (Windows' proactor)."""
    loop = asyncio.get_running_loop()
    if loop not in _WAKERS:
        try:
            _WAKERS[loop] = Waker(loop)
        except (NotImplementedError, RuntimeError):
            _WAKERS[loop] = None
    return _WAKERS[loop]


def text_pieces(use: Use, gen: Gen) -> Iterator[str | dict[str, Any]]:
    """The text pieces of ``gen``; for a stream driven by an event loop (``use.waker`` set), ``WAIT``
    instead of blocking while none is ready."""
    if use.waker is None:
        yield from gen
        return
    assert isinstance(gen, _core.EngineRequest)
    while True:
        piece = gen.next_nowait()
        if piece is None:
            yield WAIT
        elif piece:
            yield piece
        else:
            return


OWNER: ContextVar[object | None] = ContextVar("pyllama_owner", default=None)
HANDLE: ContextVar[Use | None] = ContextVar("pyllama_handle", default=None)


class Deadline:
    """A time limit on preparing an async call (rendering, grammars, schemas, the sampler): a server
    sets one (``PREPARE_DEADLINE``) for each request. The clock starts when the call starts (after any
    wait for a slot) and is checked once, when its first generation is submitted."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at: float | None = None
        self.armed = True

    def start(self) -> None:
        if self.at is None:
            self.at = time.monotonic() + self.seconds

    def check(self) -> None:
        if not self.armed:
            return
        self.armed = False  # later rounds of the same call (tool rounds) are generation, not preparation
        if self.at is not None and time.monotonic() > self.at:
            raise RequestTooComplexError(
                f"preparing the request (template, grammar, schema, sampler) took longer than {self.seconds:g} s"
            )


PREPARE_DEADLINE: ContextVar[Deadline | None] = ContextVar("pyllama_prepare_deadline", default=None)


class Use:
    """One use of a Llama: a call, or a stream from its first chunk to its last.

    ``owner`` is who started it (a thread's token, or an asyncio task's): a new call from the same
    owner while its streams hold every sequence means one of them was abandoned (the caller broke out
    of it), so the new call takes its sequence over instead of waiting for ever.
    """

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.generation: Gen | None = None
        self.cancelled = False
        self.abandoned = False
        self.running = False
        self.linked: list[Use] = []  # the uses a multi-round stream runs on behalf of this one
        self.added: list[dict[str, Any]] = []  # the tool rounds' messages of a run_tools stream
        self.waker: Waker | None = None  # set when an event loop drives the stream (see AsyncStream)

    def attach(self, gen: Gen) -> None:
        self.generation = gen
        if self.cancelled:
            gen.cancel()

    def link(self, other: Use) -> None:
        self.linked.append(other)
        if self.cancelled:
            other.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        if self.generation is not None:
            self.generation.cancel()
        for other in self.linked:
            other.cancel()


class _ThreadOwner:
    """The owner of the uses started by one thread: an object of its own for the thread's life, where a
    thread id would be reused by a later thread (and end that thread's predecessor's streams)."""

    __slots__ = ("__weakref__",)


_THREAD = threading.local()


def current_owner() -> object:
    owner = OWNER.get()
    if owner is not None:
        return owner
    mine: _ThreadOwner | None = getattr(_THREAD, "owner", None)
    if mine is None:
        mine = _THREAD.owner = _ThreadOwner()
    return mine


class Stream(Iterator[dict[str, Any]]):
    """An iterator of OpenAI chunk dicts; ``close()`` (or ``cancel()`` from any thread) stops it."""

    def __init__(self, chunks: Iterator[dict[str, Any]], use: Use, *, pollable: bool = False) -> None:
        self._chunks = chunks
        self._use = use
        # a stream of the batching engine that never blocks but for text: an event loop may drive it
        self.pollable = pollable

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._use.abandoned:
            raise _core.CancelledError(
                "this stream was abandoned: a later call from the thread or task that started it took its sequence"
            )
        self._use.running = True
        try:
            return next(self._chunks)
        finally:
            self._use.running = False

    def cancel(self) -> None:
        self._use.cancel()

    @property
    def generation(self) -> Gen | None:
        """The generation core's request behind the stream once it has started (None before): its
        prompt counters (``n_prompt``, ``n_reused``) and, when it has ended, ``stop_word``, the stop
        string that ended it (one of the request's ``stop`` strings or of the chat template's own)."""
        return self._use.generation

    @property
    def tool_messages(self) -> list[dict[str, Any]]:
        """With ``run_tools=True``: the assistant messages with calls and the tool results of the
        rounds streamed so far (the final answer is the content of the last round's chunks)."""
        return self._use.added

    def close(self) -> None:
        self._use.cancel()
        if not self._use.running:
            self._chunks.close()  # type: ignore[attr-defined]


class AsyncStream:
    """``async for`` over a Stream; cancelling the task that iterates (or ``aclose()``) stops the
    generation at its next token. A stream of the batching engine (``n_parallel > 1``) runs in the
    event loop itself, woken by the engine when text is ready; others take one step at a time in a
    worker thread."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._pending: asyncio.Future[Any] | None = None
        self._started = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        use = self._stream._use
        if not self._started:
            self._started = True
            if self._stream.pollable:
                use.waker = waker()
        if use.waker is not None:
            return await self._polled(use, use.waker)
        self._pending = asyncio.ensure_future(asyncio.to_thread(next, self._stream, None))
        try:
            chunk = await asyncio.shield(self._pending)
        except asyncio.CancelledError:
            self._stream.cancel()
            raise
        if chunk is None:
            raise StopAsyncIteration
        return chunk  # type: ignore[no-any-return]

    async def _polled(self, use: Use, waker: Waker) -> dict[str, Any]:
        try:
            while True:
                chunk = next(self._stream, None)
                if chunk is not WAIT:
                    break
                assert isinstance(use.generation, _core.EngineRequest)
                await waker.wait(use.generation)
        except asyncio.CancelledError:
            self._stream.cancel()
            raise
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    @property
    def generation(self) -> Gen | None:
        """See ``Stream.generation``."""
        return self._stream.generation

    async def aclose(self) -> None:
        self._stream.cancel()
        if self._pending is not None:
            await asyncio.gather(self._pending, return_exceptions=True)
        self._stream.close()


_TASK_IDS = itertools.count(1)
_TASKS: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()


def task_id(task: asyncio.Task[Any] | None) -> int:
    """A number for the task, never reused (unlike id(), which a new task at the same address gets)."""
    if task is None:
        return next(_TASK_IDS)
    if task not in _TASKS:
        _TASKS[task] = next(_TASK_IDS)
    return _TASKS[task]
