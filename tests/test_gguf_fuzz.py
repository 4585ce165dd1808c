"""Fuzz the GGUF loader: mutated copies of a tiny model must never crash or hang the process.

200 deterministic mutations of a small random llama (truncations, corrupted header counts, string and
array lengths, tensor infos, random byte flips) are each loaded with ``pyllama.Model`` in worker
subprocesses. Every load must either succeed or raise a Python exception; a signal (segfault, abort)
or a hang fails the test and names the file and the mutation that caused it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from tiny_models import write_tiny_llama

# Among seed 9's byte flips is one (mutation #83) that turns token 4814 "enu" into "en\0", which reads
# back as the existing token "en": llama.cpp asserts that tokens are unique (llama-vocab.cpp) and would
# abort; pyllama's metadata precheck refuses the file first. The seed is kept as a regression test.
SEED = 9
N_MUTATIONS = 200
BATCH_SIZE = 20
N_PARALLEL = max(1, min(4, os.cpu_count() or 1))
BATCH_TIMEOUT_S = 120.0
SINGLE_TIMEOUT_S = 60.0
FLIP_WINDOW = 64 * 1024
ALLOWED_ERRORS = frozenset({"ModelLoadError", "FileNotFoundError"})  # a file that cannot be loaded says so by type
KINDS = ("truncate", "header_count", "string_length", "array_length", "tensor_info", "byte_flip")

HEADER_SIZE = 24  # magic, version (u32), tensor_count (u64), kv_count (u64)
GGML_TYPE_COUNT = 43  # ggml.h, vendored llama.cpp
GGUF_MAX_LENGTH = 1 << 30  # GGUF_MAX_STRING_LENGTH and GGUF_MAX_ARRAY_ELEMENTS in gguf.cpp
HUGE_U64 = (2**63, 2**64 - 1, 2**63 - 1, 2**62, 2**40, 2**32 + 1, 2**32)
HUGE_U32 = (2**31, 2**32 - 1, 2**16, 1000)

# Loads its argument files one by one and prints one JSON line per file as soon as it is done, so that
# the lines printed before a crash tell which files were not the culprit.
WORKER = """
import json
import sys

import pyllama

for path in sys.argv[1:]:
    try:
        pyllama.Model(path).close()
    except Exception as exc:
        result = {"path": path, "outcome": "error", "type": type(exc).__name__, "message": str(exc)[:600]}
    else:
        result = {"path": path, "outcome": "ok"}
    print(json.dumps(result), flush=True)
