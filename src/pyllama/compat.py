"""llama-cpp-python compatibility: ``from pyllama.compat import Llama`` in place of ``from llama_cpp import Llama``.

``Llama`` here takes llama-cpp-python's (v0.3) constructor keywords with llama-cpp-python's defaults
(``n_ctx=512``, ``n_gpu_layers=0``, ``verbose=True``...) and has its methods, signatures and return
shapes: ``create_completion`` (and calling the object), ``create_chat_completion``, ``embed``,
``create_embedding``, ``tokenize`` (bytes in), ``detokenize`` (bytes out), ``n_ctx``... Everything
runs on pyllama's engine: prompts are rendered by llama.cpp's chat templates and tool calls are
parsed natively for every model. Options pyllama cannot honour raise NotImplementedError naming
them when they are set to anything but their default. docs/compat.md lists the differences.

The object holds a ``pyllama.Llama`` (``.native``) and passes ``chat``, ``complete``, ``achat``,
``acomplete``, ``save_state``, ``load_state``, ``set_cache`` and ``close`` to it unchanged;
``tokenize``, ``detokenize``, ``embed``, ``create_embedding`` and calling the object follow
llama-cpp-python.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import _core
from ._logging import logger, set_log_level
from .cache import DiskCache, LlamaState, RAMCache, StateCache
from .chat import ChatTemplate
from .errors import ContextLengthError, invalid
from .llama import Llama as _Llama
from .llama import Stream

__all__ = [
    "CHAT_FORMATS",
    "LLAMA_ATTENTION_TYPE_CAUSAL",
    "LLAMA_ATTENTION_TYPE_NON_CAUSAL",
    "LLAMA_ATTENTION_TYPE_UNSPECIFIED",
    "LLAMA_DEFAULT_SEED",
    "LLAMA_POOLING_TYPE_CLS",
    "LLAMA_POOLING_TYPE_LAST",
    "LLAMA_POOLING_TYPE_MEAN",
    "LLAMA_POOLING_TYPE_NONE",
    "LLAMA_POOLING_TYPE_RANK",
    "LLAMA_POOLING_TYPE_UNSPECIFIED",
    "LLAMA_ROPE_SCALING_TYPE_LINEAR",
    "LLAMA_ROPE_SCALING_TYPE_LONGROPE",
    "LLAMA_ROPE_SCALING_TYPE_NONE",
    "LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED",
    "LLAMA_ROPE_SCALING_TYPE_YARN",
    "LLAMA_SPLIT_MODE_LAYER",
    "LLAMA_SPLIT_MODE_NONE",
    "LLAMA_SPLIT_MODE_ROW",
    "Llama",
    "LlamaCache",
    "LlamaDiskCache",
    "LlamaGrammar",
    "LlamaRAMCache",
    "LlamaState",
]

# llama.cpp's constants, with the values llama-cpp-python gives them.
LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # a random seed

LLAMA_SPLIT_MODE_NONE = 0
LLAMA_SPLIT_MODE_LAYER = 1
LLAMA_SPLIT_MODE_ROW = 2

LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED = -1
LLAMA_ROPE_SCALING_TYPE_NONE = 0
LLAMA_ROPE_SCALING_TYPE_LINEAR = 1
LLAMA_ROPE_SCALING_TYPE_YARN = 2
LLAMA_ROPE_SCALING_TYPE_LONGROPE = 3

LLAMA_POOLING_TYPE_UNSPECIFIED = -1
LLAMA_POOLING_TYPE_NONE = 0
LLAMA_POOLING_TYPE_MEAN = 1
LLAMA_POOLING_TYPE_CLS = 2
LLAMA_POOLING_TYPE_LAST = 3
LLAMA_POOLING_TYPE_RANK = 4

LLAMA_ATTENTION_TYPE_UNSPECIFIED = -1
LLAMA_ATTENTION_TYPE_CAUSAL = 0
LLAMA_ATTENTION_TYPE_NON_CAUSAL = 1

_SPLIT_MODES: dict[int, str | None] = {
    LLAMA_SPLIT_MODE_NONE: "none",
    LLAMA_SPLIT_MODE_LAYER: "layer",
    LLAMA_SPLIT_MODE_ROW: "row",
}
_ROPE_SCALING: dict[int, str | None] = {-1: None, 0: "none", 1: "linear", 2: "yarn", 3: "longrope"}
_POOLING: dict[int, str | None] = {-1: None, 0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
_ATTENTION: dict[int, str | None] = {-1: None, 0: "causal", 1: "non_causal"}
# ggml_type values of the KV cache types llama.cpp supports (type_k, type_v): the C++ table
_GGML_TYPES: dict[int, str | None] = {int(t["id"]): name for name, t in _core.kv_cache_types().items()}

# llama-cpp-python's chat_format names -> the llama.cpp built-in format pyllama renders instead (the
# nearest equivalent: whitespace and the handling of system messages can differ slightly).
CHAT_FORMATS: dict[str, str] = {
    "chatml": "chatml",
    "qwen": "chatml",
    "llama-2": "llama2-sys-bos",
    "llama-3": "llama3",
    "mistral-instruct": "mistral-v1",
    "gemma": "gemma",
    "vicuna": "vicuna",
    "openchat": "openchat",
    "chatglm3": "chatglm3",
}

# llama-cpp-python's defaults for the YaRN parameters; other values are passed on to the context.
_YARN_DEFAULTS = {"yarn_ext_factor": -1.0, "yarn_attn_factor": 1.0, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0}


class LlamaGrammar:
    """A GBNF grammar, as llama-cpp-python's ``LlamaGrammar``: pass it as ``grammar=``.

    The grammar is checked when a call uses it (an invalid one raises ValueError there).
    """

    def __init__(self, *, _grammar: str) -> None:
        self._grammar = _grammar
        self._root = "root"

    @property
    def grammar(self) -> str:
        """The GBNF text."""
        return self._grammar

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> LlamaGrammar:
        if not isinstance(grammar, str):
            raise TypeError("grammar must be a str of GBNF")
        return cls(_grammar=grammar)

    @classmethod
    def from_file(cls, file: str | os.PathLike[str], verbose: bool = True) -> LlamaGrammar:
        return cls.from_string(Path(file).read_text(encoding="utf-8"), verbose=verbose)

    @classmethod
    def from_json_schema(cls, json_schema: str, verbose: bool = True) -> LlamaGrammar:
        """The grammar of JSON values matching ``json_schema`` (a JSON string, or a dict)."""
        return cls.from_string(_core.json_schema_to_grammar(json_schema), verbose=verbose)

    def __repr__(self) -> str:
        return f"LlamaGrammar({self._grammar!r})"


class LlamaRAMCache(RAMCache):
    """llama-cpp-python's ``LlamaRAMCache``: pyllama's ``RAMCache`` (prompt states in memory)."""

    def __init__(self, capacity_bytes: int = 2 << 30) -> None:
        super().__init__(capacity_bytes)

    @property
    def cache_size(self) -> int:
        return self.size_bytes


LlamaCache = LlamaRAMCache


class LlamaDiskCache(DiskCache):
    """llama-cpp-python's ``LlamaDiskCache``: pyllama's ``DiskCache`` (prompt states in files)."""

    def __init__(self, cache_dir: str | os.PathLike[str] = ".cache/llama_cache", capacity_bytes: int = 2 << 30) -> None:
        super().__init__(cache_dir, capacity_bytes)

    @property
    def cache_size(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("*.state") if p.is_file())


class _MappedStream(Iterator[dict[str, Any]]):
    """A pyllama Stream whose chunks go through ``fn``; ``close()`` and ``cancel()`` reach the stream."""

    def __init__(self, stream: Stream, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self._stream = stream
        self._fn = fn

    def __iter__(self) -> _MappedStream:
        return self

    def __next__(self) -> dict[str, Any]:
        return self._fn(next(self._stream))

    def close(self) -> None:
        self._stream.close()

    def cancel(self) -> None:
        self._stream.cancel()


def _unsupported(names: Sequence[str], what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{what}: {', '.join(names)} {'is' if len(names) == 1 else 'are'} not supported by pyllama.compat "
        "(see docs/compat.md)"
    )


def _enum(what: str, value: int | str | None, table: dict[int, str | None]) -> str | None:
    """A llama.cpp enum given as llama-cpp-python's int (or as pyllama's name) -> pyllama's name."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int (llama.cpp's enum value) or a str, not {type(value).__name__}")
    if value not in table:
        raise ValueError(f"{what}: unknown value {value} (known: {sorted(table)})")
    return table[value]


