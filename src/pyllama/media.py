"""Images and audio in chat messages: OpenAI's content parts (``image_url``, ``input_audio``) read,
decoded by the Llama's projector (llama.cpp's libmtmd) and replaced by its marker for the template,
as llama-server does."""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _core
from .errors import invalid

MAX_MEDIA_BYTES = 20 << 20  # one image or audio file
MEDIA_PARTS = ("image_url", "input_audio")
AUDIO_FORMATS = ("wav", "mp3")


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from: ``data:`` URIs always; local paths and ``file://`` URLs when
    ``files``; ``http(s)`` URLs when ``urls`` (fetched with ``timeout`` seconds, at most ``max_bytes``)."""

    files: bool = True
    urls: bool = False
    max_bytes: int = MAX_MEDIA_BYTES
    timeout: float = 10.0
    max_pixels: int = 8192 * 8192


class MediaPrompt(list[int]):
    """A prompt with media: the tokens the generation core holds for it (``Chunk.core_tokens``), and
    its chunks, which the core takes."""

    def __init__(self, chunks: Sequence[_core.Chunk]) -> None:
        super().__init__(t for c in chunks for t in c.core_tokens)
        self.chunks = list(chunks)


def has_media(messages: Sequence[Any]) -> bool:
    return any(
        isinstance(m, dict)
        and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in MEDIA_PARTS for p in m["content"])
        for m in messages
    )


def read_media(
    messages: Sequence[dict[str, Any]], projector: _core.Projector | None, policy: MediaPolicy
) -> tuple[list[dict[str, Any]], list[_core.Media]]:
    """The messages with each media part replaced by the projector's marker, and the media in order.
    InvalidRequestError naming the part for media that cannot be had or decoded, or without a projector."""
    out: list[dict[str, Any]] = []
    media: list[_core.Media] = []
    marker = _core.Projector.default_marker()
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts: list[Any] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in MEDIA_PARTS:
                parts.append(part)
                continue
            where = f"messages[{i}].content[{j}]"
            what = "images" if kind == "image_url" else "audio"
            at = f"{where}.type"  # the kind of part is what this model does not take
            if projector is None:
                raise invalid(f"{at}: this model takes no {what}: load it with its projector (mmproj=)", at)
            if kind == "image_url" and not projector.supports_vision:
                raise invalid(f"{at}: this model's projector takes no images", at)
            if kind == "input_audio" and not projector.supports_audio:
                raise invalid(f"{at}: this model's projector takes no audio", at)
            data = _image_bytes(part, where, policy) if kind == "image_url" else _audio_bytes(part, where, policy)
            try:
                media.append(projector.media(data, max_pixels=policy.max_pixels))
            except ValueError as e:
                raise invalid(f"{where}: {e}", where) from None
            parts.append({"type": "media_marker", "text": marker})
        out.append({**message, "content": parts})
    return out, media


def _image_bytes(part: dict[str, Any], where: str, policy: MediaPolicy) -> bytes:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.image_url.url: must be a data: URI, a URL or a path", f"{where}.image_url.url")
    return fetch(url, f"{where}.image_url.url", policy)


def _audio_bytes(part: dict[str, Any], where: str, policy: MediaPolicy) -> bytes:
    audio = part.get("input_audio")
    at = f"{where}.input_audio"
    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
        raise invalid(f"{at}: must be an object with the base64 data and its format", at)
    if audio.get("format", "wav") not in AUDIO_FORMATS:
        raise invalid(f"{at}.format: must be one of {', '.join(AUDIO_FORMATS)}", f"{at}.format")
    return _base64(audio["data"], f"{at}.data", policy)


def _base64(text: str, where: str, policy: MediaPolicy) -> bytes:
    if len(text) > policy.max_bytes * 4 // 3 + 4:
        raise invalid(f"{where}: the media is larger than {policy.max_bytes} bytes", where)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{where}: is not valid base64", where) from None


def fetch(url: str, where: str, policy: MediaPolicy) -> bytes:
    """The bytes a media URL (or path) names, as the policy allows; InvalidRequestError otherwise."""
    if url.startswith("data:"):
        head, sep, body = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise invalid(f"{where}: a data: URI must be base64 (data:<type>;base64,<data>)", where)
        return _base64(body, where, policy)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.urls:
            raise invalid(f"{where}: fetching media from URLs is off (send it as a data: URI)", where)
        return _download(url, where, policy)
    if scheme == "file":
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    elif scheme and len(scheme) > 1:  # a Windows drive letter is a path
        raise invalid(f"{where}: {scheme!r} URLs are not supported (data:, http(s), file or a path)", where)
    else:
        path = Path(url)
    if not policy.files:
        raise invalid(f"{where}: local files are not allowed here (send the media as a data: URI)", where)
    try:
        size = os.path.getsize(path)
        if size > policy.max_bytes:
            raise invalid(f"{where}: the file is larger than {policy.max_bytes} bytes", where)
        return path.read_bytes()
    except OSError as e:
        raise invalid(f"{where}: cannot read {str(path)!r}: {e.strerror or e}", where) from None


def _download(url: str, where: str, policy: MediaPolicy) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=policy.timeout, follow_redirects=True) as r:
            if r.status_code != 200:
                raise invalid(f"{where}: the URL answered HTTP {r.status_code}", where)
            data = bytearray()
            for piece in r.iter_bytes():
                data += piece
                if len(data) > policy.max_bytes:
                    raise invalid(f"{where}: the media is larger than {policy.max_bytes} bytes", where)
            return bytes(data)
    except httpx.HTTPError as e:
        raise invalid(f"{where}: the URL cannot be fetched: {e}", where) from None


def file_part(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """An OpenAI content part for a local file: ``image_url`` with its path, or ``input_audio`` with its
    bytes in base64 (format from the file's suffix). OSError when it cannot be read."""
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": os.fspath(path)}}
    data = Path(path).read_bytes()
    fmt = Path(path).suffix.lower().lstrip(".")
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt if fmt in AUDIO_FORMATS else "wav"},
    }
