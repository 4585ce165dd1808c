"""A chat reply's message, read from the model's output text, and the deltas that stream it.

One function reads the output (:func:`parse_reply`), for the one-shot reply and at the end of its
stream, so that a stream's deltas always add up to the one-shot message: while the text comes, the
template's streaming parser sends what it can; at the end, :class:`ReplyStream` sends what the
message of the whole text has that those deltas have not sent (all of it, as content, when the
output does not parse as the template's format).
"""

from __future__ import annotations

from typing import Any

from . import _core
from ._logging import logger

__all__ = ["ReplyStream", "parse_reply"]


def _parse(result: _core.ChatResult, text: str, id_seed: int) -> dict[str, Any] | None:
    try:
        return result.parse(text, id_seed=id_seed)
    except ValueError:
        return None


def parse_reply(result: _core.ChatResult, text: str, id_seed: int) -> dict[str, Any]:
    """The assistant message of the model's output ``text``, as the request's template format reads it.

    Output that does not parse as the format loses no text but what the format's parser drops from
    any output (the whitespace before a reply, say): the message is that of the longest beginning of
    it that parses, and the text after the point where that message was complete is added to its
    content. A stream has sent that message's calls, reasoning and content as the text came, so the
    rest can only be added to them.
    """
    message = _parse(result, text, id_seed)
    if message is not None:
        return message
    plain = {"role": "assistant", "content": text}
    # the longest beginning that parses: parsing a beginning succeeds until the text goes wrong, so
    # a bisection finds it
    good, bad = 0, len(text)
    if _parse(result, "", id_seed) is None:
        return plain
    while bad - good > 1:
        mid = (good + bad) // 2
        if _parse(result, text[:mid], id_seed) is None:
            bad = mid
        else:
            good = mid
    head = _parse(result, text[:good], id_seed)
    if head is None:
        return plain
    # where that message was complete: the messages of longer beginnings only grow, so a bisection
    # finds the shortest beginning with the same message (the empty one included); every character
    # after it stays, as content
    short, done = -1, good
    while done - short > 1:
        mid = (short + done) // 2
        if _parse(result, text[:mid], id_seed) == head:
            done = mid
        else:
            short = mid
    head["content"] = (head.get("content") or "") + text[done:]
    return head


def _rest(sent: str, whole: str, what: str) -> str:
    """What ``whole`` adds to the ``sent`` text (empty where it does not begin with it)."""
    if whole.startswith(sent):
        return whole[len(sent) :]
    logger.warning("a stream sent %s that its reply does not have: %r is not the start of %r", what, sent, whole)
    return ""


class ReplyStream:
    """The deltas of one chat reply while its text comes, then the deltas that complete its message.

    ``feed()`` gives the streaming parser's deltas for a new piece of text, as long as the text parses
    as the template's format (a parse that fails is no error: the deltas stop there). ``finish()``
    gives the message of the whole text (``parse_reply``, the one-shot reply's) and the deltas that
    bring what was sent up to it.
    """

    def __init__(self, result: _core.ChatResult, id_seed: int) -> None:
        self._result = result
        self._id_seed = id_seed
        self._parser: _core.ChatStream | None = result.stream(id_seed=id_seed)
        self._pieces: list[str] = []
        # what the deltas sent so far add up to, as a client joins them
        self._content = ""
        self._reasoning = ""
        self._calls: list[dict[str, str]] = []

    @property
    def text(self) -> str:
        """The output so far, as generated."""
        return "".join(self._pieces)

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self._pieces.append(piece)
        if self._parser is None or not piece:
            return []
        try:
            deltas = self._parser.feed(piece)
        except ValueError:
            # the text so far does not parse as the format, or its parse goes back on what was sent
            # (the C++ stream raises both as ValueError): the rest waits for finish()
            self._parser = None
            return []
        for delta in deltas:
            self._add(delta)
        return deltas

    def finish(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The reply's message, and the deltas still to send for the stream to add up to it."""
        message = parse_reply(self._result, self.text, self._id_seed)
        deltas: list[dict[str, Any]] = []
        reasoning = _rest(self._reasoning, message.get("reasoning_content") or "", "reasoning")
        if reasoning:
            deltas.append({"reasoning_content": reasoning})
        content = _rest(self._content, message.get("content") or "", "content")
        if content:
            deltas.append({"content": content})
        calls = message.get("tool_calls") or []
        if len(calls) < len(self._calls):
            logger.warning("a stream sent %d tool calls, its reply has %d", len(self._calls), len(calls))
        for i, call in enumerate(calls):
            fn = call["function"]
            if i >= len(self._calls):
                tc = {"index": i, "id": call["id"], "type": "function", "function": dict(fn)}
                deltas.append({"tool_calls": [tc]})
                continue
            sent = self._calls[i]
            if sent["name"] != fn["name"] or sent["id"] not in ("", call["id"]):
                logger.warning("a stream sent the call %r, its reply has %r", sent, call)
            arguments = _rest(sent["arguments"], fn["arguments"], "arguments")
            if arguments:
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": arguments}}]})
        for delta in deltas:
            self._add(delta)
        return message, deltas

    def _add(self, delta: dict[str, Any]) -> None:
        self._content += delta.get("content") or ""
        self._reasoning += delta.get("reasoning_content") or ""
        for tc in delta.get("tool_calls") or []:
            while len(self._calls) <= tc["index"]:
                self._calls.append({"id": "", "name": "", "arguments": ""})
            call = self._calls[tc["index"]]
            call["id"] += tc.get("id") or ""
            fn = tc.get("function") or {}
            call["name"] += fn.get("name") or ""
            call["arguments"] += fn.get("arguments") or ""
