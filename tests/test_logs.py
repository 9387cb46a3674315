"""``lamina logs``: a detached task's output, kept per container, bounded, followed.

Containers are made through the library (the tiny image of
``test_containers_cli``); ``lamina logs`` runs as a process, as a user runs it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_containers_cli as shared
from conftest import require_root_user, require_tools

from lamina.containers.logs import ContainerLogs, logs_dir
from lamina.containers.options import make_options
from lamina.containers.service import ContainerService
from lamina.images.service import ImageService
from lamina.metadata.root import Root

layout = shared.layout
V1 = shared.V1


@pytest.fixture
def ct(tmp_root: Path, layout: Path) -> Iterator[ContainerService]:
    require_root_user()
    require_tools("runc")
    root = Root(tmp_root / "lib")
    images = ImageService(root)
    containers = ContainerService(root, images=images)
    try:
        images.import_(layout)
        yield containers
    finally:
        problems = shared.cleanup_tasks(root.path)
        containers.close()
        images.close()
        root.close()
        assert not problems, problems


def lamina(ct: ContainerService, *args: str, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", "import sys; from lamina.cli import main; sys.exit(main())",
            "--root", str(ct.root.path), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def test_logs_show_lines_written_over_time_and_follow_ends_with_the_task(
        ct: ContainerService) -> None:
    script = "for i in 1 2 3 4 5; do echo line$i; echo err$i >&2; sleep 0.3; done"
    ct.create(V1, "talker", options=make_options(args=["sh", "-c", script]))
    ct.start("talker", detach=True)
    shared.wait_for(lambda: "line1" in lamina(ct, "logs", "talker").stdout, what="first line")

    started = time.monotonic()
    follow = lamina(ct, "logs", "-f", "talker")  # returns only once the task has stopped
    assert follow.returncode == 0, follow.stderr
    assert time.monotonic() - started < 30
    lines = follow.stdout.split()
    assert [x for x in lines if x.startswith("line")] == [f"line{i}" for i in range(1, 6)]
    assert [x for x in lines if x.startswith("err")] == [f"err{i}" for i in range(1, 6)]
    assert ct.task("talker").status == "stopped"  # type: ignore[union-attr]

    # (stdout and stderr are two pipes: their lines interleave in either order)
    assert sorted(lamina(ct, "logs", "--tail", "2", "talker").stdout.split()) == [
        "err5", "line5"]
    # the log outlives the task: a deleted task's container still has it
    ct.tasks.delete("talker")
    assert "line3" in lamina(ct, "logs", "talker").stdout
    # a new start appends
    ct.start("talker", detach=True)
    ct.tasks.wait("talker", timeout=30)
    out = lamina(ct, "logs", "-f", "talker").stdout.split()
    assert out.count("line1") == 2 and sorted(out[-2:]) == ["err5", "line5"]

    ct.remove("talker")
    assert not (logs_dir(ct.root.path) / "talker").exists()
    gone = lamina(ct, "logs", "talker")
    assert gone.returncode == 3 and gone.stderr.startswith("lamina: NotFound"), gone.stderr


def test_follow_returns_when_the_task_is_deleted(ct: ContainerService) -> None:
    ct.create(V1, "idle", options=make_options(args=["sh", "-c", "echo up; " + shared.IDLE]))
    ct.start("idle", detach=True)
    follow = subprocess.Popen(
        [sys.executable, "-m", "lamina", "--root", str(ct.root.path), "logs", "-f", "idle"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        assert follow.poll() is None  # still following a running task
        ct.stop("idle", timeout=5)
        out, err = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0, err
    assert out.split() == [b"up"]


def test_output_is_bounded_by_rotation(ct: ContainerService, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    from lamina.containers.runtime import bundle, launch

    monkeypatch.setattr(launch, "OUTPUT_MAX", 4096)
    assert bundle.OUTPUT_MAX == 5 << 20  # the default the docs state (10 MiB kept)
    # 400 numbered lines of 50 bytes: 20000 bytes, far more than two 4096-byte files
    script = "i=0; while [ $i -lt 400 ]; do printf '%049d\\n' $i; i=$((i+1)); done"
    ct.create(V1, "loud", options=make_options(args=["sh", "-c", script]))
    ct.start("loud", detach=True)
    ct.tasks.wait("loud", timeout=60)
    log = ContainerLogs(ct.root.path).path("loud")
    rotated = log.with_name("output.log.1")
    assert log.stat().st_size <= 4096 and rotated.stat().st_size <= 4096
    kept = b"".join(ct.logs("loud")).split()
    # the newest lines, in order, with no gap
    numbers = [int(x) for x in kept]
    assert numbers[-1] == 399 and numbers == list(range(numbers[0], 400))
    assert lamina(ct, "logs", "-n", "1", "loud").stdout.split() == [f"{399:049d}"]
