"""A stateful chat: ``ChatSession(llm)`` keeps the history, runs Python tools and streams replies.

Each turn re-renders the whole conversation, and the ``Llama`` evaluates only what follows the
prefix its context already holds, so a turn costs the new messages only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .llama import Llama, Stream

__all__ = ["ChatSession"]


class ChatSession:
    """``ChatSession(llm, *, system=None, tools=None, **defaults)``

    ``send(text)`` returns the reply's text; ``stream(text)`` yields it piece by piece. Both add the
    user message and the reply (with any tool rounds) to ``messages``. Python functions in ``tools``
    are run when the model calls them; ``defaults`` are keywords of ``Llama.chat`` used for every
    turn (``temperature``, ``max_tokens``, ...). ``reset()`` forgets all but the system message.
    """

    def __init__(
        self,
        llm: Llama,
        *,
        system: str | None = None,
        tools: Sequence[dict[str, Any] | Callable[..., Any]] | None = None,
        max_tool_rounds: int = 8,
        **defaults: Any,
    ) -> None:
        if "stream" in defaults or "messages" in defaults:
            raise TypeError("stream and messages are chosen per turn")
        self.llm = llm
        self.system = system
        self.tools = list(tools) if tools else None
        self.max_tool_rounds = max_tool_rounds
        self.defaults = defaults
        self.messages: list[dict[str, Any]] = []
        self.last_response: dict[str, Any] | None = None
        self.reset()

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation; ``system`` replaces the system message when given."""
        if system is not None:
            self.system = system
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        merged = {**self.defaults, **kwargs}
        if self.tools:
            runnable = any(callable(t) and not isinstance(t, dict) for t in self.tools)
            merged.setdefault("tools", self.tools)
            merged.setdefault("run_tools", runnable)
            if runnable:
                merged.setdefault("max_tool_rounds", self.max_tool_rounds)
        return merged

    def send(self, content: str | list[dict[str, Any]], **kwargs: Any) -> str:
        """Add a user message, generate the reply, add it to the history; returns the reply's text."""
        turn = [*self.messages, {"role": "user", "content": content}]
        out = self.llm.chat(turn, **self._kwargs(kwargs))
        assert isinstance(out, dict)
        self.last_response = out
        added = out.get("messages") or [out["choices"][0]["message"]]
        self.messages = [*turn, *(_history_message(m) for m in added)]
        return str(out["choices"][0]["message"].get("content") or "")

    def stream(self, content: str | list[dict[str, Any]], **kwargs: Any) -> Iterator[str]:
        """Like ``send``, yielding the reply's text as it is generated. The history is updated when
        the stream ends; a stream stopped early keeps what was generated up to then."""
        turn = [*self.messages, {"role": "user", "content": content}]
        chunks = self.llm.chat(turn, stream=True, **self._kwargs(kwargs))
        assert isinstance(chunks, Stream)
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        try:
            for chunk in chunks:
                if not chunk["choices"]:
                    continue
                delta = chunk["choices"][0]["delta"]
                if delta.get("role"):
                    message = {"role": "assistant", "content": ""}  # a new round
                if delta.get("content"):
                    message["content"] += delta["content"]
                    yield delta["content"]
                if delta.get("reasoning_content"):
                    message["reasoning_content"] = message.get("reasoning_content", "") + delta["reasoning_content"]
                if delta.get("tool_calls"):
                    message["tool_calls"] = True  # the round's calls are in tool_messages
        finally:
            chunks.close()
            added = list(chunks.tool_messages)
            if "tool_calls" not in message:
                added.append(message)
            self.messages = [*turn, *added]


def _history_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as the next request takes it (no ``parsed`` object)."""
    return {k: v for k, v in message.items() if k != "parsed"}
