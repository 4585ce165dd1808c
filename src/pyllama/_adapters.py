"""LoRA adapters and control vectors of a Llama: the adapters it has loaded (by path, once each), the
set every request runs with unless it names its own, and the control vector its context adds."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from . import _core
from .errors import invalid

# A request's or a Llama's adapters: [(path or LoraAdapter or id, scale), ...]; a bare path or
# LoraAdapter means scale 1.0; {"id": i, "scale": s} names the i-th loaded adapter (llama-server's shape).
LoraSpec = Sequence[Any]


class Adapters:
    """The LoRA adapters loaded for one model, in the order they were loaded (their ids), and the
    default set."""

    def __init__(self, model: _core.Model) -> None:
        self._model = model
        self._lock = threading.Lock()
        self._loaded: list[_core.LoraAdapter] = []
        self._by_path: dict[str, _core.LoraAdapter] = {}
        self.default: list[tuple[_core.LoraAdapter, float]] = []

    @property
    def loaded(self) -> list[_core.LoraAdapter]:
        return list(self._loaded)

    def load(self, path: str | os.PathLike[str]) -> _core.LoraAdapter:
        """The adapter of ``path``, loaded once (FileNotFoundError, ModelLoadError)."""
        key = os.path.realpath(os.fspath(path))
        with self._lock:
            found = self._by_path.get(key)
        if found is not None:
            return found
        adapter = _core.LoraAdapter(self._model, os.fspath(path))  # without the lock: it takes a while
        with self._lock:
            found = self._by_path.get(key)
            if found is not None:
                return found
            self._by_path[key] = adapter
            self._loaded.append(adapter)
        return adapter

    def resolve(self, spec: LoraSpec | None, param: str = "lora") -> list[tuple[_core.LoraAdapter, float]]:
        """A set of adapters from the forms ``lora=`` takes (None: the default set)."""
        if spec is None:
            return list(self.default)
        if isinstance(spec, (str, bytes, dict, os.PathLike, _core.LoraAdapter)) or not isinstance(spec, Sequence):
            raise invalid(
                f"{param} must be a list of adapters: paths, (path, scale) pairs or {{'id', 'scale'}} objects", param
            )
        out: list[tuple[_core.LoraAdapter, float]] = []
        for i, item in enumerate(spec):
            where = f"{param}[{i}]"
            scale: Any = 1.0
            if isinstance(item, dict):
                unknown = set(item) - {"id", "scale"}
                if unknown or "id" not in item:
                    raise invalid(f"{where} must be {{'id': int, 'scale': float}}", where)
                ident, scale = item["id"], item.get("scale", 1.0)
                if isinstance(ident, bool) or not isinstance(ident, int) or not 0 <= ident < len(self._loaded):
                    last = len(self._loaded) - 1
                    raise invalid(f"{where}.id must name a loaded adapter (0 to {last})", f"{where}.id")
                adapter = self._loaded[ident]
            else:
                target = item
                if isinstance(item, tuple):
                    if len(item) != 2:
                        raise invalid(f"{where} must be a path or a (path, scale) pair", where)
                    target, scale = item
                if isinstance(target, _core.LoraAdapter):
                    adapter = target
                elif isinstance(target, (str, os.PathLike)):
                    adapter = self.load(target)
                else:
                    raise invalid(f"{where} must be a path, a LoraAdapter or a (path, scale) pair", where)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise invalid(f"{where}: the scale must be a number", where)
            out.append((adapter, float(scale)))
        return out

    def describe(self) -> list[dict[str, Any]]:
        """The loaded adapters as llama-server's GET /lora-adapters lists them, with the default scales."""
        scales: dict[int, float] = {}
        for a, s in self.default:
            scales[id(a)] = scales.get(id(a), 0.0) + s
        out = []
        for i, a in enumerate(self._loaded):
            meta = a.meta
            entry: dict[str, Any] = {
                "id": i,
                "path": a.path,
                "scale": scales.get(id(a), 0.0),
                "task_name": meta.get("adapter.lora.task_name", ""),
                "prompt_prefix": meta.get("adapter.lora.prompt_prefix", ""),
            }
            if a.is_alora:
                pieces = b"".join(self._model.token_to_piece(t, special=True) for t in a.invocation_tokens)
                entry["alora_invocation_string"] = pieces.decode("utf-8", "replace")
                entry["alora_invocation_tokens"] = list(a.invocation_tokens)
            out.append(entry)
        return out


def control_vector_files(spec: Any) -> list[tuple[str, float]]:
    """``control_vectors=``: paths (strength 1.0) or (path, strength) pairs."""
    if isinstance(spec, (str, bytes, os.PathLike)) or not isinstance(spec, Sequence):
        raise invalid("control_vectors must be a list of paths or (path, strength) pairs", "control_vectors")
    files: list[tuple[str, float]] = []
    for i, item in enumerate(spec):
        path, strength = (item, 1.0) if isinstance(item, (str, os.PathLike)) else (None, None)
        if isinstance(item, tuple) and len(item) == 2:
            path, strength = item
        if (
            not isinstance(path, (str, os.PathLike))
            or not isinstance(strength, (int, float))
            or isinstance(strength, bool)
        ):
            raise invalid(f"control_vectors[{i}] must be a path or a (path, strength) pair", f"control_vectors[{i}]")
        files.append((os.fspath(path), float(strength)))
    return files


def layer_range(value: Any) -> tuple[int, int]:
    """``control_vector_layer_range=(start, end)``, inclusive; None: every layer."""
    if value is None:
        return -1, -1
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
    ):
        raise invalid("control_vector_layer_range must be (start, end), two ints", "control_vector_layer_range")
    return int(value[0]), int(value[1])
