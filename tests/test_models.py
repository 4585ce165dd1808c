"""pyllama.models: download() against a real local HTTP server, hf_download() against a fake Hugging Face Hub.

The server is a ThreadingHTTPServer on 127.0.0.1 that serves bytes from memory, honours (or, when told,
ignores) ``Range: bytes=N-``, can break a response off after N bytes, and records every request it got.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest

from pyllama import models
from pyllama.models import DownloadError, cache_dir, download, hf_download

# ---------------------------------------------------------------------------------------------- the server


@dataclass
class Request:
    method: str
    path: str  # as sent, query included
    headers: dict[str, str]  # lower-case names
    status: int = 0  # the status the server answered with


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)  # by URL path (no query)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # extra response headers, by URL path
    status: dict[str, int] = field(default_factory=dict)  # a forced error status, by URL path
    cut_after: dict[str, int] = field(default_factory=dict)  # the next GET of a path stops after N body bytes
    ignore_range: bool = False
    no_length: bool = False  # no Content-Length: the body ends when the connection closes
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up is no news
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _answer(self, request: Request, status: int, headers: dict[str, str], payload: bytes, body: bool) -> None:
        self._head(request, status, headers, len(payload))
        if body:
            self.wfile.write(payload)

    def _head(self, request: Request, status: int, headers: dict[str, str], length: int) -> None:
        request.status = status
        self.send_response(status)
        if self.server.state.no_length and status in (200, 206):
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _serve(self, body: bool) -> None:
        state = self.server.state
        request = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        with state.lock:
            state.requests.append(request)
            path = urlsplit(self.path).path
            forced = state.status.get(path)
            data = state.files.get(path)
            extra = dict(state.headers.get(path, {}))
            cut = state.cut_after.pop(path, None) if body else None
        if forced is not None:
            self._answer(request, forced, {}, b"error\n", body)
            return
        if data is None:
            self._answer(request, 404, {}, b"not found\n", body)
            return
        extra["Accept-Ranges"] = "bytes"
        status, start = 200, 0
        asked = self.headers.get("Range")
        if asked is not None and not state.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", asked.strip())
            assert m is not None, f"unexpected Range header {asked!r}"
            start = int(m.group(1))
            if start >= len(data):
                self._answer(request, 416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
                return
            status = 206
            extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        if cut is None:
            self._answer(request, status, extra, payload, body)
            return
        # Promise the whole payload, send only `cut` bytes of it, then hang up.
        self._head(request, status, extra, len(payload))
        self.wfile.write(payload[:cut])
        self.wfile.flush()
        self.close_connection = True


class LocalServer:
    def __init__(self) -> None:
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.state = ServerState()
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def state(self) -> ServerState:
        return self.httpd.state

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def serve(self, path: str, data: bytes) -> str:
        self.state.files[path] = data
        return self.url(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 is reached directly, whatever proxy the environment names."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[LocalServer]:
    s = LocalServer()
    yield s
    s.close()


def payload(n: int, seed: int = 0) -> bytes:
    """n bytes that differ at every offset (a shifted or duplicated chunk would not compare equal)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- cache_dir