"""


@dataclass(frozen=True)
class Slot:
    """An integer field of the base file: what it is, where it is, how wide, and its value."""

    name: str
    offset: int
    width: int
    value: int


@dataclass(frozen=True)
class Layout:
    """Where the sections and the length/count fields of the base file are, checked byte for byte."""

    size: int
    tensor_info_start: int
    data_start: int
    header_counts: tuple[Slot, ...]
    key_lengths: tuple[Slot, ...]
    string_lengths: tuple[Slot, ...]
    token_lengths: tuple[Slot, ...]
    tensor_name_lengths: tuple[Slot, ...]
    array_lengths: tuple[Slot, ...]
    tensor_n_dims: tuple[Slot, ...]
    tensor_dims: tuple[Slot, ...]
    tensor_types: tuple[Slot, ...]
    tensor_offsets: tuple[Slot, ...]


@dataclass(frozen=True)
class Mutation:
    index: int
    kind: str
    target: str
    value: str
    truncate_at: int | None = None
    patches: tuple[tuple[int, bytes], ...] = ()

    @property
    def filename(self) -> str:
        return f"{self.index:03d}-{self.kind}.gguf"

    def describe(self) -> str:
        return f"mutation #{self.index} [{self.kind}] {self.target} := {self.value}"

    def apply(self, base: bytes) -> bytes:
        if self.truncate_at is not None:
            return base[: self.truncate_at]
        data = bytearray(base)
        for offset, patch in self.patches:
            data[offset : offset + len(patch)] = patch
        return bytes(data)


def _part_offsets(field: gguf.ReaderField) -> list[int]:
    """File offset of each part of a field: the parts are laid out contiguously, in order."""
    sizes = np.fromiter((part.nbytes for part in field.parts), dtype=np.int64, count=len(field.parts))
    return [field.offset, *(field.offset + np.cumsum(sizes)).tolist()]


def _slot(base: bytes, field: gguf.ReaderField, offsets: Sequence[int], j: int, name: str, k: int = 0) -> Slot:
    """Element k of part j of a field, after checking that the file holds exactly that there."""
    part = field.parts[j]
    width = part.dtype.itemsize
    offset = offsets[j] + k * width
    raw = base[offset : offset + width]
    assert raw == part[k : k + 1].tobytes(), f"{name}: wrong offset {offset}"
    value = int.from_bytes(raw, "little")
    assert value == int(part[k]), name
    return Slot(name, offset, width, value)


def parse_layout(path: Path, base: bytes) -> Layout:
    reader = gguf.GGUFReader(path)
    assert base[:4] == b"GGUF"
    assert len(reader.fields["GGUF.version"].parts) == 1 and reader.fields["GGUF.version"].offset == 4

    header_counts = []
    for name, offset in (("GGUF.tensor_count", 8), ("GGUF.kv_count", 16)):
        field = reader.fields[name]
        assert field.offset == offset
        header_counts.append(_slot(base, field, _part_offsets(field), 0, f"header {name[5:]}"))
    assert header_counts[0].value == len(reader.tensors)
    assert header_counts[1].value == len(reader.fields) - 3  # minus the three GGUF.* header fields

    key_lengths, string_lengths, token_lengths, array_lengths = [], [], [], []
    kv_end = HEADER_SIZE
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        offsets = _part_offsets(field)
        kv_end = max(kv_end, offsets[-1])
        slot = _slot(base, field, offsets, 0, f"key length of {key!r}")
        assert slot.value == field.parts[1].nbytes and bytes(field.parts[1]).decode() == key
        key_lengths.append(slot)
        if field.types == [gguf.GGUFValueType.STRING]:
            slot = _slot(base, field, offsets, 3, f"string length of {key!r}")
            assert slot.value == field.parts[4].nbytes
            string_lengths.append(slot)
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            slot = _slot(base, field, offsets, 4, f"array length of {key!r}")
            assert slot.value == len(field.data)
            array_lengths.append(slot)
            if field.types[1] == gguf.GGUFValueType.STRING:
                for k, j in enumerate(field.data):
                    slot = _slot(base, field, offsets, j - 1, f"string length of {key!r}[{k}]")
                    assert slot.value == field.parts[j].nbytes
                    token_lengths.append(slot)

    name_lengths, n_dims, dims, types, data_offsets = [], [], [], [], []
    tensor_info_end = kv_end
    for tensor in reader.tensors:
        field, what = tensor.field, f"tensor {tensor.name!r}"
        offsets = _part_offsets(field)
        tensor_info_end = max(tensor_info_end, offsets[-1])
        slot = _slot(base, field, offsets, 0, f"name length of {what}")
        assert slot.value == field.parts[1].nbytes and bytes(field.parts[1]).decode() == tensor.name
        name_lengths.append(slot)
        slot = _slot(base, field, offsets, 2, f"n_dims of {what}")
        assert slot.value == len(tensor.shape)
        n_dims.append(slot)
        for d in range(len(tensor.shape)):
            slot = _slot(base, field, offsets, 3, f"ne[{d}] of {what}", k=d)
            assert slot.value == int(tensor.shape[d])
            dims.append(slot)
        slot = _slot(base, field, offsets, 4, f"ggml type of {what}")
        assert slot.value == int(tensor.tensor_type)
        types.append(slot)
        slot = _slot(base, field, offsets, 5, f"data offset of {what}")
        assert slot.value == tensor.data_offset - reader.data_offset
        data_offsets.append(slot)

    tensor_info_start = min(slot.offset for slot in name_lengths)
    assert tensor_info_start == kv_end
    assert reader.data_offset == -(-tensor_info_end // reader.alignment) * reader.alignment
    return Layout(
        size=len(base),
        tensor_info_start=tensor_info_start,
        data_start=reader.data_offset,
        header_counts=tuple(header_counts),
        key_lengths=tuple(key_lengths),
        string_lengths=tuple(string_lengths),
        token_lengths=tuple(token_lengths),
        tensor_name_lengths=tuple(name_lengths),
        array_lengths=tuple(array_lengths),
        tensor_n_dims=tuple(n_dims),
        tensor_dims=tuple(dims),
        tensor_types=tuple(types),
        tensor_offsets=tuple(data_offsets),
    )


def _set(index: int, kind: str, slot: Slot, value: int, label: str | None = None) -> Mutation:
    value &= (1 << (8 * slot.width)) - 1
    return Mutation(
        index,
        kind,
        f"{slot.name} (offset {slot.offset}, was {slot.value})",
        label or str(value),
        patches=((slot.offset, value.to_bytes(slot.width, "little")),),
    )


def _pick(rng: random.Random, slot: Slot, candidates: Iterable[tuple[int, str | None]]) -> tuple[int, str | None]:
    """A random candidate value that differs from the slot's current value."""
    choices = [(v, label) for v, label in candidates if v >= 0 and v != slot.value]
    return rng.choice(choices)


