"""Deadlines kept by one watchdog thread: what outlives its time is acted on.

A blocking call that has no timeout of its own (a socket read in
``http.client``, the next message of a gRPC stream) is armed with a deadline
and an action that ends it from outside (shut the socket down, cancel the
call). The thread sleeps until the earliest deadline, runs the action of one
that passed, and ends when nothing is armed (the next :meth:`Deadlines.arm`
starts another).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["Deadlines"]


class Deadlines:
    """Deadlines and their actions, with one thread to keep them."""

    def __init__(self, *, name: str = "lamina-deadlines") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, Callable[[], object]] = {}
        self._fired: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, action: Callable[[], object], seconds: float) -> int:
        """Run ``action`` in ``seconds`` unless :meth:`disarm` comes first; a token."""
        with self._cond:
            token = next(self._ids)
            self._armed[token] = action
            if len(self._heap) > 4 * len(self._armed) + 256:  # drop the disarmed ones
                self._heap = [e for e in self._heap if e[1] in self._armed]
                heapq.heapify(self._heap)
            when = time.monotonic() + seconds
            earliest = not self._heap or when < self._heap[0][0]
            heapq.heappush(self._heap, (when, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name=self._name)
                self._thread.start()
            if earliest:  # the thread sleeps until the earliest deadline: wake it
                self._cond.notify()
        return token

    def disarm(self, token: int) -> bool:
        """Forget ``token``; whether its deadline passed (and its action ran or runs)."""
        with self._cond:
            self._armed.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)
                if not self._heap:  # nothing armed: end
                    self._thread = None
                    return
                when, token = self._heap[0]
                now = time.monotonic()
                if when > now:
                    self._cond.wait(when - now)
                    continue
                heapq.heappop(self._heap)
                action = self._armed.pop(token)
                self._fired.add(token)
            action()  # outside the lock: it may block a while (a socket's shutdown)
