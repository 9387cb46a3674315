"""Peers: a private containerd daemon, ``lamina serve``, and gRPC clients for them.

:func:`containerd` starts containerd with its own root, state, opt path and a
unix socket in a private directory (no TCP, CRI disabled), optionally with
lamina as a proxy snapshotter, and stops it (by PID) and removes its
directories afterwards. :func:`lamina_server` does the same for ``lamina
serve``. :func:`remote_snapshotter` talks containerd's snapshots API with
the ``containerd-namespace`` header that containerd requires.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Skip,
    cleanup_tree,
    ensure_tools,
    lamina_cli,
    lamina_has_command,
    run_cmd,
)

NAMESPACE = "bench"


@dataclass(frozen=True)
class Containerd:
    address: str
    root: Path
    pid: int
    namespace: str = NAMESPACE

    def ctr(self, *args: str) -> list[str]:
        return ["ctr", "-a", self.address, "-n", self.namespace, *args]

    def lease(self) -> str:
        """Create a fresh non-expiring lease; pass it to :func:`remote_snapshotter`."""
        lease_id = f"bench-{time.monotonic_ns()}"
        run_cmd(self.ctr("leases", "create", "--id", lease_id, "--expires", "0"))
        return lease_id

    def snapshotter(self, name: str = "overlayfs") -> Any:
        """containerd's snapshotter ``name`` over its gRPC API, in a lease."""
        return remote_snapshotter(self.address, name, self.namespace, self.lease())


def require_containerd() -> None:
    """containerd and ctr, installed from Debian (with runc) if missing."""
    ensure_tools({"containerd": "containerd", "ctr": "containerd", "runc": "runc"})


def _stop(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _wait_socket(proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str,
                 log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} exited {proc.returncode} while starting:\n{tail}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up in {timeout:.0f}s")


def _config(d: Path, sock: str, proxy: str | None) -> str:
    lines = [
        "version = 2",
        f'root = "{d / "root"}"',
        f'state = "{d / "state"}"',
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",'
        ' "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",'
        ' "io.containerd.snapshotter.v1.devmapper"]',
        "",
        "[grpc]",
        f'  address = "{sock}"',
        '  tcp_address = ""',
        "",
        "[ttrpc]",
        f'  address = "{sock}.ttrpc"',
        "",
        "[debug]",
        '  address = ""',
        '  level = "warn"',
        "",
        "[metrics]",
        '  address = ""',
        "",
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{d / "opt"}"',
        "",
    ]
    if proxy:
        lines += [
            "[proxy_plugins.lamina]",
            '  type = "snapshot"',
            f'  address = "{proxy}"',
            "",
        ]
    return "\n".join(lines)


@contextlib.contextmanager
def containerd(base: Path, *, proxy: str | None = None) -> Iterator[Containerd]:
    """A private containerd under a fresh directory in ``base``; stopped and removed after."""
    require_containerd()
    base.mkdir(parents=True, exist_ok=True)
    d = Path(os.path.realpath(base)) / f"ctd-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    d.mkdir()
    proc: subprocess.Popen[bytes] | None = None
    try:
        sock = str(d / "c.sock")
        if len(sock) > 100:
            raise RuntimeError(f"socket path too long for a unix socket: {sock}")
        cfg = d / "config.toml"
        cfg.write_text(_config(d, sock, proxy))
        log = d / "containerd.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(["containerd", "--config", str(cfg)],
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)

        def ready() -> bool:
            if not os.path.exists(sock):
                return False
            return subprocess.run(["ctr", "-a", sock, "version"], capture_output=True,
                                  check=False, timeout=10).returncode == 0

        _wait_socket(proc, ready, "containerd", log)
        yield Containerd(address=sock, root=d, pid=proc.pid)
    finally:
        if proc is not None:
            _stop(proc)
        cleanup_tree(d)


@dataclass(frozen=True)
class LaminaServer:
    address: str
    root: Path
    pid: int
    how: str  # "lamina serve" or the fallback used


