"""``lamina serve`` as a process and the server's socket and shutdown behaviour."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lamina.api.client import RemoteSnapshotter
from lamina.api.server import SOCKET_MODE, Server, check_address, serve
from lamina.cli.config import containerd_snippet
from lamina.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from lamina.metadata.root import Root
from lamina.snapshots import Capability, Info, Kind

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="snapshotters need root")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lamina-serve-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"lamina serve exited with {proc.returncode}: {out}")
        if path.exists() and stat.S_ISSOCK(path.lstat().st_mode):
            try:
                check_address(str(path))
            except AlreadyExists:
                return  # somebody listens
        time.sleep(0.05)
    raise AssertionError(f"lamina serve did not listen on {path} within {timeout}s")


def _lamina(*args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from lamina.cli import main; sys.exit(main())",
        *args,
    ]


@pytest.fixture
def lamina_serve(tmp_path: Path, sockdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = sockdir / "lamina.sock"
    proc = subprocess.Popen(
        _lamina("--root", str(tmp_path / "root"), "serve", "--address", str(sock)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_socket(sock, proc)
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()  # by our own child's pid
        proc.wait(timeout=30)


@needs_root
def test_subprocess_serve_round_trip_and_sigterm(
    lamina_serve: tuple[subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    proc, sock = lamina_serve
    assert stat.S_IMODE(sock.lstat().st_mode) == SOCKET_MODE
    with RemoteSnapshotter(str(sock), "lamina") as sn:
        assert Capability.OVERLAY in sn.capabilities
        sn.prepare("default/1/a", labels={"k": "v"})
        sn.commit("default/2/A", "default/1/a")
        assert sn.stat("default/2/A").kind is Kind.COMMITTED
        with pytest.raises(NotFound):
            sn.stat("default/1/a")
        # the native snapshotter is served by name too
        with RemoteSnapshotter(str(sock), "native") as native:
            native.prepare("n")
            assert [i.name for i in native.walk()] == ["n"]
        assert [i.name for i in sn.walk()] == ["default/2/A"]
        # the CLI talks to the server with the global --address
        out = subprocess.run(
            _lamina("--address", str(sock), "snapshot", "ls"),
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "default/2/A" in out.stdout

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not sock.exists(), "the socket is removed on a clean stop"
    # the stores were closed cleanly: the root opens again with the data intact
    root = Root(tmp_path / "root")
    try:
        assert root.snapshotter("overlay").stat("default/2/A").kind is Kind.COMMITTED
    finally:
        root.close()


@needs_root
def test_live_socket_refused(lamina_serve: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, sock = lamina_serve
    before = sock.lstat().st_ino
    second = subprocess.run(
        _lamina("--root", str(sock.parent / "other-root"), "serve", "--address", str(sock)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == AlreadyExists.exit_code, second.stderr
    assert "already listening" in second.stderr
    assert sock.lstat().st_ino == before, "the live server's socket was left alone"
    with RemoteSnapshotter(str(sock), "overlay") as sn:
        assert list(sn.walk()) == []  # and it still answers
    with pytest.raises(AlreadyExists):
        Server(str(sock), lambda name: None).start()  # type: ignore[arg-type,return-value]


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # bound, never listening: a leftover of a dead server
    assert stat.S_ISSOCK(path.lstat().st_mode)


@needs_root
def test_stale_socket_replaced(tmp_path: Path, sockdir: Path) -> None:
    sock = sockdir / "stale.sock"
    _stale_socket(sock)
    assert check_address(str(sock)) is True
    server = Server.for_root(Root(tmp_path / "root"), str(sock))
    server.start()
    try:
        assert stat.S_IMODE(sock.lstat().st_mode) == SOCKET_MODE
        with RemoteSnapshotter(str(sock), "overlay") as sn:
            assert list(sn.walk()) == []
    finally:
        server.stop(grace=1)
    assert not sock.exists()


def test_not_a_socket_refused(sockdir: Path) -> None:
    path = sockdir / "file"
    path.write_text("not a socket")
    with pytest.raises(FailedPrecondition):
        Server(str(path), lambda name: None).start()  # type: ignore[arg-type,return-value]
    assert path.read_text() == "not a socket"


def test_socket_mode_and_directory(sockdir: Path) -> None:
    sock = sockdir / "sub" / "dir" / "s.sock"  # parents are created
    server = Server(str(sock), lambda name: None)  # type: ignore[arg-type,return-value]
    server.start()
    try:
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o660
        assert [p.name for p in sock.parent.iterdir()] == ["s.sock"]  # no temp leftovers
    finally:
        server.stop(grace=0)
    assert not sock.exists()


def test_stop_leaves_a_successors_socket(sockdir: Path) -> None:
    sock = sockdir / "s.sock"
    first = Server(str(sock), lambda name: None)  # type: ignore[arg-type,return-value]
    first.start()
    first.begin_stop(0).wait()
    os.unlink(sock)
    time.sleep(0.05)  # a reused inode number differs at least in ctime
    second = Server(str(sock), lambda name: None)  # type: ignore[arg-type,return-value]
    second.start()
    try:
        first.close()  # must not remove the successor's socket
        assert sock.exists()
    finally:
        second.stop(grace=0)


# -- graceful stop ---------------------------------------------------------------


class _Slow:
    """A snapshotter whose stat stays in flight until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = False
        self.finished_before_close = False
        self.done = threading.Event()

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset()

    def stat(self, key: str) -> Info:
        self.entered.set()
        assert self.release.wait(60), "the test never released the call"
        self.done.set()
        return Info(kind=Kind.ACTIVE, name=key)

    def close(self) -> None:
        self.finished_before_close = self.done.is_set()
        self.closed = True


