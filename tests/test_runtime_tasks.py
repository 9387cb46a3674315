"""TaskManager against the real runc: foreground and detached tasks, exec,
pause/resume, kill, delete, bind mounts, image config, recovery by a new process.

Every test gets its own state directory under ``tmp_root``; the ``tm`` fixture
force-deletes whatever tasks are left (which unmounts their rootfs), and
``tmp_root`` lazily unmounts anything still below it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from conftest import mounts_under, require_root_user, require_tools
from imagefactory import minimal_rootfs

from lamina.containers.runtime import BindMount, Stdio, TaskManager, TaskStatus, generate_spec
from lamina.errors import AlreadyExists, FailedPrecondition, LaminaError, NotFound
from lamina.mounts.mount import Mount, mount_all, temp_mount

Rootfs = Callable[[str], list[Mount]]
"""The ``rootfs`` fixture: name -> mounts of a fresh writable rootfs."""

BINARIES = (
    "sh", "echo", "cat", "sleep", "seq", "ls", "touch", "mkdir", "rm", "true", "false",
    "env", "id", "pwd",
)  # fmt: skip
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\nstaff:x:50:app\napp:x:1000:\n"


@pytest.fixture(scope="session")
def rootfs_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny rootfs of host binaries, shared read-only by every task (as an overlay lower)."""
    root = minimal_rootfs(tmp_path_factory.mktemp("runtime-rootfs") / "rootfs", BINARIES)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    for d in ("data", "home/app", "srv/www"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chown(root / "home/app", 1000, 1000)
    return root


@pytest.fixture
def tm(tmp_root: Path) -> Iterator[TaskManager]:
    require_root_user()
    require_tools("runc")
    manager = TaskManager(tmp_root / "tasks")
    try:
        yield manager
    finally:
        problems: list[str] = []
        for info in manager.list():
            try:
                manager.delete(info.id, force=True)
            except LaminaError as exc:  # keep cleaning the others
                problems.append(f"{info.id}: {exc}")
        for state in manager.runc.list():
            subprocess.run(
                manager.runc.argv("delete", "--force", str(state["id"])),
                capture_output=True,
                check=False,
            )
            problems.append(f"runc container {state['id']} had no bundle")
        assert not problems, problems


@pytest.fixture
def rootfs(tmp_root: Path, rootfs_src: Path) -> Callable[[str], list[Mount]]:
    """Mounts of a fresh writable rootfs: an overlay on the shared tiny rootfs."""

    def make(name: str) -> list[Mount]:
        upper = tmp_root / "layers" / name / "upper"
        work = tmp_root / "layers" / name / "work"
        upper.mkdir(parents=True)
        work.mkdir(parents=True)
        return [
            Mount(
                "overlay",
                "overlay",
                options=(f"lowerdir={rootfs_src}", f"upperdir={upper}", f"workdir={work}"),
            )
        ]

    return make


def spec_for(cmd: Sequence[str], **kw: object) -> dict[str, object]:
    config = kw.pop("config", {})
    assert isinstance(config, dict)
    return generate_spec({"config": {"Cmd": list(cmd), **config}}, **kw)  # type: ignore[arg-type]


def to_fd(fd: int) -> Stdio:
    """No input; output and errors to ``fd``."""
    return Stdio(stdin=subprocess.DEVNULL, stdout=fd, stderr=fd)


def capture(fn: Callable[[int], object]) -> tuple[object, str]:
    """Call ``fn(fd)`` with a temp file's fd as stdout/stderr; its result and what it wrote."""
    with tempfile.TemporaryFile() as f:
        result = fn(f.fileno())
        f.seek(0)
        return result, f.read().decode()


def wait_for(pred: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# --------------------------------------------------------------------------- foreground


def test_foreground_echo_and_exit_codes(tm: TaskManager, rootfs: Rootfs) -> None:
    task, out = capture(
        lambda fd: tm.start(
            "echo", rootfs("echo"), spec_for(["echo", "hello"]), detach=False,
            stdio=to_fd(fd),
        )
    )  # fmt: skip
    assert out == "hello\n"
    info = tm.state("echo")
    assert info.status == TaskStatus.STOPPED and info.exit_code == 0
    assert task == info
    bundle = info.bundle
    assert (bundle / "rootfs" / "bin" / "sh").exists()  # mounted until delete
    final = tm.delete("echo")
    assert final.exit_code == 0
    assert not bundle.exists()
    assert not mounts_under(bundle.parent)
    with pytest.raises(NotFound):
        tm.state("echo")

    task, out = capture(
        lambda fd: tm.start(
            "fail", rootfs("fail"), spec_for(["sh", "-c", "echo oops >&2; exit 7"]),
            detach=False, stdio=to_fd(fd),
        )
    )  # fmt: skip
    assert out == "oops\n"
    assert tm.state("fail").exit_code == 7
    tm.delete("fail")


def test_missing_executable_fails_cleanly(
    tm: TaskManager, rootfs: Rootfs
) -> None:
    with pytest.raises(NotFound, match="nope"):
        tm.start("nope", rootfs("nope"), spec_for(["/bin/nope"]), detach=False,
                 stdio=to_fd(subprocess.DEVNULL))
    with pytest.raises(NotFound):
        tm.start("nope2", rootfs("nope2"), spec_for(["/bin/nope"]), detach=True)
    assert tm.list() == []
    assert not mounts_under(tm.state_dir)


# --------------------------------------------------------------------------- detached


def test_detached_lifecycle(tm: TaskManager, rootfs: Rootfs) -> None:
    task = tm.start(
        "sleeper", rootfs("sleeper"), spec_for(["sh", "-c", "echo up; exec sleep 300"]),
        detach=True,
    )  # fmt: skip
    assert task.status == TaskStatus.RUNNING and task.pid
    assert Path(f"/proc/{task.pid}").exists()
    wait_for(lambda: tm.output_path("sleeper").read_text() == "up\n")

    assert task.pid in tm.ps("sleeper")
    assert [t.id for t in tm.list()] == ["sleeper"]
    assert tm.list()[0].status == TaskStatus.RUNNING

    with pytest.raises(AlreadyExists):
        tm.start("sleeper", rootfs("sleeper2"), spec_for(["true"]), detach=True)

    tm.pause("sleeper")
    assert tm.state("sleeper").status == TaskStatus.PAUSED
    with open(f"/proc/{task.pid}/status") as f:
        assert any(line.startswith("State:") for line in f)
    tm.resume("sleeper")
    assert tm.state("sleeper").status == TaskStatus.RUNNING

    with pytest.raises(FailedPrecondition):
        tm.delete("sleeper")

    tm.kill("sleeper", "KILL")
    assert tm.wait("sleeper", timeout=10) == 137
    info = tm.state("sleeper")
    assert info.status == TaskStatus.STOPPED and info.exit_code == 137 and info.pid is None
    assert tm.ps("sleeper") == []
    with pytest.raises(FailedPrecondition):
        tm.kill("sleeper", "TERM")
    with pytest.raises(FailedPrecondition):
        tm.pause("sleeper")
    bundle = info.bundle
    tm.delete("sleeper")
    assert not bundle.exists()


def test_detached_exit_code_and_output(tm: TaskManager, rootfs: Rootfs) -> None:
    tm.start(
        "quick", rootfs("quick"),
        spec_for(["sh", "-c", "sleep 0.3; echo out; echo err >&2; exit 3"]), detach=True,
    )  # fmt: skip
    assert tm.wait("quick", timeout=10) == 3
    assert sorted(tm.output_path("quick").read_text().split()) == ["err", "out"]
    assert tm.state("quick").exit_code == 3


def test_term_with_a_handler_and_kill_all(tm: TaskManager, rootfs: Rootfs) -> None:
    script = "trap 'echo bye; exit 42' TERM; echo ready; while true; do sleep 0.1; done"
    tm.start("trap", rootfs("trap"), spec_for(["sh", "-c", script]), detach=True)
    wait_for(lambda: "ready" in tm.output_path("trap").read_text())
    tm.kill("trap")  # SIGTERM by default
    assert tm.wait("trap", timeout=10) == 42
    assert "bye" in tm.output_path("trap").read_text()

    tm.start("many", rootfs("many"), spec_for(["sh", "-c", "sleep 300 & sleep 300 & wait"]),
             detach=True)
    wait_for(lambda: len(tm.ps("many")) == 3)
    tm.kill("many", 9, all=True)
    tm.wait("many", timeout=10)
    assert tm.ps("many") == []


def test_half_created_bundle_is_replaced(tm: TaskManager, rootfs: Rootfs, tmp_root: Path) -> None:
    # a start that died after mounting the rootfs but before writing meta.json
    stale = tm.bundle("stale")
    (stale / "rootfs").mkdir(parents=True)
    (tmp_root / "junk").mkdir()
    mount_all([Mount("bind", str(tmp_root / "junk"), options=("bind",))], stale / "rootfs")
    assert tm.list() == []
    with pytest.raises(NotFound):
        tm.state("stale")
    tm.start("stale", rootfs("stale"), spec_for(["true"]), detach=False,
             stdio=Stdio(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
    assert tm.state("stale").exit_code == 0
    assert (tmp_root / "junk").exists()


def test_unknown_task_is_not_found(tm: TaskManager) -> None:
    for op in (tm.state, tm.pause, tm.resume, tm.ps, tm.kill, tm.delete, tm.wait):
        with pytest.raises(NotFound):
            op("ghost")
    with pytest.raises(NotFound):
        tm.exec("ghost", ["true"])


# --------------------------------------------------------------------------- exec


def test_exec(tm: TaskManager, rootfs: Rootfs) -> None:
    tm.start("host", rootfs("host"),
             spec_for(["sleep", "300"], config={"Env": ["FROM_IMAGE=1"]}), detach=True)
    code, out = capture(
        lambda fd: tm.exec("host", ["sh", "-c", "echo $FROM_IMAGE $EXTRA; pwd; id -u; exit 5"],
                           env=["EXTRA=x"], cwd="/tmp", user="app",
                           stdio=to_fd(fd))
    )  # fmt: skip
    assert code == 5
    assert out.split() == ["1", "x", "/tmp", "1000"]
    code, out = capture(
        lambda fd: tm.exec("host", ["cat", "/proc/1/cmdline"],
                           stdio=Stdio(stdin=subprocess.DEVNULL, stdout=fd))
    )
    assert code == 0 and out.split("\0")[:2] == ["sleep", "300"]
    with pytest.raises(NotFound):
        tm.exec("host", ["/bin/nothere"], stdio=to_fd(subprocess.DEVNULL))
    tm.kill("host", "KILL")
    tm.wait("host", timeout=10)
    with pytest.raises(FailedPrecondition):
        tm.exec("host", ["true"])


# --------------------------------------------------------------------------- spec effects


def test_image_config_env_cwd_user(tm: TaskManager, rootfs: Rootfs) -> None:
    mounts = rootfs("user")
    with temp_mount(mounts) as root:  # resolve names from the image's own /etc files
        spec = generate_spec(
            {"config": {
                "Entrypoint": ["sh", "-c"],
                "Cmd": ["echo $GREETING; pwd; id -u; id -g; id -G; echo $HOME"],
                "Env": ["GREETING=hi there"],
                "WorkingDir": "/home/app",
                "User": "app",
            }},
            rootfs=root,
        )  # fmt: skip
    _, out = capture(lambda fd: tm.start("user", mounts, spec, detach=False,
                                         stdio=to_fd(fd)))
    assert out.splitlines() == ["hi there", "/home/app", "1000", "1000", "1000 50", "/home/app"]
    assert tm.state("user").exit_code == 0


def test_isolation_defaults(tm: TaskManager, rootfs: Rootfs) -> None:
    script = (
        'while read -r l; do case $l in *:*) echo "${l%%:*}";; esac; done < /proc/net/dev; '
        "cat /proc/sys/kernel/hostname; echo pid=$$; "
        "echo $(ls /dev); "
        "touch /sys/x 2>/dev/null || echo sys-ro; "
        "[ -s /proc/kcore ] && echo kcore-visible || echo kcore-masked"
    )
    _, out = capture(lambda fd: tm.start(
        "iso", rootfs("iso"), spec_for(["sh", "-c", script], hostname="boxy"), detach=False,
        stdio=to_fd(fd)))  # fmt: skip
    lines = [ln.strip() for ln in out.splitlines()]
    assert lines[0] == "lo"  # a fresh network namespace: loopback only
    assert lines[1] == "boxy"
    assert lines[2] == "pid=1"
    devs = set(lines[3].split())
    assert {"null", "zero", "pts", "shm", "mqueue"} <= devs
    assert lines[4] == "sys-ro"
    assert lines[5] == "kcore-masked"


def test_bind_mounts(tm: TaskManager, rootfs: Rootfs, tmp_path: Path) -> None:
    rw = tmp_path / "rw"
    ro = tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "index.html").write_text("<h1>hi</h1>\n")
    spec = spec_for(
        ["sh", "-c", "cat /srv/www/index.html; echo written > /data/out; "
                     "(echo no > /srv/www/x) 2>/dev/null || echo ro-ok"],
        mounts=[BindMount(str(rw), "/data"), BindMount(str(ro), "/srv/www", readonly=True)],
    )  # fmt: skip
    _, out = capture(lambda fd: tm.start("binds", rootfs("binds"), spec, detach=False,
                                         stdio=to_fd(fd)))
    assert out.splitlines() == ["<h1>hi</h1>", "ro-ok"]
    assert (rw / "out").read_text() == "written\n"
    assert not (ro / "x").exists()


def test_rootfs_from_a_real_snapshotter(tm: TaskManager, tmp_root: Path, rootfs_src: Path) -> None:
    from lamina.metadata.root import Root

    root = Root(tmp_root / "lamina")
    try:
        sn = root.snapshotter("overlay")
        with temp_mount(sn.prepare("extract", "")) as target:
            shutil.copytree(rootfs_src, target, symlinks=True, dirs_exist_ok=True)
        sn.commit("base", "extract")
        mounts = sn.prepare("ctr", "base")
        _, out = capture(lambda fd: tm.start(
            "snap", mounts, spec_for(["sh", "-c", "echo changed > /data/file; ls /bin/sh"]),
            detach=False, stdio=to_fd(fd)))  # fmt: skip
        assert out == "/bin/sh\n"
        tm.delete("snap")
        # the change is in the active snapshot, not in its parent
        with temp_mount(sn.mounts("ctr")) as target:
            assert Path(target, "data", "file").read_text() == "changed\n"
        with temp_mount(sn.view("look", "base")) as target:
            assert not Path(target, "data", "file").exists()
    finally:
        root.close()


# --------------------------------------------------------------------------- other processes


def test_detached_task_outlives_its_starter_and_is_recovered(
    tm: TaskManager, rootfs: Rootfs
) -> None:
    mounts = rootfs("survivor")
    script = textwrap.dedent(
        """
        import json, sys
        from lamina.containers.runtime import TaskManager
        from lamina.mounts.mount import Mount
        m = [Mount(**{**d, "options": tuple(d["options"])}) for d in json.loads(sys.argv[2])]
        tm = TaskManager(sys.argv[1])
        spec = json.loads(sys.argv[3])
        task = tm.start("survivor", m, spec, detach=True)
        print(task.pid)
        """
    )
    mounts_json = json.dumps(
        [{"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)}
         for m in mounts]
    )  # fmt: skip
    spec = spec_for(["sh", "-c", "trap 'exit 9' TERM; while true; do sleep 0.1; done"])
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tm.state_dir), mounts_json, json.dumps(spec)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.strip())

    fresh = TaskManager(tm.state_dir)  # knows nothing but the state directory
    info = fresh.state("survivor")
    assert info.status == TaskStatus.RUNNING and info.pid == pid and info.detached
    assert pid in fresh.ps("survivor")
    fresh.kill("survivor", "TERM")
    assert fresh.wait("survivor", timeout=10) == 9  # the shim recorded it
    fresh.delete("survivor")
    assert tm.list() == []


def test_concurrent_managers_use_distinct_cgroups(tmp_root: Path) -> None:
    require_tools("runc")
    a = TaskManager(tmp_root / "a")
    b = TaskManager(tmp_root / "b")
    assert a.cgroups_path("x") != b.cgroups_path("x")
    assert a.runc.root != b.runc.root


def test_shim_log_closed_under_a_stray_writer_drops_its_output(tmp_path: Path) -> None:
    """The shim closes its log after waiting (bounded) for the copiers; a copier a
    stray writer keeps alive must not write to the closed descriptor (EBADF, or a
    file that reused its number) nor close it twice."""
    from lamina.containers.runtime.shim import _Log

    log = _Log(str(tmp_path / "log"), limit=0)
    log.write(b"before\n")
    log.close()
    reused = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        log.write(b"after\n")
        log.close()
        os.fstat(reused)  # still open: the second close closed nothing
    finally:
        os.close(reused)
    assert (tmp_path / "log").read_bytes() == b"before\n"
    assert (tmp_path / "other").read_bytes() == b""