def make_mutations(base: bytes, layout: Layout, rng: random.Random, n: int) -> list[Mutation]:
    huge: list[tuple[int, str | None]] = [(v, None) for v in HUGE_U64]
    truncation_sections = (
        ("header", 0, HEADER_SIZE),
        ("KV section", HEADER_SIZE, layout.tensor_info_start),
        ("tensor-info section", layout.tensor_info_start, layout.data_start),
        ("tensor data", layout.data_start, layout.size),
    )
    mutations = []
    for index in range(n):
        kind = KINDS[index % len(KINDS)]
        round_ = index // len(KINDS)
        if kind == "truncate":
            section, start, end = truncation_sections[round_ % len(truncation_sections)]
            at = rng.randrange(start, end)
            mutations.append(Mutation(index, kind, f"file truncated in the {section}", str(at), truncate_at=at))
        elif kind == "header_count":
            slot = layout.header_counts[round_ % 2]
            near = [(slot.value + d, f"{slot.value + d} (n{d:+d})") for d in (-3, -2, -1, 1, 2, 3)]
            value, label = _pick(rng, slot, rng.choice([huge, [*near, (0, None)]]))
            mutations.append(_set(index, kind, slot, value, label))
        elif kind == "string_length":
            group = (
                layout.key_lengths,
                layout.string_lengths,
                layout.token_lengths,
                layout.tensor_name_lengths,
            )
            slot = rng.choice(group[round_ % len(group)])
            candidates = [
                *huge,
                (GGUF_MAX_LENGTH + 1, "2**30+1"),
                (slot.value + 1, f"{slot.value + 1} (len+1)"),
            ]
            mutations.append(_set(index, kind, slot, *_pick(rng, slot, candidates)))
        elif kind == "array_length":
            slot = rng.choice(layout.array_lengths)
            candidates = [
                *huge,
                (GGUF_MAX_LENGTH, "2**30"),
                (GGUF_MAX_LENGTH + 1, "2**30+1"),
                (slot.value + 1, f"{slot.value + 1} (n+1)"),
                (slot.value - 1, f"{slot.value - 1} (n-1)"),
                (0, None),
            ]
            mutations.append(_set(index, kind, slot, *_pick(rng, slot, candidates)))
        elif kind == "tensor_info":
            what = ("n_dims", "ne", "type", "offset")[round_ % 4]
            if what == "n_dims":
                slot = rng.choice(layout.tensor_n_dims)
                candidates = [(v, None) for v in (0, 1, 2, 3, 4, 5, *HUGE_U32)]
            elif what == "ne":
                slot = rng.choice(layout.tensor_dims)
                candidates = [
                    *huge,
                    (2**64 - 2, "-2"),
                    (2**31, None),
                    (0, None),
                    (1, None),
                    (slot.value + 1, f"{slot.value + 1} (ne+1)"),
                    (slot.value * 2, f"{slot.value * 2} (ne*2)"),
                ]
            elif what == "type":
                slot = rng.choice(layout.tensor_types)
                candidates = [(v, None) for v in (*range(GGML_TYPE_COUNT + 2), *HUGE_U32)]
            else:
                slot = rng.choice(layout.tensor_offsets)
                other = rng.choice(layout.tensor_offsets)
                candidates = [
                    *huge,
                    (slot.value + 1, f"{slot.value + 1} (offset+1)"),
                    (slot.value + 32, f"{slot.value + 32} (offset+32)"),
                    (slot.value - 32, f"{slot.value - 32} (offset-32)"),
                    (layout.size, f"{layout.size} (file size)"),
                    (other.value, f"{other.value} (the {other.name})"),
                ]
            mutations.append(_set(index, kind, slot, *_pick(rng, slot, candidates)))
        else:
            window = min(FLIP_WINDOW, layout.size)
            flips = sorted({rng.randrange(window): rng.randrange(1, 256) for _ in range(rng.randint(1, 8))}.items())
            patches = tuple((offset, bytes([base[offset] ^ xor])) for offset, xor in flips)
            mutations.append(
                Mutation(
                    index,
                    kind,
                    f"{len(flips)} random byte(s) of the first {window} xored",
                    ", ".join(f"@{offset}^0x{xor:02x}" for offset, xor in flips),
                    patches=patches,
                )
            )
    return mutations


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok" or "error" (a Python exception): fine; "signal", "timeout", "exit": not
    detail: str = ""  # the exception type, or the signal / exit status
    message: str = ""  # the exception message, or the tail of the worker's stderr

    @property
    def survived(self) -> bool:
        return self.status in ("ok", "error")

    def __str__(self) -> str:
        return f"{self.status} {self.detail}".strip()


