"""Snapshot metadata speed: lifecycle cycles, stat and walk over many snapshots.

lamina's overlay and native snapshotters are called in-process; the peer is
containerd 1.6's overlayfs and native snapshotters driven through its gRPC
snapshots API (a private daemon, calls in a lease so its garbage collector
leaves our snapshots alone). Note that containerd's Remove only deletes
metadata; its directories go at the next garbage collection.

lamina's cycles are also measured against lamina itself, each variant in its
own process, the order rotated each round: as shipped (SQLite
``synchronous=FULL``, every commit fsyncs the WAL) against ``NORMAL``
patched in, and with ``--before-commit REV`` against that commit's lamina.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import Ctx, Row, Skip, lamina_variant, pair, paired, rotated
from bench.peer import close_channel, containerd, require_containerd

NAME = "snapshots"
LABEL = "bench.group"
GROUPS = 10
FILTER = f'labels."{LABEL}"==7'


def _cycles(sn: Any, prefix: str, n: int) -> float:
    """``n`` prepare+commit+remove cycles; returns cycles per second."""
    t0 = time.perf_counter()
    for i in range(n):
        key = f"{prefix}-a{i}"
        name = f"{prefix}-c{i}"
        sn.prepare(key, "")
        sn.commit(name, key)
        sn.remove(name)
    return n / (time.perf_counter() - t0)


def _cycler(sn: Any, n: int) -> Callable[[int], float]:
    return lambda i: _cycles(sn, f"r{i}", n)


#: a fresh overlay snapshotter in ``argv[1]``; for each line N read, runs N cycles
#: and prints their rate (so variants in separate processes can take turns often)
_CYCLES = """
import sys, time
from lamina.snapshots.overlay import OverlaySnapshotter
if sys.argv[2] == "normal":
    import lamina.util.db as d
    _init = d.Database.__init__
    def init(self, *a, **k):
        _init(self, *a, **k)
        self.conn.execute("PRAGMA synchronous=NORMAL")
    d.Database.__init__ = init
sn = OverlaySnapshotter(sys.argv[1])
done = 0
for line in sys.stdin:
    t0 = time.perf_counter()
    n = int(line)
    for i in range(done, done + n):
        sn.prepare(f"a{i}", "")
        sn.commit(f"c{i}", f"a{i}")
        sn.remove(f"c{i}")
    done += n
    print(n / (time.perf_counter() - t0), flush=True)