@contextlib.contextmanager
def lamina_server(base: Path, *, snapshotter: str = "overlay") -> Iterator[LaminaServer]:
    """``lamina --root R serve --address SOCK`` on a fresh root; stopped and removed after.

    Falls back to the library server (:func:`lamina.api.server.serve`) in a
    subprocess while the ``serve`` command does not exist yet.
    """
    try:
        import lamina.api.server  # noqa: F401
    except ImportError as exc:
        raise Skip(f"lamina.api.server is missing ({exc})") from exc
    base.mkdir(parents=True, exist_ok=True)
    d = Path(os.path.realpath(base)) / f"lsv-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    d.mkdir()
    root = d / "root"
    sock = str(d / "l.sock")
    proc: subprocess.Popen[bytes] | None = None
    try:
        if lamina_has_command("serve"):
            cmd = [*lamina_cli(), "--root", str(root), "--snapshotter", snapshotter,
                   "serve", "--address", sock]
            how = "lamina serve"
        else:
            code = (
                "import sys\n"
                "from lamina.metadata.root import Root\n"
                "from lamina.api.server import serve\n"
                "serve(Root(sys.argv[1]), sys.argv[2], snapshotter=sys.argv[3])\n"
            )
            cmd = [sys.executable, "-c", code, str(root), sock, snapshotter]
            how = "lamina.api.server.serve (no `lamina serve` command yet)"
        log = d / "serve.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)

        def ready() -> bool:
            if not os.path.exists(sock):
                return False
            import socket

            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(sock)
                return True
            except OSError:
                return False
            finally:
                s.close()

        _wait_socket(proc, ready, how, log)
        yield LaminaServer(address=sock, root=root, pid=proc.pid, how=how)
    finally:
        if proc is not None:
            _stop(proc)
        cleanup_tree(d)


def remote_snapshotter(address: str, snapshotter: str, namespace: str | None = None,
                       lease: str | None = None) -> Any:
    """A ``RemoteSnapshotter`` for ``address``; with ``namespace``, every call carries
    the ``containerd-namespace`` header (containerd rejects calls without one), and
    with ``lease`` the ``containerd-lease`` header (else containerd's garbage
    collector removes unreferenced committed snapshots behind our back)."""
    try:
        import grpc

        from lamina.api.client import RemoteSnapshotter, connect
    except ImportError as exc:
        raise Skip(f"lamina.api.client is missing ({exc})") from exc
    channel = connect(address)
    if namespace is not None:
        md = [("containerd-namespace", namespace)]
        if lease:
            md.append(("containerd-lease", lease))
        channel = grpc.intercept_channel(channel, _metadata_interceptor(md))
    return RemoteSnapshotter(address, snapshotter, channel=channel)


def _metadata_interceptor(extra: list[tuple[str, str]]) -> Any:
    """An interceptor adding ``extra`` to every unary and server-streaming call's metadata."""
    import grpc

    class _Details(grpc.ClientCallDetails):
        def __init__(self, base: Any) -> None:
            self.method = base.method
            self.timeout = base.timeout
            self.metadata = (*(base.metadata or ()), *extra)
            self.credentials = base.credentials
            self.wait_for_ready = base.wait_for_ready
            self.compression = base.compression

    class _Interceptor(grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
                       grpc.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
        def intercept_unary_unary(self, cont: Any, details: Any, request: Any) -> Any:
            return cont(_Details(details), request)

        def intercept_unary_stream(self, cont: Any, details: Any, request: Any) -> Any:
            return cont(_Details(details), request)

    return _Interceptor()


def close_channel(sn: Any) -> None:
    """Close a snapshotter from :func:`remote_snapshotter` and its channel."""
    ch = getattr(sn, "_channel", None)
    sn.close()
    if ch is not None:
        ch.close()


def ctr_snapshot_count(c: Containerd, snapshotter: str) -> int:
    out = run_cmd(c.ctr("snapshots", "--snapshotter", snapshotter, "ls")).stdout.decode()
    return max(0, len(out.strip().splitlines()) - 1)
