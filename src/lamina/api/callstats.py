"""How many calls of each method a server answered, and how long they took.

:class:`CallStats` is a server interceptor (``lamina serve --call-stats``): it
times every call from the moment a worker starts the method's body until the
body returns (for a streaming response, until its last message is taken), so
the figures are the server's share of a call, without the client's queueing or
the transport. It keeps every method's count and total, and a bounded sample
of durations for the quantiles: a server that runs for months keeps at most
:data:`SAMPLES` numbers a method.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from lamina.api.handlers import Handler, HandlerInterceptor, behaviour, rebuild

__all__ = ["SAMPLES", "CallStats"]

SAMPLES = 20_000
"""Durations kept per method for the quantiles (a uniform sample beyond that)."""


class _Method:
    __slots__ = ("count", "samples", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.samples: list[float] = []

    def add(self, seconds: float, rng: random.Random) -> None:
        self.count += 1
        self.total += seconds
        if len(self.samples) < SAMPLES:
            self.samples.append(seconds)
        else:  # reservoir sampling: every call equally likely to be kept
            slot = rng.randrange(self.count)
            if slot < SAMPLES:
                self.samples[slot] = seconds


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class CallStats(HandlerInterceptor):
    """Per-method call counts and durations of one server (see the module docs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._methods: dict[str, _Method] = {}
        self._rng = random.Random(0)

    def _record(self, method: str, seconds: float) -> None:
        with self._lock:
            m = self._methods.get(method)
            if m is None:
                m = self._methods[method] = _Method()
            m.add(seconds, self._rng)

    def summary(self) -> dict[str, dict[str, float]]:
        """By method (its short name, ``Prepare``): ``count``, ``total_ms`` and the
        ``p50_ms``, ``p90_ms``, ``p99_ms`` and ``max_ms`` of the sampled durations."""
        out: dict[str, dict[str, float]] = {}
        with self._lock:
            methods = {k: (m.count, m.total, sorted(m.samples))
                       for k, m in self._methods.items()}
        for name, (count, total, ordered) in sorted(methods.items()):
            out[name] = {"count": count, "total_ms": total * 1e3,
                         **{f"{label}_ms": _quantile(ordered, q) * 1e3
                            for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99),
                                             ("max", 1.0))}}
        return out

    def write(self, path: str) -> None:
        """:meth:`summary` as JSON at ``path`` (written whole, then renamed into place)."""
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.summary(), f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    def wrap(self, handler: Handler, method: str) -> Handler:
        name = method.rsplit("/", 1)[-1]
        inner = behaviour(handler)

        def timed(arg: Any, context: grpc.ServicerContext) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(arg, context)
            finally:
                self._record(name, time.perf_counter() - t0)

        def timed_stream(arg: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            t0 = time.perf_counter()
            try:
                yield from inner(arg, context)
            finally:
                self._record(name, time.perf_counter() - t0)

        return rebuild(handler, timed_stream if handler.response_streaming else timed)