sn.close()
"""


def _versions(ctx: Ctx, d: Path) -> list[Row]:
    """Cycles/s of this tree with synchronous FULL vs NORMAL, and vs ``--before-commit``.

    Each variant is a process of its own, kept running; they take turns running
    a short batch of cycles, the order rotated each turn, so a load that comes
    and goes (a shared disk) bills them alike."""
    turns = ctx.pick(30, 6)
    n = ctx.pick(40, 20)
    procs: dict[str, subprocess.Popen[str]] = {}

    def start(name: str, src: Path | None = None, normal: bool = False) -> None:
        _, env = lamina_variant(src)
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", _CYCLES, str(d / f"v-{name}"), "normal" if normal else "full"],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def batch(name: str) -> Callable[[int], float]:
        def one(i: int) -> float:
            p = procs[name]
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(f"{n}\n")
            p.stdin.flush()
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"cycles ({name}) exited {p.wait()}")
            return float(line)
        return one

    try:
        start("full")
        start("normal", normal=True)
        if ctx.before is not None:
            start("before", ctx.before)
        for name in procs:  # warm up: first cycles open and create the database
            batch(name)(0)
        s = rotated({name: batch(name) for name in procs}, turns)
    finally:
        for p in procs.values():
            if p.stdin is not None:
                p.stdin.close()
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    note = f"{turns} turns of {n} cycles each, one long-lived process per variant, ext4"
    rows = [pair(s, "full", "normal").row(
        "prepare+commit+remove (overlay), synchronous=FULL / NORMAL",
        "cycles/s (higher=better)", "lamina with SQLite synchronous=NORMAL patched in",
        note=note)]
    if ctx.before is not None:
        rows.append(pair(s, "full", "before").row(
            f"prepare+commit+remove (overlay), this tree / {ctx.before_rev}",
            "cycles/s (higher=better)", f"lamina {ctx.before_rev} (synchronous=NORMAL)",
            note=note))
        rows.append(pair(s, "normal", "before").row(
            f"prepare+commit+remove (overlay), NORMAL / {ctx.before_rev}",
            "cycles/s (higher=better)", f"lamina {ctx.before_rev} (synchronous=NORMAL)",
            note="everything but synchronous=FULL"))
    return rows


def _populate(sn: Any, n: int, threads: int = 1) -> float:
    """Create ``n`` committed snapshots labelled by group; returns seconds taken."""

    def one(i: int) -> None:
        labels = {LABEL: str(i % GROUPS)}
        sn.prepare(f"pop-a{i}", "", labels=labels)
        sn.commit(f"pop-{i}", f"pop-a{i}", labels=labels)

    t0 = time.perf_counter()
    if threads <= 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(one, range(n)):
                pass
    return time.perf_counter() - t0


def _stat_time(sn: Any, keys: list[str]) -> float:
    t0 = time.perf_counter()
    for k in keys:
        sn.stat(k)
    return (time.perf_counter() - t0) / len(keys)


def _walk_time(sn: Any, expect: int, *filters: str) -> float:
    t0 = time.perf_counter()
    got = sum(1 for _ in sn.walk(*filters))
    dt = time.perf_counter() - t0
    if got != expect:
        raise RuntimeError(f"walk{filters} returned {got} snapshots, expected {expect}")
    return dt


def run(ctx: Ctx) -> list[Row]:
    require_containerd()
    try:
        from lamina.snapshots.native import NativeSnapshotter
        from lamina.snapshots.overlay import OverlaySnapshotter
    except ImportError as exc:
        raise Skip(f"lamina snapshotters missing: {exc}") from exc

    rows: list[Row] = []
    rounds = ctx.pick(5, 3)
    per_round = ctx.pick(200, 40)
    count = ctx.pick(10_000, 1_000)
    with ctx.tempdir("snapshots-") as d, containerd(d) as ctd:
        kinds: list[tuple[str, Callable[[Path], Any], str]] = [
            ("overlay", OverlaySnapshotter, "overlayfs"),
            ("native", NativeSnapshotter, "native"),
        ]
        for label, factory, peer_name in kinds:
            sn = factory(d / f"lamina-{label}")
            peer = ctd.snapshotter(peer_name)
            try:
                _cycles(sn, "warm", 5)
                _cycles(peer, "warm", 5)
                p = paired(_cycler(sn, per_round), _cycler(peer, per_round), rounds)
                rows.append(p.row(
                    f"prepare+commit+remove ({label})", "cycles/s (higher=better)",
                    f"containerd {peer_name} via gRPC",
                    note=f"{rounds}x{per_round} cycles each; lamina in-process"))
            finally:
                sn.close()
                close_channel(peer)

        rows += _versions(ctx, d)

        sn = OverlaySnapshotter(d / "lamina-walk")
        peer = ctd.snapshotter("overlayfs")
        try:
            ctx.log(f"  populating {count} snapshots in lamina and containerd ...")
            t_lam = _populate(sn, count)
            t_peer = _populate(peer, count, threads=4)
            ctx.log(f"  populated: lamina {t_lam:.1f}s, containerd {t_peer:.1f}s (4 threads)")
            rng = random.Random(7)
            n_stat = ctx.pick(1000, 300)
            keys = [f"pop-{rng.randrange(count)}" for _ in range(n_stat)]
            _stat_time(sn, keys[:50])
            _stat_time(peer, keys[:50])
            p = paired(lambda i: _stat_time(sn, keys), lambda i: _stat_time(peer, keys), rounds)
            rows.append(p.row(f"stat (of {count:,})", "s/stat", "containerd overlayfs via gRPC",
                              note=f"{n_stat} random keys per round"))
            p = paired(lambda i: _walk_time(sn, count), lambda i: _walk_time(peer, count),
                       rounds)
            rows.append(p.row(f"full walk ({count:,})", "s/walk",
                              "containerd overlayfs via gRPC"))
            want = count // GROUPS
            p = paired(lambda i: _walk_time(sn, want, FILTER),
                       lambda i: _walk_time(peer, want, FILTER), rounds)
            rows.append(p.row(f"filtered walk ({want:,} of {count:,})", "s/walk",
                              "containerd overlayfs via gRPC", note=FILTER))
        finally:
            sn.close()
            close_channel(peer)
    return rows
