"""Prompt-state caches: the KV memory of earlier prompts, kept so that a later prompt sharing a prefix
with one of them evaluates only what follows that prefix.

``Llama`` already reuses whatever its sequences hold. ``RAMCache`` is the generation core's host-memory
cache of the prefixes they give up (every sequence); ``DiskCache`` keeps states in files, which survive
restarts (one sequence). Use ``Llama(..., cache=...)`` or ``llm.set_cache(...)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DiskCache", "LlamaState", "RAMCache", "StateCache"]

_MAGIC = b"PYLLAMA-STATE\x00\x01\x00"
# a state whose cells were computed with LoRA adapters: the header also holds them, as JSON
_MAGIC_LORA = b"PYLLAMA-STATE\x00\x02\x00"


@dataclass(frozen=True)
class LlamaState:
    """What a ``Llama``'s context holds: the tokens and the KV memory of its sequence.

    ``fingerprint`` names the model and context the state belongs to; loading it into another
    raises ``ValueError``. ``save(path)`` and ``LlamaState.load(path)`` keep it on disk. ``lora``
    names the LoRA adapters (paths and scales) its cells were computed with, from token
    ``lora_from`` on (an aLoRA's invocation; the tokens before it without adapters).
    """

    tokens: tuple[int, ...]
    data: bytes
    fingerprint: str
    lora: tuple[tuple[str, float], ...] = ()
    lora_from: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.data)

    def to_bytes(self) -> bytes:
        fp = self.fingerprint.encode()
        if self.lora:
            extra = json.dumps({"lora": [list(e) for e in self.lora], "lora_from": self.lora_from}).encode()
            head = _MAGIC_LORA + struct.pack("<III", len(fp), len(self.tokens), len(extra)) + fp + extra
        else:
            head = _MAGIC + struct.pack("<II", len(fp), len(self.tokens)) + fp
        return head + struct.pack(f"<{len(self.tokens)}i", *self.tokens) + self.data

    @classmethod
    def from_bytes(cls, blob: bytes) -> LlamaState:
        tokens, fingerprint, lora, lora_from, offset = _read_header(blob)
        return cls(tokens, blob[offset:], fingerprint, lora, lora_from)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state to ``path`` (atomically: a partial file never appears under that name)."""
        path = Path(path)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LlamaState:
        return cls.from_bytes(Path(path).read_bytes())


def _header_size(head: bytes) -> int:
    """The size of a state's header (up to its data) from its first bytes (_FIXED_SIZE of them)."""
    n = len(_MAGIC)
    if len(head) >= n + 8 and head[:n] == _MAGIC:
        n_fp, n_tok = struct.unpack_from("<II", head, n)
        return int(n + 8 + n_fp + 4 * n_tok)
    if len(head) >= n + 12 and head[:n] == _MAGIC_LORA:
        n_fp, n_tok, n_extra = struct.unpack_from("<III", head, n)
        return int(n + 12 + n_fp + n_extra + 4 * n_tok)
    raise ValueError("not a pyllama state (bad magic)")


_FIXED_SIZE = len(_MAGIC) + 12  # enough of the header to know its size


def _read_header(blob: bytes) -> tuple[tuple[int, ...], str, tuple[tuple[str, float], ...], int, int]:
    """(tokens, fingerprint, lora, lora_from, where the data starts) of a state's bytes."""
    n = len(_MAGIC)
    size = _header_size(blob[:_FIXED_SIZE])
    if size > len(blob):
        raise ValueError("truncated pyllama state")
    lora: tuple[tuple[str, float], ...] = ()
    lora_from = 0
    if blob[:n] == _MAGIC:
        n_fp, n_tok = struct.unpack_from("<II", blob, n)
        offset = n + 8
        fingerprint = blob[offset : offset + n_fp].decode()
        offset += n_fp
    else:
        n_fp, n_tok, n_extra = struct.unpack_from("<III", blob, n)
        offset = n + 12
        fingerprint = blob[offset : offset + n_fp].decode()
        offset += n_fp
        try:
            extra = json.loads(blob[offset : offset + n_extra])
            lora = tuple((str(path), float(scale)) for path, scale in extra["lora"])
            lora_from = int(extra["lora_from"])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"a damaged pyllama state (its adapters: {e})") from None
        offset += n_extra
    tokens = struct.unpack_from(f"<{n_tok}i", blob, offset)
    return tokens, fingerprint, lora, lora_from, offset + 4 * n_tok


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class StateCache:
    """The interface of a prompt-state cache: ``lookup`` the state sharing the longest prefix with a
    prompt, ``store`` a state. Entries of another model or context (another fingerprint) are never
    returned."""

    def lookup(self, tokens: Sequence[int], fingerprint: str) -> tuple[LlamaState, int] | None:
        """The state whose tokens share the longest prefix with ``tokens``, and that prefix's length."""
        raise NotImplementedError

    def store(self, state: LlamaState) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class RAMCache:
    """The generation core's host-memory prompt cache, as llama-server's ``--cache-ram`` keeps it.

    When a sequence gives up a prefix of 64 tokens or more that no other sequence holds (its slot
    is taken by a prompt that shares less of it), the prefix's KV state is kept in RAM. A later prompt
    that starts with more of it than any sequence holds loads it back and evaluates only the rest.
    This works for every sequence of a ``Llama``, ``n_parallel`` > 1 included. The least recently used
    states are dropped once they take more than ``capacity_bytes``.

    ``Llama(..., cache=RAMCache(n))`` is ``Llama(..., cache_ram=n)``. Given to several ``Llama``s,
    each keeps its own states within ``capacity_bytes``; ``len()``, ``size_bytes`` and ``clear()``
    cover them all.
    """

    def __init__(self, capacity_bytes: int = 2 << 30) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be an int > 0")
        self.capacity_bytes = capacity_bytes
        self._engines: weakref.WeakSet[Any] = weakref.WeakSet()

    def _attach(self, engine: Any) -> None:
        engine.set_host_cache(self.capacity_bytes)
        self._engines.add(engine)

    def _detach(self, engine: Any) -> None:
        self._engines.discard(engine)

    def _stats(self) -> list[dict[str, int]]:
        return [engine.host_cache() for engine in list(self._engines)]

    @property
    def size_bytes(self) -> int:
        """The bytes of the states held now."""
        return sum(s["bytes"] for s in self._stats())

    @property
    def n_saved(self) -> int:
        """States saved so far."""
        return sum(s["n_saved"] for s in self._stats())

    @property
    def n_loaded(self) -> int:
        """States loaded back into a sequence so far."""
        return sum(s["n_loaded"] for s in self._stats())

    def clear(self) -> None:
        for engine in list(self._engines):
            engine.clear_host_cache()

    def __len__(self) -> int:
        return sum(s["entries"] for s in self._stats())


