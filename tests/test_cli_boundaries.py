"""The CLI's outer boundary: versions, and one line + a documented exit code per error.

Each hostile invocation runs ``python -m lamina`` (this interpreter, the one
lamina is installed in) in a child process and must end with exactly one line
on stderr, no traceback, and the exit code the ``lamina.cli`` docs give;
``--debug`` / ``LAMINA_DEBUG=1`` add the traceback.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import readable_source, require_root_user

import lamina

LAMINA = [sys.executable, "-m", "lamina"]


def run(*args: str, env: dict[str, str] | None = None, user: int | None = None,
        stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    argv = [*LAMINA, *args]
    full_env = {k: v for k, v in os.environ.items() if k != "LAMINA_DEBUG"}
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
        full_env["PYTHONPATH"] = str(readable_source())  # the checkout may be root's only
        # the user's own home, as su gives it: lamina reads its config file from there
        full_env["HOME"] = pwd.getpwuid(user).pw_dir
        full_env.pop("XDG_CONFIG_HOME", None)
    full_env.update(env or {})
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=full_env,
                          stdin=stdin, check=False)


def one_error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert the run failed with ``code`` and exactly one stderr line; return that line."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("lamina"), lines
    return lines[0]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory other users may traverse (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="lamina-cli-", dir="/var/tmp"))
    d.chmod(0o711)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


# --------------------------------------------------------------------------- versions


def test_version_flag_is_the_package_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"lamina {importlib.metadata.version('lamina')}\n"
    assert lamina.__version__ == importlib.metadata.version("lamina")  # no drift from pyproject


def test_version_command_client_only() -> None:
    proc = run("version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == ["Client:", f"  Version:  {lamina.__version__}"]
    assert "Server:" not in proc.stdout


def test_version_command_asks_the_server(scratch: Path) -> None:
    require_root_user()
    sock = scratch / "lamina.sock"
    notify = scratch / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(30)
    server = subprocess.Popen(
        [*LAMINA, "--root", str(scratch / "root"), "serve", "-q", "--address", str(sock)],
        env={**os.environ, "NOTIFY_SOCKET": str(notify)}, stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        assert b"READY=1" in listener.recv(4096).split(b"\n")
        proc = run("--address", str(sock), "version")
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.splitlines()
        assert "Server:" in out
        assert out[out.index("Server:") + 2] == f"  Version:  {lamina.__version__}"
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        listener.close()
    assert server.stderr is not None and "Traceback" not in server.stderr.read()


def test_version_without_a_server_is_unavailable(scratch: Path) -> None:
    line = one_error_line(run("--address", str(scratch / "none.sock"), "version"), 7)
    assert line.startswith("lamina: Unavailable: ")


# --------------------------------------------------------------------------- hostile calls


def test_root_is_a_file(scratch: Path) -> None:
    f = scratch / "a-file"
    f.write_text("not a directory\n")
    line = one_error_line(run("--root", str(f), "image", "ls"), 4)
    assert line == f"lamina: FileExistsError: {f}: File exists"


def test_root_below_a_file(scratch: Path) -> None:
    f = scratch / "a-file"
    f.write_text("")
    line = one_error_line(run("--root", str(f / "root"), "snapshot", "ls"), 6)
    assert line.startswith("lamina: NotADirectoryError: ")


def test_root_unreadable(scratch: Path) -> None:
    require_root_user()
    private = scratch / "private"
    (private / "root").mkdir(parents=True)
    private.chmod(0o700)
    line = one_error_line(run("--root", str(private / "root"), "snapshot", "ls", user=65534), 5)
    assert line == f"lamina: PermissionError: {private / 'root'}: Permission denied"


def test_root_with_a_corrupt_database_is_an_internal_error(scratch: Path) -> None:
    root = scratch / "root"
    assert run("--root", str(root), "snapshot", "ls").returncode == 0
    (root / "metadata.db").write_bytes(b"this is not SQLite\n" * 64)
    line = one_error_line(run("--root", str(root), "image", "ls"), 1)
    assert line.startswith("lamina: internal error: DatabaseError: ")
    assert line.endswith("(--debug shows the traceback)")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(scratch: Path, how: str) -> None:
    f = scratch / "a-file"
    f.write_text("")
    args = ["--debug", "--root", str(f), "image", "ls"] if how == "flag" else \
        ["--root", str(f), "image", "ls"]
    proc = run(*args, env={"LAMINA_DEBUG": "1"} if how == "env" else None)
    assert proc.returncode == 4
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert proc.stderr.splitlines()[-1] == f"lamina: FileExistsError: {f}: File exists"


@pytest.mark.parametrize("args", [
    ["--bogus"],
    [],
    ["image", "ls", "--bogus"],
    ["snapshot", "prepare"],
    ["no-such-command"],
    ["serve", "--workers", "many"],
])
def test_usage_errors(args: list[str], scratch: Path) -> None:
    line = one_error_line(run("--root", str(scratch / "root"), *args), 2)
    assert ": error: " in line and line.endswith("(see --help)")


def test_unknown_image(scratch: Path) -> None:
    root = str(scratch / "root")
    for args in (["image", "rm", "nosuch:tag"], ["image", "unpack", "nosuch:tag"]):
        line = one_error_line(run("--root", root, *args), 3)
        assert line == "lamina: NotFound: image 'nosuch:tag' does not exist"


def test_unknown_snapshot(scratch: Path) -> None:
    line = one_error_line(run("--root", str(scratch / "root"), "snapshot", "info", "nope"), 3)
    assert line.startswith("lamina: NotFound: ")


def _blocked_reading_stdin(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return fields[:2] == ["0", "0x0"]  # read(0, ...)


def test_interrupt_is_one_line_and_130(scratch: Path) -> None:
    r, w = os.pipe()
    # SIGINT as a terminal's ^C finds it: a suite started in the background by a
    # shell without job control inherits SIGINT ignored, and so would lamina
    proc = subprocess.Popen(["env", "--default-signal=INT", *LAMINA, "--root",
                             str(scratch / "root"), "content", "ingest", "interrupted-ref"],
                            stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(r)
    try:
        deadline = time.monotonic() + 30
        while not _blocked_reading_stdin(proc.pid):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "lamina never read its stdin"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        os.close(w)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.splitlines() == ["lamina: interrupted"]



@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_terminate_and_hangup_end_a_command_as_interrupt_does(
        scratch: Path, sig: signal.Signals, code: int) -> None:
    """SIGTERM and SIGHUP end a command through its cleanups, in one line, with
    128 + the signal (Python's default killed it on the spot: exit -15, -1); a
    SIGHUP the command inherited ignored (``nohup``) stays ignored."""
    r, w = os.pipe()
    proc = subprocess.Popen(["env", "--ignore-signal=HUP", *LAMINA, "--root",
                             str(scratch / "root"), "content", "ingest", f"ref-{sig.name}"],
                            stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    plain = subprocess.Popen([*LAMINA, "--root", str(scratch / "root"), "content", "ingest",
                              f"plain-{sig.name}"],
                             stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(r)
    try:
        deadline = time.monotonic() + 30
        while not (_blocked_reading_stdin(proc.pid) and _blocked_reading_stdin(plain.pid)):
            assert proc.poll() is None, proc.communicate()
            assert plain.poll() is None, plain.communicate()
            assert time.monotonic() < deadline, "lamina never read its stdin"
            time.sleep(0.05)
        plain.send_signal(sig)
        _, err = plain.communicate(timeout=30)
        assert plain.returncode == code, (plain.returncode, err)
        assert err.splitlines() == [f"lamina: terminated ({sig.name})"]
        proc.send_signal(signal.SIGHUP)  # ignored, as nohup asked
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143 and err.splitlines() == ["lamina: terminated (SIGTERM)"]
    finally:
        os.close(w)
        for p in (proc, plain):
            if p.poll() is None:
                p.kill()

def test_closed_stdout_is_quiet(scratch: Path) -> None:
    r, w = os.pipe()
    os.close(r)  # nobody will read what lamina writes
    try:
        proc = subprocess.run([*LAMINA, "version"], stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=60, check=False)
    finally:
        os.close(w)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


def test_serve_on_an_unbindable_path_is_one_line(scratch: Path) -> None:
    deep = scratch / ("d" * 60) / ("e" * 60)  # longer than a unix socket path may be
    deep.mkdir(parents=True)
    line = one_error_line(run("--root", str(scratch / "root"), "serve", "--address",
                              str(deep / "lamina.sock")), 7)
    assert line.startswith(f"lamina: Unavailable: cannot bind {deep / 'lamina.sock'}")
