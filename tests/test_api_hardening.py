"""What a hostile or careless client can do to ``lamina serve``, and what it cannot.

- silent Write streams do not starve unary calls (Stat, Info answer at once);
- streams beyond the caps (per client, in total) end with RESOURCE_EXHAUSTED;
- a stream idle past its timeout is closed, its ingest kept for a resume;
- a client cancelling a Write is not an error: no traceback in the log;
- ``~=`` filters run in linear time (RE2), over gRPC and locally;
- Cleanup returns only once removed snapshots' directories are gone.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from containerd_peer import lamina_serve
from grpc_streams import DEADLINE, Silent, fails_with

from lamina.api.client import RemoteContentStore, RemoteSnapshotter, connect
from lamina.api.gen.containerd.services.content.v1 import content_pb2 as cpb
from lamina.api.gen.containerd.services.content.v1 import content_pb2_grpc as cpb_grpc
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as spb_grpc
from lamina.api.server import Server
from lamina.content import sha256_digest
from lamina.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from lamina.metadata.root import Root
from lamina.util.filters import make_lookup, parse

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="snapshotters need root")

EVIL = '^(a+)+$'
"""Backtracks exponentially on 'aaa…ab' in a backtracking engine (Python's re)."""
VICTIM = "a" * 64 + "b"
"""2⁶⁴ steps for a backtracking engine (it would never finish), microseconds for RE2."""


def wait_until(what: str, done: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Return once ``done()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out ({timeout:.0f} s) waiting until {what}"
        time.sleep(0.01)


def open_streams(server: Server) -> int:
    """The streams the server has admitted and not yet released (its stream governor's
    own count: a stream counts once its call runs on the server)."""
    governor = server._governor
    assert governor is not None, "the server is not started"
    return governor.open_streams()


def finishes(fn: Callable[[], object], timeout: float = DEADLINE) -> object:
    """``fn()``'s result, computed in a thread that must finish within ``timeout``
    (a catastrophically backtracking match would not)."""
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert result, f"{fn} did not finish within {timeout:.0f} s"
    return result[0]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lamina-hard-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _serve(root: Root, sock: Path, **limits: float) -> Server:
    server = Server.for_root(root, str(sock), **limits)  # type: ignore[arg-type]
    server.start()
    return server


# -- silent streams do not stall unary calls ---------------------------------------


def test_silent_write_streams_do_not_stall_unary_calls(tmp_path: Path, sockdir: Path) -> None:
    """20 Write streams that never send (more than the 16 unary workers): Stat and
    Info still answer (a unary call stalled behind them would run into its deadline,
    DEADLINE_EXCEEDED, instead of NOT_FOUND)."""
    server = _serve(Root(tmp_path / "root", async_remove=True), sockdir / "s.sock")
    channel = connect(server.address)
    silent = Silent(channel)
    try:
        for _ in range(20):
            silent.open()
        wait_until("every stream reached the server", lambda: open_streams(server) == 20)
        snaps = spb_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
        content = cpb_grpc.ContentStub(channel)  # type: ignore[no-untyped-call]
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                snaps.Stat(spb.StatSnapshotRequest(snapshotter="overlay", key="nope"),
                           timeout=DEADLINE)
            assert err.value.code() is grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as err:
                content.Info(cpb.InfoRequest(digest="sha256:" + "0" * 64), timeout=DEADLINE)
            assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert open_streams(server) == 20  # the silent streams were held all along
    finally:
        silent.close()
        channel.close()
        server.stop(grace=1)


# -- caps ---------------------------------------------------------------------------


def test_streams_beyond_the_per_client_cap_are_refused(tmp_path: Path, sockdir: Path) -> None:
    server = _serve(Root(tmp_path / "root"), sockdir / "s.sock",
                    max_streams=10, max_client_streams=3)
    channel = connect(server.address)
    silent = Silent(channel)
    try:
        held = [silent.open() for _ in range(3)]
        wait_until("the three streams reached the server", lambda: open_streams(server) == 3)
        err = fails_with(silent.open())
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit per client" in (err.details() or "")
        # a server-streaming call counts too; through lamina's client it is ResourceExhausted
        with RemoteContentStore(server.address) as cs, pytest.raises(ResourceExhausted):
            list(cs.walk())
        # unary calls are not streams: never refused
        with RemoteContentStore(server.address) as cs, pytest.raises(NotFound):
            cs.info("sha256:" + "1" * 64)
        # a slot frees when its stream ends
        held[0].cancel()  # type: ignore[attr-defined]
        wait_until("the cancelled stream's slot is free", lambda: open_streams(server) == 2)
        with RemoteContentStore(server.address) as cs:
            assert list(cs.walk()) == []
    finally:
        silent.close()
        channel.close()
        server.stop(grace=1)


def test_streams_beyond_the_total_cap_are_refused(tmp_path: Path, sockdir: Path) -> None:
    server = _serve(Root(tmp_path / "root"), sockdir / "s.sock",
                    max_streams=2, max_client_streams=100)
    channel = connect(server.address)
    silent = Silent(channel)
    try:
        silent.open()
        silent.open()
        wait_until("both streams reached the server", lambda: open_streams(server) == 2)
        err = fails_with(silent.open())
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the server's limit" in (err.details() or "")
    finally:
        silent.close()
        channel.close()
        server.stop(grace=1)


# -- idle timeout ---------------------------------------------------------------------


def test_idle_write_stream_is_closed_and_its_ingest_resumes(
    tmp_path: Path, sockdir: Path
) -> None:
    data = bytes(range(256)) * 40
    digest = sha256_digest(data)
    server = _serve(Root(tmp_path / "root"), sockdir / "s.sock", stream_idle_timeout=1.0)
    channel = connect(server.address)
    silent = Silent(channel)
    try:
        call = silent.open([
            cpb.WriteContentRequest(action=cpb.STAT, ref="idle", total=len(data), expected=digest),
            cpb.WriteContentRequest(action=cpb.WRITE, ref="idle", offset=0, data=data[:1000]),
        ])
        assert next(call).action == cpb.STAT
        assert next(call).offset == 1000
        err = fails_with(call)
        assert open_streams(server) == 0
        assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED, err
        assert "no progress from the client in 1s" in (err.details() or ""), err
        with RemoteContentStore(server.address) as cs:
            assert cs.status("idle").offset == 1000  # kept, not committed
            with pytest.raises(NotFound):
                cs.info(digest)
            w = cs.writer("idle", total=len(data), expected=digest)  # not locked any more
            assert w.offset == 1000
            w.write(data[1000:])
            w.commit(len(data), digest)
            assert cs.info(digest).size == len(data)
    finally:
        silent.close()
        channel.close()
        server.stop(grace=1)


def test_busy_stream_is_not_idle(tmp_path: Path, sockdir: Path) -> None:
    """A client that keeps sending, more slowly than the timeout in total, keeps its stream."""
    data = b"x" * 8000
    server = _serve(Root(tmp_path / "root"), sockdir / "s.sock", stream_idle_timeout=3.0)
    try:
        with RemoteContentStore(server.address) as cs:
            w = cs.writer("slow", total=len(data))
            for i in range(8):
                w.write(data[i * 1000:(i + 1) * 1000])
                time.sleep(0.5)  # the slow client (4 s in all), not synchronisation
            w.commit(len(data), sha256_digest(data))
            assert cs.info(sha256_digest(data)).size == len(data)
            # lamina's own writer, idle past the timeout, resumes on a new stream
            other = b"y" * 8000
            w = cs.writer("pause", total=len(other))
            w.write(other[:4000])
            assert open_streams(server) == 1
            wait_until("the server closed the idle stream", lambda: open_streams(server) == 0)
            w.write(other[4000:])
            w.commit(len(other), sha256_digest(other))
            assert cs.info(sha256_digest(other)).size == len(other)
    finally:
        server.stop(grace=1)


# -- cancellation is quiet ------------------------------------------------------------------


def _lamina(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from lamina.cli import main; sys.exit(main())",
            *args]


def _resumed(cs: RemoteContentStore, ref: str, *, total: int) -> Any:
    """A writer for ``ref``, once the server has let go of the cancelled call's lock
    (until then it says Unavailable, naming the holder)."""
    got: list[Any] = []

    def attempt() -> bool:
        try:
            got.append(cs.writer(ref, total=total))
        except Unavailable:
            return False
        return True

    wait_until(f"ingest {ref!r} is unlocked", attempt)
    return got[0]


def test_cancelled_write_logs_no_traceback(tmp_path: Path, sockdir: Path) -> None:
    sock = sockdir / "s.sock"
    with lamina_serve(tmp_path / "root", sock) as served:
        channel = connect(str(sock))
        silent = Silent(channel)
        for i in range(3):
            call = silent.open([
                cpb.WriteContentRequest(action=cpb.STAT, ref=f"c{i}", total=10_000),
                cpb.WriteContentRequest(action=cpb.WRITE, ref=f"c{i}", offset=0, data=b"z" * 500),
            ])
            assert next(call).action == cpb.STAT
            assert next(call).offset == 500
            call.cancel()  # type: ignore[attr-defined]
        with RemoteContentStore(str(sock)) as cs:
            for i in range(3):  # the ingests stay, unlocked once the cancel reached the server
                w = _resumed(cs, f"c{i}", total=10_000)
                assert w.offset == 500
                w.close()
        silent.close()
        channel.close()
    text = served.log.read_text()  # it stopped on SIGTERM with status 0
    assert "Traceback" not in text, text
    assert "internal error" not in text.lower(), text
    assert "Exception" not in text, text


class _SlowToClose:
    """A content store whose writers take ``delay`` seconds to close, noting in
    ``events`` when each closed and when the store itself closed."""

    def __init__(self, store: Any, events: list[str], delay: float) -> None:
        self._store, self._events, self._delay = store, events, delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def writer(self, ref: str, **kw: Any) -> Any:
        w = self._store.writer(ref, **kw)
        events, delay, close = self._events, self._delay, w.close

        def slow_close() -> None:
            time.sleep(delay)
            close()
            events.append(f"writer {ref} closed")

        w.close = slow_close
        return w

    def info(self, digest: str) -> Any:
        self._events.append("info called")
        time.sleep(self._delay)
        try:
            return self._store.info(digest)
        finally:
            self._events.append("info returned")

    def close(self) -> None:
        self._events.append("store closed")
        self._store.close()


def _serve_content(sockdir: Path, store: _SlowToClose) -> Server:
    """A started server of ``store``'s Content service alone, closing it when it stops."""
    from lamina.api.content import ContentService

    def add(server: grpc.Server) -> None:
        cpb_grpc.add_ContentServicer_to_server(  # type: ignore[no-untyped-call]
            ContentService(lambda: store), server)

    server = Server(str(sockdir / "s.sock"), lambda name: None,  # type: ignore[arg-type,return-value]
                    extra_services=add, on_close=store.close)
    server.start()
    return server


def _serve_slow_store(tmp_path: Path, sockdir: Path, events: list[str]) -> Server:
    """A started server of a :class:`_SlowToClose` content store (0.5 s)."""
    from lamina.content.local import LocalContentStore

    return _serve_content(
        sockdir, _SlowToClose(LocalContentStore(tmp_path / "content"), events, delay=0.5))


def test_stopping_server_closes_its_stores_after_cancelled_streams_clean_up(
    tmp_path: Path, sockdir: Path,
) -> None:
    """A Write stream still open when the server stops is cancelled; its handler closes
    its writer after gRPC has let the call go. The stores close only after that (the
    content store closing a writer its handler closes at the same moment closed one
    descriptor twice: 'OSError: Bad file descriptor' from ``lamina serve``)."""
    events: list[str] = []
    server = _serve_slow_store(tmp_path, sockdir, events)
    channel = connect(server.address)
    silent = Silent(channel)
    try:
        call = silent.open([cpb.WriteContentRequest(action=cpb.STAT, ref="held", total=10)])
        assert next(call).action == cpb.STAT
        server.stop(grace=0)
        assert events == ["writer held closed", "store closed"]
    finally:
        silent.close()
        channel.close()
        server.stop(grace=0)


def test_stopping_server_closes_its_stores_after_cancelled_unary_calls_return(
    tmp_path: Path, sockdir: Path,
) -> None:
    """The same for a unary call the stop cancels while its handler runs."""
    events: list[str] = []
    server = _serve_slow_store(tmp_path, sockdir, events)
    channel = connect(server.address)
    stub = cpb_grpc.ContentStub(channel)  # type: ignore[no-untyped-call]
    call = stub.Info.future(cpb.InfoRequest(digest=sha256_digest(b"none")), timeout=30)
    try:
        wait_until("the Info handler runs", lambda: "info called" in events)
        server.stop(grace=0)
        assert events == ["info called", "info returned", "store closed"]
        with pytest.raises(grpc.RpcError):
            call.result()
    finally:
        channel.close()
        server.stop(grace=0)


class _OutOfDescriptors(_SlowToClose):
    """A content store whose ``info`` finds no descriptor left."""

    def info(self, digest: str) -> Any:
        raise OSError(24, "Too many open files", "/some/blob")


def test_an_os_error_of_a_class_travels_as_that_class(tmp_path: Path, sockdir: Path) -> None:
    """Too many open files in a handler: RESOURCE_EXHAUSTED, ResourceExhausted again in
    the client (it was INTERNAL, logged with a traceback as if lamina had a bug)."""
    from lamina.content.local import LocalContentStore

    server = _serve_content(
        sockdir, _OutOfDescriptors(LocalContentStore(tmp_path / "content"), [], delay=0))
    try:
        with RemoteContentStore(server.address) as cs, \
                pytest.raises(ResourceExhausted) as err:
            cs.info(sha256_digest(b"x"))
        assert "OSError: /some/blob: Too many open files" in str(err.value)
    finally:
        server.stop(grace=0)


def test_an_error_echoing_a_huge_input_keeps_its_class_over_grpc(
        tmp_path: Path, sockdir: Path) -> None:
    """A status message travels in a header clients cap at 8 KiB (non-ASCII bytes sent
    as three): an error quoting a 100 KB digest, or 3,000 euro signs of a key, came
    back as RESOURCE_EXHAUSTED ("received metadata size exceeds ...") instead of
    its own class. Now the message is shortened to fit and the class arrives."""
    server = _serve(Root(tmp_path / "root"), sockdir / "s.sock")
    try:
        channel = grpc.insecure_channel(f"unix://{server.address}")
        meta = (("containerd-namespace", "default"),)
        content = cpb_grpc.ContentStub(channel)
        snaps = spb_grpc.SnapshotsStub(channel)
        calls = [
            (grpc.StatusCode.INVALID_ARGUMENT, lambda: content.Info(
                cpb.InfoRequest(digest="sha256:" + "f" * 100_000), metadata=meta, timeout=30)),
            (grpc.StatusCode.NOT_FOUND, lambda: snaps.Stat(
                spb.StatSnapshotRequest(snapshotter="overlay", key="€" * 3000),
                metadata=meta, timeout=30)),
            (grpc.StatusCode.NOT_FOUND, lambda: snaps.Stat(
                spb.StatSnapshotRequest(snapshotter="overlay", key="k" * 1_000_000),
                metadata=meta, timeout=30)),
        ]
        for code, call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() is code, (code, err.value.code(), err.value.details()[:200])
            assert "characters left out" in err.value.details()
        channel.close()
    finally:
        server.stop(grace=0)


# -- linear-time regular expressions ---------------------------------------------------------


def test_regex_filter_is_linear_time_locally() -> None:
    matcher = parse([f'labels.r~="{EVIL}"'])
    assert finishes(lambda: matcher(make_lookup({}, {"r": VICTIM}))) is False
    assert finishes(lambda: matcher(make_lookup({}, {"r": "a" * 64}))) is True
    # Go's RE2 syntax: no backreferences or lookaround (Python's re has them)
    for bad in ("name~=`(a)\\1`", "name~=`(?=a)`", 'name~="(a"'):
        with pytest.raises(InvalidArgument, match="bad regular expression"):
            parse([bad])


def test_regex_filters_over_grpc_are_linear_time(tmp_path: Path, sockdir: Path) -> None:
    root = Root(tmp_path / "root")
    server = _serve(root, sockdir / "s.sock")
    try:
        with RemoteSnapshotter(server.address, "overlay") as sn, \
                RemoteContentStore(server.address) as cs:
            for i in range(3):
                sn.prepare(f"victim-{i}", labels={"r": VICTIM})
            sn.prepare("match", labels={"r": "aaaa"})
            for i in range(3):
                blob = f"blob {i}".encode()
                w = cs.writer(f"b{i}", total=len(blob))
                w.write(blob)
                w.commit(len(blob), sha256_digest(blob), labels={"r": VICTIM})
            assert finishes(lambda: [i.name for i in sn.walk(f'labels.r~="{EVIL}"')]) \
                == ["match"]
            assert finishes(lambda: list(cs.walk(f'labels.r~="{EVIL}"'))) == []
            with pytest.raises(InvalidArgument):
                list(sn.walk("name~=`(a)\\1`"))
            with pytest.raises(InvalidArgument):
                list(cs.walk("labels.r~=`(?<=a)b`"))
        # the local stores too
        local = root.snapshotter("overlay")
        assert finishes(lambda: [i.name for i in local.walk(f'labels.r~="{EVIL}"')]) \
            == ["match"]
        assert finishes(lambda: list(root.content().walk(f'labels.r~="{EVIL}"'))) == []
    finally:
        server.stop(grace=1)


# -- Cleanup waits for deferred deletions --------------------------------------------------


def test_cleanup_returns_with_removed_directories_gone(tmp_path: Path, sockdir: Path) -> None:
    """As ``lamina serve`` runs it (removal deferred to a reaper thread): removing
    snapshots over gRPC, then Cleanup — on return no snapshot directory is left."""
    root = Root(tmp_path / "root", async_remove=True)
    server = _serve(root, sockdir / "s.sock")
    snaps_dir = root.snapshots_dir("overlay") / "snapshots"
    try:
        with RemoteSnapshotter(server.address, "overlay") as sn:
            for round_ in range(2):
                keys = [f"r{round_}-{i}" for i in range(4)]
                for key in keys:
                    sn.prepare(key)
                for d in snaps_dir.iterdir():  # deletion takes a while: the reaper
                    for j in range(3):        # is still at it when Cleanup arrives
                        sub = d / "fs" / f"d{j}"
                        sub.mkdir()
                        for k in range(100):
                            (sub / f"f{k}").write_bytes(b"x")
                for key in keys:
                    sn.remove(key)
                sn.cleanup()
                left = sorted(p.name for p in snaps_dir.iterdir())
                assert left == [], left
    finally:
        server.stop(grace=1)


@pytest.mark.slow
def test_ctr_image_rm_sync_frees_lamina_directories(tmp_root: Path) -> None:
    """containerd (proxy snapshotter ``lamina``): when ``ctr image rm --sync``
    returns, lamina's snapshot directories are already gone — no waiting."""
    import imagefactory as f
    from containerd_peer import lamina_and_containerd

    work = tmp_root / "img"
    layers = [
        f.layer_from_entries(
            [f.Dir(f"d{n}"), *(f.File(f"d{n}/f{i}", b"x" * 100) for i in range(2000))], work
        )
        for n in range(4)
    ]
    ref = "docker.io/lamina/rm-sync:test"
    f.build_oci_layout(work / "layout", layers, ref_name=ref)
    tar = f.as_tar(work / "layout", work / "image.tar")
    with lamina_and_containerd(tmp_root) as (lamina, ctrd):
        ctrd.ctr("images", "import", "--snapshotter", "lamina", str(tar))
        snaps = lamina.root / "snapshots" / "overlay" / "snapshots"
        assert len(_snapshot_dirs(snaps)) == 4
        ctrd.ctr("images", "rm", "--sync", ref)
        left = _snapshot_dirs(snaps)
        assert left == [], left


def _snapshot_dirs(snaps: Path) -> list[str]:
    """The directories under ``snaps`` that are not ``lamina serve``'s stock of
    directories made ahead, which the server keeps flocked until a Prepare takes one."""
    names = []
    for p in snaps.iterdir():
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
        names.append(p.name)
    return sorted(names)


# -- a server that accepts connections but does not answer -------------------------


def test_a_command_gives_up_on_a_server_that_does_not_answer(
        tmp_path: Path, sockdir: Path) -> None:
    """``lamina serve`` stopped (SIGSTOP): the kernel still accepts connections on its
    socket, so a command through --address waited for ever. It gives up after
    CONNECT_TIMEOUT with one line, Unavailable (exit 7), and works once the server
    runs again."""
    from lamina.api.backend import CONNECT_TIMEOUT

    sock = sockdir / "s.sock"
    with lamina_serve(tmp_path / "root", sock) as served:
        served.proc.send_signal(signal.SIGSTOP)  # our own child, by pid
        started = time.monotonic()
        stuck = subprocess.run(_lamina("--address", str(sock), "snapshot", "ls"),
                               capture_output=True, text=True, timeout=CONNECT_TIMEOUT + 50)
        waited = time.monotonic() - started
        assert stuck.returncode == 7, stuck.stderr
        assert stuck.stderr.strip().splitlines() == [
            f"lamina: Unavailable: {sock}: connected, but the server did not answer "
            f"within {CONNECT_TIMEOUT:g}s"]
        assert CONNECT_TIMEOUT <= waited < CONNECT_TIMEOUT + 20, waited
        served.proc.send_signal(signal.SIGCONT)
        ok = subprocess.run(_lamina("--address", str(sock), "snapshot", "ls"),
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr


class _HangingWrites:
    """A content store whose writers' writes block until ``release`` is set."""

    def __init__(self, store: Any, release: threading.Event) -> None:
        self._store, self._release = store, release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def writer(self, ref: str, **kw: Any) -> Any:
        w = self._store.writer(ref, **kw)
        write, release = w.write, self._release

        def hanging_write(data: bytes) -> int:
            release.wait(120)
            return int(write(data))

        w.write = hanging_write
        return w


def test_a_write_stream_gives_up_on_a_server_that_stops_answering(
        tmp_path: Path, sockdir: Path) -> None:
    """A Write stream has no deadline of its own (a blob takes as long as it takes):
    a server that stopped answering mid-ingest held the writer for ever. Each
    answer now comes within the client's call timeout, or Unavailable."""
    from lamina.content.local import LocalContentStore

    release = threading.Event()
    store = _HangingWrites(LocalContentStore(tmp_path / "content"), release)
    server = _serve_content(sockdir, store)  # type: ignore[arg-type]
    try:
        with RemoteContentStore(server.address, timeout=1.5) as cs:
            w = cs.writer("hung", total=4)  # its STAT is answered
            started = time.monotonic()
            with pytest.raises(Unavailable, match=r"^content write 'hung' on .*: no answer "
                                                  r"within 1.5s$"):
                w.write(b"data")
            assert 1.5 <= time.monotonic() - started < 15
            release.set()
            w.close()
    finally:
        release.set()
        server.stop()
