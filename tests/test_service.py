"""lamina as a systemd service: sd_notify readiness, SIGTERM, and the shipped unit files."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_root_user, require_tools

from lamina.api import DEFAULT_ADDRESS
from lamina.cli.config import containerd_snippet
from lamina.util.sdnotify import notify

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "contrib/systemd/lamina.service"
DROPIN = REPO / "contrib/systemd/containerd.service.d/lamina.conf"
CONTAINERD_TOML = REPO / "contrib/containerd/lamina.toml"


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound to a path, announced as $NOTIFY_SOCKET."""
    d = tempfile.mkdtemp(prefix="lamina-notify-")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()
    shutil.rmtree(d)


def test_notify_sends_one_datagram(listener: socket.socket) -> None:
    assert notify("READY=1", "STATUS=up") is True
    assert listener.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"lamina-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_notify_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_notify_to_a_missing_socket_raises(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError):
        notify("READY=1")


def test_serve_is_ready_when_listening_and_stops_on_sigterm(
    listener: socket.socket, tmp_root: Path
) -> None:
    require_root_user()
    sock = Path(str(listener.getsockname())).with_name("serve.sock")  # short: sun_path
    server = subprocess.Popen(
        [sys.executable, "-m", "lamina", "--root", str(tmp_root / "root"), "serve",
         "--address", str(sock)],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        message = listener.recv(4096).decode().split("\n")
        # READY=1 comes only once the socket is in place and answering
        assert "READY=1" in message
        assert sock.is_socket()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(sock))
        assert any(m.startswith("STATUS=serving ") for m in message)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.stderr is not None
    err = server.stderr.read()
    assert "Traceback" not in err
    assert not sock.exists()  # removed on a clean stop


# --------------------------------------------------------------------------- unit files


def _verify(*units: Path, unit_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_path}:", "SYSTEMD_LOG_COLOR": "0"},
        capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """lamina.service and containerd.service with lamina's drop-in, as installed."""
    require_tools("systemd-analyze")
    shutil.copy(UNIT, tmp_path)
    containerd = Path("/lib/systemd/system/containerd.service")
    if containerd.exists():
        shutil.copy(containerd, tmp_path)
    else:  # containerd not installed: a minimal stand-in for the drop-in to attach to
        (tmp_path / "containerd.service").write_text(
            "[Unit]\nDescription=containerd\n[Service]\nExecStart=/bin/true\n")
    (tmp_path / "containerd.service.d").mkdir()
    shutil.copy(DROPIN, tmp_path / "containerd.service.d")
    return tmp_path


def test_units_verify_clean(unit_dir: Path) -> None:
    proc = _verify(unit_dir / "lamina.service", unit_dir / "containerd.service",
                   unit_path=unit_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # not even a warning


def test_verify_catches_a_broken_unit(unit_dir: Path) -> None:
    """The check above can fail: a typo in the drop-in and a bad ExecStart are reported."""
    dropin = unit_dir / "containerd.service.d" / DROPIN.name
    dropin.write_text(dropin.read_text().replace("After=", "Aftr="))
    unit = unit_dir / "lamina.service"
    unit.write_text(unit.read_text().replace("ExecStart=/usr/local/bin/lamina",
                                             "ExecStart=/nonexistent/lamina"))
    proc = _verify(unit, unit_dir / "containerd.service", unit_path=unit_dir)
    assert proc.returncode != 0
    assert "Aftr" in proc.stderr and "/nonexistent/lamina" in proc.stderr


def test_unit_runs_lamina_serve_with_notify() -> None:
    text = UNIT.read_text()
    assert "\nType=notify\n" in text
    assert f"\nExecStart=/usr/local/bin/lamina serve --address {DEFAULT_ADDRESS}\n" in text
    assert "\nKillSignal=SIGTERM\n" in text


def test_shipped_containerd_config_is_what_lamina_config_prints() -> None:
    assert CONTAINERD_TOML.read_text() == containerd_snippet(DEFAULT_ADDRESS)
    doc = tomllib.loads(CONTAINERD_TOML.read_text())
    assert doc["proxy_plugins"]["lamina"] == {"type": "snapshot", "address": DEFAULT_ADDRESS}