def test_graceful_stop_finishes_calls_in_flight(sockdir: Path) -> None:
    slow = _Slow()
    server = Server(str(sockdir / "g.sock"), lambda name: slow, on_close=slow.close)  # type: ignore[arg-type,return-value]
    server.start()
    results: list[Any] = []
    sn = RemoteSnapshotter(server.address, "x")

    def call() -> None:
        try:
            results.append(sn.stat("in-flight"))
        except Exception as exc:
            results.append(exc)

    t = threading.Thread(target=call)
    t.start()
    assert slow.entered.wait(10)
    stopped = server.begin_stop(grace=10)
    # new calls are refused while the old one finishes
    with pytest.raises(Unavailable):
        RemoteSnapshotter(server.address, "x", timeout=5).stat("new")
    assert not stopped.is_set()  # the call in flight holds the stop
    slow.release.set()
    assert stopped.wait(60)
    server.close()
    t.join(10)
    sn.close()
    assert len(results) == 1 and isinstance(results[0], Info), results
    assert results[0].name == "in-flight"
    assert slow.closed and slow.finished_before_close


@needs_root
def test_serve_in_thread_with_stop_event(tmp_path: Path, sockdir: Path) -> None:
    """serve() off the main thread: no signal handlers, a stop event ends it."""
    stop = threading.Event()
    ready = threading.Event()
    errors: list[BaseException] = []
    sock = sockdir / "t.sock"
    root = Root(tmp_path / "root")

    def run() -> None:
        try:
            serve(root, str(sock), stop=stop, grace=2, ready=lambda s: ready.set())
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    t = threading.Thread(target=run)
    t.start()
    try:
        assert ready.wait(30) and not errors, errors
        with RemoteSnapshotter(str(sock), "lamina") as sn:
            sn.prepare("k")
            assert sn.stat("k").kind is Kind.ACTIVE
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive() and not errors
    assert not sock.exists()


def test_sigint_stops_subprocess_serve(tmp_path: Path, sockdir: Path) -> None:
    """SIGINT stops like SIGTERM (nothing is opened before the first call)."""
    sock = sockdir / "i.sock"
    proc = subprocess.Popen(
        _lamina("--root", str(tmp_path / "root"), "serve", "--address", str(sock)),
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_socket(sock, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- lamina config containerd ------------------------------------------------------


def test_config_containerd_snippet() -> None:
    import tomllib

    text = containerd_snippet("/run/x y/l.sock")
    doc = tomllib.loads(text)
    assert doc["version"] == 2
    assert doc["proxy_plugins"] == {"lamina": {"type": "snapshot", "address": "/run/x y/l.sock"}}
    assert "# [proxy_plugins.lamina-content]" in text and 'type = "content"' in text
    doc = tomllib.loads(containerd_snippet("/s", name="lam", content=True))
    assert doc["proxy_plugins"]["lam-content"] == {"type": "content", "address": "/s"}


def test_config_containerd_cli() -> None:
    out = subprocess.run(
        _lamina("config", "containerd", "--address", "/run/l.sock"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "[proxy_plugins.lamina]" in out.stdout
    assert 'address = "/run/l.sock"' in out.stdout
