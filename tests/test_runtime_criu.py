"""Checkpoint/restore of tasks with the real runc and CRIU.

A shell loop counts into a bind-mounted file; after a checkpoint and a
restore it must go on counting from (at least) where it was dumped, in the
same process (same in-container pid, same shell variable).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_runtime_tasks as shared
from conftest import require_root_user, require_tools

from lamina.containers.runtime import BindMount, TaskManager, TaskStatus, criu_available
from lamina.containers.runtime.criu import find_criu
from lamina.errors import AlreadyExists, FailedPrecondition, Internal, LaminaError, NotFound

# the tiny rootfs and the overlay-per-task fixtures are shared with test_runtime_tasks
rootfs_src = shared.rootfs_src
rootfs = shared.rootfs
spec_for = shared.spec_for
Rootfs = shared.Rootfs

# Counts are appended, never rewritten: `echo $i > f` truncates before it writes, and
# a dump taken in between would leave the dumped file empty for good. The count is
# the file's last whole line.
LOOP = (
    'i=0; echo "pid=$$"; while true; do i=$((i+1)); echo $i >> /data/count; '
    "echo $i >> /tmp/count; sleep 0.1; done"
)


@pytest.fixture
def tm(tmp_root: Path) -> Iterator[TaskManager]:
    require_root_user()
    require_tools("runc")
    if find_criu() is None:
        pytest.skip("criu is not installed")
    manager = TaskManager(tmp_root / "tasks")
    try:
        yield manager
    finally:
        problems = []
        for info in manager.list():
            try:
                manager.delete(info.id, force=True)
            except LaminaError as exc:
                problems.append(f"{info.id}: {exc}")
        assert not problems, problems


def read_count(path: Path) -> int:
    """The last whole line of the appended count file (which holds one by now)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = path.read_text()
        whole = text[:text.rfind("\n") + 1].split()
        if whole:
            return int(whole[-1])
        time.sleep(0.01)  # before the loop's first count
    raise AssertionError(f"{path} holds no count")


def wait_count(path: Path, above: int, timeout: float = 60.0) -> int:
    """The counter at ``path`` once it is above ``above`` (polled, under a generous
    deadline: the loop writes every 0.1 s)."""
    return _wait_counter(path, lambda v: v > above, f"go above {above}", timeout)


def wait_change(path: Path, start: int, timeout: float = 60.0) -> int:
    """The first value of the counter at ``path`` other than ``start``."""
    return _wait_counter(path, lambda v: v != start, f"change from {start}", timeout)