def _seed(seed: int | None) -> int | None:
    """llama-cpp-python's seed -> pyllama's: LLAMA_DEFAULT_SEED (or -1) means a random one (None)."""
    if seed is None or seed in (LLAMA_DEFAULT_SEED, -1):
        return None
    return int(seed)


def _max_tokens(max_tokens: int | None) -> int | None:
    """None or <= 0 means as many as the context holds, as in llama-cpp-python."""
    return None if max_tokens is None or max_tokens <= 0 else int(max_tokens)


def _logit_bias(bias: dict[Any, float] | None) -> dict[int, float] | None:
    return None if bias is None else {int(k): float(v) for k, v in bias.items()}


def _grammar_text(grammar: Any) -> str | None:
    if grammar is None:
        return None
    if isinstance(grammar, LlamaGrammar):
        return grammar.grammar
    if isinstance(grammar, str):
        return grammar
    kind = f"{type(grammar).__module__}.{type(grammar).__qualname__}"
    raise NotImplementedError(
        f"grammar: a {kind} is not supported by pyllama.compat; pass GBNF text or a pyllama.compat.LlamaGrammar"
    )


def _legacy_functions(
    functions: Sequence[dict[str, Any]] | None,
    function_call: str | dict[str, Any] | None,
    tools: Sequence[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
) -> tuple[list[dict[str, Any]] | None, str | dict[str, Any] | None]:
    """The legacy ``functions``/``function_call`` of the OpenAI API as ``tools``/``tool_choice``."""
    out_tools = list(tools) if tools is not None else None
    if functions is not None:
        if tools is not None:
            raise invalid("give tools or functions, not both", "functions")
        out_tools = [{"type": "function", "function": dict(f)} for f in functions]
    if function_call is not None:
        if tool_choice is not None:
            raise invalid("give tool_choice or function_call, not both", "function_call")
        if isinstance(function_call, str):
            tool_choice = function_call  # "none" or "auto"
        elif isinstance(function_call, dict) and isinstance(function_call.get("name"), str):
            tool_choice = {"type": "function", "function": {"name": function_call["name"]}}
        else:
            raise invalid('function_call must be "none", "auto" or {"name": ...}', "function_call")
    return out_tools, tool_choice


def _has_handler(log: logging.Logger) -> bool:
    current: logging.Logger | None = log
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _log_to_stderr() -> None:
    """verbose=True: llama.cpp's log (INFO and up) on stderr, as llama-cpp-python prints it. The
    ``pyllama`` logger goes down to INFO; a handler writing to stderr is added only when no handler
    would show its records already (an application's logging configuration is left as it is)."""
    if logger.getEffectiveLevel() > logging.INFO:
        set_log_level(logging.INFO)
    if not _has_handler(logger):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


class Llama:
    """llama-cpp-python's ``Llama`` (constructor, defaults and methods) over a ``pyllama.Llama``.

    ``Llama(model_path, *, n_gpu_layers=0, split_mode=LLAMA_SPLIT_MODE_LAYER, main_gpu=0,
    tensor_split=None, vocab_only=False, use_mmap=True, use_mlock=False, kv_overrides=None,
    seed=LLAMA_DEFAULT_SEED, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=None,
    n_threads_batch=None, rope_scaling_type=LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
    pooling_type=LLAMA_POOLING_TYPE_UNSPECIFIED, attention_type=LLAMA_ATTENTION_TYPE_UNSPECIFIED,
    rope_freq_base=0.0, rope_freq_scale=0.0, yarn_ext_factor=-1.0, yarn_attn_factor=1.0,
    yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_orig_ctx=0, logits_all=False, embedding=False,
    offload_kqv=True, flash_attn=False, op_offload=None, swa_full=None, no_perf=False,
    last_n_tokens_size=64, lora_base=None, lora_scale=1.0, lora_path=None, numa=False,
    chat_format=None, chat_handler=None, draft_model=None, tokenizer=None, type_k=None,
    type_v=None, spm_infill=False, verbose=True, **kwargs)``

    The enums (``split_mode``, ``rope_scaling_type``, ``pooling_type``, ``attention_type``,
    ``type_k``/``type_v``) take llama-cpp-python's ints or pyllama's names. ``chat_format`` takes a
    llama-cpp-python name with a llama.cpp equivalent (``CHAT_FORMATS``) or a llama.cpp built-in
    name; None uses the model's own template. Other keyword arguments go to ``pyllama.Llama``
    (``chat_template``, ``cache``, ``progress``...). ``chat_handler``, ``draft_model``,
    ``tokenizer``, ``lora_path``/``lora_base``, ``vocab_only=True``, ``spm_infill=True`` and
    ``numa`` raise NotImplementedError. ``logits_all`` is accepted and has no effect (pyllama
    computes logprobs without it).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        # model
        n_gpu_layers: int = 0,
        split_mode: int | str = LLAMA_SPLIT_MODE_LAYER,
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
        vocab_only: bool = False,
        use_mmap: bool = True,
        use_mlock: bool = False,
        kv_overrides: dict[str, bool | int | float | str] | None = None,
        # context
        seed: int = LLAMA_DEFAULT_SEED,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_ubatch: int = 512,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        rope_scaling_type: int | str | None = LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
        pooling_type: int | str = LLAMA_POOLING_TYPE_UNSPECIFIED,
        attention_type: int | str = LLAMA_ATTENTION_TYPE_UNSPECIFIED,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        yarn_ext_factor: float = -1.0,
        yarn_attn_factor: float = 1.0,
        yarn_beta_fast: float = 32.0,
        yarn_beta_slow: float = 1.0,
        yarn_orig_ctx: int = 0,
        logits_all: bool = False,
        embedding: bool = False,
        offload_kqv: bool = True,
        flash_attn: bool | None = False,
        op_offload: bool | None = None,
        swa_full: bool | None = None,
        no_perf: bool = False,
        # sampling
        last_n_tokens_size: int = 64,
        # LoRA, NUMA, chat, speculative decoding, tokenizer: see the NotImplementedError below
        lora_base: str | None = None,
        lora_scale: float = 1.0,
        lora_path: str | None = None,
        numa: bool | int = False,
        chat_format: str | None = None,
        chat_handler: Any = None,
        draft_model: Any = None,
        tokenizer: Any = None,
        # KV cache types
        type_k: int | str | None = None,
        type_v: int | str | None = None,
        spm_infill: bool = False,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        unsupported = [
            name
            for name, value in (
                ("chat_handler", chat_handler),
                ("draft_model", draft_model),
                ("tokenizer", tokenizer),
                ("lora_path", lora_path),
                ("lora_base", lora_base),
            )
            if value is not None
        ]
        unsupported += [name for name, value in (("vocab_only", vocab_only), ("spm_infill", spm_infill)) if value]
        if numa:
            unsupported.append("numa")
        if unsupported:
            hint = " (pyllama.Model(path, vocab_only=True) loads only a vocabulary)" if vocab_only else ""
            raise NotImplementedError(str(_unsupported(unsupported, "Llama()")) + hint)
        if chat_format is not None and "chat_template" in kwargs:
            raise TypeError("give chat_format or chat_template, not both")

        context: dict[str, Any] = {"offload_kqv": offload_kqv}
        if no_perf:
            context["no_perf"] = True
        if n_threads_batch is not None:
            context["n_threads_batch"] = n_threads_batch
        for key, value, table in (
            ("rope_scaling_type", rope_scaling_type, _ROPE_SCALING),
            ("attention_type", attention_type, _ATTENTION),
        ):
            name = _enum(key, value, table)
            if name is not None:
                context[key] = name
        for key, kv in (("type_k", type_k), ("type_v", type_v)):
            name = _enum(key, kv, _GGML_TYPES)
            if name is not None:
                context[key] = name
        if rope_freq_base:
            context["rope_freq_base"] = rope_freq_base
        if rope_freq_scale:
            context["rope_freq_scale"] = rope_freq_scale
        yarn = {
            "yarn_ext_factor": yarn_ext_factor,
            "yarn_attn_factor": yarn_attn_factor,
            "yarn_beta_fast": yarn_beta_fast,
            "yarn_beta_slow": yarn_beta_slow,
        }
        context.update({k: v for k, v in yarn.items() if v != _YARN_DEFAULTS[k]})
        if yarn_orig_ctx:
            context["yarn_orig_ctx"] = yarn_orig_ctx
        if op_offload is not None:
            context["op_offload"] = op_offload
        if swa_full is not None:
            context["swa_full"] = swa_full
        if set(context) & set(kwargs):
            raise TypeError(f"duplicate keyword arguments: {', '.join(sorted(set(context) & set(kwargs)))}")

        split = _enum("split_mode", split_mode, _SPLIT_MODES)
        pooling = _enum("pooling_type", pooling_type, _POOLING)
        template = kwargs.pop("chat_template", None)
        if chat_format is not None:
            template = _chat_template_for(chat_format)
        if verbose:
            _log_to_stderr()
        self.native = _Llama(
            model_path,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            n_batch=n_batch,
            n_ubatch=min(n_ubatch, n_batch),
            flash_attn=None if flash_attn is None else bool(flash_attn),
            seed=_seed(seed),
            chat_template=template,
            embedding=embedding,
            pooling_type=pooling,
            verbose=False,
            use_mmap=use_mmap,
            use_mlock=use_mlock,
            main_gpu=main_gpu,
            split_mode=split or "layer",
            tensor_split=tensor_split,
            kv_overrides=kv_overrides,
            **context,
            **kwargs,
        )
        self.verbose = verbose
        self.chat_format = chat_format
        self.chat_handler = None
        self.last_n_tokens_size = last_n_tokens_size
        self.metadata: dict[str, str] = dict(self.model.metadata)
        self.native.model_name = self.model_path  # llama-cpp-python names the model by its path in responses
        self._compat_seed = _seed(seed)
        self._per_token_embeddings = pooling == "none"

    # --- tokens -------------------------------------------------------------------------------

    def tokenize(  # llama-cpp-python's names; pyllama's as keywords
        self,
        text: str | bytes,
        add_bos: bool = True,
        special: bool = False,
        *,
        add_special: bool | None = None,
        parse_special: bool | None = None,
    ) -> list[int]:
        """The tokens of ``text`` (UTF-8 bytes, or str); ``add_bos`` adds the BOS (and whatever else
        the vocabulary adds), ``special`` parses special tokens such as ``<|im_start|>``."""
        if add_special is not None:
            add_bos = add_special
        if parse_special is not None:
            special = parse_special
        return list(self.model.tokenize(text, add_special=add_bos, parse_special=special))

    def detokenize(  # bytes, as llama-cpp-python
        self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None, special: bool = False
    ) -> bytes:
        """The bytes of ``tokens``, piece after piece (a leading space after a BOS is dropped, as in
        llama-cpp-python); ``special`` renders special tokens. ``prev_tokens`` is accepted and unused,
        as in llama-cpp-python."""
        tokens = [int(t) for t in tokens]
        out = b"".join(self.model.token_to_piece(t, special=special) for t in tokens)
        if tokens and tokens[0] == self.model.token_bos and out[:1] == b" ":
            out = out[1:]
        return out

    # --- pyllama's own ------------------------------------------------------------------------

    @property
    def model(self) -> _core.Model:
        return self.native.model

    @property
    def context(self) -> _core.Context:
        return self.native.context

    @property
    def chat_template(self) -> ChatTemplate:
        return self.native.chat_template

    @property
    def model_path(self) -> str:
        return self.native.model_path

    @property
    def model_name(self) -> str:
        return self.native.model_name

    @property
    def fingerprint(self) -> str:
        return self.native.fingerprint

    @property
    def cache(self) -> StateCache | RAMCache | None:
        return self.native.cache

    @property
    def closed(self) -> bool:
        return self.native.closed

    def chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> dict[str, Any] | Stream:
        """pyllama's ``chat`` (see ``pyllama.Llama.chat``)."""
        return self.native.chat(messages, **kwargs)

    def complete(self, prompt: Any, **kwargs: Any) -> dict[str, Any] | Stream:
        """pyllama's ``complete`` (see ``pyllama.Llama.complete``)."""
        return self.native.complete(prompt, **kwargs)

    async def achat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """pyllama's ``achat``."""
        return await self.native.achat(messages, **kwargs)

    async def acomplete(self, prompt: Any, **kwargs: Any) -> Any:
        """pyllama's ``acomplete``."""
        return await self.native.acomplete(prompt, **kwargs)

    def save_state(self, path: str | os.PathLike[str] | None = None) -> LlamaState:
        """pyllama's ``save_state``: the tokens the context holds and their KV memory."""
        return self.native.save_state(path)

    def load_state(self, state: LlamaState | str | os.PathLike[str]) -> None:
        """pyllama's ``load_state``."""
        self.native.load_state(state)

    def set_cache(self, cache: StateCache | RAMCache | None) -> None:
        """Keep prompt states in ``cache`` (a ``LlamaRAMCache``/``LlamaDiskCache`` or pyllama's)."""
        self.native.set_cache(cache)

    def n_ctx(self) -> int:
        return self.native.n_ctx()

    def close(self) -> None:
        """Free the context, and the model unless another Llama shares it. Idempotent."""
        self.native.close()

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- model and context --------------------------------------------------------------------

    def n_vocab(self) -> int:
        return int(self.model.n_vocab)

    def n_embd(self) -> int:
        return int(self.model.n_embd)

    def token_bos(self) -> int:
        """The BOS token, or -1 when the vocabulary has none."""
        bos = self.model.token_bos
        return -1 if bos is None else int(bos)

    def token_eos(self) -> int:
        """The EOS token, or -1 when the vocabulary has none."""
        eos = self.model.token_eos
        return -1 if eos is None else int(eos)

    def token_nl(self) -> int:
        nl = self.model.token_nl
        return -1 if nl is None else int(nl)

    def reset(self) -> None:
        """Forget the tokens the context holds: the next call evaluates its whole prompt."""
        self.native.reset()

    def set_seed(self, seed: int) -> None:
        """The seed of the following calls that give none (LLAMA_DEFAULT_SEED: a random one each call)."""
        self._compat_seed = _seed(seed)

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: str,
        additional_files: Sequence[str] | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        local_dir_use_symlinks: bool | str = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        revision: str | None = None,
        progress: bool | None = None,
        **kwargs: Any,
    ) -> Llama:
        """Download ``filename`` (a glob pattern matching one file) from the Hugging Face Hub repository
        ``repo_id`` (and each of ``additional_files``), then load it with ``kwargs``. Needs
        ``huggingface_hub``; a split GGUF's parts are all downloaded. ``local_dir_use_symlinks`` is
        accepted and ignored (huggingface_hub no longer uses it)."""
        from . import models

        hub: dict[str, Any] = {}
        if local_dir is not None:
            hub["local_dir"] = os.fspath(local_dir)
        common: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir, "progress": progress, **hub}
        path = models.hf_download(repo_id, filename, **common)
        for extra in additional_files or ():
            models.hf_download(repo_id, extra, **common)
        return cls(path, **kwargs)

    # --- sampling -----------------------------------------------------------------------------

    def _sampling(
        self,
        *,
        temperature: float,
        top_p: float,
        top_k: int,
        min_p: float,
        typical_p: float,
        repeat_penalty: float,
        frequency_penalty: float,
        presence_penalty: float,
        mirostat_mode: int,
        mirostat_tau: float,
        mirostat_eta: float,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "typical_p": typical_p,
            "repeat_penalty": repeat_penalty,
            "frequency_penalty": frequency_penalty,
            "presence_penalty": presence_penalty,
            "penalty_last_n": self.last_n_tokens_size,
            "mirostat": mirostat_mode,
            "mirostat_tau": mirostat_tau,
            "mirostat_eta": mirostat_eta,
        }
        if temperature == 0:
            params["mirostat"] = 0  # greedy, as llama-cpp-python
        elif temperature < 0:
            # llama-cpp-python: a draw from the whole distribution, no top-k/top-p/min-p/typical/mirostat
            params.update(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, mirostat=0)
        return params

    def _call_seed(self, seed: int | None) -> int:
        chosen = self._compat_seed if seed is None else _seed(seed)
        return chosen if chosen is not None else random.getrandbits(32)

    def _clamped(self, call: Callable[[int | None], Any], max_tokens: int | None) -> Any:
        """``call(max_tokens)``; when the prompt and max_tokens exceed the context, max_tokens is
        lowered to what the context holds, as llama-cpp-python does (the prompt alone must fit)."""
        try:
            return call(max_tokens)
        except ContextLengthError as e:
            if max_tokens is None or e.param != "max_tokens":
                raise
        return call(None)

    # --- completion ---------------------------------------------------------------------------

    def create_completion(
        self,
        prompt: str | Sequence[int],
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | Sequence[str] | None = (),
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        stopping_criteria: Any = None,
        logits_processor: Any = None,
        grammar: LlamaGrammar | str | None = None,
        logit_bias: dict[Any, float] | None = None,
    ) -> Any:
        """An OpenAI Completion dict, or with ``stream=True`` an iterator of completion chunks.

        Special tokens written in a text prompt (``<|im_start|>``...) are parsed as special tokens, as
        in llama-cpp-python. ``tfs_z`` is accepted and ignored, as in llama-cpp-python 0.3.
        """
        names = [n for n, v in (("stopping_criteria", stopping_criteria), ("logits_processor", logits_processor)) if v]
        if names:
            raise _unsupported(names, "create_completion")
        sampling = self._sampling(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            typical_p=typical_p,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
        )
        kwargs: dict[str, Any] = {
            "suffix": suffix,
            "seed": self._call_seed(seed),
            "stop": stop,
            "logit_bias": _logit_bias(logit_bias),
            "logprobs": logprobs,
            "echo": echo,
            "grammar": _grammar_text(grammar),
            "stream": stream,
            **sampling,
        }
        arg, echo_text = self._completion_prompt(prompt, suffix)
        out = self._clamped(lambda n: self.complete(arg, max_tokens=n, **kwargs), _max_tokens(max_tokens))
        # a prompt given as tokens echoes as their text: the prompt as written is echoed instead
        native_echo = self.native.detokenize(arg, special=True) if echo and echo_text is not None else None

        def fix(chunk: dict[str, Any], first: bool) -> dict[str, Any]:
            if model is not None:
                chunk["model"] = model
            if native_echo is not None and echo_text is not None and first:
                choice = chunk["choices"][0]
                choice["text"] = echo_text + choice["text"][len(native_echo) :]
                lp = choice.get("logprobs")
                if lp is not None:
                    shift = len(echo_text) - len(native_echo)
                    lp["text_offset"] = [o + shift for o in lp["text_offset"]]
            return chunk

        if isinstance(out, Stream):
            if model is None and native_echo is None:
                return out
            seen = [False]

            def fix_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
                first, seen[0] = not seen[0], True
                return fix(chunk, first)

            return _MappedStream(out, fix_chunk)
        return fix(out, True)

    __call__ = create_completion  # llama-cpp-python's __call__

    def _completion_prompt(self, prompt: str | Sequence[int], suffix: str | None) -> tuple[Any, str | None]:
        """What to give pyllama's complete, and the text to echo when it is not that prompt's text.

        llama-cpp-python parses special tokens in a text prompt; pyllama's complete does not, so a
        prompt in which parsing them makes a difference is passed as its tokens."""
        if isinstance(prompt, str):
            if suffix is None:
                parsed = list(self.model.tokenize(prompt, add_special=True, parse_special=True))
                if parsed != list(self.model.tokenize(prompt, add_special=True, parse_special=False)):
                    return parsed, prompt
            return prompt, None
        return [int(t) for t in prompt], None

    # --- chat ---------------------------------------------------------------------------------

    def create_chat_completion(
        self,
        messages: Sequence[dict[str, Any]],
        functions: Sequence[dict[str, Any]] | None = None,
        function_call: str | dict[str, Any] | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: str | Sequence[str] | None = (),
        seed: int | None = None,
        response_format: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        logits_processor: Any = None,
        grammar: LlamaGrammar | str | None = None,
        logit_bias: dict[Any, float] | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
    ) -> Any:
        """An OpenAI ChatCompletion dict, or with ``stream=True`` an iterator of ChatCompletionChunk dicts.

        The prompt is the model's chat template (or ``chat_format``'s) rendered by llama.cpp, and tool
        calls are parsed natively for every model. The legacy ``functions``/``function_call`` become
        ``tools``/``tool_choice``; the reply then also carries ``function_call`` (the first call).
        """
        if logits_processor:
            raise _unsupported(["logits_processor"], "create_chat_completion")
        legacy = functions is not None
        chat_tools, choice = _legacy_functions(functions, function_call, tools, tool_choice)
        sampling = self._sampling(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            typical_p=typical_p,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
        )
        kwargs: dict[str, Any] = {
            "tools": chat_tools,
            "tool_choice": choice,
            "response_format": response_format,
            "seed": self._call_seed(seed),
            "stop": stop,
            "logit_bias": _logit_bias(logit_bias),
            "logprobs": bool(logprobs),
            "top_logprobs": top_logprobs,
            "grammar": _grammar_text(grammar),
            "stream": stream,
            **sampling,
        }
        out = self._clamped(lambda n: self.chat(messages, max_tokens=n, **kwargs), _max_tokens(max_tokens))

        def fix(chunk: dict[str, Any]) -> dict[str, Any]:
            if model is not None:
                chunk["model"] = model
            if legacy:
                for c in chunk["choices"]:
                    msg = c.get("message") if "message" in c else c.get("delta")
                    calls = (msg or {}).get("tool_calls") or []
                    first = next((tc for tc in calls if tc.get("index", 0) == 0), None)
                    if msg is not None and first is not None:
                        fn = first.get("function") or {}
                        msg["function_call"] = {k: fn[k] for k in ("name", "arguments") if k in fn}
            return chunk

        if isinstance(out, Stream):
            return _MappedStream(out, fix) if model is not None or legacy else out
        return fix(out)

    # --- embeddings ---------------------------------------------------------------------------

    def embed(  # lists of floats, as llama-cpp-python
        self,
        input: str | Sequence[str],
        normalize: bool = False,
        truncate: bool = True,
        return_count: bool = False,
    ) -> Any:
        """The embedding of a str (a list of floats) or of each str of a list (a list of lists);
        with ``return_count=True``, ``(embeddings, number of tokens)``. ``normalize``: L2-normalised.
        ``truncate``: a text longer than the context is cut to its first n_ctx tokens (else ValueError).
        """
        if self._per_token_embeddings:
            raise _unsupported(["per-token embeddings (pooling_type=LLAMA_POOLING_TYPE_NONE)"], "embed")
        texts = [input] if isinstance(input, str) else list(input)
        vectors = self.native.embed(texts, normalize=normalize, truncate=truncate)
        data: list[list[float]] = vectors.tolist()
        out: Any = data[0] if isinstance(input, str) else data
        if return_count:
            n_ctx = self.n_ctx()
            return out, sum(min(len(self.model.tokenize(t, add_special=True)), n_ctx) for t in texts)
        return out

    def create_embedding(self, input: str | Sequence[str], model: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """An OpenAI embeddings response (not normalised, as llama-cpp-python's); ``kwargs`` go to ``embed``."""
        texts = [input] if isinstance(input, str) else list(input)
        data, n_tokens = self.embed(texts, return_count=True, **kwargs)
        return {
            "object": "list",
            "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(data)],
            "model": model if model is not None else self.model_name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }


def _chat_template_for(chat_format: str) -> str | None:
    if chat_format == "chat_template.default":  # llama-cpp-python's name for the model's own template
        return None
    if chat_format in CHAT_FORMATS:
        return CHAT_FORMATS[chat_format]
    if chat_format in _core.ChatTemplate.builtin_names():
        return chat_format
    raise ValueError(
        f"chat_format {chat_format!r} has no equivalent in pyllama: use one of {', '.join(sorted(CHAT_FORMATS))}, "
        "a llama.cpp built-in name (pyllama.ChatTemplate.builtin_names()), chat_template=<Jinja source>, "
        "or None for the model's own template"
    )