class DiskCache(StateCache):
    """States in files under ``directory`` (one file each), which survive restarts; the least
    recently used are deleted once they take more than ``capacity_bytes``."""

    def __init__(self, directory: str | os.PathLike[str], capacity_bytes: int = 10 << 30) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be > 0")
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        # file name -> (fingerprint, tokens), read from the files' headers
        self._index: dict[str, tuple[str, tuple[int, ...]]] = {}
        for path in self.directory.glob("*.state"):
            try:
                with path.open("rb") as f:
                    head = f.read(_FIXED_SIZE)
                    size = _header_size(head)
                    tokens, fp, *_ = _read_header(head + f.read(max(0, size - len(head))))
            except (OSError, ValueError, struct.error):
                continue  # not ours, or damaged: left alone
            self._index[path.name] = (fp, tokens)

    @staticmethod
    def _name(fingerprint: str, tokens: Sequence[int]) -> str:
        h = hashlib.sha256(fingerprint.encode() + struct.pack(f"<{len(tokens)}i", *tokens))
        return h.hexdigest()[:32] + ".state"

    def lookup(self, tokens: Sequence[int], fingerprint: str) -> tuple[LlamaState, int] | None:
        with self._lock:
            best: tuple[str, int] | None = None
            for name, (fp, key) in self._index.items():
                if fp != fingerprint:
                    continue
                n = common_prefix(key, tokens)
                if n > 0 and (best is None or n > best[1]):
                    best = (name, n)
            if best is None:
                return None
            path = self.directory / best[0]
            try:
                state = LlamaState.load(path)
                os.utime(path)
            except (OSError, ValueError):
                self._index.pop(best[0], None)
                return None
            return state, best[1]

    def store(self, state: LlamaState) -> None:
        with self._lock:
            name = self._name(state.fingerprint, state.tokens)
            for old, (fp, key) in list(self._index.items()):
                if fp == state.fingerprint and key == state.tokens[: len(key)]:
                    (self.directory / old).unlink(missing_ok=True)
                    del self._index[old]
            state.save(self.directory / name)
            self._index[name] = (state.fingerprint, state.tokens)
            self._evict()

    def _evict(self) -> None:
        files = []
        for name in self._index:
            try:
                st = (self.directory / name).stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, name))
        total = sum(size for _, size, _ in files)
        for _, size, name in sorted(files):
            if total <= self.capacity_bytes:
                break
            (self.directory / name).unlink(missing_ok=True)
            self._index.pop(name, None)
            total -= size

    def clear(self) -> None:
        with self._lock:
            for name in self._index:
                (self.directory / name).unlink(missing_ok=True)
            self._index.clear()

    def __len__(self) -> int:
        return len(self._index)
