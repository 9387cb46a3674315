"""A private containerd 1.6 for tests: its own root, state, socket and opt path.

CRI is disabled and there is no TCP listener. Optionally lamina is plugged in
as a proxy snapshotter (and content store). Everything started is stopped by
PID when the context ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lamina.api.client import RemoteContentStore, RemoteSnapshotter
from lamina.api.server import check_address
from lamina.errors import AlreadyExists

NAMESPACE = "lamina-test"
BUILTIN_CONTENT = "io.containerd.content.v1.content"
SOCKET_MAX = 104  # containerd refuses longer unix socket paths (sun_path is 108 bytes)


@dataclass
class Containerd:
    base: Path
    address: str
    proc: subprocess.Popen[bytes]

    def ctr(self, *args: str, check: bool = True, timeout: float = 300,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this containerd in the test namespace."""
        proc = subprocess.run(
            ["ctr", "--address", self.address, "--namespace", NAMESPACE, *args],
            capture_output=True, text=True, timeout=timeout, check=False,
            input=input.decode() if input is not None else None,
        )
        if check and proc.returncode != 0:
            log = (self.base / "containerd.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"ctr {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr}\n--- containerd log tail:\n{log}")
        return proc

    def collect_garbage(self) -> None:
        """Run one garbage collection now and wait for it (a lease deleted with --sync)."""
        lease = self.ctr("leases", "create").stdout.split()[0]
        self.ctr("leases", "rm", "--sync", lease)

    @property
    def root(self) -> Path:
        return self.base / "root"


def require_containerd() -> None:
    missing = [t for t in ("containerd", "ctr") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")


def _gc_scheduler(*, on_request: bool) -> list[str]:
    """containerd's GC scheduler settings.

    As it ships, a collection follows deletions, and anything not held by a
    lease, an image or a gc.root label goes. ``on_request``: a collection only
    when a client asks for a synchronous one (``--sync``) — no startup
    collection, deletions and mutations never schedule one. For tests that
    create objects with ``ctr snapshots``/``ctr content``, which cannot hold a
    lease, so a scheduled collection could take them between two commands.
    """
    if on_request:
        deletions, mutations, startup = 1_000_000_000, 0, "87600h"
    else:
        deletions, mutations, startup = 0, 100, "100ms"
    return ['[plugins."io.containerd.gc.v1.scheduler"]',
            "  pause_threshold = 0.02",
            f"  deletion_threshold = {deletions}",
            f"  mutation_threshold = {mutations}",
            '  schedule_delay = "0s"',
            f'  startup_delay = "{startup}"']


def _config(base: Path, proxy_snapshotter: str | None, proxy_content: str | None,
            *, gc_on_request: bool = False) -> str:
    lines = [
        "version = 2",
        f'root = "{base / "root"}"',
        f'state = "{base / "state"}"',
        # containerd 1.6 keeps using its built-in content store when both are loaded
        "disabled_plugins = "
        + json.dumps(["io.containerd.grpc.v1.cri", *([BUILTIN_CONTENT] if proxy_content else [])]),
        "[grpc]",
        f'  address = "{base / "containerd.sock"}"',
        '  tcp_address = ""',
        "[ttrpc]",
        f'  address = "{base / "containerd.sock.ttrpc"}"',
        "[debug]",
        '  level = "info"',
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{base / "opt"}"',
        *_gc_scheduler(on_request=gc_on_request),
    ]
    if proxy_snapshotter:
        lines += ["[proxy_plugins.lamina]", '  type = "snapshot"',
                  f'  address = "{proxy_snapshotter}"']
    if proxy_content:
        lines += ["[proxy_plugins.lamina-content]", '  type = "content"',
                  f'  address = "{proxy_content}"']
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def private_containerd(base: Path, *, proxy_snapshotter: str | None = None,
                       proxy_content: str | None = None,
                       gc_on_request: bool = False) -> Iterator[Containerd]:
    require_containerd()
    base.mkdir(parents=True, exist_ok=True)
    config = base / "config.toml"
    config.write_text(_config(base, proxy_snapshotter, proxy_content,
                              gc_on_request=gc_on_request))
    log = open(base / "containerd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = str(base / "containerd.sock")
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError("containerd exited: "
                                     + (base / "containerd.log").read_text()[-2000:])
            ok = subprocess.run(["ctr", "--address", address, "version"],
                                capture_output=True, check=False).returncode == 0
            if ok:
                break
            if time.monotonic() > deadline:
                raise AssertionError("containerd did not come up in 30 s")
            time.sleep(0.1)
        yield Containerd(base=base, address=address, proc=proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        # containerd leaves its snapshot mounts behind if a test failed midway
        subprocess.run(["sh", "-c", f"grep -o ' {base}[^ ]*' /proc/self/mountinfo | "
                        "sort -r | xargs -r -n1 umount -l"], check=False)


# --------------------------------------------------------------------------- lamina serve


@dataclass
class Lamina:
    """A ``lamina serve`` subprocess on its own root."""

    root: Path
    sock: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``lamina --root ROOT ARGS`` (talks to the root directly, not the server)."""
        out = subprocess.run(
            [*_LAMINA, "--root", str(self.root), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"lamina {' '.join(args)}: rc {out.returncode}: {out.stderr}")
        return out

    def snapshotter(self) -> RemoteSnapshotter:
        return RemoteSnapshotter(str(self.sock), "lamina")

    def content(self) -> RemoteContentStore:
        return RemoteContentStore(str(self.sock))

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


_LAMINA = [sys.executable, "-c", "import sys; from lamina.cli import main; sys.exit(main())"]


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # our own child, by pid
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=timeout)


@contextlib.contextmanager
def lamina_serve(root: Path, sock: Path, *, options: tuple[str, ...] = (),
                 serve_options: tuple[str, ...] = (), netns: str = "") -> Iterator[Lamina]:
    """Run ``lamina --root ROOT [OPTIONS] serve --address SOCK [SERVE_OPTIONS]`` until
    the block ends (``options``: global ones, e.g. ``("--snapshotter", "native")``), in
    network namespace ``netns`` when given.

    On a clean exit of the block it must stop on SIGTERM with status 0 and
    remove its socket; in any case it is stopped (by PID).
    """
    root.mkdir(parents=True, exist_ok=True)
    log = root.parent / f"{root.name}.serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*(["ip", "netns", "exec", netns] if netns else []), *_LAMINA, "--root",
             str(root), *options, "serve", "--address", str(sock), *serve_options],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    lamina = Lamina(root=root, sock=sock, proc=proc, log=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"lamina serve exited ({proc.returncode}):\n{lamina.log_tail()}"
                )
            if sock.exists() and stat.S_ISSOCK(sock.lstat().st_mode):
                try:
                    check_address(str(sock))
                except AlreadyExists:
                    break  # somebody listens
            if time.monotonic() > deadline:
                raise AssertionError(f"lamina serve did not come up:\n{lamina.log_tail()}")
            time.sleep(0.1)
        yield lamina
        assert _stop(proc) == 0, lamina.log_tail()
        assert not sock.exists()
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- + containerd


def short_dir(preferred: Path) -> tuple[Path, bool]:
    """``preferred`` if the sockets below it (``ctrd/containerd.sock.ttrpc`` is the
    longest) fit containerd's limit, else a new directory in /tmp.

    Returns (dir, created_in_tmp)."""
    if len(str(preferred / "ctrd" / "containerd.sock.ttrpc")) <= SOCKET_MAX:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred, False
    return Path(tempfile.mkdtemp(prefix="lct-", dir="/tmp")), True


@contextlib.contextmanager
def lamina_and_containerd(
    workdir: Path, *, content: bool = False, gc_on_request: bool = False
) -> Iterator[tuple[Lamina, Containerd]]:
    """``lamina serve`` (root ``workdir/lamina-root``) plus a private containerd using
    it as proxy snapshotter ``lamina`` and, with ``content``, as its content store.

    Teardown: containerd first (it holds connections to lamina), then lamina;
    both must exit with status 0 after a clean block.
    """
    require_containerd()
    base, in_tmp = short_dir(workdir / "c")
    try:
        sock = base / "lamina.sock"
        with lamina_serve(workdir / "lamina-root", sock) as lamina, contextlib.ExitStack() as stack:
            ctrd = stack.enter_context(
                private_containerd(
                    base / "ctrd",
                    proxy_snapshotter=str(sock),
                    proxy_content=str(sock) if content else None,
                    gc_on_request=gc_on_request,
                )
            )
            yield lamina, ctrd
            stack.close()  # containerd stops before lamina
            log = (ctrd.base / "containerd.log").read_text(errors="replace")
            assert ctrd.proc.returncode == 0, log[-3000:]
    finally:
        if in_tmp:
            shutil.rmtree(base, ignore_errors=True)


