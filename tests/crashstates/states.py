"""The persistence model, and the crash states it allows.

**Model** (ext4 ``data=ordered`` with delayed allocation, read as POSIX
promises it, without the extra flushes ext4 happens to do):

* metadata operations — create, mkdir, symlink, mknod, link, unlink, rmdir,
  rename, chmod/chown/xattr/utimes, truncate — reach the disk in the order
  they were issued: a crash keeps a *prefix* of them;
* ``fsync`` of a directory (or ``syncfs``/``sync``) makes every metadata
  operation before it durable; ``fsync``/``fdatasync`` of a file makes that
  file's data durable and nothing else (not its name: a new file needs its
  directory fsynced);
* file data not yet made durable may be lost, file by file and write by
  write: a crash keeps any subset of the writes since the file's last sync
  (a file whose appends were lost is shorter, as delayed allocation leaves it),
  independently of the metadata — so a rename can persist before the data it
  points to unless that data was fsynced;
* ``syncfs``/``sync`` make everything durable; ``sync_file_range`` promises
  nothing.

**Crash points** are the moments between two traced calls. At each one the
operations issued so far split into durable ones (always kept) and pending
ones. The states taken at every point: everything kept (what a process kill
leaves), only the durable part, all metadata without the pending data. Just
before every sync and every acknowledgement (where most is pending) also:
each file's pending data lost alone, each file's last pending write lost
(a torn append), and metadata cut at each pending operation with all data
kept (a rename without the directory's fsync, with or without its data).
States are deduplicated by what they contain.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from crashstates.tree import Create, Op, Sync, SyncAll, Tree, Write, is_data, is_meta

__all__ = ["CrashState", "choose", "explore", "replay"]

#: At most this many metadata cut positions per sync point (evenly spread).
MAX_META_CUTS = 48


@dataclass(frozen=True)
class CrashState:
    point: int  # ops[:point] had been issued
    excluded: frozenset[int]  # indices below point the disk did not get
    acked: int  # workload steps acknowledged before the crash
    why: str

    def describe(self) -> str:
        return (f"crash after op {self.point} ({self.why}; {len(self.excluded)} pending "
                f"op(s) lost; {self.acked} step(s) acknowledged)")


def explore(ops: Sequence[Op], tree: Tree, acks: Sequence[int]) -> list[CrashState]:
    """Every distinct state the model allows at the points described above.
    ``acks[i]`` is the op index at which workload step ``i`` was acknowledged."""
    out: dict[tuple[int, frozenset[int]], CrashState] = {}
    kinds = dict(tree.kind)
    pending_meta: list[int] = []
    pending_data: dict[int, list[int]] = {}
    content = 0  # metadata + data operations before the point

    def add(point: int, excluded: frozenset[int], why: str) -> None:
        acked = sum(1 for a in acks if a <= point)
        key = (content, excluded)
        old = out.get(key)
        if old is None or old.acked < acked:
            out[key] = CrashState(point, excluded, acked, why)

    ack_points = set(acks)
    for p in range(len(ops) + 1):
        all_data = frozenset(i for v in pending_data.values() for i in v)
        add(p, frozenset(), "all issued")
        add(p, all_data, "pending data lost")
        add(p, all_data | frozenset(pending_meta), "durable only")
        at_sync = p == len(ops) or p in ack_points or isinstance(ops[p], Sync | SyncAll)
        if at_sync:
            for ino, writes in pending_data.items():
                add(p, frozenset(writes), f"data of inode {ino} lost")
                if len(writes) > 1:
                    add(p, frozenset(writes[-1:]), f"last write to inode {ino} lost")
            step = max(1, len(pending_meta) // MAX_META_CUTS)
            for k in range(0, len(pending_meta), step):
                add(p, frozenset(pending_meta[k:]), f"metadata cut before op {pending_meta[k]}")
                add(p, frozenset(pending_meta[k:]) | all_data,
                    f"metadata cut before op {pending_meta[k]}, pending data lost")
        if p == len(ops):
            break
        op = ops[p]
        if is_meta(op):
            pending_meta.append(p)
            content += 1
            if isinstance(op, Create):
                kinds[op.ino] = op.kind
        elif is_data(op):
            assert isinstance(op, Write)
            pending_data.setdefault(op.ino, []).append(p)
            content += 1
        elif isinstance(op, SyncAll):
            pending_meta.clear()
            pending_data.clear()
        elif isinstance(op, Sync):
            if kinds.get(op.ino) == "d":
                pending_meta.clear()
            else:
                pending_data.pop(op.ino, None)
    return list(out.values())


def choose(states: list[CrashState], acks: Sequence[int], *, budget: int,
           seed: int) -> list[CrashState]:
    """All states when they fit in ``budget``; otherwise the three whole states
    (all issued, pending data lost, durable only) at each acknowledgement and at
    the end, plus a sample of the rest drawn with ``seed``."""
    if len(states) <= budget:
        return sorted(states, key=lambda s: (s.point, sorted(s.excluded)))
    marks = set(acks) | {max(s.point for s in states)}
    whole = {"all issued", "pending data lost", "durable only"}
    must = [s for s in states if s.point in marks and s.why in whole]
    rest = [s for s in states if not (s.point in marks and s.why in whole)]
    rng = random.Random(seed)
    picked = must + rng.sample(rest, max(0, min(len(rest), budget - len(must))))
    return sorted(picked, key=lambda s: (s.point, sorted(s.excluded)))


def replay(ops: Sequence[Op], base: Tree, state: CrashState) -> Tree:
    """The tree a crash in ``state`` leaves: ``base`` with the kept operations applied."""
    t = base.copy()
    for i in range(state.point):
        if i not in state.excluded:
            t.apply(ops[i])
    return t