def test_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYLLAMA_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("PYLLAMA_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "pyllama"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "pyllama"


def test_download_goes_to_the_default_cache(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = payload(1000)
    url = server.serve("/m/tiny.gguf", data)
    monkeypatch.setenv("PYLLAMA_CACHE", str(tmp_path / "c"))
    path = download(url, progress=False)
    assert path == tmp_path / "c" / "url" / sha(url.encode())[:16] / "tiny.gguf"
    assert path.read_bytes() == data


# ---------------------------------------------------------------------------------------------- download


def test_download_bytes_and_sha256(server: LocalServer, tmp_path: Path) -> None:
    data = payload(300_000)
    url = server.serve("/models/some%20model.gguf", data)
    path = download(url, sha256=sha(data).upper(), cache_dir=tmp_path, progress=False)
    assert path.name == "some model.gguf"  # the URL path's last part, unquoted
    assert path.read_bytes() == data
    assert leftovers(tmp_path) == ["some model.gguf"]  # no .part left behind
    assert [(r.method, r.path, "range" in r.headers) for r in server.state.requests] == [
        ("GET", "/models/some%20model.gguf", False)
    ]


def test_download_filename_argument(server: LocalServer, tmp_path: Path) -> None:
    data = payload(100)
    url = server.serve("/download", data)
    assert download(url, cache_dir=tmp_path, filename="x.gguf", progress=False).read_bytes() == data
    with pytest.raises(ValueError, match="file name"):
        download(server.url("/"), cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="file name"):
        download(url, cache_dir=tmp_path, filename="../x.gguf", progress=False)


def test_wrong_sha256_raises_and_leaves_no_file(server: LocalServer, tmp_path: Path) -> None:
    data = payload(50_000)
    url = server.serve("/m.gguf", data)
    wrong = sha(b"something else")
    with pytest.raises(ValueError) as info:
        download(url, sha256=wrong, cache_dir=tmp_path, progress=False)
    assert wrong in str(info.value) and sha(data) in str(info.value)  # expected and actual
    assert leftovers(tmp_path) == []  # neither the file nor its .part
    with pytest.raises(ValueError, match="64 hexadecimal"):
        download(url, sha256="abc", cache_dir=tmp_path, progress=False)


def test_interrupted_download_resumes_with_range(server: LocalServer, tmp_path: Path) -> None:
    data = payload(200_000)
    url = server.serve("/big.gguf", data)
    cut = 70_001
    server.state.cut_after["/big.gguf"] = cut
    with pytest.raises(DownloadError) as info:
        download(url, sha256=sha(data), cache_dir=tmp_path, progress=False)
    assert url in str(info.value) and info.value.url == url
    (part,) = tmp_path.rglob("*.part")
    assert part.name == "big.gguf.part"
    assert part.read_bytes() == data[:cut]  # what came before the break is kept
    assert not part.with_name("big.gguf").exists()

    path = download(url, sha256=sha(data), cache_dir=tmp_path, progress=False)
    first, second = server.state.requests
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={cut}-"
    assert second.status == 206
    assert path.read_bytes() == data
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha(data)
    assert not part.exists()


def test_resume_with_a_wrong_sha256_checks_the_whole_file(server: LocalServer, tmp_path: Path) -> None:
    """The resumed bytes alone would hash to something else: the check is over the whole file."""
    data = payload(10_000)
    url = server.serve("/m.gguf", data)
    server.state.cut_after["/m.gguf"] = 4_000
    with pytest.raises(DownloadError):
        download(url, cache_dir=tmp_path, progress=False)
    assert download(url, sha256=sha(data), cache_dir=tmp_path, progress=False).read_bytes() == data
    assert [r.status for r in server.state.requests] == [200, 206]


def test_server_ignoring_range_restarts(server: LocalServer, tmp_path: Path) -> None:
    data = payload(120_000)
    url = server.serve("/m.gguf", data)
    server.state.ignore_range = True
    server.state.cut_after["/m.gguf"] = 50_000
    with pytest.raises(DownloadError):
        download(url, cache_dir=tmp_path, progress=False)
    path = download(url, sha256=sha(data), cache_dir=tmp_path, progress=False)
    second = server.state.requests[1]
    assert second.headers["range"] == "bytes=50000-"
    assert second.status == 200  # the whole file came again, and must not be appended to the .part
    assert path.read_bytes() == data


def test_short_body_without_length_is_incomplete(server: LocalServer, tmp_path: Path) -> None:
    """No Content-Length, the connection closes early: the Content-Range total shows the file is not all there."""
    data = payload(90_000)
    url = server.serve("/m.gguf", data)
    part = tmp_path / "url" / sha(url.encode())[:16] / "m.gguf.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:10_000])
    server.state.no_length = True
    server.state.cut_after["/m.gguf"] = 30_000
    with pytest.raises(DownloadError, match="incomplete"):
        download(url, cache_dir=tmp_path, progress=False)
    assert part.read_bytes() == data[:40_000]
    assert not part.with_name("m.gguf").exists()
    assert download(url, cache_dir=tmp_path, progress=False).read_bytes() == data
    assert [r.headers.get("range") for r in server.state.requests] == ["bytes=10000-", "bytes=40000-"]


def test_complete_part_and_range_not_satisfiable(server: LocalServer, tmp_path: Path) -> None:
    """A .part that already holds the whole file: the server answers 416 and the .part becomes the file."""
    data = payload(5_000)
    url = server.serve("/m.gguf", data)
    target = tmp_path / "url" / sha(url.encode())[:16] / "m.gguf"
    target.parent.mkdir(parents=True)
    target.with_name("m.gguf.part").write_bytes(data)
    assert download(url, sha256=sha(data), cache_dir=tmp_path, progress=False) == target
    assert target.read_bytes() == data
    assert [(r.headers.get("range"), r.status) for r in server.state.requests] == [("bytes=5000-", 416)]


def test_oversized_part_starts_over(server: LocalServer, tmp_path: Path) -> None:
    """A .part longer than the file (the file changed on the server): 416, then a fresh download."""
    data = payload(5_000)
    url = server.serve("/m.gguf", data)
    target = tmp_path / "url" / sha(url.encode())[:16] / "m.gguf"
    target.parent.mkdir(parents=True)
    target.with_name("m.gguf.part").write_bytes(payload(9_000, seed=1))
    assert download(url, cache_dir=tmp_path, progress=False).read_bytes() == data
    assert [(r.headers.get("range"), r.status) for r in server.state.requests] == [("bytes=9000-", 416), (None, 200)]


def test_cached_file_makes_no_request(server: LocalServer, tmp_path: Path) -> None:
    data = payload(30_000)
    url = server.serve("/m.gguf", data)
    first = download(url, cache_dir=tmp_path, progress=False)
    assert len(server.state.requests) == 1
    server.state.files.clear()  # a request now would 404
    assert download(url, cache_dir=tmp_path, progress=False) == first
    assert download(url, sha256=sha(data), cache_dir=tmp_path, progress=False) == first
    assert len(server.state.requests) == 1
    assert first.read_bytes() == data


def test_cached_file_with_another_sha256_is_fetched_again(server: LocalServer, tmp_path: Path) -> None:
    old, new = payload(3_000), payload(4_000, seed=7)
    url = server.serve("/m.gguf", old)
    download(url, cache_dir=tmp_path, progress=False)
    server.state.files["/m.gguf"] = new
    path = download(url, sha256=sha(new), cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == new
    assert len(server.state.requests) == 2


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_status(server: LocalServer, tmp_path: Path, status: int) -> None:
    server.state.status["/m.gguf"] = status
    url = server.url("/m.gguf")
    with pytest.raises(DownloadError) as info:
        download(url, cache_dir=tmp_path, progress=False)
    assert info.value.status == status
    assert url in str(info.value) and str(status) in str(info.value)
    assert isinstance(info.value, OSError)
    assert leftovers(tmp_path) == []


def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/m.gguf"
    with pytest.raises(DownloadError) as info:
        download(url, cache_dir=tmp_path, progress=False, timeout=5)
    assert info.value.status is None and url in str(info.value)


@pytest.mark.parametrize("url", ["ftp://example.com/m.gguf", "file:///tmp/m.gguf", "example.com/m.gguf", "http:///m"])
def test_not_http_url(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="http"):
        download(url, cache_dir=tmp_path, progress=False)
    assert not tmp_path.joinpath("url").exists()


def test_progress_bar(server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = payload(64_000)
    download(server.serve("/a.gguf", data), cache_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "a.gguf" in err and "100%" in err and "62.5k/62.5k" in err  # tqdm's bar, in KiB
    download(server.serve("/b.gguf", data), cache_dir=tmp_path, progress=False)
    download(server.serve("/c.gguf", data), cache_dir=tmp_path)  # None: stderr is not a terminal here
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- a fake Hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_repo(server: LocalServer, repo_id: str, files: dict[str, bytes], revision: str = "main") -> None:
    """Serve a model repository the way the Hub does, for huggingface_hub's list_repo_files and hf_hub_download."""
    tree = [
        {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)} for name, data in files.items()
    ]
    tree_path = f"/api/models/{repo_id}/tree/{revision}"
    server.state.files[tree_path] = json.dumps(tree).encode()
    server.state.headers[tree_path] = {"Content-Type": "application/json"}
    for name, data in files.items():
        path = f"/{repo_id}/resolve/{revision}/{name}"
        server.state.files[path] = data
        server.state.headers[path] = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha(data)}"'}


@dataclass
class Hub:
    server: LocalServer
    hf: ModuleType  # the huggingface_hub imported for the fake hub

    def requests(self, method: str | None = None) -> list[str]:
        return [urlsplit(r.path).path for r in self.server.state.requests if method in (None, r.method)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A local server standing in for the Hub, and huggingface_hub imported afresh to point at it.

    huggingface_hub reads its environment (HF_ENDPOINT, the cache, offline mode) when imported: any copy
    already imported is set aside, a fresh one is imported under this environment, and the old one comes
    back afterwards.
    """
    pytest.importorskip("huggingface_hub")
    server = LocalServer()
    home = tmp_path_factory.mktemp("hf-home")
    env = {
        "HF_ENDPOINT": server.base,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    unset = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING"]
    unset += ["HF_HUB_DISABLE_PROGRESS_BARS", "HUGGINGFACE_HUB_CACHE"]

    def is_hf(name: str) -> bool:
        return name == "huggingface_hub" or name.startswith("huggingface_hub.")

    saved = {name: mod for name, mod in sys.modules.items() if is_hf(name)}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        for name in unset:
            mp.delenv(name, raising=False)
        for name in saved:
            del sys.modules[name]
        try:
            hf = importlib.import_module("huggingface_hub")
            assert importlib.import_module("huggingface_hub.constants").ENDPOINT == server.base
            yield Hub(server, hf)
        finally:
            for name in [n for n in sys.modules if is_hf(n)]:
                del sys.modules[name]
            sys.modules.update(saved)
            server.close()


@pytest.fixture
def fresh_hub(hub: Hub) -> Hub:
    hub.server.state.requests.clear()
    return hub


def test_hf_download_exact_name(fresh_hub: Hub, tmp_path: Path) -> None:
    files = {"model-Q4_K_M.gguf": payload(20_000, 1), "README.md": b"# a model\n"}
    add_repo(fresh_hub.server, "org/exact", files)
    path = hf_download("org/exact", "model-Q4_K_M.gguf", cache_dir=tmp_path, progress=False)
    assert path.name == "model-Q4_K_M.gguf"
    assert path.read_bytes() == files["model-Q4_K_M.gguf"]
    assert path.is_relative_to(tmp_path)  # the Hub's cache layout, in the cache_dir given
    assert COMMIT in path.parts
    # An exact name needs no listing: only the file's metadata and bytes.
    assert fresh_hub.requests() == ["/org/exact/resolve/main/model-Q4_K_M.gguf"] * 2
    assert fresh_hub.requests("HEAD") == ["/org/exact/resolve/main/model-Q4_K_M.gguf"]


def test_hf_download_glob_one_match(fresh_hub: Hub, tmp_path: Path) -> None:
    files = {
        "model-Q4_K_M.gguf": payload(30_000, 2),
        "model-Q8_0.gguf": payload(40_000, 3),
        "README.md": b"# a model\n",
    }
    add_repo(fresh_hub.server, "org/glob", files)
    path = hf_download("org/glob", "*Q4_K_M.gguf", cache_dir=tmp_path)
    assert path.name == "model-Q4_K_M.gguf"
    assert path.read_bytes() == files["model-Q4_K_M.gguf"]
    tree = [r for r in fresh_hub.server.state.requests if "/tree/" in r.path]
    assert [urlsplit(r.path).path for r in tree] == ["/api/models/org/glob/tree/main"]
    assert "recursive=true" in urlsplit(tree[0].path).query.lower()
    assert fresh_hub.requests("GET")[1:] == ["/org/glob/resolve/main/model-Q4_K_M.gguf"]  # only that file


def test_hf_download_glob_several_or_none(fresh_hub: Hub, tmp_path: Path) -> None:
    files = {"a-Q4_K_M.gguf": b"a", "b-Q4_K_M.gguf": b"b", "c-Q8_0.gguf": b"c", "README.md": b"r"}
    add_repo(fresh_hub.server, "org/many", files)
    with pytest.raises(ValueError) as info:
        hf_download("org/many", "*Q4_K_M.gguf", cache_dir=tmp_path)
    assert "a-Q4_K_M.gguf" in str(info.value) and "b-Q4_K_M.gguf" in str(info.value)
    assert "c-Q8_0.gguf" not in str(info.value)
    with pytest.raises(ValueError, match=r"no file of org/many matches '\*Q2_K\*'"):
        hf_download("org/many", "*Q2_K*", cache_dir=tmp_path)
    assert all("/tree/" in path for path in fresh_hub.requests())  # nothing downloaded
    assert not any(tmp_path.rglob("*.gguf"))


def test_hf_download_revision(fresh_hub: Hub, tmp_path: Path) -> None:
    files = {"m-Q4_0.gguf": payload(1_000, 9)}
    add_repo(fresh_hub.server, "org/rev", files, revision="v1")
    path = hf_download("org/rev", "*.gguf", revision="v1", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == files["m-Q4_0.gguf"]
    assert fresh_hub.requests()[0] == "/api/models/org/rev/tree/v1"
    assert fresh_hub.requests("GET")[1:] == ["/org/rev/resolve/v1/m-Q4_0.gguf"]


@pytest.mark.parametrize("pattern", ["*Q4_K_M*.gguf", "big/model-Q4_K_M-00002-of-00003.gguf"])
def test_hf_download_split_gguf(fresh_hub: Hub, tmp_path: Path, pattern: str) -> None:
    parts = {f"big/model-Q4_K_M-{i:05d}-of-00003.gguf": payload(10_000 + i, 10 + i) for i in (1, 2, 3)}
    files = {**parts, "big/model-Q8_0.gguf": payload(100, 20), "README.md": b"r"}
    add_repo(fresh_hub.server, "org/split", files)
    if "*" not in pattern:  # an exact name of a later part: just that file
        path = hf_download("org/split", pattern, cache_dir=tmp_path, progress=False)
        assert path.read_bytes() == parts[pattern]
        return
    path = hf_download("org/split", pattern, cache_dir=tmp_path, progress=False)
    assert path.name == "model-Q4_K_M-00001-of-00003.gguf"
    for name, data in parts.items():  # every part, side by side, as llama.cpp looks for them
        assert path.parent.joinpath(name.rsplit("/", 1)[1]).read_bytes() == data
    assert sorted(fresh_hub.requests("GET")[1:]) == sorted(f"/org/split/resolve/main/{name}" for name in parts)


def test_hf_download_split_by_exact_first_part(fresh_hub: Hub, tmp_path: Path) -> None:
    parts = {f"s-{i:05d}-of-00002.gguf": payload(5_000, 30 + i) for i in (1, 2)}
    add_repo(fresh_hub.server, "org/split2", parts)
    path = hf_download("org/split2", "s-00001-of-00002.gguf", cache_dir=tmp_path, progress=False)
    assert path.name == "s-00001-of-00002.gguf"
    assert path.with_name("s-00002-of-00002.gguf").read_bytes() == parts["s-00002-of-00002.gguf"]
    assert path.read_bytes() == parts["s-00001-of-00002.gguf"]


def test_hf_download_incomplete_split(fresh_hub: Hub, tmp_path: Path) -> None:
    add_repo(fresh_hub.server, "org/broken", {"s-00001-of-00003.gguf": b"1", "s-00003-of-00003.gguf": b"3"})
    with pytest.raises(ValueError, match=re.escape("s-00002-of-00003.gguf")):
        hf_download("org/broken", "s-*.gguf", cache_dir=tmp_path)


def test_hf_download_cached_needs_no_download(fresh_hub: Hub, tmp_path: Path) -> None:
    files = {"m.gguf": payload(2_000, 40)}
    add_repo(fresh_hub.server, "org/cached", files)
    first = hf_download("org/cached", "m.gguf", cache_dir=tmp_path, progress=False)
    fresh_hub.server.state.requests.clear()
    assert hf_download("org/cached", "m.gguf", cache_dir=tmp_path, progress=False) == first
    assert fresh_hub.requests("GET") == []  # the Hub's cache answered; at most a HEAD to check the revision


def test_hf_download_progress(fresh_hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if "tqdm_class" not in inspect.signature(fresh_hub.hf.hf_hub_download).parameters:
        pytest.skip("huggingface_hub < 1.1: hf_hub_download takes no tqdm_class, progress= is not applied")
    files = {"p.gguf": payload(3_000, 50), "q.gguf": payload(3_000, 51)}
    add_repo(fresh_hub.server, "org/progress", files)
    hf_download("org/progress", "p.gguf", cache_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "p.gguf" in err and "100%" in err
    hf_download("org/progress", "q.gguf", cache_dir=tmp_path, progress=False)
    assert "q.gguf" not in capsys.readouterr().err


def test_hf_download_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` now fails
    with pytest.raises(ImportError, match=re.escape("pip install 'pyllama[hf]'")):
        hf_download("org/repo", "*.gguf")


def test_resolve_model_path_still_checks_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("f.gguf")):
        models.resolve_model_path(tmp_path / "f.gguf")
    (tmp_path / "f.gguf").write_bytes(b"GGUF")
    assert models.resolve_model_path(os.fspath(tmp_path / "f.gguf")) == tmp_path / "f.gguf"


def test_llama_from_url_loads_the_downloaded_model(server: LocalServer, tiny_model_path: Path, tmp_path: Path) -> None:
    import pyllama

    data = tiny_model_path.read_bytes()
    url = server.serve("/m/tiny.gguf", data)
    with pyllama.Llama.from_url(url, sha256=sha(data), cache_dir=tmp_path, progress=False, n_ctx=256) as llm:
        assert llm.n_ctx() == 256 and Path(llm.model_path).read_bytes() == data
        assert llm.tokenize("Hello") == list(llm.model.tokenize("Hello"))
    with pyllama.Llama.from_url(url, sha256=sha(data), cache_dir=tmp_path, progress=False, n_ctx=256):
        pass
    assert len(server.state.requests) == 1  # the second came from the cache


def test_llama_from_pretrained(fresh_hub: Hub, tiny_model_path: Path, tmp_path: Path) -> None:
    import pyllama

    data = tiny_model_path.read_bytes()
    add_repo(fresh_hub.server, "org/tiny", {"tiny-Q8_0.gguf": data, "tiny-F16.gguf": payload(10, 2)})
    with pyllama.Llama.from_pretrained("org/tiny", "*Q8_0.gguf", cache_dir=tmp_path, progress=False, n_ctx=256) as llm:
        assert Path(llm.model_path).read_bytes() == data and llm.n_ctx() == 256


def test_pick_mmproj_as_llama_server_does() -> None:
    """llama.cpp's find_best_sibling: an mmproj file in the model's directory (or above), the deepest
    first, then the quantization bits closest to the model's."""
    from pyllama.models import pick_mmproj

    files = [
        "model-Q4_K_M.gguf",
        "mmproj-model-f16.gguf",
        "mmproj-model-Q8_0.gguf",
        "sub/model-Q8_0.gguf",
        "sub/mmproj-F32.gguf",
        "other/mmproj-Q4_0.gguf",
        "README.md",
    ]
    assert pick_mmproj(files, "model-Q4_K_M.gguf") == "mmproj-model-Q8_0.gguf"  # 8 bits nearer 4 than 16
    assert pick_mmproj(files, "sub/model-Q8_0.gguf") == "sub/mmproj-F32.gguf"  # its own directory first
    assert pick_mmproj(["model.gguf"], "model.gguf") is None


def test_llama_from_pretrained_with_its_mmproj(fresh_hub: Hub, tmp_path: Path) -> None:
    """from_pretrained(mmproj=True) downloads the repository's projector and loads it with the model."""
    import pyllama

    from tiny_models import write_tiny_llama, write_tiny_mmproj_vision

    model = write_tiny_llama(tmp_path / "m.gguf", n_embd=64).read_bytes()
    proj = write_tiny_mmproj_vision(tmp_path / "p.gguf", text_n_embd=64).read_bytes()
    add_repo(fresh_hub.server, "org/vlm", {"vlm-Q8_0.gguf": model, "mmproj-vlm-F16.gguf": proj, "mmproj-x.txt": b"x"})
    with pyllama.Llama.from_pretrained(
        "org/vlm", "*Q8_0.gguf", mmproj=True, cache_dir=tmp_path / "c", progress=False, n_ctx=256
    ) as llm:
        assert llm.supports_vision and llm.mmproj_path is not None
        assert Path(llm.mmproj_path).read_bytes() == proj
