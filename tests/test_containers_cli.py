"""``lamina container``/``run``/``task`` end to end, with the real runc.

Two versions of a tiny image (host binaries from ``minimal_rootfs``): ``v2``
adds ``/etc/version``. Every test works on its own root through the command
line (a fresh Python process per command, as a user would run it); the
``cli`` fixture force-deletes whatever tasks a test leaves behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import mounts_under, require_root_user, require_tools
from imagefactory import (
    File,
    ImageConfig,
    build_oci_layout,
    layer_from_dir,
    layer_from_entries,
    minimal_rootfs,
)

from lamina.containers.runtime import TaskManager
from lamina.errors import LaminaError

BINARIES = (
    "sh", "echo", "cat", "sleep", "ls", "touch", "mkdir", "rm", "true", "false", "env", "id",
)  # fmt: skip
V1 = "test/app:v1"
V2 = "test/app:v2"
V_USER = "test/app:user"  # runs as "app", a user only the image's /etc/passwd knows

# a task that stops promptly on SIGTERM (sh as pid 1 ignores signals it has no trap for)
IDLE = "trap 'exit 0' TERM; while true; do sleep 0.1; done"


@pytest.fixture(scope="session")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout with V1 (the tiny rootfs) and V2 (plus /etc/version)."""
    base = tmp_path_factory.mktemp("containers-image")
    rootfs = minimal_rootfs(base / "rootfs", BINARIES)
    (rootfs / "srv").mkdir()
    base_layer = layer_from_dir(rootfs, base / "blobs")
    extra = layer_from_entries([File("etc/version", b"v2\n")], base / "blobs")
    build_oci_layout(base / "oci", [base_layer], ref_name=V1)
    build_oci_layout(base / "oci", [base_layer, extra], ref_name=V2)
    users = layer_from_entries([
        File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:4242:4343:app:/srv:/bin/sh\n"),
        File("etc/group", b"root:x:0:\napp:x:4343:\nextra:x:5151:app\n"),
    ], base / "blobs")
    build_oci_layout(base / "oci", [base_layer, users], ref_name=V_USER,
                     config=ImageConfig(cmd=["sh", "-c", "id -u; id -g; id -G; echo $HOME"],
                                        user="app"))
    return base / "oci"


