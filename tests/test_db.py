"""lamina.util.db: the SQLite layer every store shares."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lamina.errors import ResourceExhausted
from lamina.util.db import Database

_SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v TEXT)"


def _churn(path: str, worker: int, rounds: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """Open and close extra connections while a long-lived one keeps working."""
    try:
        keeper = Database(path, _SCHEMA)
        for i in range(rounds):
            extra = Database(path, _SCHEMA)  # must not disturb ``keeper``'s locks
            with extra.write() as c:
                c.execute("INSERT OR REPLACE INTO t VALUES (?, ?)",
                          (f"{worker}-{i % 7}", "x" * 500))
            with keeper.read() as c:
                c.execute("SELECT count(*) FROM t").fetchone()
            with keeper.write() as c:
                c.execute("DELETE FROM t WHERE k = ?", (f"{worker}-{(i + 3) % 7}",))
            extra.close()
        keeper.close()
        out.put((worker, "ok"))
    except Exception as exc:  # reported to the test, not swallowed
        out.put((worker, f"{type(exc).__name__}: {exc} "
                         f"{getattr(exc, 'sqlite_errorname', '')}"))


def test_opening_a_database_keeps_other_connections_locks(tmp_path: Path) -> None:
    """Opening a database used to open and close the file itself, which drops every
    POSIX lock the process holds on it: another connection of the same process then
    read a WAL being rewritten under it (SQLITE_IOERR_SHORT_READ under load)."""
    path = str(tmp_path / "m.db")
    Database(path, _SCHEMA).close()
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [mp.Process(target=_churn, args=(path, w, 150, out)) for w in range(6)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {w: "ok" for w in range(6)}


def test_database_files_are_owner_only_from_the_start(tmp_path: Path) -> None:
    db = Database(tmp_path / "m.db", _SCHEMA)
    with db.write() as c:
        c.execute("INSERT INTO t VALUES ('a', 'b')")
    for name in ("m.db", "m.db-wal", "m.db-shm"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    db.close()


@pytest.mark.parametrize("group", [False, True], ids=["alone", "group-commit"])
def test_a_full_disk_is_resource_exhausted(tmp_path: Path, group: bool) -> None:
    db = Database(tmp_path / "m.db", _SCHEMA, group_commit=group)
    db.conn.execute("PRAGMA max_page_count=8")  # a database that cannot grow: SQLITE_FULL
    with pytest.raises(ResourceExhausted, match="the disk is full"), db.write() as c:
        for i in range(1000):
            c.execute("INSERT INTO t VALUES (?, ?)", (str(i), "y" * 4000))
    with db.read() as c:  # rolled back, and the database still works
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    db.close()


def test_group_commit_commits_waiting_writers_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers that wait while a body runs join its transaction: one directory
    fsync and one COMMIT for all, before any returns; a failing body is undone
    alone; a read meanwhile sees only what committed."""
    import lamina.util.db as dbmod

    synced: list[str] = []
    monkeypatch.setattr(dbmod, "fsync_dir", lambda d: synced.append(os.fspath(d)))
    db = Database(tmp_path / "m.db", _SCHEMA, group_commit=True)
    started, release = threading.Event(), threading.Event()
    errors: dict[str, BaseException] = {}

    def writer(name: str, *, first: bool = False, fail: bool = False) -> None:
        try:
            with db.write() as c:
                c.execute("INSERT INTO t VALUES (?, ?)", (name, "v"))
                db.sync_before_commit(tmp_path)
                if first:
                    started.set()
                    assert release.wait(10)
                if fail:
                    raise ValueError(name)
        except BaseException as exc:
            errors[name] = exc

    leader = threading.Thread(target=writer, args=("lead",), kwargs={"first": True})
    leader.start()
    assert started.wait(10)
    others = [threading.Thread(target=writer, args=(f"w{i}",), kwargs={"fail": i == 2})
              for i in range(4)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 10
    while db._queued < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    with db.read() as c:  # not blocked by the open transaction, and blind to it
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    release.set()
    for t in [leader, *others]:
        t.join(10)
    assert list(errors) == ["w2"] and isinstance(errors["w2"], ValueError)
    assert synced == [os.fspath(tmp_path)]  # one fsync for the whole group
    with db.read() as c:
        assert sorted(r[0] for r in c.execute("SELECT k FROM t")) == ["lead", "w0", "w1", "w3"]
    db.close()


def test_group_commit_fails_every_body_when_the_commit_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a body asked to sync is synced before COMMIT; if that fails nothing
    commits and the writer hears of it."""
    import lamina.util.db as dbmod

    def broken(d: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(dbmod, "fsync_dir", broken)
    db = Database(tmp_path / "m.db", _SCHEMA, group_commit=True)
    with pytest.raises(Exception, match="Input/output error"), db.write() as c:
        c.execute("INSERT INTO t VALUES ('a', 'v')")
        db.sync_before_commit(tmp_path)
    with db.read() as c:
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    with db.write() as c:  # and the database goes on working
        c.execute("INSERT INTO t VALUES ('b', 'v')")
    with db.read() as c:
        assert c.execute("SELECT k FROM t").fetchall() == [("b",)]
    db.close()


def test_a_new_database_costs_two_syncs(tmp_path: Path) -> None:
    """A new file is built aside and linked in place: one fsync of the file, one of
    the directory (switching it to WAL and committing the schema in place took
    seven), and it is a WAL database with the schema, owner-only, nothing left over."""
    if not shutil.which("strace"):
        pytest.skip("strace missing")
    path = tmp_path / "m.db"
    code = ("import sys\nfrom lamina.util.db import Database\n"
            "Database(sys.argv[1], sys.argv[2]).close()\n")  # nothing written: close syncs nothing
    summary = tmp_path / "summary"
    subprocess.run(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(summary),
                    sys.executable, "-c", code, str(path), _SCHEMA], check=True)
    calls = {line.split()[-1]: int(line.split()[3]) for line in summary.read_text().splitlines()
             if line.split() and line.split()[-1] in ("fsync", "fdatasync")}
    assert sum(calls.values()) == 2, calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.db", "summary"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    db = Database(path, "")
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with db.write() as c:
        c.execute("INSERT INTO t VALUES ('a', 'b')")
    db.close()


def test_a_database_another_process_made_first_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two openers of a new file: the one that links second keeps the other's file
    (and what was written to it) and adds its own schema to it."""
    path = tmp_path / "m.db"
    real_link = os.link

    def link_after_another(src: str, dst: str) -> None:
        monkeypatch.setattr(os, "link", real_link)
        other = Database(dst, "CREATE TABLE o (k TEXT)")
        with other.write() as c:
            c.execute("INSERT INTO o VALUES ('theirs')")
        other.close()
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_another)
    db = Database(path, _SCHEMA)
    with db.read() as c:
        assert c.execute("SELECT k FROM o").fetchall() == [("theirs",)]
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    db.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.db"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_new_database_on_a_full_disk_is_resource_exhausted(tmp_path: Path) -> None:
    """Made aside, a new file on a full disk is ResourceExhausted, and nothing of it
    is left (neither at its path nor under its temporary name)."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        fd = os.open(small / "fill", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"x" * 4096)
        os.close(fd)
        with pytest.raises(ResourceExhausted, match="the disk is full"):
            Database(small / "m.db", _SCHEMA)
        assert sorted(p.name for p in small.iterdir()) == ["fill"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_build_killed_before_it_cleaned_up_is_removed_on_the_next_open(
        tmp_path: Path) -> None:
    """A process killed while it built a new file leaves its temporary file (and
    that file's journals) beside the database: the next open removes them, and
    nothing else (the database's own WAL, another database's files)."""
    path = tmp_path / "m.db"
    Database(path, _SCHEMA).close()
    left = [".m.db-k1ll3d", ".m.db-k1ll3d-wal", ".m.db-k1ll3d-shm", ".m.db-x-journal"]
    for name in left:
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / ".other.db-k1ll3d").write_bytes(b"not ours")
    db = Database(path, _SCHEMA)
    with db.write() as c:
        c.execute("INSERT INTO t VALUES ('a', 'b')")
    names = sorted(p.name for p in tmp_path.iterdir())
    db.close()
    assert not set(left) & set(names), names
    assert ".other.db-k1ll3d" in names and "m.db" in names and "m.db-wal" in names, names


def test_a_build_killed_before_its_link_leaves_nothing_after_the_next_open(
        tmp_path: Path) -> None:
    """Killed (SIGKILL) with its file built but not linked: no database, a temporary
    file; the next open makes the database and removes the leftover."""
    code = ("import os, signal, sys\nfrom lamina.util.db import Database\n"
            "os.link = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "Database(sys.argv[1], sys.argv[2])\n")
    path = tmp_path / "m.db"
    proc = subprocess.run([sys.executable, "-c", code, str(path), _SCHEMA], check=False)
    assert proc.returncode == -9
    assert not path.exists() and [p.name for p in tmp_path.iterdir()], "nothing was left"
    Database(path, _SCHEMA).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.db"]


def _open_fresh(path: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        Database(path, _SCHEMA).close()
        out.put("ok")
    except Exception as exc:  # reported to the test, not swallowed
        out.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_database_together_all_succeed(tmp_path: Path) -> None:
    """Four processes open a database no one has made yet, 30 times over. The first
    to link its file removed the others' files still being built as if a killed
    build had left them: SQLite then failed those with ``disk I/O error`` (in about
    half the rounds; CI saw it as a failed ``image unpack``)."""
    ctx = mp.get_context("fork")
    failures = []
    for i in range(30):
        path = str(tmp_path / f"r{i}" / "m.db")
        os.mkdir(os.path.dirname(path))
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        procs = [ctx.Process(target=_open_fresh, args=(path, out)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        failures += [r for r in results if r != "ok"]
        left = [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".")]
        assert not left, left  # every loser removed its own file
    assert not failures, failures


def test_a_build_in_progress_is_not_taken_for_a_killed_one(tmp_path: Path) -> None:
    """A temporary file whose builder still holds it (its flock) survives an open of
    the database; once let go, the next open removes it."""
    import fcntl

    path = tmp_path / "m.db"
    Database(path, _SCHEMA).close()
    building = tmp_path / ".m.db-bu1ld1"
    building.write_bytes(b"being built")
    (tmp_path / ".m.db-bu1ld1-wal").write_bytes(b"its journal")
    fd = os.open(building, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        Database(path, _SCHEMA).close()
        assert building.exists() and (tmp_path / ".m.db-bu1ld1-wal").exists()
    finally:
        os.close(fd)
    Database(path, _SCHEMA).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.db"]