def _text(stream: str | bytes | None) -> str:
    if isinstance(stream, bytes):
        return stream.decode(errors="replace")
    return stream or ""


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _run_worker(paths: Sequence[Path], timeout: float) -> tuple[dict[str, Outcome], Outcome | None]:
    """Load the files in one worker process: the outcome of each file it finished, and how it ended
    (None when it exited normally)."""
    command = [sys.executable, "-c", WORKER, *map(str, paths)]
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    ended: Outcome | None = None
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        stdout = proc.stdout
        if proc.returncode < 0:
            ended = Outcome("signal", _signal_name(-proc.returncode), proc.stderr[-2000:])
        elif proc.returncode != 0:
            ended = Outcome("exit", f"status {proc.returncode}", proc.stderr[-2000:])
    except subprocess.TimeoutExpired as exc:
        stdout = _text(exc.stdout)
        ended = Outcome("timeout", f"after {timeout:.0f} s", _text(exc.stderr)[-2000:])
    results = {}
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if result["outcome"] == "ok":
            results[result["path"]] = Outcome("ok")
        else:
            results[result["path"]] = Outcome("error", result["type"], result["message"])
    return results, ended


def run_batch(batch: Sequence[Mutation], base: bytes, directory: Path) -> tuple[dict[int, Outcome], str]:
    """Write and load one batch of mutated files; returns the outcome of each mutation, and a description
    of a worker failure that no single file reproduces (or ""). Only the files that failed are kept."""
    paths = {m.index: directory / m.filename for m in batch}
    for m in batch:
        paths[m.index].write_bytes(m.apply(base))
    results, ended = _run_worker(list(paths.values()), BATCH_TIMEOUT_S)
    unexplained = ""
    if ended is None and len(results) == len(batch):
        outcomes = {m.index: results[str(paths[m.index])] for m in batch}
    else:
        # The worker crashed or hung: load each file of the batch alone to find the one(s) that did it.
        outcomes = {}
        for m in batch:
            single, single_ended = _run_worker([paths[m.index]], SINGLE_TIMEOUT_S)
            outcome = single.get(str(paths[m.index]))
            outcomes[m.index] = outcome if single_ended is None and outcome else (single_ended or Outcome("exit"))
        if all(outcome.survived for outcome in outcomes.values()):
            unexplained = (
                f"a worker loading {', '.join(str(p) for p in paths.values())} ended with {ended} "
                f"but none of these files fails alone; stderr: {ended.message if ended else ''}"
            )
    for m in batch:
        if outcomes[m.index].survived and not unexplained:
            paths[m.index].unlink()
    return outcomes, unexplained