@dataclass
class Cli:
    """Runs ``lamina --root ROOT ...`` in a child process."""

    root: Path
    roots: list[Path] = field(default_factory=list)

    def __call__(self, *args: str, check: bool = True, timeout: float = 120,
                 root: Path | None = None) -> subprocess.CompletedProcess[str]:
        use = root or self.root
        if use not in self.roots:
            self.roots.append(use)
        argv = [sys.executable, "-c", "import sys; from lamina.cli import main; sys.exit(main())",
                "--root", str(use), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"lamina {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def terminated_when(self, *args: str, ready: Callable[[], Any],
                        timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``lamina ARGS`` started in the background and sent SIGTERM as soon as
        ``ready()`` (polled without a pause) is true — or once it has ended."""
        argv = [sys.executable, "-c", "import sys; from lamina.cli import main; sys.exit(main())",
                "--root", str(self.root), *args]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and not ready():
                assert time.monotonic() < deadline, f"lamina {' '.join(args)}: never ready"
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def json(self, *args: str, root: Path | None = None) -> Any:
        return json.loads(self(*args, root=root).stdout)

    def task(self, cid: str, root: Path | None = None) -> dict[str, Any] | None:
        tasks = {t["id"]: t for t in self.json("task", "ls", "--json", root=root)}
        return tasks.get(cid)

    def containers(self, root: Path | None = None) -> dict[str, Any]:
        return {c["id"]: c for c in self.json("container", "ls", "--json", root=root)}


def cleanup_tasks(root: Path) -> list[str]:
    """Force-delete every task under ``root``; what could not be deleted."""
    problems: list[str] = []
    if not (root / "tasks").exists():
        return problems
    tm = TaskManager(root / "tasks")
    for info in tm.list():
        try:
            tm.delete(info.id, force=True)
        except LaminaError as exc:
            problems.append(f"{info.id}: {exc}")
    return problems


@pytest.fixture
def cli(tmp_root: Path, layout: Path) -> Iterator[Cli]:
    """A root with both image versions imported; tasks are force-deleted afterwards."""
    require_root_user()
    require_tools("runc")
    c = Cli(tmp_root / "root")
    try:
        c("image", "import", str(layout))
        yield c
    finally:
        problems = [p for r in c.roots for p in cleanup_tasks(r)]
        assert not problems, problems


def wait_for(pred: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- run


def test_run_foreground_streams_output_and_exit_code(cli: Cli) -> None:
    proc = cli("run", "--name", "fg", V1,
               "sh", "-c", "echo to-out; echo to-err >&2; ls /srv; exit 0")
    assert proc.stdout.split() == ["to-out"]
    assert "to-err" in proc.stderr
    # the task is gone once run returns, the container stays
    assert cli.task("fg") is None
    assert "fg" in cli.containers()

    proc = cli("run", "--name", "bad", V1, "sh", "-c", "echo failing; exit 42", check=False)
    assert proc.returncode == 42, proc.stderr
    assert proc.stdout.strip() == "failing"

    # a stopped container starts again (same command, same filesystem)
    proc = cli("task", "start", "bad", check=False)
    assert proc.returncode == 42 and proc.stdout.strip() == "failing"

    # an unknown command: an error from lamina, not a hang
    proc = cli("run", "--name", "nocmd", V1, "/bin/does-not-exist", check=False)
    assert proc.returncode != 0 and "does-not-exist" in proc.stderr


def test_a_terminated_run_passes_the_signal_on_and_ends_its_task(cli: Cli) -> None:
    """SIGTERM (as ``kill`` or ``timeout`` send it) to a foreground ``lamina run``:
    the container gets it, lamina waits for its end and exits 143 — where Python's
    default killed lamina at once and left runc and the container running."""
    proc = cli.terminated_when(
        "run", "--name", "fg-term", V1, "sh", "-c",
        "trap 'echo got-term; exit 3' TERM; echo started; while :; do sleep 0.1; done",
        ready=lambda: (t := cli.task("fg-term")) and t["status"] == "running", timeout=30)
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == "lamina: terminated (SIGTERM)", proc.stderr
    assert proc.stdout.split() == ["started", "got-term"], proc.stdout
    task = cli.task("fg-term")
    assert task is None or task["status"] == "stopped", task


def test_an_image_cannot_write_to_the_terminal_through_an_error(
        cli: Cli, tmp_path: Path) -> None:
    # A hostile image's entrypoint names a program of terminal control sequences
    # (set the window title, clear the screen); runc's "not found" quotes it,
    # escaped, and lamina unescaped it into its error line: the terminal obeyed.
    rootfs = minimal_rootfs(tmp_path / "rootfs", ("sh",))
    hostile = "/bin/\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil"
    build_oci_layout(tmp_path / "oci", [layer_from_dir(rootfs, tmp_path / "blobs")],
                     ref_name="test/hostile:1", config=ImageConfig(entrypoint=[hostile]))
    cli("image", "import", str(tmp_path / "oci"))
    proc = cli("run", "--rm", "--name", "hostile", "test/hostile:1", check=False)
    assert proc.returncode != 0
    line = proc.stderr.strip()
    assert line.startswith("lamina: ") and "\n" not in line, proc.stderr
    assert line.isprintable(), repr(line)  # no control character reaches the terminal
    assert "owned" in line and "evil" in line, line  # the name is still told, escaped


def test_run_rm_removes_container_and_snapshots(cli: Cli) -> None:
    proc = cli("run", "--rm", "--name", "gone", V1, "sh", "-c", "echo bye; exit 3", check=False)
    assert proc.returncode == 3 and proc.stdout.strip() == "bye"
    assert "gone" not in cli.containers()
    assert cli.task("gone") is None
    snaps = cli("snapshot", "ls").stdout
    assert "lamina.revision.gone." not in snaps
    # nor a lock file of its task or network: there is no end of container names
    root = cli.roots[0]
    assert not [p for p in root.rglob(".locks/*") if "gone" in p.name]


def test_run_detached_logs_and_task_verbs(cli: Cli) -> None:
    proc = cli("run", "-d", "--name", "bg", V1, "sh", "-c",
               "echo started; trap 'echo bye; exit 9' TERM; "
               "while true; do sleep 0.1; done")
    assert proc.stdout == "bg\n"  # the container's ID, as nerdctl prints it
    task = cli.task("bg")
    assert task is not None and task["status"] == "running"
    pid = task["pid"]
    assert str(pid) in cli("task", "ps", "bg").stdout.split()
    wait_for(lambda: "started" in cli("task", "logs", "bg").stdout, what="output")

    assert cli("task", "exec", "bg", "cat", "/etc/passwd").stdout.startswith("root:")
    assert cli("task", "exec", "bg", "sh", "-c", "exit 5", check=False).returncode == 5

    cli("task", "pause", "bg")
    assert cli.task("bg")["status"] == "paused"  # type: ignore[index]
    cli("task", "resume", "bg")
    assert cli.task("bg")["status"] == "running"  # type: ignore[index]

    # a live task is not deleted without --force
    assert cli("task", "delete", "bg", check=False).returncode == 5
    cli("task", "kill", "bg")
    assert cli("task", "wait", "--timeout", "10", "bg", check=False).returncode == 9
    assert "bye" in cli("task", "logs", "bg").stdout
    assert cli("task", "delete", "bg").stdout.split() == ["bg", "9"]
    assert cli.task("bg") is None

    # start -d again; kill --all with a signal name
    cli("task", "start", "-d", "bg")
    cli("task", "kill", "--signal", "KILL", "--all", "bg")
    assert cli("task", "wait", "--timeout", "10", "bg", check=False).returncode == 137
    cli("task", "delete", "bg")


def test_create_options_labels_and_info(cli: Cli, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    cli("container", "create", "--label", "team=infra", "--env", "GREETING=hi there",
        "--mount", f"type=bind,src={data},dst=/data", V1, "opts",
        "sh", "-c", 'echo "$GREETING"; cat /data/in.txt; echo out > /data/out.txt')
    info = cli.json("container", "info", "opts")
    assert info["id"] == "opts" and info["image"] == V1
    assert info["labels"] == {"team": "infra"}
    assert info["options"]["env"] == ["GREETING=hi there"]
    assert info["options"]["mounts"] == [
        {"source": str(data), "destination": "/data", "readonly": False}]
    assert info["task"] is None

    proc = cli("task", "start", "opts")
    assert proc.stdout.splitlines() == ["hi there", "from the host"]
    assert (data / "out.txt").read_text() == "out\n"
    # the generated runtime spec is recorded with the container
    spec = cli.json("container", "info", "opts")["spec"]
    assert spec["process"]["args"][:2] == ["sh", "-c"]
    assert "GREETING=hi there" in spec["process"]["env"]
    assert any(m["destination"] == "/data" and m["source"] == str(data) for m in spec["mounts"])
    assert spec["annotations"]["lamina.io/options"]["env"] == ["GREETING=hi there"]

    listing = cli("container", "ls").stdout
    assert "opts" in listing and V1 in listing
    assert cli("container", "create", V1, "opts", check=False).returncode == 4  # exists
    assert cli("container", "create", "no/such:image", "x", check=False).returncode == 3


def test_image_user_names_resolve_in_the_image(cli: Cli) -> None:
    # no such user on the host: the name must come from the image's own passwd
    proc = cli("run", "--rm", "--name", "who", V_USER)
    assert proc.stdout.split() == ["4242", "4343", "4343", "5151", "/srv"]
    cli("container", "create", V_USER, "who2", "sh", "-c", "id -un 2>/dev/null; id -u")
    assert cli("task", "start", "who2").stdout.split()[-1] == "4242"
    assert cli.json("container", "info", "who2")["spec"]["process"]["user"] == {
        "uid": 4242, "gid": 4343, "additionalGids": [5151]}
    assert not mounts_under(cli.root / "tmpmounts")  # the temporary rootfs mount is gone


# --------------------------------------------------------------------------- revisions


def test_upgrade_keeps_writes_rollback_and_prune(cli: Cli) -> None:
    cli("run", "-d", "--name", "app", V1, "sh", "-c", IDLE)
    cli("task", "exec", "app", "sh", "-c", "echo kept > /root/mine")
    assert cli("task", "exec", "app", "cat", "/etc/version", check=False).returncode != 0

    t0 = time.monotonic()
    out = cli("container", "upgrade", "app", V2).stdout.split()
    print(f"\nupgrade of a running container took {time.monotonic() - t0:.2f}s")
    assert out[:2] == ["app", V2]
    # restarted (detached) on the new revision
    task = cli.task("app")
    assert task is not None and task["status"] == "running"
    assert cli("task", "exec", "app", "cat", "/root/mine").stdout == "kept\n"
    assert cli("task", "exec", "app", "cat", "/etc/version").stdout == "v2\n"
    cli("task", "exec", "app", "sh", "-c", "echo later > /root/v2-only")

    revs = cli.json("container", "revisions", "--json", "app")
    assert [r["image"] for r in revs] == [V1, V2]
    assert [r["current"] for r in revs] == [False, True]
    assert revs[1]["previous"] == revs[0]["key"]
    assert "*" in cli("container", "revisions", "app").stdout

    out = cli("container", "rollback", "app").stdout.split()
    assert out[:3] == ["app", V1, revs[0]["key"]]
    assert cli.task("app")["status"] == "running"  # type: ignore[index]
    # the old image's files, with that revision's own writes
    assert cli("task", "exec", "app", "cat", "/root/mine").stdout == "kept\n"
    assert cli("task", "exec", "app", "ls", "/root/v2-only", check=False).returncode != 0
    assert cli("task", "exec", "app", "cat", "/etc/version", check=False).returncode != 0
    assert cli("container", "info", "app").stdout.count(V1) >= 1

    # upgrade again (from the rolled-back revision): three revisions
    cli("container", "upgrade", "app", V2)
    revs = cli.json("container", "revisions", "--json", "app")
    assert len(revs) == 3 and revs[-1]["current"]
    assert revs[-1]["previous"] == revs[0]["key"]

    removed = cli("container", "prune-revisions", "app", "--keep", "1").stdout.split()
    assert sorted(removed) == sorted(r["key"] for r in revs[:2])
    left = cli.json("container", "revisions", "--json", "app")
    assert [r["key"] for r in left] == [revs[-1]["key"]]
    # nothing to roll back to any more
    proc = cli("container", "rollback", "app", check=False)
    assert proc.returncode == 5 and "previous" in proc.stderr
    assert cli("task", "exec", "app", "cat", "/root/mine").stdout == "kept\n"
    cli("container", "rm", "--force", "app")


def test_upgrade_of_a_stopped_container_does_not_start_it(cli: Cli) -> None:
    cli("container", "create", V1, "idle", "sh", "-c", "cat /etc/version")
    cli("container", "upgrade", "idle", V2)
    assert cli.task("idle") is None
    assert cli("task", "start", "idle").stdout == "v2\n"
    assert cli("container", "upgrade", "idle", "no/such:image", check=False).returncode == 3


# --------------------------------------------------------------------------- rm


def test_rm_refuses_running_then_force(cli: Cli) -> None:
    cli("run", "-d", "--name", "busy", V1, "sh", "-c", IDLE)
    key = cli.json("container", "info", "busy")["snapshot_key"]
    proc = cli("container", "rm", "busy", check=False)
    assert proc.returncode == 5 and "--force" in proc.stderr
    assert cli.task("busy")["status"] == "running"  # type: ignore[index]

    cli("container", "rm", "--force", "busy")
    assert "busy" not in cli.containers()
    assert cli.task("busy") is None
    assert not mounts_under(cli.root / "tasks")
    assert key not in cli("snapshot", "ls").stdout
    assert cli("container", "rm", "busy", check=False).returncode == 3

    # a stopped task goes without --force; several ids at once
    cli("container", "create", V1, "a", "true")
    cli("container", "create", V1, "b", "true")
    cli("run", "-d", "--name", "c", V1, "true")
    wait_for(lambda: (cli.task("c") or {}).get("status") == "stopped", what="c to stop")
    cli("container", "rm", "a", "b", "c")
    assert cli.containers() == {}
    assert cli.json("task", "ls", "--json") == []
    runc_state = cli.root / "tasks" / "runc"
    assert not runc_state.exists() or not os.listdir(runc_state)
