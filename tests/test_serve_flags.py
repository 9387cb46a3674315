"""``lamina serve``'s limit flags, given on its command line, are the limits it keeps.

The limits themselves are tested in-process (tests/test_api_hardening.py); here the
server is the ``lamina serve`` command, so a flag that is parsed but not passed on
(or passed to the wrong limit) fails: ``--max-streams``, ``--max-client-streams``
and ``--stream-idle-timeout``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_streams import Silent, fails_with

from lamina.api.client import connect
from lamina.api.gen.containerd.services.content.v1 import content_pb2 as cpb
from lamina.api.server import check_address
from lamina.errors import AlreadyExists

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lamina serve's snapshotters need root")


@contextmanager
def serving(root: Path, *flags: str) -> Iterator[str]:
    """``lamina serve`` with ``flags`` on a private socket; yields the socket path."""
    sockdir = Path(tempfile.mkdtemp(prefix="lamina-flags-", dir="/tmp"))
    sock = sockdir / "s.sock"
    log = root.parent / f"{root.name}-serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lamina", "--root", str(root), "serve",
                                 "--address", str(sock), *flags],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                check_address(str(sock))
            except AlreadyExists:  # something listens there
                break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield str(sock)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in sockdir.iterdir():
            p.unlink()
        sockdir.rmdir()
    assert "Traceback" not in log.read_text()


def held(silent: Silent, ref: str) -> Iterator[cpb.WriteContentResponse]:
    """A Write stream that has said STAT and got its answer, so the server counts it,
    and then sends nothing until the test releases it."""
    call = silent.open([cpb.WriteContentRequest(action=cpb.STAT, ref=ref, total=10)])
    assert next(call).action == cpb.STAT
    return call


def opened(silent: Silent, ref: str) -> Iterator[cpb.WriteContentResponse]:
    return silent.open([cpb.WriteContentRequest(action=cpb.STAT, ref=ref, total=10)])


def test_max_client_streams_flag(require_root: None, tmp_root: Path) -> None:
    with serving(tmp_root / "root", "--max-client-streams", "2") as sock:
        channel = connect(sock)
        streams = Silent(channel)
        try:
            held(streams, "a")
            held(streams, "b")
            err = fails_with(opened(streams, "c"))
            assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "has 2 streams open (the limit per client)" in (
                err.details() or "")  # type: ignore[attr-defined]
        finally:
            streams.close()
            channel.close()


def test_max_streams_flag(require_root: None, tmp_root: Path) -> None:
    with serving(tmp_root / "root", "--max-streams", "1", "--max-client-streams", "8") as sock:
        channel = connect(sock)
        streams = Silent(channel)
        try:
            held(streams, "a")
            err = fails_with(opened(streams, "b"))
            assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "the server's limit" in (err.details() or "")  # type: ignore[attr-defined]
        finally:
            streams.close()
            channel.close()


def test_stream_idle_timeout_flag(require_root: None, tmp_root: Path) -> None:
    with serving(tmp_root / "root", "--stream-idle-timeout", "1.5") as sock:
        channel = connect(sock)
        streams = Silent(channel)
        try:
            err = fails_with(held(streams, "idle"))
            assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            assert "no progress from the client in 1.5s" in (
                err.details() or "")  # type: ignore[attr-defined]
        finally:
            streams.close()
            channel.close()
