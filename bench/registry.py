"""Registries: pull, resumed pull and push against Debian's docker-registry on loopback.

* **pull + unpack**: ``lamina image pull`` vs ``ctr image pull --plain-http
  --snapshotter overlayfs`` of the multi-layer debian image (see
  :mod:`bench.images`), fresh root / fresh private containerd per run, warm
  registry. Target: ratio ≤ 0.7.
* **resume**: a ``lamina image pull`` killed (SIGKILL) once it holds about
  half of the image's blob bytes (in its ingests); the re-run's bytes are
  counted by a TCP relay in front of the registry. (What sat in socket
  buffers when the pull died never reached it, and is fetched again.)
  Target: ≤ 60% of the image.
* **push**: ``lamina image push`` of the imported image vs ``skopeo copy``
  from its OCI layout, each into an empty repository of a fresh registry
  (skopeo's blob-info cache removed, so it cannot mount). Target: ≤ 1.0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import (
    Ctx,
    Row,
    cleanup_tree,
    ensure_tools,
    lamina_cli,
    paired,
    run_cmd,
    time_cmd,
)
from bench.images import debian_image
from bench.peer import containerd, require_containerd

NAME = "registry"
_SKOPEO_CACHE = Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def local_registry(base: Path) -> Iterator[str]:
    """docker-registry on a free loopback port, its own storage; stopped by PID."""
    port = _free_port()
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: bench\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(base / "config.yml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not start")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Relay:
    """A TCP relay to ``target`` counting the bytes it sends back to clients."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.sent = 0
        self.open = 0  # connections being relayed
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self.open += 2
            threading.Thread(target=self._pipe, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if count:
                    with self._lock:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self.open -= 1

    def settle(self, timeout: float = 10.0) -> None:
        """Until every relayed connection has ended (a killed client's included)."""
        deadline = time.monotonic() + timeout
        while self.open > 0 and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self._server.close()


def _received(root: Path) -> int:
    """Blob bytes a pull into ``root`` holds: its ingests and committed blobs."""
    total = 0
    for pattern in ("content/ingest/*/data", "content/blobs/sha256/*"):
        for p in root.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
    return total


def oci_layout(tar: Path, dest: Path) -> Path:
    if not (dest / "index.json").exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as tf:
            tf.extractall(dest)  # our own image (bench.images), not untrusted input
    return dest


def skopeo_push(layout: Path, name: str, ref: str) -> float:
    _SKOPEO_CACHE.unlink(missing_ok=True)
    return time_cmd(["skopeo", "--insecure-policy", "copy", "--quiet",
                     "--dest-tls-verify=false", f"oci:{layout}:{name}", f"docker://{ref}"])


def run(ctx: Ctx) -> list[Row]:
    require_containerd()
    ensure_tools({"docker-registry": "docker-registry", "skopeo": "skopeo"})
    img = debian_image(ctx.cache)
    layout = oci_layout(img.tar, ctx.cache / "bench-image-layout")
    blob_bytes = sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
    reps = ctx.pick(5, 1)
    rows = []
    with ctx.tempdir("registry-") as work, local_registry(work / "reg") as host:
        ref = f"{host}/bench/debian:1"
        skopeo_push(layout, img.name, ref)

        def lam(i: int) -> float:
            with ctx.tempdir("pull-") as root:
                os.sync()
                return time_cmd([*lamina_cli(), "--root", str(root), "image", "pull", ref])

        def peer(i: int) -> float:
            with containerd(work) as c:
                os.sync()
                return time_cmd(c.ctr("image", "pull", "--plain-http", "--snapshotter",
                                      "overlayfs", ref))

        p = paired(lam, peer, reps)
        rows.append(p.row(f"pull+unpack {img.layers}-layer debian from a loopback registry",
                          "s", "ctr image pull --plain-http --snapshotter overlayfs",
                          target="<= 0.7", limit=0.7, note=f"{reps} pairs, fresh roots"))

        relay = _Relay(host)
        try:
            with ctx.tempdir("resume-") as root:
                via = f"{relay.address}/bench/debian:1"
                proc = subprocess.Popen([*lamina_cli(), "--root", str(root), "image", "pull",
                                         via], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                while _received(root) < blob_bytes // 2 and proc.poll() is None:
                    time.sleep(0.002)
                proc.kill()
                proc.wait()
                relay.settle()  # what was in flight to the dead client is not the re-run's
                first = _received(root)
                relay.sent = 0
                run_cmd([*lamina_cli(), "--root", str(root), "image", "pull", via])
                again = relay.sent
        finally:
            relay.close()
        rows.append(Row(metric="re-run of a pull killed half-way: bytes transferred",
                        unit="% of image", lamina=100 * again / blob_bytes, peer=None,
                        peer_name="(the image's blob bytes)", ratio=again / blob_bytes,
                        target="<= 0.6", ok=again / blob_bytes <= 0.6,
                        note=f"killed after {first / 2**20:.1f} of "
                             f"{blob_bytes / 2**20:.1f} MiB"))

    with ctx.tempdir("push-") as work:
        src = work / "root"
        run_cmd([*lamina_cli(), "--root", str(src), "image", "import", "--no-unpack",
                 str(img.tar)])

        def lam_push(i: int) -> float:
            with local_registry(work / f"l{i}") as h:
                return time_cmd([*lamina_cli(), "--root", str(src), "image", "push",
                                 img.name, f"{h}/bench/debian:1"])

        def peer_push(i: int) -> float:
            with local_registry(work / f"s{i}") as h:
                return skopeo_push(layout, img.name, f"{h}/bench/debian:1")

        p = paired(lam_push, peer_push, reps)
        rows.append(p.row("push to an empty repository", "s",
                          "skopeo copy oci:<layout> docker://", target="<= 1.0", limit=1.0,
                          note=f"{reps} pairs, fresh registries"))
        cleanup_tree(src)
    return rows