def test_mutated_gguf_files_load_or_raise(tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("gguf-fuzz")
    base_path = write_tiny_llama(
        directory / "base.gguf", vocab="llama-spm", n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=64
    )
    base = base_path.read_bytes()
    layout = parse_layout(base_path, base)
    mutations = make_mutations(base, layout, random.Random(SEED), N_MUTATIONS)
    by_kind = Counter(m.kind for m in mutations)
    assert set(by_kind) == set(KINDS) and max(by_kind.values()) - min(by_kind.values()) <= 1

    # The unmutated file loads, so the errors below are the mutations' doing.
    results, ended = _run_worker([base_path], SINGLE_TIMEOUT_S)
    assert ended is None and results == {str(base_path): Outcome("ok")}, (ended, results)

    batches = [mutations[i : i + BATCH_SIZE] for i in range(0, len(mutations), BATCH_SIZE)]
    outcomes: dict[int, Outcome] = {}
    unexplained: list[str] = []
    with ThreadPoolExecutor(N_PARALLEL) as pool:
        runs = pool.map(run_batch, batches, [base] * len(batches), [directory] * len(batches))
        for batch_outcomes, batch_unexplained in runs:
            outcomes.update(batch_outcomes)
            if batch_unexplained:
                unexplained.append(batch_unexplained)

    table: Counter[tuple[str, str]] = Counter()
    for m in mutations:
        table[m.kind, outcomes[m.index].status] += 1
    statuses = sorted({status for _, status in table})
    print(f"\nGGUF fuzz, seed {SEED}: outcome of {len(mutations)} loads per mutation kind")
    print(f"{'kind':<15}" + "".join(f"{status:>9}" for status in statuses))
    for kind in KINDS:
        print(f"{kind:<15}" + "".join(f"{table[kind, status]:>9}" for status in statuses))

    crashes = [
        f"{m.describe()}\n    file: {directory / m.filename}\n    {outcomes[m.index]}: "
        f"{outcomes[m.index].message.strip()[-800:]}"
        for m in mutations
        if not outcomes[m.index].survived
    ]
    if crashes or unexplained:
        pytest.fail(
            f"{len(crashes)} mutated GGUF file(s) crashed or hung the loader (seed {SEED}):\n"
            + "\n".join(crashes + unexplained),
            pytrace=False,
        )

    wrong_type = [
        f"{m.describe()}: {outcomes[m.index].detail}: {outcomes[m.index].message}"
        for m in mutations
        if outcomes[m.index].status == "error" and outcomes[m.index].detail not in ALLOWED_ERRORS
    ]
    assert not wrong_type, "unexpected exception types:\n" + "\n".join(wrong_type)

    # The mutations must really reach the error paths, or the test proves nothing.
    n_errors = sum(outcome.status == "error" for outcome in outcomes.values())
    assert n_errors >= len(mutations) // 2, f"only {n_errors} of {len(mutations)} mutated files failed to load"
    for kind in KINDS:
        assert table[kind, "error"] > 0, f"no {kind} mutation made the load fail"
