"""``lamina serve --call-stats``: per-method call counts and durations (issue 19's
question of what containerd's calls cost lamina), in-process and from the command."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.api import callstats
from lamina.api.callstats import CallStats
from lamina.api.client import RemoteSnapshotter
from lamina.api.server import Server, check_address
from lamina.errors import AlreadyExists, NotFound
from lamina.metadata.root import Root

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="snapshotters need root")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lamina-stats-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_quantiles_and_a_bounded_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(callstats, "SAMPLES", 100)
    stats = CallStats()
    for ms in random.Random(1).sample(range(1, 1001), 1000):
        stats._record("Stat", ms / 1000)
    got = stats.summary()["Stat"]
    assert got["count"] == 1000
    assert got["total_ms"] == pytest.approx(500_500)
    assert len(stats._methods["Stat"].samples) == 100  # a sample, not every call
    assert 300 < got["p50_ms"] < 700 and got["p99_ms"] <= got["max_ms"] <= 1000


@needs_root
def test_every_call_counted_unary_and_streaming(tmp_path: Path, sockdir: Path) -> None:
    stats = CallStats()
    server = Server.for_root(Root(tmp_path / "root"), str(sockdir / "s.sock"),
                             call_stats=stats)
    server.start()
    try:
        with RemoteSnapshotter(server.address, "overlay") as sn:
            for i in range(3):
                sn.prepare(f"k{i}")
            sn.stat("k0")
            with pytest.raises(NotFound):
                sn.stat("missing")  # a failed call is a call too
            assert len(list(sn.walk())) == 3  # List: a streaming response
    finally:
        server.stop(grace=1)
    got = stats.summary()
    assert got["Prepare"]["count"] == 3
    assert got["Stat"]["count"] == 2
    assert got["List"]["count"] == 1
    assert 0 < got["Prepare"]["p50_ms"] <= got["Prepare"]["max_ms"]


@needs_root
def test_serve_writes_the_file_when_it_stops(tmp_path: Path, sockdir: Path) -> None:
    sock, out = sockdir / "s.sock", tmp_path / "calls.json"
    proc = subprocess.Popen([sys.executable, "-m", "lamina", "--root", str(tmp_path / "root"),
                             "serve", "-q", "--address", str(sock), "--call-stats", str(out)])
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None
            try:
                check_address(str(sock))
            except AlreadyExists:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with RemoteSnapshotter(str(sock), "overlay") as sn:
            sn.prepare("a")
            sn.remove("a")
        assert not out.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    got = json.loads(out.read_text())
    assert {k: v["count"] for k, v in got.items()} == {"Prepare": 1, "Remove": 1}
    assert set(got["Prepare"]) == {"count", "total_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms"}
