"""Loaded models shared between Llamas, and the default context fitted to free memory."""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from typing import Any

from . import _core

# Options of a model load: two Llamas over the same file with the same options share the loaded model.
MODEL_OPTIONS = (
    "n_gpu_layers",
    "split_mode",
    "main_gpu",
    "tensor_split",
    "use_mmap",
    "use_mlock",
    "vocab_only",
    "check_tensors",
    "kv_overrides",
    "repack",
    "rpc_servers",
)


class SharedModels:
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


MODELS = SharedModels()

DEFAULT_N_CTX = 4096  # the smallest context the default fit chooses (llama.cpp's fit_params_min_ctx)
_MARGIN = 1 << 30  # memory left free on a GPU by the default fit, as llama.cpp's fit leaves


@functools.cache
def _bytes_per_element() -> dict[str, float]:
    return {name: float(t["bytes_per_element"]) for name, t in _core.kv_cache_types().items()}


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
    size = _bytes_per_element()
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


def default_n_ctx(model: _core.Model, n_gpu_layers: int, ctx_kwargs: dict[str, Any]) -> int:
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
