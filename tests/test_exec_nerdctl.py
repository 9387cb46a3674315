"""``lamina exec`` in docker's and nerdctl's form, as a person types it.

``lamina exec [-i] [-t] [-e K=V] [-w DIR] [-u USER] [-d] ID CMD...`` in a
container that ``lamina run -d`` left idle, run as a process (on a
pseudo-terminal for ``-t``) with the real runc: the exit code is the
command's, a missing command is one line and 127, a missing container is
NotFound (3).
"""

from __future__ import annotations

import subprocess
import sys
import termios
from collections.abc import Iterator

import pytest
from test_containers_cli import IDLE, Cli, wait_for
from test_run_nerdctl import IMG, Terminal, cli, layout

__all__ = ["cli", "layout"]  # the fixtures, used by name


@pytest.fixture
def idle(cli: Cli) -> Iterator[Cli]:
    cli("run", "-d", "--name", "x", IMG, "sh", "-c", IDLE)
    try:
        yield cli
    finally:
        cli("container", "rm", "-f", "x", check=False)


def test_it_gives_a_shell_a_terminal(idle: Cli) -> None:
    term = Terminal(idle.root, "exec", "-it", "-e", "A=1", "x", "sh")
    try:
        term.expect(rb"# $")
        term.send(b"echo hi-$A; stty size; tty\n")
        out = term.expect(rb"/dev/pts/\d+\r\n")
        assert b"hi-1\r\n" in out and b"40 100\r\n" in out
        term.send(b"exit 3\n")
        assert term.wait() == 3
        assert termios.tcgetattr(term.slave) == term.cooked
    finally:
        term.close()


def test_exec_runs_a_command_and_returns_its_code(idle: Cli) -> None:
    assert idle("exec", "x", "echo", "hi").stdout == "hi\n"
    done = idle("exec", "-w", "/srv", "-u", "app", "x", "sh", "-c", "pwd; id -u; exit 5",
                check=False)
    assert (done.returncode, done.stdout.split()) == (5, ["/srv", "4242"])
    # the task form has the same flags
    assert idle("task", "exec", "-e", "B=2", "x", "sh", "-c", "echo $B").stdout == "2\n"


def test_stdin_is_attached_only_with_i(idle: Cli) -> None:
    argv = [sys.executable, "-m", "lamina", "--root", str(idle.root), "exec"]
    for flags, out in (([], ""), (["-i"], "data\n")):
        done = subprocess.run([*argv, *flags, "x", "cat"], input="data\n", text=True,
                              capture_output=True, timeout=120)
        assert (done.returncode, done.stdout) == (0, out)


def test_detached_exec_returns_at_once(idle: Cli) -> None:
    assert idle("exec", "-d", "x", "touch", "/tmp/done").stdout == ""
    wait_for(lambda: idle("exec", "x", "ls", "/tmp/done", check=False).returncode == 0)


def test_errors_are_one_line(idle: Cli) -> None:
    missing = idle("exec", "x", "nothere", check=False)
    assert missing.returncode == 127
    assert missing.stderr.splitlines() == [
        'lamina: NotFound: exec: "nothere": executable file not found in $PATH']
    ghost = idle("exec", "ghost", "true", check=False)
    assert ghost.returncode == 3 and len(ghost.stderr.splitlines()) == 1, ghost.stderr
    assert ghost.stderr.startswith("lamina: NotFound:")
    both = idle("exec", "-d", "-t", "x", "sh", check=False)
    assert both.returncode == 8
