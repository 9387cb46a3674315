"""``lamina rootless stop`` as a real unprivileged user (test_rootless's user):
it refuses while another process is in the namespace, ends the holder and says
which mounts went with it, and the next command makes a new namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_rootless import User, user

__all__ = ["user"]  # the fixture, shared with test_rootless

# a process that joins the user's namespace as every lamina command does, and stays
STAY = "from lamina import rootless; rootless.enter(); print('in', flush=True); " \
       "import time; time.sleep(60)"


def test_stop_refuses_while_others_are_in_the_namespace_then_ends_it(user: User) -> None:
    u = user
    u.lamina("snapshot", "prepare", "stop-a")
    target = u.home / "stop-mnt"
    u.run("mkdir", "-p", str(target))
    u.lamina("snapshot", "mount", str(target), "stop-a")
    holder = u.holder()
    assert holder is not None

    stay = subprocess.Popen([u.python, "-c", STAY], user=u.uid, group=u.gid, extra_groups=[],
                            env=u.env(), cwd=u.home, stdout=subprocess.PIPE, text=True)
    try:
        assert stay.stdout is not None and stay.stdout.readline() == "in\n"
        refused = u.lamina("rootless", "stop", check=False)
        assert refused.returncode == 5, refused.stderr
        assert refused.stderr.startswith("lamina: FailedPrecondition: 1 other process(es) "
                                          f"run in lamina's namespace (holder pid {holder}): "
                                          f"{stay.pid} (")
        assert refused.stderr.count("\n") == 1
        assert u.holder() == holder
    finally:
        stay.send_signal(signal.SIGKILL)
        stay.wait()

    done = u.lamina("rootless", "stop")
    # (other tests' mounts, copied when the namespace was made and gone from the
    # host since, may be listed too)
    assert done.stdout.startswith(f"stopped lamina's namespace holder (pid {holder}); ")
    assert " mount(s) only it had went with it: " in done.stdout
    assert str(target) in done.stdout.split(": ", 1)[1].strip().split(", ")
    assert u.holder() is None
    assert _gone(holder)
    assert not Path(f"/tmp/lamina-{u.uid}/ns.pid").exists()
    assert u.lamina("rootless", "stop").stdout == "no namespace holder to stop\n"

    # the next command makes a new namespace, where the old mount is not
    u.lamina("snapshot", "ls")
    again = u.holder()
    assert again is not None and again != holder
    assert str(target) not in Path(f"/proc/{again}/mountinfo").read_text()
    u.lamina("snapshot", "rm", "stop-a")


def _gone(pid: int) -> bool:
    for _ in range(100):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def test_root_has_no_holder_to_stop() -> None:
    if os.geteuid() != 0:
        return
    done = subprocess.run([sys.executable, "-m", "lamina", "rootless", "stop"],
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (0, "no namespace holder to stop\n")
