"""The high-level API: ``Llama(model_path).chat(messages)`` and ``complete(prompt)``, OpenAI-shaped.

Every generation runs through the C++ generation core (``pyllama._core.Engine``) with the GIL
released, one sequence or many; this module only
renders the prompt, builds the sampler and shapes the results. Each call evaluates only the tokens
after its longest common prefix with what the context already holds, so a chat turn costs the new
turn only.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import json
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from .cache import LlamaState, StateCache, common_prefix
from .chat import ChatTemplate
from .errors import ContextLengthError, invalid
from .reply import ReplyStream, parse_reply
from .sampling import SAMPLING

__all__ = ["AsyncStream", "ContextLengthError", "Llama", "Stream"]

# a generation in progress: a request to the generation core
_Gen = _core.EngineRequest

# Options of a model load: two Llamas over the same file with the same options share the loaded model.
_MODEL_OPTIONS = (
    "n_gpu_layers",
    "split_mode",
    "main_gpu",
    "tensor_split",
    "use_mmap",
    "use_mlock",
    "vocab_only",
    "check_tensors",
    "kv_overrides",
)


class _SharedModels:
    """Loaded models by (file, load options), counted: the last Llama to close one frees it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[Any, ...], list[Any]] = {}  # key -> [model, users]

    @staticmethod
    def key(path: str, options: dict[str, Any]) -> tuple[Any, ...]:
        st = os.stat(path)
        frozen = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in options.items()))
        return (os.path.realpath(path), st.st_size, st.st_mtime_ns, frozen)

    def acquire(
        self, path: str, options: dict[str, Any], progress: Callable[[float], bool | None] | None
    ) -> tuple[tuple[Any, ...], _core.Model]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file not found: '{path}'")
        key = self.key(path, options)
        with self._lock:
            entry = self._models.get(key)
            if entry is not None and not entry[0].closed:
                entry[1] += 1
                return key, entry[0]
            # loading happens under the lock, so that two Llamas created at once load the file once
            model = _core.Model(path, progress_callback=progress, **options)
            self._models[key] = [model, 1]
            return key, model

    def release(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            entry = self._models.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._models[key]
                entry[0].close()

    def users(self, key: tuple[Any, ...]) -> int:
        with self._lock:
            entry = self._models.get(key)
            return 0 if entry is None else int(entry[1])


_MODELS = _SharedModels()

DEFAULT_N_CTX = 4096  # the smallest context the default fit chooses (llama.cpp's fit_params_min_ctx)
_MARGIN = 1 << 30  # memory left free on a GPU by the default fit, as llama.cpp's fit leaves


def _meta_int(model: _core.Model, key: str, default: int) -> int:
    """An integer of the model's metadata (the largest, for per-layer arrays)."""
    value = model.metadata.get(f"{model.architecture}.{key}")
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        numbers = [int(x) for x in str(value).strip("[]").replace(",", " ").split() if x.lstrip("-").isdigit()]
        return max(numbers) if numbers else default


def kv_bytes_per_token(model: _core.Model, type_k: str = "f16", type_v: str = "f16") -> int:
    """An estimate of the KV memory one token of context takes (every layer, K and V)."""
    n_head = max(1, int(model.n_head))
    head = int(model.n_embd) // n_head
    n_kv = _meta_int(model, "attention.head_count_kv", int(model.n_head_kv) or n_head)
    size = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32}
    k = _meta_int(model, "attention.key_length", head) * size.get(type_k, 2.0)
    v = _meta_int(model, "attention.value_length", head) * size.get(type_v, 2.0)
    return max(1, int(int(model.n_layer) * n_kv * (k + v)))


def fit_n_ctx(train_ctx: int, per_token: int, budget: int) -> int:
    """The default context: the training context, reduced to what ``budget`` bytes of KV memory hold,
    never below 4096 tokens (or the training context when that is smaller), a multiple of 256."""
    if train_ctx <= 0:
        return DEFAULT_N_CTX
    fits = max(0, budget) // per_token // 256 * 256
    return min(train_ctx, max(DEFAULT_N_CTX, fits))


def _default_n_ctx(model: _core.Model, n_gpu_layers: int, ctx_kwargs: dict[str, Any]) -> int:
    """llama.cpp's default: the model's training context, fitted to free memory (of the GPUs when the
    layers go there, else of the host)."""
    devices = _core.devices()
    gpus = [d for d in devices if d["type"] != "cpu"]
    if gpus and n_gpu_layers != 0:
        budget = sum(int(d["memory_free"]) - _MARGIN for d in gpus) - int(model.size)
    else:
        host = sum(int(d["memory_free"]) for d in devices if d["type"] == "cpu")
        budget = host // 2 - int(model.size)
    per_token = kv_bytes_per_token(model, str(ctx_kwargs.get("type_k", "f16")), str(ctx_kwargs.get("type_v", "f16")))
    return fit_n_ctx(int(model.n_ctx_train), per_token, budget)


# The sampling keywords that map onto pyllama.Sampler's (the one table, in sampling.py).
_SAMPLING_KEYS = tuple(SAMPLING)


def _logprob_entry(token_text: bytes, logprob: float, top: list[dict[str, Any]] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "token": token_text.decode("utf-8", "replace"),
        "logprob": logprob,
        "bytes": list(token_text),
    }
    if top is not None:
        entry["top_logprobs"] = top
    return entry


# What a stream driven by an event loop yields while the engine has no new text for it yet.
_WAIT: dict[str, Any] = {}


class _Waker:
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


_WAKERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waker | None] = weakref.WeakKeyDictionary()


def _waker() -> _Waker | None:
    """The running loop's waker; None where the loop cannot watch a descriptor (Windows' proactor)."""
    loop = asyncio.get_running_loop()
    if loop not in _WAKERS:
        try:
            _WAKERS[loop] = _Waker(loop)
        except (NotImplementedError, RuntimeError):
            _WAKERS[loop] = None
    return _WAKERS[loop]


