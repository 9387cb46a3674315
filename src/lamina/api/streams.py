"""Streaming calls on their own threads, bounded and timed out, so no client stalls the server.

grpcio's synchronous server runs every call on a pool thread from its first
message to its status, and a streaming call holds its thread while it waits
for the client: a Write stream that never sends, or a Read whose client never
reads, keeps its thread for good. With one shared pool, a client opening as
many silent streams as there are workers leaves every later call (a Stat, an
Info) queued behind them.

:class:`StreamGovernor` is a server interceptor that keeps streams apart:

* **Own pool.** Every streaming method (client, server or both ways) runs on
  the governor's pool (grpcio's ``experimental_thread_pool`` on the
  behaviour), so the server's pool serves unary calls only and streams can
  never take all of its workers.
* **Caps.** At most ``max_streams`` streams run at once, and at most
  ``max_client_streams`` per client; one more ends at once with
  RESOURCE_EXHAUSTED. The pool has a few threads beyond ``max_streams`` to
  turn those away. A *client* is what grpc tells about the peer (its address
  and authenticated identity); on a unix socket grpc reports every connection
  as ``unix:`` and no peer credentials, so there all local clients share the
  per-client budget, and the idle timeout is what returns slots held by a
  silent one.
* **Idle timeout.** A stream waiting on its client (for a message, or for it
  to take a response) longer than ``idle_timeout`` seconds is cancelled with
  DEADLINE_EXCEEDED; the servicer sees the cancellation as a client's and
  cleans up as for one (a Write's ingest stays, for a resume). Time spent on
  the server's own work (hashing a commit) does not count.

Not covered: a call whose client sends headers but never its request message
waits inside grpcio before any of this runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from lamina.api.errors import ERROR_METADATA
from lamina.api.handlers import Handler, HandlerInterceptor, behaviour, rebuild
from lamina.errors import InvalidArgument

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CLIENT_STREAMS",
    "DEFAULT_MAX_STREAMS",
    "IDLE_CLOSED",
    "StreamGovernor",
]

log = logging.getLogger("lamina.api")

DEFAULT_MAX_STREAMS = 64
DEFAULT_MAX_CLIENT_STREAMS = 32
DEFAULT_IDLE_TIMEOUT = 60.0
IDLE_CLOSED = "stream closed by the server"
"""In the details of the DEADLINE_EXCEEDED an idle stream ends with."""
_SPARE_THREADS = 4
"""Pool threads beyond the cap, to refuse streams while the cap is in use."""


class _Stream:
    """One admitted streaming call: who, what, and since when it waits on its client."""

    def __init__(self, method: str, client: str, context: grpc.ServicerContext) -> None:
        self.method = method
        self.client = client
        self.context = context
        self.waiting_since: float | None = None
        self.released = False
        self.expired = False

    def waiting(self) -> None:
        self.waiting_since = time.monotonic()

    def busy(self) -> None:
        self.waiting_since = None


class _Watched:
    """A request iterator that tells its stream when it waits for the client."""

    def __init__(self, requests: Iterator[Any], stream: _Stream) -> None:
        self._requests = requests
        self._stream = stream

    def __iter__(self) -> _Watched:
        return self

    def __next__(self) -> Any:
        self._stream.waiting()
        try:
            return next(self._requests)
        finally:
            self._stream.busy()


def client_of(context: grpc.ServicerContext) -> str:
    """The key a client's streams are counted under (see module docs)."""
    identities = context.peer_identities() or ()
    who = ",".join(i.decode(errors="replace") for i in identities)
    return f"{context.peer()}|{who}"


