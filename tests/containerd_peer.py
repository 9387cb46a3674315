"""A private containerd 1.6 for tests: its own root, state, socket and opt path.

CRI is disabled and there is no TCP listener. Optionally lamina is plugged in
as a proxy snapshotter (and content store). Everything started is stopped by
PID when the context ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NAMESPACE = "lamina-test"


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
        )
        if check and proc.returncode != 0:
            log = (self.base / "containerd.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"ctr {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr}\n--- containerd log tail:\n{log}")
        return proc

    @property
    def root(self) -> Path:
        return self.base / "root"


def require_containerd() -> None:
    missing = [t for t in ("containerd", "ctr") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")


def _config(base: Path, proxy_snapshotter: str | None, proxy_content: str | None) -> str:
    lines = [
        "version = 2",
        f'root = "{base / "root"}"',
        f'state = "{base / "state"}"',
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
        "[grpc]",
        f'  address = "{base / "containerd.sock"}"',
        '  tcp_address = ""',
        "[ttrpc]",
        f'  address = "{base / "containerd.sock.ttrpc"}"',
        "[debug]",
        '  level = "info"',
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{base / "opt"}"',
        '[plugins."io.containerd.gc.v1.scheduler"]',
        "  pause_threshold = 0.02",
        "  deletion_threshold = 0",
        "  mutation_threshold = 100",
        '  schedule_delay = "0s"',
        '  startup_delay = "100ms"',
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
                       proxy_content: str | None = None) -> Iterator[Containerd]:
    require_containerd()
    base.mkdir(parents=True, exist_ok=True)
    config = base / "config.toml"
    config.write_text(_config(base, proxy_snapshotter, proxy_content))
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
