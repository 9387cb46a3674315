"""``lamina run`` in docker's and nerdctl's form, as a person types it.

``lamina run [flags] IMAGE [COMMAND [ARG...]]`` with ``--name``, ``-it``,
``-e``, ``--env-file``, ``-v``, ``-w``, ``-u``, ``--rm`` and ``-d`` (together
too: the container goes when its detached task ends), run as a
process (on a pseudo-terminal for ``-t``) with the real runc. A missing
command is one line and exit 127 (126: not executable); an ID in use is
AlreadyExists (4).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_root_user, require_tools
from imagefactory import (
    File,
    ImageConfig,
    build_oci_layout,
    layer_from_dir,
    layer_from_entries,
    minimal_rootfs,
)
from test_containers_cli import IDLE, Cli, cleanup_tasks, wait_for

IMG = "test/nerd:1"
BINARIES = ("sh", "echo", "cat", "sleep", "ls", "true", "id", "tty", "stty", "env", "pwd",
            "touch")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("nerd-image")
    rootfs = minimal_rootfs(base / "rootfs", BINARIES)
    (rootfs / "srv").mkdir()
    users = layer_from_entries([
        File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:4242:4343:app:/srv:/bin/sh\n"),
        File("etc/group", b"root:x:0:\napp:x:4343:\n"),
    ], base / "blobs")
    build_oci_layout(base / "oci", [layer_from_dir(rootfs, base / "blobs"), users],
                     ref_name=IMG, config=ImageConfig(cmd=["sh"]))
    return base / "oci"


@pytest.fixture
def cli(tmp_root: Path, layout: Path) -> Iterator[Cli]:
    require_root_user()
    require_tools("runc")
    c = Cli(tmp_root / "root")
    try:
        c("image", "import", str(layout))
        yield c
    finally:
        assert not cleanup_tasks(c.root)


class Terminal:
    """``lamina`` on a pseudo-terminal of 40 rows and 100 columns, as a person's shell runs it."""

    def __init__(self, root: Path, *args: str) -> None:
        self.master, self.slave = pty.openpty()
        self.resize(40, 100)
        self.cooked = termios.tcgetattr(self.slave)
        argv = [sys.executable, "-m", "lamina", "--root", str(root), *args]
        self.proc = subprocess.Popen(argv, stdin=self.slave, stdout=self.slave,
                                     stderr=self.slave, start_new_session=True,
                                     preexec_fn=self._take_terminal)
        self.seen = b""

    def _take_terminal(self) -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def expect(self, pattern: bytes, timeout: float = 60.0, *, since: int = 0) -> bytes:
        """What the terminal showed, once ``pattern`` is in it (after its first ``since``
        bytes)."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen[since:]):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:  # every writer has gone
                    time.sleep(0.05)
        return self.seen

    def send(self, text: bytes) -> None:
        os.write(self.master, text)

    def wait(self) -> int:
        code = self.proc.wait(timeout=60)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def test_it_gives_an_interactive_shell_a_terminal(cli: Cli) -> None:
    term = Terminal(cli.root, "run", "-it", "--rm", "-e", "A=1", "-v", "/srv:/srv", IMG, "sh")
    try:
        term.expect(rb"# $")  # an interactive sh shows its prompt
        term.send(b"echo hi-$((1+1)) $A; tty\n")
        out = term.expect(rb"/dev/pts/\d+\r\n")
        assert b"hi-2 1\r\n" in out
        # raw mode: the container's terminal echoes, not the user's, so each line shows once
        assert out.count(b"echo hi-") == 1
        term.resize(50, 120)  # the window changes: the container's terminal follows
        deadline = time.monotonic() + 30  # runc passes the SIGWINCH on in its own time
        while b"50 120\r\n" not in term.seen:
            assert time.monotonic() < deadline, term.seen
            mark = len(term.seen)
            term.send(b"stty size\n")
            term.expect(rb"\d+ \d+\r\n# $", since=mark)
            time.sleep(0.1)
        term.send(b"exit 3\n")
        assert term.wait() == 3
        # the user's terminal is as it was before
        assert termios.tcgetattr(term.slave) == term.cooked
    finally:
        term.close()
    assert cli.containers() == {}


def test_without_i_stdin_is_not_attached(cli: Cli) -> None:
    argv = [sys.executable, "-m", "lamina", "--root", str(cli.root), "run", "--rm"]
    piped = subprocess.run([*argv, IMG, "cat"], input="data\n", capture_output=True,
                           text=True, timeout=120)
    assert (piped.returncode, piped.stdout) == (0, "")
    piped = subprocess.run([*argv, "-i", IMG, "cat"], input="data\n", capture_output=True,
                           text=True, timeout=120)
    assert (piped.returncode, piped.stdout) == (0, "data\n")
    # -t wants a terminal; none here
    proc = cli("run", "-t", "--rm", IMG, "true", check=False)
    assert proc.returncode == 6 and proc.stderr.count("\n") == 1, proc.stderr
    proc = cli("run", "-dit", IMG, "sh", check=False)
    assert proc.returncode == 8 and proc.stderr.startswith("lamina: NotImplemented: ")


def test_env_volume_workdir_user(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    env_file = tmp_path / "env"
    env_file.write_text("# a comment\n\nFROM_FILE=f\nB=from-file\n")
    monkeypatch.setenv("PASSED", "caller's")
    monkeypatch.delenv("UNSET_HERE", raising=False)
    proc = cli("run", "--rm", "--env-file", str(env_file), "-e", "B=2", "-e", "PASSED",
               "-e", "UNSET_HERE", "-v", f"{data}:/data:ro", "-v", f"{tmp_path}/made:/made",
               "-w", "/data", "-u", "1000:1001", IMG,
               "sh", "-c", 'echo "$FROM_FILE $B $PASSED ${UNSET_HERE-unset}"; pwd; id -u; '
               "id -g; cat in.txt; touch /data/x 2>/dev/null || echo read-only; "
               "ls -d /made")
    assert proc.stdout.splitlines() == [
        "f 2 caller's unset", "/data", "1000", "1001", "from the host", "read-only", "/made"]
    assert (tmp_path / "made").is_dir()  # -v made the missing host directory, as docker
    # a user name comes from the image's own /etc/passwd
    proc = cli("run", "--rm", "-u", "app", IMG, "sh", "-c", "id -u; id -g; echo $HOME")
    assert proc.stdout.split() == ["4242", "4343", "/srv"]
    proc = cli("run", "--rm", "-u", "nobody-here", IMG, "true", check=False)
    assert proc.returncode == 3 and "nobody-here" in proc.stderr
    for bad in ("data:/data", "/only-one", f"{data}:/data:z"):
        proc = cli("run", "--rm", "-v", bad, IMG, "true", check=False)
        assert proc.returncode == 6 and proc.stderr.startswith("lamina: InvalidArgument: -v ")
    assert cli("run", "--rm", "-w", "relative", IMG, "true", check=False).returncode == 6


def test_a_missing_command_is_one_line_and_127(cli: Cli) -> None:
    proc = cli("run", "--rm", IMG, "nosuchcmd", check=False)
    assert proc.returncode == 127
    assert proc.stderr == ('lamina: NotFound: exec: "nosuchcmd": '
                           "executable file not found in $PATH\n")
    proc = cli("run", "--rm", IMG, "/etc/passwd", check=False)
    assert proc.returncode == 126
    assert proc.stderr == 'lamina: FailedPrecondition: exec: "/etc/passwd": permission denied\n'
    proc = cli("run", "--rm", "-w", "/bin", IMG, "./nothing", check=False)
    assert proc.returncode == 127 and proc.stderr.count("\n") == 1
    assert cli.containers() == {}  # --rm removed them


def test_names_generated_and_taken(cli: Cli) -> None:
    proc = cli("run", "-d", IMG, "sleep", "30")
    cid = proc.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", cid), proc.stdout
    assert cli.task(cid)["status"] == "running"  # type: ignore[index]
    # an ID in use is AlreadyExists, whichever command asks
    proc = cli("run", "--name", cid, IMG, "true", check=False)
    assert proc.returncode == 4 and proc.stderr.startswith("lamina: AlreadyExists: ")
    assert cli("container", "create", IMG, cid, check=False).returncode == 4
    assert cli.task(cid)["status"] == "running"  # type: ignore[index]
    cli("container", "rm", "--force", cid)
    # the command after the image is the container's, flags and all
    proc = cli("run", "--rm", "--name", "args", IMG, "echo", "-x", "--name", "y", "-v")
    assert proc.stdout == "-x --name y -v\n"
    wait_for(lambda: "args" not in cli.containers(), what="removal")


def test_rm_with_detach_removes_the_container_when_its_task_ends(cli: Cli) -> None:
    cid = cli("run", "-d", "--rm", IMG, "sh", "-c", "sleep 1; exit 4").stdout.strip()
    assert cid in cli.containers()
    wait_for(lambda: cid not in cli.containers(), what="removal after the task's end")
    assert cli.task(cid) is None
    assert f"lamina.revision.{cid}." not in cli("snapshot", "ls").stdout

    # ended from outside (task kill) counts; an upgrade's stop and restart does not
    cli("run", "-d", "--rm", "--name", "svc", IMG, "sh", "-c", IDLE)
    cli("container", "upgrade", "svc", IMG)
    assert cli.task("svc")["status"] == "running"  # type: ignore[index]
    assert "svc" in cli.containers()
    cli("container", "rm", "--force", "svc")
    cli("run", "-d", "--rm", "--name", "killed", IMG, "sh", "-c", IDLE)
    cli("task", "kill", "killed")
    wait_for(lambda: "killed" not in cli.containers(), what="removal after kill")
    assert cli("container", "rm", "--after-exit", "a", "b", check=False).returncode == 6


def test_the_terminal_has_its_size_from_the_start(cli: Cli) -> None:
    # runc's own resize comes after the process starts; the spec's consoleSize before
    for _ in range(3):
        term = Terminal(cli.root, "run", "-t", "--rm", IMG, "stty", "size")
        try:
            term.expect(rb"\d+ \d+\r\n")
            assert re.search(rb"(\d+ \d+)\r\n", term.seen).group(1) == b"40 100"  # type: ignore[union-attr]
            assert term.wait() == 0
        finally:
            term.close()
