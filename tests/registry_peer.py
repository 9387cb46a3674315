"""A private Debian ``docker-registry`` (distribution 2.8) on 127.0.0.1 for tests.

Each registry gets its own config and storage directory and a free port; it
is stopped by PID when the context ends. :func:`skopeo_push` copies an OCI
layout (built by ``imagefactory``) into it, as the interoperability peer.
Optional htpasswd basic auth (``htpasswd=(user, password)``) and TLS
(``tls=(cert, key)``) for the auth and transport tests.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import require_tools

__all__ = ["Registry", "free_port", "running_registry", "skopeo_push"]


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Registry:
    base: Path
    port: int
    proc: subprocess.Popen[bytes]
    tls: bool = False
    addr: str = "127.0.0.1"

    @property
    def host(self) -> str:
        return f"{self.addr}:{self.port}"

    @property
    def storage(self) -> Path:
        return self.base / "storage"

    def log(self) -> str:
        return (self.base / "registry.log").read_text(errors="replace")[-4000:]


def _htpasswd(path: Path, user: str, password: str) -> None:
    """An htpasswd file with a bcrypt hash (libxcrypt's, through the crypt module)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    path.write_text(f"{user}:{hashed}\n")


@contextlib.contextmanager
def running_registry(base: Path, *, htpasswd: tuple[str, str] | None = None,
                     tls: tuple[Path, Path] | None = None,
                     extra: str = "", addr: str = "127.0.0.1",
                     netns: str = "") -> Iterator[Registry]:
    """Start ``docker-registry serve`` on a free port of ``addr`` (loopback by default),
    or on port 5000 of ``addr`` in network namespace ``netns``; stop it by PID after."""
    require_tools("docker-registry")
    base.mkdir(parents=True, exist_ok=True)
    ns_exec = ["ip", "netns", "exec", netns] if netns else []
    port = 5000 if netns else free_port(addr)
    auth = ""
    if htpasswd is not None:
        _htpasswd(base / "htpasswd", *htpasswd)
        auth = (f"auth:\n  htpasswd:\n    realm: lamina-test\n"
                f"    path: {base / 'htpasswd'}\n")
    tls_conf = ""
    if tls is not None:
        tls_conf = f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n"
    (base / "config.yml").write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'storage'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: {addr}:{port}\n  secret: lamina-test-secret\n{tls_conf}"
        f"{auth}{extra}")
    log = open(base / "registry.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*ns_exec, "docker-registry", "serve", str(base / "config.yml")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    reg = Registry(base, port, proc, tls=tls is not None, addr=addr)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {reg.log()}")
            if _listening(addr, port, ns_exec):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not listen: {reg.log()}")
            time.sleep(0.05)
        yield reg
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _listening(addr: str, port: int, ns_exec: list[str]) -> bool:
    if not ns_exec:
        try:
            socket.create_connection((addr, port), timeout=0.5).close()
            return True
        except OSError:
            return False
    probe = f"import socket; socket.create_connection(({addr!r}, {port}), timeout=0.5)"
    return subprocess.run([*ns_exec, sys.executable, "-c", probe], capture_output=True,
                          timeout=30, check=False).returncode == 0


def skopeo_push(layout_ref: str, dest: str, *, fmt: str = "",
                creds: str = "", netns: str = "") -> None:
    """``skopeo copy`` an image (``oci:<dir>:<ref>``) to ``docker://<dest>`` over plain HTTP
    (from network namespace ``netns`` when given)."""
    require_tools("skopeo")
    cmd = [*(["ip", "netns", "exec", netns] if netns else []), "skopeo",
           "--insecure-policy", "copy", "--dest-tls-verify=false", "--quiet"]
    if fmt:
        cmd += ["--format", fmt]
    if creds:
        cmd += ["--dest-creds", creds]
    proc = subprocess.run([*cmd, layout_ref, f"docker://{dest}"], capture_output=True,
                          text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"skopeo copy failed: {proc.stderr}")


def http_get(host: str, path: str, accept: str = "application/vnd.oci.image.manifest.v1+json"
             ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, timeout=10)
    try:
        conn.request("GET", path, headers={"Accept": accept})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


_hosts = itertools.count()


@contextlib.contextmanager
def second_host() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: a second "host".

    Yields (namespace, this side's address, the namespace's address); run a
    command there with ``ip netns exec <namespace> ...``. Removed afterwards.
    """
    require_tools("ip")
    n = next(_hosts)  # several at once in one process (the CRI bench's two nodes)
    tag = f"{os.getpid() % 10000}{n % 10}{int(time.monotonic() * 1000) % 1000}"
    ns, here, there = f"lamina-test-{tag}", f"lt{tag}a", f"lt{tag}b"
    subnet = 10 + (os.getpid() + 37 * n) % 200
    host_ip, ns_ip = f"10.{subnet}.77.1", f"10.{subnet}.77.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    ip("netns", "add", ns)
    try:
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", here)
        ip("link", "set", here, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", there)
        ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host_ip, ns_ip
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
