"""Routing of llama.cpp's log into Python's ``logging``.

Native code never takes the GIL to log: it queues lines, and one daemon thread started here waits
on that queue (with the GIL released) and hands the lines to the ``pyllama`` logger. Lines below
the logger's effective level are dropped in native code before they are queued; the level is read
again every half second, or at once by :func:`set_log_level`.
"""

from __future__ import annotations

import atexit
import logging
import threading

from . import _core

logger = logging.getLogger("pyllama")
logger.addHandler(logging.NullHandler())  # silent by default, as a library should be

_POLL_S = 0.5
_thread: threading.Thread | None = None


def _sync_level() -> None:
    _core._log_set_level(logger.getEffectiveLevel())


def _emit(lines: list[tuple[int, str]]) -> None:
    for level, text in lines:
        if logger.isEnabledFor(level):
            logger.log(level, "%s", text)


def _pump() -> None:
    while not _core._log_is_closed():
        lines = _core._log_wait(_POLL_S)
        _sync_level()
        _emit(lines)


def set_log_level(level: int | str) -> None:
    """Set the ``pyllama`` logger's level and apply it to native code at once.

    ``set_log_level("DEBUG")`` (or ``logging.DEBUG``) lets every llama.cpp line through; add a
    handler (for example ``logging.basicConfig()``) to see them.
    """
    logger.setLevel(level)
    _sync_level()


def flush() -> None:
    """Hand every queued line to the logger now, in the calling thread."""
    _emit(_core._log_wait(0.0))


def _stop() -> None:
    # At interpreter exit: stop queueing, wake the pump and wait for it, so that no native thread
    # ever calls into a finalising interpreter (the native callback never calls Python anyway).
    # Lines still queued are handed to the logger first.
    flush()
    _core._log_close()
    if _thread is not None:
        _thread.join(timeout=2.0)


def _start() -> None:
    global _thread
    if _thread is not None:
        return
    _sync_level()
    _thread = threading.Thread(target=_pump, name="pyllama-log", daemon=True)
    _thread.start()
    atexit.register(_stop)


_start()