def _pieces(use: _Use, gen: _Gen) -> Iterator[str | dict[str, Any]]:
    """The text pieces of ``gen``; for a stream driven by an event loop (``use.waker`` set), ``_WAIT``
    instead of blocking while none is ready."""
    if use.waker is None:
        yield from gen
        return
    assert isinstance(gen, _core.EngineRequest)
    while True:
        piece = gen.next_nowait()
        if piece is None:
            yield _WAIT
        elif piece:
            yield piece
        else:
            return


_OWNER: ContextVar[object | None] = ContextVar("pyllama_owner", default=None)
_HANDLE: ContextVar[_Use | None] = ContextVar("pyllama_handle", default=None)


class _Use:
    """One use of a Llama: a call, or a stream from its first chunk to its last.

    ``owner`` is who started it (a thread, or an asyncio task): a new call from the same owner while
    its stream is suspended means that stream was abandoned (the caller broke out of it), so the new
    call takes the Llama over instead of waiting for ever.
    """

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.generation: _Gen | None = None
        self.cancelled = False
        self.abandoned = False
        self.running = False
        self.linked: list[_Use] = []  # the uses a multi-round stream runs on behalf of this one
        self.added: list[dict[str, Any]] = []  # the tool rounds' messages of a run_tools stream
        self.waker: _Waker | None = None  # set when an event loop drives the stream (see AsyncStream)

    def attach(self, gen: _Gen) -> None:
        self.generation = gen
        if self.cancelled:
            gen.cancel()

    def link(self, other: _Use) -> None:
        self.linked.append(other)
        if self.cancelled:
            other.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        if self.generation is not None:
            self.generation.cancel()
        for other in self.linked:
            other.cancel()


def _owner() -> object:
    owner = _OWNER.get()
    return owner if owner is not None else threading.get_ident()


class Stream(Iterator[dict[str, Any]]):
    """An iterator of OpenAI chunk dicts; ``close()`` (or ``cancel()`` from any thread) stops it."""

    def __init__(self, chunks: Iterator[dict[str, Any]], use: _Use, *, pollable: bool = False) -> None:
        self._chunks = chunks
        self._use = use
        # a stream of the batching engine that never blocks but for text: an event loop may drive it
        self.pollable = pollable

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._use.abandoned:
            raise StopIteration
        self._use.running = True
        try:
            return next(self._chunks)
        finally:
            self._use.running = False

    def cancel(self) -> None:
        self._use.cancel()

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
                use.waker = _waker()
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

    async def _polled(self, use: _Use, waker: _Waker) -> dict[str, Any]:
        try:
            while True:
                chunk = next(self._stream, None)
                if chunk is not _WAIT:
                    break
                assert isinstance(use.generation, _core.EngineRequest)
                await waker.wait(use.generation)
        except asyncio.CancelledError:
            self._stream.cancel()
            raise
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self._stream.cancel()
        if self._pending is not None:
            await asyncio.gather(self._pending, return_exceptions=True)
        self._stream.close()


