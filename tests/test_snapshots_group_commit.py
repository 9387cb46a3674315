"""Snapshot calls of many threads at once (a server's): group commit keeps them right.

Concurrent prepares, commits and removes share transactions
(:mod:`lamina.util.db`); each call must still see its own effects, fail alone
(a key taken twice), leave the metadata and the directories in agreement, and
get its snapshots directory's fsync before the commit that names the rename.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import lamina.util.db as dbmod
from lamina.errors import AlreadyExists
from lamina.metadata.root import SNAPSHOTTERS

THREADS = 8
CYCLES = 25


@pytest.mark.parametrize("kind", ["overlay", "native"])
def test_concurrent_cycles_share_commits_and_stay_consistent(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sn = SNAPSHOTTERS[kind](tmp_path)
    sn.prepare("base-a", "")
    sn.commit("base", "base-a")
    synced: list[str] = []
    real = dbmod.fsync_dir

    def counted(d: str) -> None:
        synced.append(d)
        real(d)

    monkeypatch.setattr(dbmod, "fsync_dir", counted)
    errors: list[BaseException] = []
    clashes: list[str] = []
    start = threading.Barrier(THREADS)

    def worker(w: int) -> None:
        try:
            start.wait()
            for i in range(CYCLES):
                a, c = f"w{w}-a{i}", f"w{w}-c{i}"
                sn.prepare(a, "base" if i % 2 else "")
                sn.commit(c, a)
                if i % 5 == 0:  # every thread takes the same key: one wins per round
                    try:
                        sn.prepare(f"shared-{i}", "base")
                    except AlreadyExists:
                        clashes.append(f"shared-{i}")
                if i % 7 == 0:
                    sn.cleanup()
                sn.remove(c)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    shared = {f"shared-{i}" for i in range(0, CYCLES, 5)}
    assert len(clashes) == len(shared) * (THREADS - 1)
    assert {i.name for i in sn.walk()} == {"base", *shared}
    sn.flush()
    assert sn.check() == []
    ids = {sn.snapshot(k).id for k in ("base", *shared)}
    assert set(os.listdir(tmp_path / "snapshots")) == ids
    prepares = THREADS * CYCLES + THREADS * len(shared)
    assert 0 < len(synced) <= prepares  # one per group that made a snapshot
    sn.close()
