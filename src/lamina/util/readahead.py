"""A stream read ahead by a helper thread, its blocks handed over as they are.

:class:`ReadAhead` calls a ``read(n)`` function (e.g. a gzip decompressor's)
in a helper thread, a few blocks ahead of its reader, so the work behind it
(inflating, where the library releases the GIL) overlaps with whatever the
reader does with the data. A block goes to the reader as the bytes object the
function made, whole when the reader asks for at least as much: isal's own
threaded reader copies every block through a BytesIO and a buffered reader,
about 10 ms of CPU per 100 MiB.

The helper stops at the end of the data, at an error (raised to the reader,
at the read where its data would have been, and at every read after), at
:meth:`ReadAhead.close`, or when the thread that made the reader is gone.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from lamina.util.rawio import RawReader

__all__ = ["ReadAhead"]

_WAIT = 0.05  # seconds between the helper's checks that it is still wanted


class ReadAhead(RawReader):
    """``read`` called with ``block`` in a helper thread, at most ``depth`` blocks
    ahead of the reader; ``name`` names the thread. Closing stops the helper
    (waiting for the call it is in), then calls ``on_close``."""

    def __init__(self, read: Callable[[int], bytes], *, block: int, depth: int = 2,
                 name: str = "read-ahead", on_close: Callable[[], object] | None = None) -> None:
        super().__init__()
        self._read = read
        self._on_close = on_close
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = False
        self._left = b""  # the rest of a block the reader asked less than
        self._ended = False
        self._error: BaseException | None = None
        self._owner = threading.current_thread()
        self._thread = threading.Thread(target=self._run, args=(block,), name=name,
                                        daemon=True)
        self._thread.start()

    def _run(self, block: int) -> None:
        while True:
            item: bytes | BaseException
            try:
                item = self._read(block)
            except BaseException as exc:  # the reader raises it
                item = exc
            while True:
                if self._stop or not self._owner.is_alive():
                    return
                try:
                    self._queue.put(item, timeout=_WAIT)
                    break
                except queue.Full:
                    continue
            if not item or isinstance(item, BaseException):
                return

    def read(self, size: int = -1) -> bytes:
        data = self._left
        if not data:
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            item = self._next()
            if isinstance(item, BaseException):
                self._error = item
                raise item
            if not item:
                self._ended = True
                return b""
            data = item
        if 0 <= size < len(data):
            self._left = data[size:]
            return data[:size]
        self._left = b""
        return data

    def _next(self) -> bytes | BaseException:
        while True:
            try:
                return self._queue.get(timeout=_WAIT)
            except queue.Empty:
                # (a helper only stops early when its owner thread is gone)
                if not self._thread.is_alive() and self._queue.empty():
                    return OSError("the read-ahead thread stopped before the end")

    def close(self) -> None:
        if not self.closed:
            self._stop = True
            while True:  # a helper waiting to put a block sees the stop
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join()
            if self._on_close is not None:
                self._on_close()
        super().close()
