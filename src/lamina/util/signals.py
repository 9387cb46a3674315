"""SIGTERM and SIGHUP end a command the way Ctrl-C does: as an exception.

Python's default for them is to die on the spot, so a command stopped by
``kill``, ``timeout`` or a closed terminal skipped every cleanup: a paused task
stayed paused, a temporary mount mounted, an ingest open. Under
:func:`as_exception` they raise :class:`Terminated` in the main thread, the
``finally`` blocks run, and the command ends with 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Terminated", "as_exception", "deferred"]

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM, SIGHUP); ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_held: list[int] = []  # signals that came while a deferred() block ran
_deferring = 0


def _raise(signum: int, _frame: FrameType | None) -> None:
    if _deferring:
        _held.append(signum)
        return
    raise Terminated(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that must not be cut short by SIGTERM or SIGHUP — a cleanup, such as
    thawing a task lamina paused: one that comes meanwhile is raised after it.
    Signals are handled in the main thread; elsewhere the block is plain."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        came = _held[-1:] if not _deferring else []
        if not _deferring:
            _held.clear()
    if came:
        raise Terminated(came[0])


@contextlib.contextmanager
def as_exception() -> Iterator[None]:
    """For the block, SIGTERM and SIGHUP raise :class:`Terminated` (in the main
    thread only: elsewhere signal handlers cannot be set, and nothing changes;
    and only where they have their default action); the handlers before are put
    back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # one the process inherited ignored (``nohup``) stays ignored
    previous = {sig: signal.signal(sig, _raise) for sig in _SIGNALS
                if signal.getsignal(sig) is signal.SIG_DFL}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