class StreamGovernor(HandlerInterceptor):
    """Runs streaming calls on their own bounded pool with idle timeouts (module docs)."""

    def __init__(
        self,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_client_streams: int = DEFAULT_MAX_CLIENT_STREAMS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        if max_streams < 1 or max_client_streams < 1:
            raise InvalidArgument("stream limits must be at least 1")
        if not idle_timeout > 0:
            raise InvalidArgument(f"stream idle timeout must be positive, not {idle_timeout}")
        self.max_streams = max_streams
        self.max_client_streams = max_client_streams
        self.idle_timeout = idle_timeout
        self.pool = futures.ThreadPoolExecutor(
            max_workers=max_streams + _SPARE_THREADS, thread_name_prefix="lamina-stream"
        )
        self._lock = threading.Lock()
        self._streams: set[_Stream] = set()
        # handler bodies still running: a cancelled call's handler may run its
        # cleanup after gRPC has let the call go (and released its stream)
        self._running = 0
        self._idle = threading.Condition(self._lock)
        self._per_client: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._watchdog = threading.Thread(
            target=self._watch, name="lamina-stream-watchdog", daemon=True
        )
        self._watchdog.start()

    # -- grpc.ServerInterceptor ----------------------------------------------
    def wrap(self, handler: Handler, method: str) -> Handler:
        request_streaming = handler.request_streaming
        if not (request_streaming or handler.response_streaming):
            answer = behaviour(handler)

            def counted(request: Any, context: grpc.ServicerContext) -> Any:
                with self._handler_running():
                    return answer(request, context)

            return rebuild(handler, counted)  # unary calls stay on the server's own pool
        inner = behaviour(handler)
        if handler.response_streaming:

            def streaming(arg: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with self._handler_running():
                    yield from run(arg, context)

            def run(arg: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                stream = self._admit(method, context)
                try:
                    results = inner(_Watched(arg, stream) if request_streaming else arg, context)
                    try:
                        while True:
                            stream.busy()
                            try:
                                item = next(results)
                            except StopIteration:
                                return
                            stream.waiting()  # until grpc sent it and asks for the next
                            yield item
                    finally:
                        results.close()
                finally:
                    self._release(stream)

            behavior: Callable[..., Any] = streaming
        else:

            def unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                with self._handler_running():
                    stream = self._admit(method, context)
                    try:
                        return inner(_Watched(requests, stream), context)
                    finally:
                        self._release(stream)

            behavior = unary
        behavior.experimental_thread_pool = self.pool  # type: ignore[attr-defined]
        return rebuild(handler, behavior)

    @contextlib.contextmanager
    def _handler_running(self) -> Iterator[None]:
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if not self._running:
                    self._idle.notify_all()

    def wait_handlers(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every call's handler to return (after
        the gRPC server stopped: a cancelled call's handler may still be running);
        whether they all did."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._running, timeout)

    # -- admission -------------------------------------------------------------
    def _admit(self, method: str, context: grpc.ServicerContext) -> _Stream:
        client = client_of(context)
        stream = _Stream(method, client, context)
        with self._lock:
            if len(self._streams) >= self.max_streams:
                refused = f"{len(self._streams)} streams are open (the server's limit)"
            elif self._per_client[client] >= self.max_client_streams:
                refused = (f"this client has {self._per_client[client]} streams open "
                           f"(the limit per client)")
            else:
                self._streams.add(stream)
                self._per_client[client] += 1
                refused = ""
        if refused:
            # travels as lamina.errors.ResourceExhausted (class named in the trailer)
            context.set_trailing_metadata(((ERROR_METADATA, "ResourceExhausted"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{method}: {refused}; retry later")
        context.add_callback(lambda: self._release(stream))
        return stream

    def _release(self, stream: _Stream) -> None:
        with self._lock:
            if stream.released:
                return
            stream.released = True
            self._streams.discard(stream)
            self._per_client[stream.client] -= 1
            if self._per_client[stream.client] <= 0:
                del self._per_client[stream.client]

    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    # -- idle timeout ------------------------------------------------------------
    def _watch(self) -> None:
        tick = min(1.0, self.idle_timeout / 4)
        while not self._stopping.wait(tick):
            now = time.monotonic()
            with self._lock:
                idle = [
                    s for s in self._streams
                    if not s.expired
                    and s.waiting_since is not None
                    and now - s.waiting_since >= self.idle_timeout
                ]
                for s in idle:
                    s.expired = True
            for s in idle:
                log.info("%s: client idle for %gs, stream closed", s.method, self.idle_timeout)
                _cancel(
                    s.context,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{s.method}: no progress from the client in {self.idle_timeout:g}s; "
                    f"{IDLE_CLOSED}",
                )

    def close(self) -> None:
        """Stop the watchdog and the pool (after the gRPC server stopped)."""
        self._stopping.set()
        self._watchdog.join()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _cancel(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """Cancel a call from the server's side, telling the client ``code`` and ``details``
    where grpcio lets us (its call object), else with the plain CANCELLED."""
    call: Any = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)  # grpcio's cygrpc.Call
    except Exception:
        context.cancel()  # type: ignore[no-untyped-call]
