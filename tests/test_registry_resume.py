"""A pull killed half-way resumes against the real ``docker-registry``: the re-run asks
only for the missing bytes (``Range``) and trusts the registry's ``206``.

lamina reaches the registry through a TCP relay of the test's own (hosts.toml names it
as the registry's server), which slows the registry's answers enough to kill the
first pull in the middle of its layer and records what both pulls asked for and got.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import imagefactory
import pytest
from registry_peer import running_registry, skopeo_push

LAYER_BYTES = 8 << 20


class Relay:
    """Forwards loopback TCP connections to ``target``; the registry's answers go back
    in 64 KiB pieces at a bounded rate. Keeps what each side sent, per connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.lock = threading.Lock()
        self.asked: list[bytes] = []  # what clients sent, one buffer per connection
        self.answered: list[bytes] = []  # headers of what the registry sent back
        self.sent = 0  # body and header bytes sent back to clients
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self.stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=30)
            with self.lock:
                self.asked.append(b"")
                self.answered.append(b"")
                n = len(self.asked) - 1
            threading.Thread(target=self._up, args=(client, upstream, n), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, n), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, n: int) -> None:
        def keep(data: bytes) -> None:
            self.asked[n] += data

        self._pipe(src, dst, keep, pause=0.0)

    def _down(self, src: socket.socket, dst: socket.socket, n: int) -> None:
        def keep(data: bytes) -> None:
            if len(self.answered[n]) < 1 << 16:
                self.answered[n] += data[:4096]
            self.sent += len(data)

        # about 3 MB/s back to the client: the first pull is killed mid-layer
        self._pipe(src, dst, keep, pause=0.02)

    def _pipe(self, src: socket.socket, dst: socket.socket,
              keep: Callable[[bytes], None], *, pause: float) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    keep(data)
                dst.sendall(data)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stop.set()
        self.server.close()


def _partial_ingest(root: Path) -> int:
    """The largest ingest's byte count in the content store of ``root`` (0 when none).

    Only the ingest directory is looked at: the pull makes and removes other
    directories (a snapshotter's feature probes) while this polls. An ingest
    committed between listing and stat counts as none.
    """
    sizes = []
    for data in (root / "content" / "ingest").glob("*/data"):
        try:
            sizes.append(data.stat().st_size)
        except FileNotFoundError:
            continue
    return max(sizes, default=0)


def test_killed_pull_resumes_with_range(require_root: None, tmp_root: Path) -> None:
    work = tmp_root / "image"
    big = os.urandom(LAYER_BYTES)  # incompressible: the blob is about as large
    layer = imagefactory.layer_from_entries([imagefactory.File("srv/big", big)],
                                            work / "blobs")
    image = imagefactory.build_oci_layout(work / "oci", [layer], ref_name="resume")
    with running_registry(tmp_root / "registry") as reg:
        ref = f"{reg.host}/test/resume:1"
        skopeo_push(image.oci_ref, ref)
        relay = Relay(("127.0.0.1", reg.port))
        try:
            certs = tmp_root / "certs.d" / f"127.0.0.1_{reg.port}_"
            certs.mkdir(parents=True)
            (certs / "hosts.toml").write_text(f'server = "http://{relay.address}"\n')
            cmd = [sys.executable, "-m", "lamina", "--root", str(tmp_root / "root"), "image",
                   "pull", "--hosts-dir", str(tmp_root / "certs.d"), ref]
            first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 120
            while _partial_ingest(tmp_root / "root") < LAYER_BYTES // 4:
                assert first.poll() is None, first.stderr.read() if first.stderr else ""
                assert time.monotonic() < deadline, "the first pull made no progress"
                time.sleep(0.02)
            first.send_signal(signal.SIGKILL)
            first.wait()
            if first.stderr:
                first.stderr.close()
            kept = _partial_ingest(tmp_root / "root")
            assert LAYER_BYTES // 4 <= kept < layer.size
            with relay.lock:
                before = len(relay.asked)
                relay.sent = 0
            again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert again.returncode == 0, again.stderr
            with relay.lock:
                asked = b"".join(relay.asked[before:])
                answered = b"".join(relay.answered[before:])
                resent = relay.sent
        finally:
            relay.close()
    blob_get = [line for line in asked.split(b"\r\n\r\n")
                if line.startswith(b"GET ") and layer.digest.encode() in line.split(b"\r\n")[0]]
    assert len(blob_get) == 1, asked[:2000]
    ranges = [h for h in blob_get[0].split(b"\r\n") if h.lower().startswith(b"range:")]
    assert len(ranges) == 1, blob_get[0]
    start = int(ranges[0].split(b"=", 1)[1].rstrip(b"-"))
    assert start >= LAYER_BYTES // 4  # at least what the killed pull had verified on disk
    assert b"HTTP/1.1 206 Partial Content" in answered
    assert resent < layer.size - start + (1 << 20), (resent, layer.size, start)
    # what the kill left (the layer's staging directory) goes as the failure model says
    lamina = [sys.executable, "-m", "lamina", "--root", str(tmp_root / "root")]
    subprocess.run([*lamina, "gc"], check=True, capture_output=True, timeout=300)
    out = subprocess.run([*lamina, "check", "--deep"], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.strip() == "consistent", out.stdout + out.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
