"""The gRPC server: lamina's services on a unix socket, over a lamina Root.

:class:`Server` binds a unix socket and serves unary calls on a thread pool
and streaming calls (Write, Read, List) on a separate, bounded one with idle
timeouts (:mod:`lamina.api.streams`), so no client can hold every worker;
:func:`serve` runs one until SIGTERM/SIGINT (or a stop event) and stops it
gracefully: new calls are refused, calls in flight get ``grace`` seconds to
finish, then the stores are closed and the socket removed.

The services are :mod:`lamina.api.snapshots` (Snapshots, Introspection),
:mod:`lamina.api.content` (Content), :mod:`lamina.api.images` (Images) and
:mod:`lamina.api.version` (Version).

The socket: a live server on the path (one that accepts a connection) makes
:meth:`Server.start` fail with AlreadyExists; a stale socket file is
replaced; any other file there is FailedPrecondition. The socket is bound in
a private directory, given mode 0660 and then renamed onto the path, so it is
never reachable with looser permissions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Callable
from concurrent import futures
from types import FrameType
from typing import Any

import grpc

from lamina.api import CHANNEL_OPTIONS
from lamina.api.callstats import CallStats
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as spb_grpc
from lamina.api.gen.lamina.services.introspection.v1 import introspection_pb2_grpc as ipb_grpc
from lamina.api.snapshots import IntrospectionService, Resolver, SnapshotsService, root_resolver
from lamina.api.streams import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CLIENT_STREAMS,
    DEFAULT_MAX_STREAMS,
    StreamGovernor,
)
from lamina.api.version import add_version_service
from lamina.errors import AlreadyExists, FailedPrecondition, Unavailable
from lamina.metadata.root import Root

__all__ = ["SOCKET_MODE", "Server", "check_address", "serve"]

log = logging.getLogger("lamina.api")

SOCKET_MODE = 0o660
HANDLER_EXIT_WAIT = 5.0  # seconds a stopped server waits for call handlers to return


def check_address(path: str) -> bool:
    """Whether ``path`` is free to serve on: True if a stale socket must be replaced.

    AlreadyExists when a live server accepts connections there;
    FailedPrecondition when something other than a socket is in the way.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True  # nobody listens: stale
    except (BlockingIOError, TimeoutError):
        pass  # backlog full or slow: somebody is there
    except OSError as exc:
        raise Unavailable(f"cannot probe socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise AlreadyExists(f"a server is already listening on {path}")


class Server:
    """A gRPC server for lamina's services on one unix socket."""

    def __init__(
        self,
        address: str,
        resolve: Resolver,
        *,
        max_workers: int = 16,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_client_streams: int = DEFAULT_MAX_CLIENT_STREAMS,
        stream_idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        on_close: Callable[[], None] | None = None,
        extra_services: Callable[[grpc.Server], None] | None = None,
        call_stats: CallStats | None = None,
    ) -> None:
        """``max_workers`` threads serve unary calls; streams are limited to
        ``max_streams`` at once (``max_client_streams`` per client) on threads of
        their own and closed after ``stream_idle_timeout`` seconds without progress
        from the client (see :mod:`lamina.api.streams`). ``call_stats`` counts and
        times every call (:mod:`lamina.api.callstats`)."""
        self.address = os.path.abspath(address)
        self._resolve = resolve
        self._max_workers = max_workers
        self._stream_limits = (max_streams, max_client_streams, stream_idle_timeout)
        self._governor: StreamGovernor | None = None
        self._on_close = on_close
        self._extra = extra_services
        self._call_stats = call_stats
        self._server: grpc.Server | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._ino: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self._stopped: threading.Event | None = None
        self._closed = False

    @classmethod
    def for_root(
        cls,
        root: Root,
        address: str,
        *,
        snapshotter: str = "overlay",
        max_workers: int = 16,
        call_stats: CallStats | None = None,
        **stream_limits: Any,
    ) -> Server:
        """A server for ``root``'s stores, closing the root when it stops.

        ``stream_limits``: ``max_streams``, ``max_client_streams``,
        ``stream_idle_timeout`` (see :class:`Server`)."""
        from lamina.api.content import add_content_service
        from lamina.api.images import add_images_service

        def services(server: grpc.Server) -> None:
            add_content_service(server, root)
            add_images_service(server, root)

        return cls(
            address,
            root_resolver(root, snapshotter),
            max_workers=max_workers,
            **stream_limits,
            on_close=root.close,
            extra_services=services,
            call_stats=call_stats,
        )

    def start(self) -> None:
        """Bind the socket (see module docs) and start serving; returns at once."""
        parent = os.path.dirname(self.address)
        os.makedirs(parent, mode=0o711, exist_ok=True)
        check_address(self.address)
        streams, per_client, idle = self._stream_limits
        governor = StreamGovernor(
            max_streams=streams, max_client_streams=per_client, idle_timeout=idle
        )
        self._executor = futures.ThreadPoolExecutor(
            max_workers=self._max_workers, thread_name_prefix="lamina-rpc"
        )
        # no maximum_concurrent_rpcs: it would count silent streams and refuse unary calls
        # call_stats outermost: a stream's time includes the governor's admission
        interceptors: list[grpc.ServerInterceptor[Any, Any]] = [
            *filter(None, [self._call_stats]), governor]
        server = grpc.server(self._executor, interceptors=interceptors, options=CHANNEL_OPTIONS)
        self._governor = governor
        spb_grpc.add_SnapshotsServicer_to_server(  # type: ignore[no-untyped-call]
            SnapshotsService(self._resolve), server
        )
        ipb_grpc.add_IntrospectionServicer_to_server(  # type: ignore[no-untyped-call]
            IntrospectionService(self._resolve), server
        )
        add_version_service(server)
        if self._extra is not None:
            self._extra(server)
        tmpdir = tempfile.mkdtemp(prefix=".lamina-sock-", dir=parent)
        tmp = os.path.join(tmpdir, "s")
        try:
            try:
                server.add_insecure_port("unix:" + tmp)
            except RuntimeError as exc:
                raise Unavailable(f"cannot bind {self.address}: {exc}") from exc
            server.start()
            os.chmod(tmp, SOCKET_MODE)
            check_address(self.address)  # nobody took the path meanwhile
            os.rename(tmp, self.address)
        except BaseException:
            server.stop(None)
            self._executor.shutdown(wait=False)
            governor.close()
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.rmdir(tmpdir)
        st = os.lstat(self.address)
        self._ino = (st.st_dev, st.st_ino, st.st_ctime_ns)  # inode numbers get reused
        self._server = server
        log.debug("serving on %s", self.address)  # the CLI says it, with the root

    def begin_stop(self, grace: float | None = 10.0) -> threading.Event:
        """Refuse new calls, give calls in flight ``grace`` seconds; set when all are done.

        Calling it again with a smaller grace (0) cuts the wait short.
        """
        with self._lock:
            if self._server is None:
                ev = threading.Event()
                ev.set()
                return ev
            stopped = self._server.stop(grace)
            if self._stopped is None:
                self._stopped = stopped
            return stopped

    def stop(self, grace: float | None = 10.0) -> None:
        """Stop gracefully (see :meth:`begin_stop`), then remove the socket and close stores."""
        self.begin_stop(grace).wait()
        self.close()

    def close(self) -> None:
        """After the gRPC server stopped: remove our socket, close the stores (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._remove_socket()
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            if self._governor is not None:
                # the stores close under no handler: a cancelled call's cleanup
                # (closing its writer, say) runs after gRPC let the call go
                if not self._governor.wait_handlers(HANDLER_EXIT_WAIT):
                    log.warning("call handlers still running after %gs; closing anyway",
                                HANDLER_EXIT_WAIT)
                self._governor.close()
            if self._on_close is not None:
                self._on_close()

    def _remove_socket(self) -> None:
        try:
            st = os.lstat(self.address)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino, st.st_ctime_ns) == self._ino:  # ours, not a successor's
            os.unlink(self.address)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)


def serve(
    root: Root,
    address: str,
    *,
    snapshotter: str = "overlay",
    max_workers: int = 16,
    grace: float = 10.0,
    stop: threading.Event | None = None,
    ready: Callable[[Server], None] | None = None,
    call_stats: CallStats | None = None,
    **stream_limits: Any,
) -> None:
    """Serve ``root`` on ``address`` until SIGTERM/SIGINT (main thread) or ``stop`` is set.

    The first signal stops gracefully (``grace`` seconds for calls in flight);
    a second one cuts the grace short. The root is closed on return.
    ``call_stats`` and ``stream_limits`` go to :class:`Server`.
    """
    server = Server.for_root(
        root, address, snapshotter=snapshotter, max_workers=max_workers,
        call_stats=call_stats, **stream_limits
    )
    stop = stop or threading.Event()
    force = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            force.set()
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        try:
            server.start()
        except BaseException:
            root.close()
            raise
        try:
            if ready is not None:
                ready(server)
            while not stop.wait(0.5):
                pass
            log.info("stopping (grace %.1fs)", grace)
            stopped = server.begin_stop(grace)
            while not stopped.wait(0.2):
                if force.is_set():
                    server.begin_stop(0)
        finally:
            server.begin_stop(0).wait()
            server.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
