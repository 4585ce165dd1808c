"""What every call of a Llama shares: loading (a shared model, a fitted context, the generation
core), its lifecycle, uses and their owners, the submission of a generation, states and the prompt
cache, the sampler and the token budget. ``Llama`` (llama.py) adds chat, completion and embeddings
to it, each in a module of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from . import _core
from ._adapters import Adapters, LoraSpec, control_vector_files
from ._adapters import layer_range as cvec_layer_range
from ._fitting import MODEL_OPTIONS, MODELS, default_n_ctx
from .cache import LlamaState, RAMCache, StateCache, common_prefix
from .chat import ChatTemplate
from .errors import ContextLengthError, invalid
from .media import MediaPolicy, MediaPrompt
from .streams import HANDLE, OWNER, PREPARE_DEADLINE, AsyncStream, Gen, Stream, Use, current_owner, task_id

_L = TypeVar("_L", bound="LlamaBase")

SPECULATIVE_KEYS = ("type", "n_max", "n_min", "p_min", "ngram_size_n", "ngram_size_m", "ngram_min_hits")


@dataclasses.dataclass
class Decoding:
    """How a request decodes: the engine's speculative drafts on or off, a predicted output's tokens,
    and the LoRA adapters it runs with (None: the Llama's)."""

    speculative: bool = True
    prediction: list[int] = dataclasses.field(default_factory=list)
    lora: list[tuple[_core.LoraAdapter, float]] | None = None


class LlamaBase:
    """The shared machinery of ``pyllama.Llama`` (see there)."""

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
        cache: StateCache | RAMCache | None = None,
        cache_ram: int | None = None,
        verbose: bool = False,
        use_mmap: bool | None = None,
        use_mlock: bool = False,
        main_gpu: int = 0,
        split_mode: str = "layer",
        tensor_split: Sequence[float] | None = None,
        kv_overrides: dict[str, bool | int | float | str] | None = None,
        repack: bool = True,
        rpc_servers: Sequence[str] | None = None,
        progress: Callable[[float], bool | None] | None = None,
        n_parallel: int = 1,
        mmproj: str | os.PathLike[str] | None = None,
        mmproj_use_gpu: bool | None = None,
        media: MediaPolicy | None = None,
        draft_model: str | os.PathLike[str] | None = None,
        speculative: str | dict[str, Any] | None = None,
        lora: LoraSpec | None = None,
        control_vectors: Sequence[Any] | None = None,
        control_vector_layer_range: tuple[int, int] | None = None,
        **context_params: Any,
    ) -> None:
        self._closed = True
        self._projector: _core.Projector | None = None
        self._draft_ctx: _core.Context | None = None
        self._draft_key: Any = None
        if isinstance(n_parallel, bool) or not isinstance(n_parallel, int) or n_parallel < 1:
            raise invalid("n_parallel must be an int >= 1", "n_parallel")
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
        if not repack:
            options["repack"] = False
        if rpc_servers:
            if isinstance(rpc_servers, str) or not all(isinstance(r, str) for r in rpc_servers):
                raise invalid("rpc_servers must be a list of 'host:port' strings", "rpc_servers")
            options["rpc_servers"] = list(rpc_servers)
        unknown = set(context_params) & set(MODEL_OPTIONS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
        self._model_key, self._model = MODELS.acquire(self.model_path, options, progress)
        try:
            train_ctx = int(self._model.n_ctx_train)
            if n_ctx is None:
                n_ctx = default_n_ctx(self._model, n_gpu_layers, context_params)
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
            if n_parallel > ctx_kwargs["n_batch"]:
                raise invalid(
                    f"n_parallel ({n_parallel}) must be at most n_batch ({ctx_kwargs['n_batch']}, and n_ctx): "
                    "each step decodes one token of every sequence in one batch",
                    "n_parallel",
                )
            if cache_ram is not None:
                if isinstance(cache_ram, bool) or not isinstance(cache_ram, int) or cache_ram < 0:
                    raise invalid("cache_ram must be an int >= 0 (bytes)", "cache_ram")
                if cache is not None:
                    raise invalid("give cache or cache_ram, not both", "cache_ram")
                if cache_ram > 0:
                    cache = RAMCache(cache_ram)
            if n_parallel > 1:
                if isinstance(cache, StateCache):
                    raise ValueError("a DiskCache needs n_parallel=1 (a RAMCache serves every sequence)")
                ctx_kwargs.setdefault("n_seq_max", n_parallel)
            self._ctx_kwargs = ctx_kwargs
            self._ctx = _core.Context(self._model, **ctx_kwargs)
            # every call goes through the generation core: with n_parallel > 1 its worker thread batches
            # concurrent calls; with one sequence it steps on the thread that waits for the text
            self._engine = _core.Engine(self._ctx, n_parallel)
            if speculative is not None or draft_model is not None:
                self._set_up_speculative(speculative, draft_model, options, ctx_kwargs, n_parallel)
            self._adapters = Adapters(self._model)
            if lora is not None:
                self._adapters.default = self._adapters.resolve(lora)
            self._cvec_digest = ""
            if control_vectors is not None or control_vector_layer_range is not None:
                self._apply_control_vectors(control_vectors or [], control_vector_layer_range)
            if mmproj is not None:
                # the projector (images, audio) goes to the GPU with the model unless told otherwise
                use_gpu = n_gpu_layers != 0 if mmproj_use_gpu is None else bool(mmproj_use_gpu)
                # a warm-up encode at load, as llama-server does: the first image is not the slow one
                self._projector = _core.Projector(
                    self._model, os.fspath(mmproj), use_gpu=use_gpu, n_threads=self._ctx.n_threads, warmup=True
                )
        except BaseException:
            if self._projector is not None:
                self._projector.close()
            self._close_draft()
            MODELS.release(self._model_key)
            raise
        self._media = media if media is not None else MediaPolicy()
        self.mmproj_path = None if mmproj is None else os.fspath(mmproj)
        self._closed = False
        self._embed_lock = threading.Lock()
        self._pooling_type = pooling_type
        self._embed_ctx: _core.Context | None = None
        if embedding:  # the embedding context now, rather than at the first embed()
            self._embedding_context()
        self._template = ChatTemplate(self._model, template=chat_template)
        self._state = threading.Lock()  # guards _uses
        self._uses: dict[object, list[Use]] = {}  # each owner's uses in progress, oldest first
        self._seed = seed
        self._rng = random.Random(seed)
        self._cache: StateCache | RAMCache | None = None
        self.set_cache(cache)
        self.model_name = Path(self.model_path).stem
        # which model and context a saved state belongs to
        self._fingerprint = hashlib.sha256(
            json.dumps(
                [list(self._model_key[:3]), sorted((k, repr(v)) for k, v in ctx_kwargs.items()), self.mmproj_path]
            ).encode()
        ).hexdigest()[:32]

    @property
    def fingerprint(self) -> str:
        """Which model, context settings and control vector a saved state belongs to."""
        if not self._cvec_digest:
            return self._fingerprint
        return hashlib.sha256((self._fingerprint + self._cvec_digest).encode()).hexdigest()[:32]

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

    @property
    def projector(self) -> _core.Projector | None:
        """The multimodal projector (``mmproj=``), or None."""
        return self._projector

    @property
    def media(self) -> MediaPolicy:
        """Where the media of chat messages may come from (a ``pyllama.MediaPolicy``); settable."""
        return self._media

    @media.setter
    def media(self, policy: MediaPolicy) -> None:
        if not isinstance(policy, MediaPolicy):
            raise TypeError("media must be a pyllama.MediaPolicy")
        self._media = policy

    @property
    def supports_vision(self) -> bool:
        """Whether chat messages may hold images (``image_url`` parts): a projector that takes them."""
        return self._projector is not None and self._projector.supports_vision

    @property
    def supports_audio(self) -> bool:
        """Whether chat messages may hold audio (``input_audio`` parts): a projector that takes it."""
        return self._projector is not None and self._projector.supports_audio

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
            raise _core.LlamaError("this Llama is closed")

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
        self._engine.clear_host_cache()
        with self._embed_lock:
            if self._embed_ctx is not None:
                self._embed_ctx.close()
        self._ctx.close()
        if self._projector is not None:
            self._projector.close()
        self._close_draft()
        MODELS.release(self._model_key)

    def _set_up_speculative(
        self,
        speculative: str | dict[str, Any] | None,
        draft_model: str | os.PathLike[str] | None,
        options: dict[str, Any],
        ctx_kwargs: dict[str, Any],
        n_parallel: int,
    ) -> None:
        """llama.cpp's speculative decoding for every request: n-gram types, or a draft model."""
        spec: dict[str, Any] = {"type": speculative} if isinstance(speculative, str) else dict(speculative or {})
        if speculative is not None and not isinstance(speculative, (str, dict)):
            raise invalid("speculative must be a type name or a dict with 'type'", "speculative")
        unknown = set(spec) - set(SPECULATIVE_KEYS)
        if unknown:
            raise invalid(
                f"speculative: unknown keys {sorted(unknown)} (known: {list(SPECULATIVE_KEYS)})", "speculative"
            )
        types = spec.pop("type", "draft-simple" if draft_model is not None else None)
        if types is None:
            raise invalid("speculative needs a 'type'", "speculative")
        for key, value in spec.items():
            kind = float if key == "p_min" else int
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise invalid(f"speculative: {key} must be a number", "speculative")
        if draft_model is not None:
            self._draft_key, draft = MODELS.acquire(os.fspath(draft_model), options, None)
            kwargs = {k: v for k, v in ctx_kwargs.items() if k in ("n_ctx", "n_batch", "n_ubatch", "n_threads")}
            self._draft_ctx = _core.Context(draft, **kwargs, n_seq_max=n_parallel)
        self._engine.set_speculative(types, draft=self._draft_ctx, **spec)

    def _decoding(self, prediction: dict[str, Any] | None, speculative: bool, lora: LoraSpec | None = None) -> Decoding:
        if not isinstance(speculative, bool):
            raise invalid("speculative must be True or False", "speculative")
        tokens: list[int] = []
        if prediction is not None:
            from ._openai import prediction_text

            tokens = self._tokenize(prediction_text(prediction), add_special=False, parse_special=False)
        return Decoding(speculative, tokens, None if lora is None else self._adapters.resolve(lora))

    # --- LoRA adapters and control vectors ----------------------------------------------------

    @property
    def lora(self) -> list[tuple[str, float]]:
        """The LoRA adapters every request runs with unless it names its own: [(path, scale), ...]."""
        return [(a.path, s) for a, s in self._adapters.default]

    @property
    def lora_adapters(self) -> list[dict[str, Any]]:
        """The adapters this Llama has loaded, in llama-server's ``/lora-adapters`` shape: ``id``,
        ``path``, ``scale`` (in the default set; 0 when not in it) and an aLoRA's
        ``alora_invocation_tokens``. A request's ``lora=[{"id": i, "scale": s}]`` names them by id."""
        return self._adapters.describe()

    def load_lora(self, path: str | os.PathLike[str]) -> int:
        """Load a LoRA adapter without applying it (``lora_init_without_apply``); returns its id."""
        self._check_open()
        adapter = self._adapters.load(path)
        return next(i for i, a in enumerate(self._adapters.loaded) if a is adapter)

    def set_lora(self, lora: LoraSpec | None) -> None:
        """Swap or rescale the adapters of the requests that follow, without reloading the model:
        paths (scale 1.0), ``(path, scale)`` pairs, LoraAdapters or ``{"id", "scale"}`` objects; None
        or ``[]``: none. Requests running now keep theirs. Cells computed with other adapters are not
        reused for them."""
        self._check_open()
        self._adapters.default = [] if lora is None else self._adapters.resolve(lora)

    def set_control_vectors(
        self, control_vectors: Sequence[Any] | None, layer_range: tuple[int, int] | None = None
    ) -> None:
        """Add llama.cpp control vectors ([(path, strength), ...], summed) to the output of the layers
        in ``layer_range`` (inclusive; default: every layer) from the next request on; None or ``[]``
        removes them. What the sequences and the host cache hold was computed without the new vector
        and is dropped. ``LlamaError`` while a generation runs."""
        self._check_open()
        self._engine.reset(-1)  # LlamaError while a generation uses a sequence
        self._apply_control_vectors(control_vectors or [], layer_range)
        self._engine.clear_host_cache()

    def _apply_control_vectors(self, control_vectors: Sequence[Any], layer_range: tuple[int, int] | None) -> None:
        files = control_vector_files(control_vectors)
        start, end = cvec_layer_range(layer_range)
        data = _core.load_control_vectors(self._model, files) if files else None
        self._ctx.set_control_vector(data, start, end)
        self._cvec_digest = (
            "" if data is None else hashlib.sha256(data.tobytes() + f"{start},{end}".encode()).hexdigest()
        )

    def _close_draft(self) -> None:
        if self._draft_ctx is not None:
            self._draft_ctx.close()
            self._draft_ctx = None
        if self._draft_key is not None:
            MODELS.release(self._draft_key)
            self._draft_key = None

    @property
    def speculative(self) -> dict[str, Any] | None:
        """The speculative decoding every request uses unless it says ``speculative=False``:
        ``{'types', 'n_max', 'draft_model'}``, or None."""
        return self._engine.speculative

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
                MODELS.release(self._model_key)
            except Exception:
                pass
            self._closed = True

    def __enter__(self: _L) -> _L:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the shared machinery -----------------------------------------------------------------

    def _enter(self, use: Use) -> None:
        """Register a use. A new call from an owner whose suspended streams hold every sequence (the
        caller broke out of them and kept the iterators) ends the oldest of them: it was abandoned, and
        the new call would wait for it for as long as its max_tokens allow. Calls themselves never wait
        here: the generation core queues what finds no free sequence."""
        self._check_open()
        with self._state:
            mine = self._uses.setdefault(use.owner, [])
            suspended = [u for u in mine if not u.running]
            while suspended and len(suspended) >= self.n_parallel:
                oldest = suspended.pop(0)
                oldest.abandoned = True
                oldest.cancel()
                mine.remove(oldest)
            mine.append(use)

    def _exit(self, use: Use) -> None:
        """Unregister a use: its generation stops if it has not ended (a stream closed, or dropped and
        collected, before its last chunk frees its sequence at once)."""
        gen = use.generation
        if gen is not None and not gen.finish_reason:
            gen.cancel()
        with self._state:
            mine = self._uses.get(use.owner)
            if mine is not None:
                if use in mine:
                    mine.remove(use)
                if not mine:
                    del self._uses[use.owner]

    def _generate(
        self,
        use: Use,
        tokens: list[int],
        sampler: _core.Sampler,
        budget: int,
        stops: list[str],
        n_top: int,
        ignore_eos: bool = False,
        decoding: Decoding | None = None,
    ) -> Gen:
        deadline = PREPARE_DEADLINE.get()
        if deadline is not None:
            deadline.check()
        if not self._request_lora(decoding):
            self._restore_from_cache(tokens)  # a DiskCache keeps states computed without adapters
        media = isinstance(tokens, MediaPrompt)
        gen = self._engine.submit(
            tokens.chunks if isinstance(tokens, MediaPrompt) else tokens,
            sampler,
            projector=self._projector if media else None,
            max_tokens=budget,
            stop=stops,
            logprobs=n_top,
            ignore_eos=ignore_eos,
            notifier=None if use.waker is None else use.waker.notifier,
            speculative=True if decoding is None else decoding.speculative,
            prediction=[] if decoding is None else decoding.prediction,
            lora=self._request_lora(decoding),
        )
        use.attach(gen)
        handle = HANDLE.get()
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
        decoding: Decoding | None = None,
    ) -> tuple[Gen, str]:
        use = Use(current_owner())
        self._enter(use)
        try:
            gen = self._generate(use, tokens, sampler, budget, stops, n_top, ignore_eos, decoding)
            text = gen.run()
            self._store_in_cache()
            return gen, text
        finally:
            self._exit(use)

    # --- states and the prompt cache ---------------------------------------------------------

    def _request_lora(self, decoding: Decoding | None) -> list[tuple[_core.LoraAdapter, float]]:
        if decoding is None or decoding.lora is None:
            return self._adapters.default
        return decoding.lora

    def _state_of(self, taken: tuple[list[int], bytes, Any]) -> LlamaState:
        """A LlamaState of Engine.snapshot's (tokens, state, (lora, lora_from))."""
        lora, lora_from = taken[2]
        return LlamaState(
            tuple(taken[0]), taken[1], self.fingerprint, tuple((a.path, s) for a, s in lora), lora_from if lora else 0
        )

    def _restore_into(self, state: LlamaState, seq: int) -> None:
        """Load a state into a sequence, with the adapters its cells were computed with (loaded by path
        when this Llama has not loaded them yet)."""
        lora = [(self._adapters.load(path), scale) for path, scale in state.lora]
        self._engine.restore(list(state.tokens), state.data, seq, lora=lora, lora_from=state.lora_from)

    def _restore(self, state: LlamaState) -> None:
        if state.fingerprint != self.fingerprint:
            raise ValueError("this state belongs to another model or context settings")
        try:
            self._restore_into(state, 0)
        except _core.LlamaError as e:
            raise ValueError(f"the state could not be loaded: {e}") from e

    def _restore_from_cache(self, tokens: list[int]) -> None:
        if not isinstance(self._cache, StateCache):
            return  # none, or the core's RAMCache, which needs nothing here
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
        if not isinstance(self._cache, StateCache):
            return
        taken = self._engine.snapshot(0)
        if taken is None or not taken[0] or taken[2][0]:
            return  # another call runs in the sequence now, or its cells were computed with adapters
        try:
            self._cache.store(self._state_of(taken))
        except (_core.LlamaError, OSError):
            pass  # a cache that cannot take the state only costs a later re-evaluation

    def _slot(self, slot: int | None) -> int:
        if slot is None:
            if self.n_parallel > 1:
                raise invalid(f"name the slot (0 to {self.n_parallel - 1}): this Llama has {self.n_parallel}", "slot")
            return 0
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.n_parallel:
            raise invalid(f"slot must be an int from 0 to {self.n_parallel - 1}", "slot")
        return slot

    def save_state(self, path: str | os.PathLike[str] | None = None, *, slot: int | None = None) -> LlamaState:
        """The tokens a sequence holds and their KV memory, as a ``LlamaState`` (also written to
        ``path`` when given). ``load_state`` puts it back, here or in a new Llama with the same model
        and context settings, so that a prompt starting with those tokens evaluates only the rest.
        ``slot`` names the sequence (required with ``n_parallel`` > 1); one a generation is using
        raises ``LlamaError``."""
        seq = self._slot(slot)
        use = Use(current_owner())
        if self.n_parallel == 1:
            self._enter(use)  # this thread's suspended stream gives the sequence back
        try:
            taken = self._engine.snapshot(seq)
        finally:
            if self.n_parallel == 1:
                self._exit(use)
        if taken is None:
            raise _core.LlamaError(f"sequence {seq} is in use by a generation")
        state = self._state_of(taken)
        if path is not None:
            state.save(path)
        return state

    def load_state(self, state: LlamaState | str | os.PathLike[str], *, slot: int | None = None) -> None:
        """Restore a state from ``save_state`` (or the path it was saved to) into a sequence
        (``slot``, required with ``n_parallel`` > 1). Raises ValueError for a state of another model or
        context settings, and leaves the sequence empty then; ``LlamaError`` while a generation uses
        the sequence."""
        seq = self._slot(slot)
        if not isinstance(state, LlamaState):
            state = LlamaState.load(state)
        if state.fingerprint != self.fingerprint:
            raise ValueError("this state belongs to another model or context settings")
        use = Use(current_owner())
        if self.n_parallel == 1:
            self._enter(use)
        try:
            if self._engine.busy(seq):
                raise _core.LlamaError(f"sequence {seq} is in use by a generation")
            try:
                self._restore_into(state, seq)
            except (_core.LlamaError, ValueError) as e:  # a state that does not fit this context
                raise ValueError(f"the state could not be loaded: {e}") from e
        finally:
            if self.n_parallel == 1:
                self._exit(use)

    def reset(self, slot: int | None = None) -> None:
        """Forget what the sequences hold (``slot``: that one only), so that the next prompt is
        evaluated afresh; ``LlamaError`` while a generation uses one of them. The caches keep theirs."""
        seq = -1 if slot is None else self._slot(slot)
        use = Use(current_owner())
        if self.n_parallel == 1:
            self._enter(use)
        try:
            self._engine.reset(seq)
        finally:
            if self.n_parallel == 1:
                self._exit(use)

    def set_cache(self, cache: StateCache | RAMCache | None) -> None:
        """Use ``cache`` for prompt states from now on: a ``RAMCache`` (the core's host-memory cache,
        every sequence) or a ``DiskCache`` (files, ``n_parallel=1``); None stops (a RAMCache's states
        are dropped)."""
        if isinstance(cache, StateCache) and self.n_parallel > 1:
            raise ValueError("a DiskCache needs n_parallel=1 (a RAMCache serves every sequence)")
        if cache is not None and not isinstance(cache, (StateCache, RAMCache)):
            raise TypeError("cache must be a pyllama.RAMCache, a pyllama.DiskCache (a StateCache) or None")
        if isinstance(self._cache, RAMCache):
            self._cache._detach(self._engine)
        self._engine.set_host_cache(0)
        if isinstance(cache, RAMCache):
            cache._attach(self._engine)
        self._cache = cache

    @property
    def cache(self) -> StateCache | RAMCache | None:
        return self._cache

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

    def _fan_out(self, calls: list[Callable[[], dict[str, Any] | Stream]]) -> list[dict[str, Any]]:
        """Run the calls: at the same time when the engine batches them, else one after the other."""
        if self.n_parallel == 1:
            results = [call() for call in calls]  # one sequence: one after the other, on this thread
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(len(calls), self.n_parallel)) as pool:
                results = list(pool.map(lambda call: call(), calls))
        return [r for r in results if isinstance(r, dict)]

    async def _async(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        token = OWNER.set(("task", task_id(task)))
        try:
            deadline = PREPARE_DEADLINE.get()
            if deadline is not None:
                deadline.start()
            if kwargs.get("stream"):
                # the template, grammars, schemas and sampler are prepared off the event loop (a server
                # bounds this wait itself: the first chunk, maybe after a wait for a slot, is not checked)
                try:
                    return AsyncStream(await asyncio.to_thread(fn, *args, **kwargs))
                finally:
                    if deadline is not None:
                        deadline.armed = False
            handle = Use(current_owner())

            def call() -> Any:
                HANDLE.set(handle)
                return fn(*args, **kwargs)

            work = asyncio.ensure_future(asyncio.to_thread(call))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                handle.cancel()  # the generation stops at its next token and the Llama is free again
                raise
        finally:
            OWNER.reset(token)
