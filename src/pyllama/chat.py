"""Chat templates from untrusted sources, vetted before llama.cpp runs them in this process.

llama.cpp's Jinja engine has no recursion limit, no time limit and no memory limit at the pinned
commit, and even building a template runs template code (to detect its capabilities). A template
that recurses without bound overflows the stack (a crash no exception can catch); one that loops
for ever or builds a huge string hangs or exhausts memory. On Linux builds every render runs under
the C++ render guard's limits (``pyllama.template_limits()``; src/cpp/render_guard.h), which end such
a render with TemplateError. As a first filter, and the only one where the guard is off, every
template is vetted once, by its hash, before it is used in process:

1. a static check: the size, the nesting of blocks and of expressions;
2. a first build and render in a child process, with limits on CPU time, address space and wall
   time: a crash, a kill or a timeout there rejects the template.

Templates that pass are remembered in memory and on disk (under ``pyllama.models.cache_dir()``:
``$PYLLAMA_CACHE``, else ``$XDG_CACHE_HOME/pyllama``, else ``~/.cache/pyllama``), keyed by the
template's sha256 and the engine's version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import _core
from ._logging import logger
from ._validate import check_messages, check_tools
from .errors import TemplateError

__all__ = ["ChatTemplate", "TemplateError", "vet_template"]

MAX_BLOCK_DEPTH = 128
MAX_EXPRESSION_DEPTH = 256
MAX_SOURCE_BYTES = 2 * 1024 * 1024
CHILD_CPU_S = 3
CHILD_WALL_S = 4.5
CHILD_ADDRESS_SPACE = 1536 * 1024 * 1024
CHILD_MAX_GROWTH_KB = 300 * 1024


_BLOCK_TAG = re.compile(r"{%-?\s*(end)?(if|for|macro|call|filter|block|with|set)\b(.*?)-?%}", re.S)
_vetted: set[str] = set()
_lock = threading.Lock()


def _cache_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "vetted-templates"


def _key(source: str) -> str:
    h = hashlib.sha256()
    for part in (_core.LLAMA_CPP_COMMIT, _core.__version__, source):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _static_check(source: str) -> None:
    if len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        raise TemplateError(f"the template is larger than {MAX_SOURCE_BYTES} bytes")
    # Block nesting ({% if %} inside {% for %} ...). `{% set x = ... %}` is not a block.
    stack: list[str] = []
    for m in _BLOCK_TAG.finditer(source):
        end, kind, rest = m.group(1), m.group(2), m.group(3)
        if kind == "set" and "=" in rest:
            continue
        if end:
            if stack and stack[-1] == kind:
                stack.pop()
            continue
        stack.append(kind)
        if len(stack) > MAX_BLOCK_DEPTH:
            raise TemplateError(f"blocks nest deeper than {MAX_BLOCK_DEPTH} levels")
    # Expression nesting: brackets inside {{ }} and {% %}.
    depth = 0
    for ch in source:
        if ch in "([{":
            depth += 1
            if depth > MAX_EXPRESSION_DEPTH:
                raise TemplateError(f"expressions nest deeper than {MAX_EXPRESSION_DEPTH} levels")
        elif ch in ")]}":
            depth = max(0, depth - 1)
    # Macros may recurse (many real templates walk JSON schemas that way): recursion without bound
    # is caught by the sandboxed render, and recursion driven by the request's data is bounded by
    # the nesting limit ChatTemplate.apply puts on messages and tools.


# The child builds the template and renders a plain conversation and one with tools, then reports
# its peak memory and any error message (an exception from the template itself is not a reason to
# refuse it: the same clear exception comes back when it is used in process).
_CHILD = r"""
import json, resource, sys
from pyllama import _core
src = sys.stdin.read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
errors = []
tool = {"type": "function", "function": {"name": "get_weather", "description": "d",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
call = {"id": "abc123xyz", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"x\"}"}}
cases = [
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
      {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"}], None),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "", "tool_calls": [call]},
      {"role": "tool", "tool_call_id": "abc123xyz", "content": "r"}], [tool]),
]
try:
    t = _core.ChatTemplate(template=src)
    for messages, tools in cases:
        try:
            t.apply(messages, tools=tools)
        except Exception as e:
            errors.append([type(e).__name__, str(e)[:500]])
except Exception as e:
    errors.append([type(e).__name__, str(e)[:500]])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
