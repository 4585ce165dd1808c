"""Where a server of several models finds them: a directory of GGUF files (``--models-dir``, as
llama-server scans one) and a TOML file that lists models with their options (``--config``).

A directory holds models as files (``NAME.gguf``: the model ``NAME``) or as subdirectories (``NAME/``
with the model's file, its first shard where it is split, and a projector whose name holds
"mmproj"). Files whose name holds "mmproj" or begins with a speculative sidecar's prefix
(``mtp-``, ``dspark-``, ``dflash-``) are companions, never models of their own.

The TOML file::

    [defaults]                  # options of every model (a model's own table overrides them)
    n-ctx = 4096

    [models.qwen]               # the model's id
    path = "qwen2.5-7b-instruct-q4_k_m.gguf"   # relative to this file's directory
    aliases = ["gpt-4o-mini"]
    parallel = 2
    load-on-startup = true

Other keys are ``pyllama serve``'s options of a model (``--n-ctx``...) without their dashes;
``-`` and ``_`` are the same in keys. Reading them is the caller's business: this module gives them
as they are, keyed with ``_``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from ..models import pick_mmproj

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Config", "ConfigModel", "FoundModel", "read_config", "scan_models_dir"]

# llama-server's companion files: projectors, and speculative sidecars (common/preset.cpp)
DRAFT_PREFIXES = ("mtp-", "dspark-", "dflash-")
# keys of a model's table that are no serve option
MODEL_KEYS = ("path", "model", "alias", "aliases", "load_on_startup")


# --- a directory of models -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FoundModel:
    """A model of a models directory: its id, its file and the projector beside it (if any)."""

    id: str
    path: Path
    mmproj: Path | None = None


def _companion(name: str) -> bool:
    return "mmproj" in name or name.startswith(DRAFT_PREFIXES)


def _later_shard(name: str) -> bool:
    """A shard of a split model other than the first (``-00002-of-00003.gguf``)."""
    stem = name[: -len(".gguf")]
    head, sep, count = stem.rpartition("-of-")
    index = head.rpartition("-")[2]
    return bool(sep) and count.isdigit() and index.isdigit() and int(index) > 1


def _ggufs(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(".gguf") and not p.name.startswith(".")
    )


def scan_models_dir(directory: str | os.PathLike[str]) -> list[FoundModel]:
    """The models of ``directory``, sorted by id: each ``NAME.gguf`` (companions and later shards
    aside) is the model ``NAME``; each subdirectory ``NAME`` with a model file is the model
    ``NAME``, with the projector beside it that llama-server picks (``pyllama.models.pick_mmproj``)."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"models directory not found: '{root}'")
    found: dict[str, FoundModel] = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = _ggufs(entry)
            models = [f for f in files if not _companion(f) and not _later_shard(f)]
            if not models:
                continue
            first = [f for f in models if "-00001-of-" in f]
            model = (first or models)[0]
            mmproj = pick_mmproj(files, model)
            model_id = entry.name
            item = FoundModel(model_id, entry / model, None if mmproj is None else entry / mmproj)
        elif entry.is_file() and entry.name.endswith(".gguf"):
            if _companion(entry.name) or _later_shard(entry.name):
                continue
            model_id = entry.name[: -len(".gguf")]
            item = FoundModel(model_id, entry)
        else:
            continue
        if model_id in found:
            raise ValueError(f"{root}: the model id {model_id!r} is both a file and a directory")
        found[model_id] = item
    return list(found.values())


# --- a TOML file of models -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConfigModel:
    """A model of a config file: its id, file (None: a model of the models directory by that id),
    aliases, whether it loads when the server starts, and its serve options (keys with ``_``)."""

    id: str
    path: Path | None
    aliases: tuple[str, ...]
    load_on_startup: bool | None
    options: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Config:
    """A config file: where it is (relative paths in it are relative to ``base``), the options of
    every model (``[defaults]``) and its models, in the file's order."""

    base: Path
    defaults: dict[str, Any]
    load_on_startup: bool
    models: list[ConfigModel]


def _keyed(table: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in out:
            raise ValueError(f"{key!r} is given twice (with '-' and with '_')")
        out[name] = value
    return out


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table")
    return value


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false")
    return value


def read_config(path: str | os.PathLike[str]) -> Config:
    """The models of a TOML config file (see the module's doc). FileNotFoundError where it is not
    there, ValueError naming the table and key for what is wrong in it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: '{file}'")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not a valid TOML file ({e})") from None
    try:
        return _config(data, file.resolve().parent)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def _config(data: dict[str, Any], base: Path) -> Config:
    unknown = sorted(set(data) - {"defaults", "models"})
    if unknown:
        raise ValueError(f"unknown top-level key {unknown[0]!r}: a config has [defaults] and [models.ID] tables")
    defaults = _keyed(_table(data.get("defaults", {}), "[defaults]"))
    for key in ("path", "model", "alias", "aliases"):
        if key in defaults:
            raise ValueError(f"[defaults] {key}: give it in a model's table")
    load_default = _flag(defaults.pop("load_on_startup", False), "[defaults] load-on-startup")
    models_table = _table(data.get("models", {}), "[models]")
    if not models_table:
        raise ValueError("no model: add a table [models.ID] with the path of its file")
    models = []
    for model_id, raw in models_table.items():
        where = f"[models.{model_id}]"
        if not model_id.strip():
            raise ValueError("a model's id must not be empty")
        table = _keyed(_table(raw, where))
        if "path" in table and "model" in table:
            raise ValueError(f"{where}: give path or model, not both")
        file = table.pop("path", table.pop("model", None))
        model_path = None
        if file is not None:
            if not isinstance(file, str) or not file:
                raise ValueError(f"{where} path must be the path of a GGUF file")
            model_path = Path(os.path.normpath(base / Path(file).expanduser()))
        aliases: list[str] = []
        if "alias" in table:
            value = table.pop("alias")
            if not isinstance(value, str):
                raise ValueError(f"{where} alias must be a string (aliases takes a list)")
            aliases.append(value)
        if "aliases" in table:
            value = table.pop("aliases")
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise ValueError(f"{where} aliases must be a list of strings")
            aliases += value
        if any(not a.strip() for a in aliases):
            raise ValueError(f"{where}: an alias must not be empty")
        load = table.pop("load_on_startup", None)
        if load is not None:
            _flag(load, f"{where} load-on-startup")
        models.append(ConfigModel(model_id, model_path, tuple(aliases), load, table))
    return Config(base, defaults, load_default, models)
