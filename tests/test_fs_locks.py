"""``lamina.fs.files.locked``: an exclusive lock across threads and processes, and
a transient one that leaves no file behind."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from lamina.errors import Unavailable
from lamina.fs import files
from lamina.fs.files import locked, names_open_file


def test_a_lock_keeps_its_file_and_a_transient_one_removes_it(tmp_path: Path) -> None:
    with locked(tmp_path / "locks" / "kept"):
        pass
    with locked(tmp_path / "locks" / "gone", transient=True):
        assert (tmp_path / "locks" / "gone").exists()
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["kept"]


def _count(lock: str, counter: str, rounds: int) -> None:
    for _ in range(rounds):
        with locked(lock, transient=True):
            n = int(Path(counter).read_text())
            time.sleep(0.0005)  # a lost update shows when two are in at once
            Path(counter).write_text(str(n + 1))


def test_a_transient_lock_still_excludes_when_its_file_comes_and_goes(
        tmp_path: Path) -> None:
    # every release removes the file other processes wait on: each of them must
    # take the lock again on the new file, or two get in at once
    counter = tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_count, args=(str(tmp_path / "lock"), str(counter), 150))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    assert counter.read_text() == str(4 * 150)
    assert not (tmp_path / "lock").exists()


def test_a_lock_whose_file_keeps_being_removed_gives_up_with_unavailable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "RELOCK_TRIES", 3)
    monkeypatch.setattr(files, "names_open_file", lambda fd, path: False)
    with (pytest.raises(Unavailable, match=r"lock .*/l: removed 3 times"),
          locked(tmp_path / "l", transient=True)):
        pytest.fail("the lock was taken on a file no longer named")


def test_names_open_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert names_open_file(fd, path)
        os.rename(path, tmp_path / "g")
        path.write_text("another file")
        assert not names_open_file(fd, path)
        path.unlink()
        assert not names_open_file(fd, path)
    finally:
        os.close(fd)