limits = _core.template_limits()
peaks = _core.template_render_peaks()
hit = [k for k in ("seconds", "memory", "stack") if limits.get("active") and peaks[k] >= limits[k]]
print(json.dumps({"growth_kb": after - before, "errors": errors, "limits_hit": hit}))
"""


def _limits() -> None:  # pragma: no cover - runs in the child
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (CHILD_CPU_S, CHILD_CPU_S + 1))
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _sandbox_render(source: str) -> None:
    env = dict(os.environ, GGML_NO_BACKTRACE="1", OMP_NUM_THREADS="1")
    kwargs: dict[str, Any] = {"preexec_fn": _limits} if os.name == "posix" else {}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD],
            input=source,
            capture_output=True,
            text=True,
            timeout=CHILD_WALL_S,
            env=env,
            **kwargs,
        )
    except subprocess.TimeoutExpired:
        raise TemplateError(f"rendering the template took longer than {CHILD_WALL_S} s") from None
    if proc.returncode != 0:
        if proc.returncode < 0:
            why = f"it killed the renderer with signal {-proc.returncode} (unbounded recursion, time or memory)"
        else:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
            why = f"the renderer failed ({tail[0]})"
        raise TemplateError(f"the template was refused: {why}")
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise TemplateError("the template was refused: the renderer gave no report") from None
    if report.get("limits_hit"):  # the render guard stopped a render (told by the peaks, not a message)
        raise TemplateError(f"the template was refused: rendering it reached the {report['limits_hit'][0]} limit")
    if report["growth_kb"] > CHILD_MAX_GROWTH_KB:
        raise TemplateError(f"the template was refused: rendering it took {report['growth_kb'] // 1024} MiB")
    for kind, err in report["errors"]:
        if kind == "MemoryError":  # told by its type: the C++ core lets std::bad_alloc through as MemoryError
            raise TemplateError(f"the template was refused: rendering it ran out of memory ({err})")


def vet_template(source: str) -> None:
    """Raise TemplateError unless the template is safe to run in this process (cached by hash)."""
    key = _key(source)
    with _lock:
        if key in _vetted:
            return
    marker = _cache_dir() / key
    if not marker.exists():
        _static_check(source)
        _sandbox_render(source)
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass  # a read-only home: vet again next time
    with _lock:
        _vetted.add(key)


def _template_sources(model: _core.Model | None, template: str | None, name: str | None) -> Iterable[str]:
    if template is not None:
        if template not in _core.ChatTemplate.builtin_names():  # built-in formats run no template code
            yield template
        return
    if model is None:
        return
    if name is not None:
        src = model.get_chat_template(name)
        if src is not None:
            yield src
        return
    for variant in (None, "tool_use"):
        src = model.get_chat_template(variant)
        if src is not None:
            yield src


class ChatTemplate(_core.ChatTemplate):
    """A chat template rendered by llama.cpp's native Jinja engine; see ``pyllama._core.ChatTemplate``.

    ``vet=True`` (the default) vets the template before llama.cpp runs it in this process (see
    this module's docstring); pass ``vet=False`` only for templates you trust.
    """

    def __init__(
        self,
        model: _core.Model | None = None,
        *,
        template: str | None = None,
        name: str | None = None,
        bos_token: str = "",
        eos_token: str = "",
        vet: bool = True,
    ) -> None:
        if vet:
            for source in _template_sources(model, template, name):
                vet_template(source)
        super().__init__(model, template=template, name=name, bos_token=bos_token, eos_token=eos_token)

    def apply(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        reasoning_format: str = "auto",
        chat_template_kwargs: dict[str, Any] | None = None,
        json_schema: dict[str, Any] | str | None = None,
        grammar: str | None = None,
        strict_tool_choice: bool = True,
        continue_final_message: bool | str | None = None,
    ) -> _core.ChatResult:
        """Render OpenAI-format messages (and tools) into the prompt; see ``pyllama._core.ChatTemplate.apply``.

        Malformed messages or tools raise InvalidRequestError (a ValueError) whose ``param`` names the
        field (``messages[2].tool_call_id``); a template that refuses the messages raises TemplateError.
        """
        check_messages(messages)
        check_tools(tools)
        if tools and not self.caps.get("supports_tools"):
            logger.warning("this chat template does not support tools: the model may not see them, nor call them")
        return super().apply(
            messages,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            reasoning_format=reasoning_format,
            chat_template_kwargs=chat_template_kwargs,
            json_schema=json_schema,
            grammar=grammar,
            strict_tool_choice=strict_tool_choice,
            continue_final_message=continue_final_message,
        )