def _wait_counter(path: Path, done: Callable[[int], bool], what: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            value = read_count(path)
            if done(value):
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not {what} in {timeout:.0f} s")
        time.sleep(0.02)


def test_criu_available_says_why() -> None:
    ok, reason = criu_available()
    assert isinstance(ok, bool) and reason
    if find_criu() is not None and os.geteuid() == 0:
        assert ok, reason  # CI installs a CRIU that works on its kernel


def test_checkpoint_and_restore_in_place(
    tm: TaskManager, rootfs: Rootfs, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    count = data / "count"
    spec = spec_for(["sh", "-c", LOOP], mounts=[BindMount(str(data), "/data")])
    tm.start("counter", rootfs("counter"), spec, detach=True)
    wait_count(count, 5)

    image = tmp_path / "image"
    ckpt = tm.checkpoint("counter", image)
    print(f"\ncheckpoint took {ckpt.seconds:.3f}s")
    assert (image / "inventory.img").exists()
    dumped = read_count(count)
    assert tm.state("counter").status == TaskStatus.STOPPED
    time.sleep(0.5)  # not synchronisation: a stopped loop writes nothing in any 0.5 s
    assert read_count(count) == dumped  # nothing runs any more

    started = time.monotonic()
    task = tm.restore("counter", image)
    print(f"restore took {time.monotonic() - started:.3f}s")
    assert task.status == TaskStatus.RUNNING and task.pid
    resumed = wait_count(count, dumped)
    assert resumed > dumped
    # it is the same shell: its counter in the container's /tmp (the rootfs upper) agrees
    upper = Path(tm.rootfs("counter"), "tmp", "count")
    assert abs(read_count(upper) - read_count(count)) <= 1
    log = tm.output_path("counter").read_text().split()
    assert log.count(log[0]) == 1 and log[0].startswith("pid=")  # no second start

    with pytest.raises(AlreadyExists):  # it runs again
        tm.restore("counter", image)
    tm.kill("counter", "KILL")
    assert tm.wait("counter", timeout=10) == 137


def test_leave_running_then_restore_elsewhere(
    tm: TaskManager, rootfs: Rootfs, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    count = data / "count"
    spec = spec_for(["sh", "-c", LOOP], mounts=[BindMount(str(data), "/data")])
    tm.start("orig", rootfs("orig"), spec, detach=True)
    before_dump = wait_count(count, 3)  # the dumped counter is at least this
    image = tmp_path / "image"
    work = tmp_path / "work"
    ckpt = tm.checkpoint("orig", image, leave_running=True, work_dir=work)
    assert (work / "dump.log").exists()
    upper_orig = Path(tm.rootfs("orig"), "tmp", "count")
    wait_count(upper_orig, read_count(upper_orig))  # the original goes on counting
    assert tm.state("orig").status == TaskStatus.RUNNING
    assert ckpt.leave_running
    with pytest.raises(AlreadyExists):
        tm.checkpoint("orig", image)
    tm.delete("orig", force=True)
    last = read_count(count)  # the original's last value: nothing writes it now

    # A new manager (another process, say) restores under a new id from what
    # the checkpoint recorded: spec, mounts (the same overlay) and options.
    other = TaskManager(tm.state_dir)
    task = other.restore("copy", image)
    assert task.status == TaskStatus.RUNNING
    # the copy's first write continues the dumped counter (a shell started afresh
    # would write 1, 2, 3 ..., none of them above before_dump)
    resumed = wait_change(count, last)
    assert resumed > before_dump, (resumed, before_dump)
    assert other.state("copy").status == TaskStatus.RUNNING
    other.delete("copy", force=True)


def test_checkpoint_preconditions(
    tm: TaskManager, rootfs: Rootfs, tmp_path: Path
) -> None:
    with pytest.raises(NotFound):
        tm.checkpoint("ghost", tmp_path / "img")
    tm.start("done", rootfs("done"), spec_for(["true"]), detach=True)
    tm.wait("done", timeout=10)
    with pytest.raises(FailedPrecondition):
        tm.checkpoint("done", tmp_path / "img")
    with pytest.raises(NotFound):
        tm.restore("done", tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound):
        tm.restore("done", tmp_path / "empty")


# what CRIU 4.1.1 wrote in CI when a loaded machine left a task in the freezer
SEIZE_LOG = (
    "(10.038495) Error (compel/src/lib/infect.c:263): Unseizable non-zombie 23713 found, "
    "state D, err -1/4\n"
    "(10.038947) Error (compel/src/lib/infect.c:418): Unable to detach from 23713: "
    "No such process\n"
    "(10.038963) Error (criu/cr-dump.c:2111): Dumping FAILED.\n"
)


def test_a_failed_seize_is_retried(
    tm: TaskManager, rootfs: Rootfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dump that failed while stopping the tasks (task still live, nothing dumped)
    is tried again; the failed attempt's log is kept, its partial images are not."""
    data = tmp_path / "data"
    data.mkdir()
    count = data / "count"
    spec = spec_for(["sh", "-c", LOOP], mounts=[BindMount(str(data), "/data")])
    tm.start("flaky", rootfs("flaky"), spec, detach=True)
    wait_count(count, 3)

    real = tm.runc.checkpoint
    calls: list[Path] = []

    def seize_fails_once(task_id: str, image_path: Path, **kw: object) -> None:
        calls.append(Path(image_path))
        if len(calls) == 1:
            (Path(image_path) / "dump.log").write_text(SEIZE_LOG)
            (Path(image_path) / "pstree.img").write_bytes(b"partial")
            raise Internal("runc checkpoint flaky: criu failed: type NOTIFY errno 0")
        real(task_id, image_path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tm.runc, "checkpoint", seize_fails_once)
    image = tmp_path / "image"
    tm.checkpoint("flaky", image)
    assert len(calls) == 2
    assert "Unseizable" in (image / "dump.1.log").read_text()
    assert (image / "pstree.img").read_bytes() != b"partial"  # the second dump's own
    dumped = read_count(count)
    assert tm.state("flaky").status == TaskStatus.STOPPED
    tm.restore("flaky", image)
    assert wait_count(count, dumped) > dumped


def test_other_dump_failures_are_not_retried(
    tm: TaskManager, rootfs: Rootfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_for(["sh", "-c", LOOP], mounts=[])
    tm.start("hard", rootfs("hard"), spec, detach=True)
    calls = []

    def fails(task_id: str, image_path: Path, **kw: object) -> None:
        calls.append(task_id)
        (Path(image_path) / "dump.log").write_text(
            "(00.101) Error (criu/files-reg.c:1710): Can't lookup mount=1 for fd=3 path=/x\n")
        raise Internal("runc checkpoint hard: criu failed: type NOTIFY errno 0")

    monkeypatch.setattr(tm.runc, "checkpoint", fails)
    with pytest.raises(Internal, match="Can't lookup mount"):
        tm.checkpoint("hard", tmp_path / "image")
    assert calls == ["hard"]
    assert tm.state("hard").status == TaskStatus.RUNNING