class Llama:
    """A model and a context, with OpenAI-shaped ``chat`` and ``complete``.

    ``Llama(model_path, *, n_ctx=None, n_gpu_layers=-1, n_threads=None, n_batch=2048, n_ubatch=512,
    flash_attn=None, seed=None, chat_template=None, embedding=False, pooling_type=None, cache=None,
    verbose=False, use_mmap=None, use_mlock=False, main_gpu=0, split_mode="layer", tensor_split=None,
    kv_overrides=None, progress=None, **context_params)``

    ``n_ctx=0`` takes the model's training context; the default (None) is llama.cpp's: the training
    context, reduced to fit free memory (never below 4096 tokens); any other value is used as given.
    ``n_gpu_layers=-1`` offloads every layer where a GPU backend exists.
    ``chat_template`` overrides the model's template (Jinja source, "chatml" or a built-in name).
    ``cache`` (a ``pyllama.RAMCache`` or ``pyllama.DiskCache``) keeps prompt states beyond the one
    the context holds. Two Llamas over the same file with the same load options share one loaded
    model. Calls on one Llama are serialised; ``close()`` (or ``with``) frees the context, and the
    model once no other Llama uses it.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int | None = None,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        flash_attn: bool | None = None,
        seed: int | None = None,
        chat_template: str | None = None,
        embedding: bool = False,
        pooling_type: str | None = None,
        cache: StateCache | None = None,
        verbose: bool = False,
        use_mmap: bool | None = None,
        use_mlock: bool = False,
        main_gpu: int = 0,
        split_mode: str = "layer",
        tensor_split: Sequence[float] | None = None,
        kv_overrides: dict[str, bool | int | float | str] | None = None,
        progress: Callable[[float], bool | None] | None = None,
        n_parallel: int = 1,
        **context_params: Any,
    ) -> None:
        self._closed = True
        if n_parallel < 1:
            raise ValueError("n_parallel must be >= 1")
        self.n_parallel = n_parallel
        if verbose:
            from ._logging import set_log_level

            set_log_level("INFO")
        self.model_path = str(model_path)
        options: dict[str, Any] = {
            "n_gpu_layers": n_gpu_layers,
            "use_mlock": use_mlock,
            "main_gpu": main_gpu,
            "split_mode": split_mode,
        }
        if use_mmap is not None:
            options["use_mmap"] = use_mmap
        if tensor_split:
            options["tensor_split"] = [float(x) for x in tensor_split]
        if kv_overrides:
            options["kv_overrides"] = dict(kv_overrides)
        unknown = set(context_params) & set(_MODEL_OPTIONS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
        self._model_key, self._model = _MODELS.acquire(self.model_path, options, progress)
        try:
            train_ctx = int(self._model.n_ctx_train)
            if n_ctx is None:
                n_ctx = _default_n_ctx(self._model, n_gpu_layers, context_params)
            elif n_ctx == 0:
                n_ctx = train_ctx
            elif n_ctx < 0:
                raise ValueError("n_ctx must be >= 0")
            ctx_kwargs: dict[str, Any] = {"n_ctx": n_ctx, "n_batch": min(n_batch, n_ctx), "n_ubatch": n_ubatch}
            if n_threads is not None:
                ctx_kwargs["n_threads"] = n_threads
            if flash_attn is not None:
                ctx_kwargs["flash_attn"] = flash_attn
            ctx_kwargs.update(context_params)
            if n_parallel > 1:
                if cache is not None:
                    raise ValueError("cache needs n_parallel=1 (each parallel sequence keeps its own prefix)")
                ctx_kwargs.setdefault("n_seq_max", n_parallel)
            self._ctx_kwargs = ctx_kwargs
            self._ctx = _core.Context(self._model, **ctx_kwargs)
            # every call goes through the generation core: with n_parallel > 1 its worker thread batches
            # concurrent calls; with one sequence it steps on the thread that waits for the text
            self._engine = _core.Engine(self._ctx, n_parallel)
        except BaseException:
            _MODELS.release(self._model_key)
            raise
        self._closed = False
        self._embed_lock = threading.Lock()
        self._pooling_type = pooling_type
        self._embed_ctx: _core.Context | None = None
        if embedding:  # the embedding context now, rather than at the first embed()
            self._embedding_context()
        self._template = ChatTemplate(self._model, template=chat_template)
        self._state = threading.Lock()  # guards _uses
        self._uses: dict[object, _Use] = {}  # each owner's use in progress
        self._seed = seed
        self._rng = random.Random(seed)
        self._cache = cache
        self.model_name = Path(self.model_path).stem
        # which model and context a saved state belongs to
        self.fingerprint = hashlib.sha256(
            json.dumps([list(self._model_key[:3]), sorted((k, repr(v)) for k, v in ctx_kwargs.items())]).encode()
        ).hexdigest()[:32]

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        sha256: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
        **llama_kwargs: Any,
    ) -> Llama:
        """Download a GGUF file into the cache (resumable, verified against ``sha256`` when given),
        then load it: see ``pyllama.models.download``."""
        from .models import download

        return cls(download(url, sha256=sha256, cache_dir=cache_dir, progress=progress), **llama_kwargs)

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: str,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
        **llama_kwargs: Any,
    ) -> Llama:
        """Download ``filename`` (a glob pattern matching one file, e.g. ``"*q4_k_m.gguf"``) from the
        Hugging Face Hub repository ``repo_id``, then load it (needs ``pip install 'pyllama[hf]'``)."""
        from .models import hf_download

        path = hf_download(repo_id, filename, revision=revision, cache_dir=cache_dir, progress=progress)
        return cls(path, **llama_kwargs)

    # --- basics -----------------------------------------------------------------------------

    @property
    def model(self) -> _core.Model:
        return self._model

    @property
    def context(self) -> _core.Context:
        return self._ctx

    @property
    def chat_template(self) -> ChatTemplate:
        return self._template

    def n_ctx(self) -> int:
        return int(self._ctx.n_ctx)

    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self._tokenize(text, add_special, parse_special)

    def _tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> list[int]:
        self._check_open()
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return list(self._model.tokenize(text, add_special=add_special, parse_special=parse_special))

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this Llama is closed")

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return self._detokenize(tokens, special)

    def _detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        self._check_open()
        return str(self._model.detokenize(list(tokens), unparse_special=special))

    def close(self) -> None:
        """Free the context now, and the model unless another Llama shares it. Idempotent. Calls in
        progress on other threads end with an error; a stream this thread abandoned is closed."""
        with self._state:
            if self._closed:
                return
            self._closed = True
        self._engine.close()
        with self._embed_lock:
            if self._embed_ctx is not None:
                self._embed_ctx.close()
        self._ctx.close()
        _MODELS.release(self._model_key)

    @property
    def closed(self) -> bool:
        return self._closed

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_model_key", None) is not None:
            try:
                self._engine.close()
                self._ctx.close()
                if self._embed_ctx is not None:
                    self._embed_ctx.close()
                _MODELS.release(self._model_key)
            except Exception:
                pass
            self._closed = True

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the shared machinery -----------------------------------------------------------------

    def _enter(self, use: _Use) -> None:
        """Register a use. A new call from the owner of a stream that is suspended (the caller broke
        out of it and kept the iterator) ends that stream: it was abandoned, and would hold its
        sequence for as long as its max_tokens allow. Calls themselves never wait here: the generation
        core queues what finds no free sequence."""
        self._check_open()
        with self._state:
            previous = self._uses.get(use.owner)
            if previous is not None and not previous.running:
                previous.abandoned = True
                previous.cancel()
            self._uses[use.owner] = use

    def _exit(self, use: _Use) -> None:
        with self._state:
            if self._uses.get(use.owner) is use:
                del self._uses[use.owner]

    def _generate(
        self,
        use: _Use,
        tokens: list[int],
        sampler: _core.Sampler,
        budget: int,
        stops: list[str],
        n_top: int,
        ignore_eos: bool = False,
    ) -> _Gen:
        self._restore_from_cache(tokens)
        gen = self._engine.submit(
            tokens,
            sampler,
            max_tokens=budget,
            stop=stops,
            logprobs=n_top,
            ignore_eos=ignore_eos,
            notifier=None if use.waker is None else use.waker.notifier,
        )
        use.attach(gen)
        handle = _HANDLE.get()
        if handle is not None:
            handle.attach(gen)
        return gen

    def _run(
        self,
        tokens: list[int],
        sampler: _core.Sampler,
        budget: int,
        stops: list[str],
        n_top: int,
        ignore_eos: bool = False,
    ) -> tuple[_Gen, str]:
        use = _Use(_owner())
        self._enter(use)
        try:
            gen = self._generate(use, tokens, sampler, budget, stops, n_top, ignore_eos)
            text = gen.run()
            self._store_in_cache()
            return gen, text
        finally:
            self._exit(use)

    # --- states and the prompt cache ---------------------------------------------------------

    def _snapshot(self) -> LlamaState:
        taken = self._engine.snapshot(0)
        if taken is None:
            raise _core.LlamaError("the context is in use by a generation")
        tokens, data = taken
        return LlamaState(tuple(tokens), data, self.fingerprint)

    def _restore(self, state: LlamaState) -> None:
        if state.fingerprint != self.fingerprint:
            raise ValueError("this state belongs to another model or context settings")
        try:
            self._engine.restore(list(state.tokens), state.data, 0)
        except _core.LlamaError as e:
            raise ValueError(f"the state could not be loaded: {e}") from e

    def _restore_from_cache(self, tokens: list[int]) -> None:
        if self._cache is None:
            return
        found = self._cache.lookup(tokens, self.fingerprint)
        if found is None:
            return
        state, n = found
        if n > common_prefix(self._engine.tokens(0), tokens):
            try:
                self._restore(state)
            except ValueError:
                pass  # in use, or a state that does not fit: the prompt is evaluated instead

    def _store_in_cache(self) -> None:
        if self._cache is None:
            return
        taken = self._engine.snapshot(0)
        if taken is None or not taken[0]:
            return  # another call runs in the sequence now
        try:
            self._cache.store(LlamaState(tuple(taken[0]), taken[1], self.fingerprint))
        except (_core.LlamaError, OSError):
            pass  # a cache that cannot take the state only costs a later re-evaluation

    def save_state(self, path: str | os.PathLike[str] | None = None) -> LlamaState:
        """The tokens the context holds and their KV memory, as a ``LlamaState`` (also written to
        ``path`` when given). ``load_state`` puts it back, here or in a new Llama with the same model
        and context settings, so that a prompt starting with those tokens evaluates only the rest."""
        if self.n_parallel > 1:
            raise ValueError("save_state needs n_parallel=1")
        use = _Use(_owner())
        self._enter(use)
        try:
            state = self._snapshot()
        finally:
            self._exit(use)
        if path is not None:
            state.save(path)
        return state

    def load_state(self, state: LlamaState | str | os.PathLike[str]) -> None:
        """Restore a state from ``save_state`` (or the path it was saved to). Raises ValueError for a
        state of another model or context settings, and leaves the context empty then."""
        if self.n_parallel > 1:
            raise ValueError("load_state needs n_parallel=1")
        if not isinstance(state, LlamaState):
            state = LlamaState.load(state)
        use = _Use(_owner())
        self._enter(use)
        try:
            self._restore(state)
        finally:
            self._exit(use)

    def set_cache(self, cache: StateCache | None) -> None:
        """Use ``cache`` (a ``RAMCache`` or ``DiskCache``) for prompt states from now on; None stops."""
        self._cache = cache

    @property
    def cache(self) -> StateCache | None:
        return self._cache

    def _sampler(self, chat: _core.ChatResult | None, seed: int | None, kw: dict[str, Any]) -> _core.Sampler:
        params = {k: v for k, v in kw.items() if v is not None}
        if seed is None:
            seed = self._seed if self._seed is not None else self._rng.getrandbits(32)
        params["seed"] = seed
        if chat is not None:
            params["chat"] = chat
        return _core.Sampler(self._model, **params)

    def n_ctx_seq(self) -> int:
        """The tokens one call can use: the context, or with n_parallel > 1 one sequence's share."""
        return self._n_ctx_seq()

    def _n_ctx_seq(self) -> int:
        return int(self._engine.n_ctx_seq)

    def _budget(self, n_prompt: int, max_tokens: int | None) -> int:
        n_ctx = self._n_ctx_seq()
        if n_prompt >= n_ctx:
            raise ContextLengthError(f"the prompt has {n_prompt} tokens and the context holds {n_ctx}")
        if max_tokens is None or max_tokens < 0:
            return n_ctx - n_prompt
        if n_prompt + max_tokens > n_ctx:
            raise invalid(
                f"the prompt ({n_prompt} tokens) and max_tokens ({max_tokens}) exceed the context ({n_ctx} tokens)",
                "max_tokens",
                ContextLengthError,
            )
        return max_tokens

    def _room(self, max_tokens: int | None) -> int:
        """How many prompt tokens fit when the prompt is truncated for ``max_tokens``."""
        n_ctx = self._n_ctx_seq()
        reserve = max_tokens if max_tokens is not None and max_tokens >= 0 else min(n_ctx // 4, 1024)
        return max(1, n_ctx - max(reserve, 1))

    # --- chat -----------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any] | Callable[..., Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | type | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        logit_bias: dict[int, float] | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        reasoning_format: str = "auto",
        enable_thinking: bool | None = None,
        reasoning_effort: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool | str | None = None,
        run_tools: bool = False,
        max_tool_rounds: int = 8,
        truncate: bool = False,
        n: int = 1,
        stream: bool = False,
        **sampling: Any,
    ) -> dict[str, Any] | Stream:
        """An OpenAI ChatCompletion dict, or with ``stream=True`` an iterator of ChatCompletionChunk dicts.

        ``tools`` takes OpenAI tool dicts and Python functions (their type hints and docstrings become
        the schema); with ``run_tools=True`` the calls the model makes are run and answered, round
        after round (at most ``max_tool_rounds``), until it replies without calls. A final assistant
        message is continued (prefill) unless ``continue_final_message=False``. ``truncate=True`` drops
        the oldest turns (after the system message) when the conversation does not fit.
        """
        _check_sampling(sampling)
        toolbox = None
        if tools is not None and (run_tools or any(callable(t) and not isinstance(t, dict) for t in tools)):
            from .tools import Tools

            toolbox = Tools(list(tools))
            tools = toolbox.specs
        elif run_tools:
            raise invalid("run_tools=True needs tools", "tools")
        parse_as: Any = None
        if isinstance(response_format, type):
            from .tools import response_format as _format_of

            parse_as, response_format = response_format, _format_of(response_format)
        kwargs: dict[str, Any] = {
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel_tool_calls,
            "response_format": response_format,
            "max_tokens": max_tokens,
            "seed": seed,
            "stop": stop,
            "logit_bias": logit_bias,
            "logprobs": logprobs,
            "top_logprobs": top_logprobs,
            "reasoning_format": reasoning_format,
            "enable_thinking": enable_thinking,
            "reasoning_effort": reasoning_effort,
            "chat_template_kwargs": chat_template_kwargs,
            "continue_final_message": continue_final_message,
            "truncate": truncate,
            **sampling,
        }
        if run_tools:
            assert toolbox is not None
            if n != 1:
                raise invalid("run_tools takes n=1", "n")
            if max_tool_rounds < 1:
                raise invalid("max_tool_rounds must be >= 1", "max_tool_rounds")
            if stream:
                use = _Use(_owner())
                return Stream(self._tool_rounds_stream(use, list(messages), toolbox, max_tool_rounds, kwargs), use)
            return self._tool_rounds(list(messages), toolbox, max_tool_rounds, kwargs, parse_as)
        if n < 1:
            raise invalid("n must be >= 1", "n")
        if n > 1:
            if stream:
                raise invalid("stream=True takes n=1", "n")
            outs = self._fan_out(
                [
                    functools.partial(self._chat_once, messages, stream=False, **{**kwargs, "seed": _nth_seed(seed, i)})
                    for i in range(n)
                ]
            )
            out: dict[str, Any] | Stream = _merge_choices(outs, prompt_once=True)
        else:
            out = self._chat_once(messages, stream=stream, **kwargs)
        if parse_as is not None and isinstance(out, dict):
            _attach_parsed(out, parse_as)
        return out

    def _render(
        self, messages: Sequence[dict[str, Any]], truncate: bool, max_tokens: int | None, **apply: Any
    ) -> tuple[_core.ChatResult, list[int]]:
        messages = list(messages)
        while True:
            result = self._template.apply(messages, **apply)
            tokens = list(result.prompt_tokens)  # tokenised in C++, with the BOS as the template wants it
            if not truncate or len(tokens) <= self._room(max_tokens):
                return result, tokens
            dropped = _drop_oldest_turn(messages)
            if dropped is None:
                raise ContextLengthError(
                    f"the conversation does not fit the context ({self.n_ctx()} tokens) even with only the "
                    f"system message and the last message ({len(tokens)} prompt tokens)"
                )
            messages = dropped

    def _chat_once(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None,
        tool_choice: str | dict[str, Any] | None,
        parallel_tool_calls: bool | None,
        response_format: dict[str, Any] | None,
        max_tokens: int | None,
        seed: int | None,
        stop: str | Sequence[str] | None,
        logit_bias: dict[int, float] | None,
        logprobs: bool,
        top_logprobs: int | None,
        reasoning_format: str,
        enable_thinking: bool | None,
        reasoning_effort: str | None,
        chat_template_kwargs: dict[str, Any] | None,
        continue_final_message: bool | str | None,
        truncate: bool,
        stream: bool,
        **sampling: Any,
    ) -> dict[str, Any] | Stream:
        json_schema = _response_schema(response_format)
        if reasoning_format not in REASONING_FORMATS:
            known = ", ".join(REASONING_FORMATS)
            raise invalid(f"reasoning_format: {reasoning_format!r} is not one of {known}", "reasoning_format")
        if reasoning_effort is not None:
            chat_template_kwargs = {"reasoning_effort": reasoning_effort, **(chat_template_kwargs or {})}
        if continue_final_message is None and messages and messages[-1].get("role") == "assistant":
            continue_final_message = True  # a final assistant message is a prefill, as in llama-server
        result, tokens = self._render(
            messages,
            truncate,
            max_tokens,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            enable_thinking=enable_thinking,
            reasoning_format=reasoning_format,
            chat_template_kwargs=chat_template_kwargs,
            json_schema=json_schema,
            continue_final_message=continue_final_message or None,
        )
        budget = self._budget(len(tokens), max_tokens)
        sampler = self._sampler(result, seed, {**sampling, "logit_bias": logit_bias})
        stops = _stop_list(stop)
        stops += [s for s in result.stops if s not in stops]
        n_top = -1 if not logprobs else (top_logprobs or 0)
        meta: dict[str, Any] = {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "created": int(time.time()),
            "model": self.model_name,
            "id_seed": self._rng.getrandbits(63),
        }
        if stream:
            use = _Use(_owner())
            return Stream(
                self._chat_stream(use, result, tokens, sampler, budget, stops, n_top, meta),
                use,
                pollable=self._engine.threaded,
            )
        gen, text = self._run(tokens, sampler, budget, stops, n_top)
        message = parse_reply(result, text, meta["id_seed"])
        finish = _finish_reason(gen.finish_reason or "stop", bool(message.get("tool_calls")))
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        if logprobs:
            choice["logprobs"] = {"content": _chat_logprobs(gen, self._model, n_top)}
        return {
            "id": meta["id"],
            "object": "chat.completion",
            "created": meta["created"],
            "model": meta["model"],
            "choices": [choice],
            "usage": _usage(gen),
        }

    def _tool_rounds(
        self,
        messages: list[dict[str, Any]],
        toolbox: Any,
        max_rounds: int,
        kwargs: dict[str, Any],
        parse_as: Any,
    ) -> dict[str, Any]:
        added: list[dict[str, Any]] = []
        usage = {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        out: dict[str, Any] = {}
        for round_ in range(max_rounds):
            if round_ == max_rounds - 1:
                kwargs = {**kwargs, "tool_choice": "none"}  # the last round must answer
            reply = self._chat_once(messages + added, stream=False, **kwargs)
            assert isinstance(reply, dict)
            out = reply
            _add_usage(usage, out["usage"])
            message = out["choices"][0]["message"]
            added.append(message)
            if out["choices"][0]["finish_reason"] != "tool_calls":
                break  # an answer, or a reply cut at max_tokens: its calls may be incomplete
            added.extend(toolbox.call(call) for call in message["tool_calls"])
        out["usage"] = usage
        out["messages"] = added  # what the rounds added to the conversation, ending with the answer
        if parse_as is not None:
            _attach_parsed(out, parse_as)
        return out

    def _tool_rounds_stream(
        self, use: _Use, messages: list[dict[str, Any]], toolbox: Any, max_rounds: int, kwargs: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        added = use.added
        for round_ in range(max_rounds):
            if use.cancelled:
                return
            if round_ == max_rounds - 1:
                kwargs = {**kwargs, "tool_choice": "none"}  # the last round must answer
            chunks = self._chat_once(messages + added, stream=True, **kwargs)
            assert isinstance(chunks, Stream)
            use.link(chunks._use)
            calls: dict[int, dict[str, Any]] = {}
            content: list[str] = []
            reasoning: list[str] = []
            finish = None
            try:
                for chunk in chunks:
                    yield chunk
                    delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                    content.append(delta.get("content") or "")
                    reasoning.append(delta.get("reasoning_content") or "")
                    for tc in delta.get("tool_calls") or []:
                        call = calls.setdefault(
                            tc["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                        )
                        call["id"] = tc.get("id") or call["id"]
                        fn = tc.get("function") or {}
                        call["function"]["name"] += fn.get("name") or ""
                        call["function"]["arguments"] += fn.get("arguments") or ""
                    finish = chunk["choices"][0]["finish_reason"] if chunk["choices"] else None
            finally:
                chunks.close()
            if not calls or use.cancelled or finish != "tool_calls":
                return
            message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
            if any(reasoning):
                message["reasoning_content"] = "".join(reasoning)
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
            added.append(message)
            added.extend(toolbox.call(call) for call in message["tool_calls"])

    def _chat_stream(
        self,
        use: _Use,
        result: _core.ChatResult,
        tokens: list[int],
        sampler: _core.Sampler,
        budget: int,
        stops: list[str],
        n_top: int,
        meta: dict[str, Any],
    ) -> Iterator[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            return {
                "id": meta["id"],
                "object": "chat.completion.chunk",
                "created": meta["created"],
                "model": meta["model"],
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                **extra,
            }

        self._enter(use)
        try:
            gen = self._generate(use, tokens, sampler, budget, stops, n_top)
            reply = ReplyStream(result, meta["id_seed"])
            yield chunk({"role": "assistant", "content": ""})
            # an error of the generation itself reaches the caller; output that does not parse as the
            # template's format is no error: the reply carries it as the one-shot reply does
            for piece in _pieces(use, gen):
                if piece is _WAIT:
                    yield _WAIT
                    continue
                assert isinstance(piece, str)
                for delta in reply.feed(piece):
                    yield chunk(delta)
            message, rest = reply.finish()  # what the one-shot reply of this text has that was not sent
            for delta in rest:
                yield chunk(delta)
            finish = _finish_reason(gen.finish_reason or "stop", bool(message.get("tool_calls")))
            self._store_in_cache()
        finally:
            self._exit(use)
        yield chunk({}, finish, usage=_usage(gen))

    # --- completion -------------------------------------------------------------------------

    def complete(
        self,
        prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        *,
        n: int = 1,
        stream: bool = False,
        seed: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | Stream:
        """An OpenAI Completion dict, or with ``stream=True`` an iterator of completion chunks.

        ``prompt`` is text, tokens, or a list of either (one choice each, in order). ``n`` gives that
        many choices per prompt. With ``n_parallel > 1`` the choices are generated together. Keywords:
        ``suffix`` asks a model with fill-in-the-middle tokens for the text between ``prompt`` and
        ``suffix``; ``max_tokens`` (16), ``stop``, ``logit_bias``, ``logprobs``, ``echo``,
        ``ignore_eos``, ``grammar``, ``json_schema``, the sampler keywords; ``truncate=True`` keeps
        the end of a prompt that does not fit (and its BOS).
        """
        many = not isinstance(prompt, str) and len(prompt) > 0 and not isinstance(prompt[0], int)
        prompts: list[Any] = list(prompt) if many else [prompt]
        if n < 1:
            raise invalid("n must be >= 1", "n")
        if len(prompts) == 1 and n == 1:
            return self._complete_one(prompts[0], seed=seed, stream=stream, **kwargs)
        if stream:
            raise invalid("stream=True takes one prompt and n=1", "n")
        jobs = [(p, i) for p in prompts for i in range(n)]
        outs = self._fan_out(
            [functools.partial(self._complete_one, p, seed=_nth_seed(seed, i), stream=False, **kwargs) for p, i in jobs]
        )
        return _merge_choices(outs, prompt_once=False)

    def _fan_out(self, calls: list[Callable[[], dict[str, Any] | Stream]]) -> list[dict[str, Any]]:
        """Run the calls: at the same time when the engine batches them, else one after the other."""
        if self.n_parallel == 1:
            results = [call() for call in calls]  # one sequence: one after the other, on this thread
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(len(calls), self.n_parallel)) as pool:
                results = list(pool.map(lambda call: call(), calls))
        return [r for r in results if isinstance(r, dict)]

    def _complete_one(
        self,
        prompt: str | Sequence[int],
        *,
        suffix: str | None = None,
        max_tokens: int | None = 16,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        logit_bias: dict[int, float] | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        ignore_eos: bool = False,
        grammar: str | None = None,
        json_schema: dict[str, Any] | None = None,
        truncate: bool = False,
        stream: bool = False,
        **sampling: Any,
    ) -> dict[str, Any] | Stream:
        """An OpenAI Completion dict, or with ``stream=True`` an iterator of completion chunks.

        ``suffix`` asks a model with fill-in-the-middle tokens for the text between ``prompt`` and
        ``suffix``. ``truncate=True`` keeps the end of a prompt that does not fit (and its BOS).
        """
        _check_sampling(sampling)
        if suffix is not None:
            if not isinstance(prompt, str):
                raise TypeError("suffix needs the prompt as text")
            tokens = self._infill_tokens(prompt, suffix)
            prompt_text = prompt
        elif isinstance(prompt, str):
            tokens = self._tokenize(prompt, add_special=True, parse_special=False)
            prompt_text = prompt
        else:
            tokens = [int(t) for t in prompt]
            prompt_text = self._detokenize(tokens, special=True)
        if truncate and len(tokens) > self._room(max_tokens):
            room = self._room(max_tokens)
            bos = self._model.token_bos
            head = tokens[:1] if tokens and tokens[0] == bos else []
            tokens = head + tokens[len(tokens) - (room - len(head)) :]
            if suffix is None:
                prompt_text = self._detokenize(tokens, special=True)
        budget = self._budget(len(tokens), max_tokens)
        sampler = self._sampler(
            None, seed, {**sampling, "logit_bias": logit_bias, "grammar": grammar, "json_schema": json_schema}
        )
        stops = _stop_list(stop)
        n_top = -1 if logprobs is None else logprobs
        cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

        def shape(text: str, finish: str | None, extra: dict[str, Any]) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
                **extra,
            }

        if stream:
            use = _Use(_owner())

            def pieces() -> Iterator[dict[str, Any]]:
                self._enter(use)
                try:
                    gen = self._generate(use, tokens, sampler, budget, stops, n_top, ignore_eos)
                    if echo:
                        yield shape(prompt_text, None, {})
                    for piece in _pieces(use, gen):
                        if piece is _WAIT:
                            yield _WAIT
                        else:
                            assert isinstance(piece, str)
                            yield shape(piece, None, {})
                    self._store_in_cache()
                finally:
                    self._exit(use)
                yield shape("", _finish_reason(gen.finish_reason or "stop", False), {"usage": _usage(gen)})

            return Stream(pieces(), use, pollable=self._engine.threaded)
        gen, text = self._run(tokens, sampler, budget, stops, n_top, ignore_eos)
        out = shape(
            (prompt_text if echo else "") + text,
            _finish_reason(gen.finish_reason or "stop", False),
            {"usage": _usage(gen)},
        )
        if logprobs is not None:
            out["choices"][0]["logprobs"] = _completion_logprobs(gen, self._model, len(prompt_text) if echo else 0)
        return out

    __call__ = complete

    def _infill_tokens(self, prefix: str, suffix: str) -> list[int]:
        """Fill-in-the-middle prompt, as llama-server builds it: [BOS] PRE prefix SUF suffix MID."""
        pre, suf, mid = self._model.token_fim_pre, self._model.token_fim_suf, self._model.token_fim_mid
        if pre is None or suf is None or mid is None:
            raise invalid("suffix needs a model with fill-in-the-middle tokens (FIM_PRE, FIM_SUF, FIM_MID)", "suffix")
        tokens = [pre, *self._tokenize(prefix, add_special=False), suf, *self._tokenize(suffix, add_special=False), mid]
        if self._model.add_bos and self._model.token_bos is not None:
            tokens.insert(0, self._model.token_bos)
        return tokens

    # --- embeddings -------------------------------------------------------------------------

    def _embedding_context(self) -> _core.Context:
        if self._embed_ctx is None:
            n = self.n_ctx()
            kwargs: dict[str, Any] = {
                **{k: v for k, v in self._ctx_kwargs.items() if k not in ("n_batch", "n_ubatch", "n_seq_max")},
                "n_ctx": n,
                "n_batch": n,
                "n_ubatch": n,
                "embeddings": True,
            }
            pooling = self._pooling_type
            if pooling == "none":
                raise invalid("embed() needs a pooling type: pooling_type='none' gives one vector per token")
            self._embed_ctx = _core.Context(self._model, **kwargs, pooling_type=pooling)
            if self._embed_ctx.pooling_type == "none":
                # a model that does not pool (a generation model): mean pooling, unless asked otherwise
                self._embed_ctx.close()
                self._embed_ctx = _core.Context(self._model, **kwargs, pooling_type="mean")
        return self._embed_ctx

    def embed(
        self, input: str | Sequence[str], *, normalize: bool = True, truncate: bool = False
    ) -> npt.NDArray[np.float32]:
        """Embeddings of one text or a list of texts: a numpy array (n, n_embd), L2-normalised when
        ``normalize``. The model's own pooling is used (mean for a model that declares none, or the
        ``pooling_type`` given to the constructor). A text longer than the context raises
        ValueError, unless ``truncate=True`` (its first n_ctx tokens are used)."""
        texts = [input] if isinstance(input, str) else list(input)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("input must be a str or a list of str")
        with self._embed_lock:  # the embedding context is apart from the chat context
            self._check_open()
            ctx = self._embedding_context()
            out = np.empty((len(texts), ctx.n_embd), dtype=np.float32)
            encode = not self._model.has_decoder
            for i, text in enumerate(texts):
                tokens = self._tokenize(text, add_special=True)
                if not tokens:
                    raise invalid(f"input[{i}] has no tokens", f"input[{i}]")
                if len(tokens) > ctx.n_ctx:
                    if not truncate:
                        raise invalid(
                            f"input[{i}] has {len(tokens)} tokens and the context holds {ctx.n_ctx} "
                            "(pass truncate=True to embed its beginning)",
                            f"input[{i}]",
                            ContextLengthError,
                        )
                    tokens = tokens[: ctx.n_ctx]
                ctx.memory_clear()
                batch = _core.Batch.from_tokens(tokens, logits_last=True)
                if encode:
                    ctx.encode(batch)
                else:
                    ctx.decode(batch)
                out[i] = ctx.embeddings_seq(0)
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        return out

    def create_embedding(
        self, input: str | Sequence[str], *, model: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """An OpenAI embeddings response (``{"object": "list", "data": [...], "usage": ...}``)."""
        texts = [input] if isinstance(input, str) else list(input)
        vectors = Llama.embed(self, texts, **kwargs)
        n_tokens = sum(min(len(self._tokenize(t)), self.n_ctx()) for t in texts)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [float(x) for x in v]} for i, v in enumerate(vectors)
            ],
            "model": model or self.model_name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    # --- async ------------------------------------------------------------------------------

    async def achat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """``chat`` without blocking the event loop: a ChatCompletion dict, or with ``stream=True``
        an AsyncStream to ``async for`` over. Cancelling the task stops the generation."""
        return await self._async(self.chat, messages, **kwargs)

    async def acomplete(self, prompt: str | Sequence[int], **kwargs: Any) -> Any:
        """``complete`` without blocking the event loop (see ``achat``)."""
        return await self._async(self.complete, prompt, **kwargs)

    async def _async(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        token = _OWNER.set(("task", _task_id(task)))
        try:
            if kwargs.get("stream"):
                return AsyncStream(fn(*args, **kwargs))
            handle = _Use(_owner())

            def call() -> Any:
                _HANDLE.set(handle)
                return fn(*args, **kwargs)

            work = asyncio.ensure_future(asyncio.to_thread(call))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                handle.cancel()  # the generation stops at its next token and the Llama is free again
                raise
        finally:
            _OWNER.reset(token)


def _nth_seed(seed: int | None, i: int) -> int | None:
    """The seed of choice i: the request's own for the first, then the next ones."""
    return None if seed is None else (seed + i) & 0xFFFFFFFF


def _merge_choices(outs: list[dict[str, Any]], *, prompt_once: bool) -> dict[str, Any]:
    """Several single-choice responses as one, choices indexed in order; ``prompt_once``: the
    choices share one prompt (chat's n), which usage counts once."""
    merged = dict(outs[0])
    merged["choices"] = []
    usage: dict[str, Any] = {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    for i, out in enumerate(outs):
        choice = dict(out["choices"][0])
        choice["index"] = i
        merged["choices"].append(choice)
        if not prompt_once or i == 0:
            usage["prompt_tokens"] += out["usage"]["prompt_tokens"]
            usage["prompt_tokens_details"]["cached_tokens"] += out["usage"]["prompt_tokens_details"]["cached_tokens"]
        usage["completion_tokens"] += out["usage"]["completion_tokens"]
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    merged["usage"] = usage
    return merged


def _finish_reason(reason: str, has_calls: bool) -> str:
    """OpenAI's finish_reason: "length" when max_tokens (or the context) cut the reply, even inside a
    call, whose arguments may then be incomplete; else "tool_calls" when the reply made calls."""
    if reason == "length":
        return reason
    if reason == "cancelled":
        return "stop"  # OpenAI has no "cancelled": the reply ended early, at the caller's request
    return "tool_calls" if has_calls else reason


def _check_sampling(sampling: dict[str, Any]) -> None:
    unknown = set(sampling) - set(_SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise TypeError(f"stop[{i}]: stop strings must be non-empty str, got {s!r}")
    return stops


_TASK_IDS = itertools.count(1)
_TASKS: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()


def _task_id(task: asyncio.Task[Any] | None) -> int:
    """A number for the task, never reused (unlike id(), which a new task at the same address gets)."""
    if task is None:
        return next(_TASK_IDS)
    if task not in _TASKS:
        _TASKS[task] = next(_TASK_IDS)
    return _TASKS[task]


REASONING_FORMATS = ("auto", "none", "deepseek", "deepseek-legacy")


def _response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return response_format.get("schema") or {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            where = "response_format.json_schema"
            raise invalid(f"{where}: must be an object with a 'schema'", where)
        schema = spec.get("schema", {"type": "object"})
        return schema if isinstance(schema, dict) else None
    where = "response_format.type"
    raise invalid(f"{where}: {kind!r} is not 'text', 'json_object' or 'json_schema'", where)


def _usage(gen: _Gen) -> dict[str, Any]:
    return {
        "prompt_tokens": gen.n_prompt,
        "completion_tokens": gen.n_completion,
        "total_tokens": gen.n_prompt + gen.n_completion,
        "prompt_tokens_details": {"cached_tokens": gen.n_reused},
    }


def _chat_logprobs(gen: _Gen, model: _core.Model, n_top: int) -> list[dict[str, Any]]:
    out = []
    for _tok, piece, lp, top in gen.logprobs:
        alts = None
        if n_top >= 0:
            alts = [_logprob_entry(model.token_to_piece(t), v, None) for t, v in top]
        out.append(_logprob_entry(piece, lp, alts))
    return out


def _completion_logprobs(gen: _Gen, model: _core.Model, offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    pos = offset
    for _tok, piece, lp, top in gen.logprobs:
        text = piece.decode("utf-8", "replace")
        tokens.append(text)
        token_logprobs.append(lp)
        top_logprobs.append({model.token_to_piece(t).decode("utf-8", "replace"): v for t, v in top})
        text_offset.append(pos)
        pos += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def _drop_oldest_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The conversation without its oldest turn after the leading system messages: a user message
    and everything up to the next user message (the replies, calls and tool results), so that roles
    still alternate as templates expect. None when only the system messages and the last turn are left."""
    first = 0
    while first < len(messages) and messages[first].get("role") in ("system", "developer"):
        first += 1
    end = first + 1
    while end < len(messages) and messages[end].get("role") != "user":
        end += 1
    if end >= len(messages):
        return None  # the oldest turn is the last one
    return messages[:first] + messages[end:]


def _attach_parsed(response: dict[str, Any], parse_as: Any) -> None:
    from .tools import parse_model

    choice = response["choices"][0]
    if choice["finish_reason"] == "length":
        raise invalid(
            "the reply was cut at max_tokens: it cannot be parsed as " + getattr(parse_as, "__name__", "the type")
        )
    choice["message"]["parsed"] = parse_model(parse_as, choice["message"].get("content") or "")


def _add_usage(total: dict[str, Any], usage: dict[str, Any]) -> None:
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        total[key] += usage[key]
    total["prompt_tokens_details"]["cached_tokens"] += usage["prompt_tokens_details"]["cached_tokens"]
