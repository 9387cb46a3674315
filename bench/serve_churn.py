"""Snapshot churn over gRPC: ``lamina serve`` vs containerd's overlayfs, 1 and 8 clients.

Prepare+Commit+Remove cycles through containerd's snapshots API, the way
containerd drives a proxy snapshotter (no ``lamina-owner`` header: the calls
work in containerd's scope), against containerd 1.6's built-in overlayfs
served by a private containerd over its own socket (namespace and lease
headers). Each client is a process of its own with one channel (a client in
the bench's process would share its GIL and measure Python, not the
servers); all clients of a side start together and the rate is every cycle
they made over the time from the first start to the last finish. Sides take
turns, the order alternating per round. Target: lamina >= 1.5x overlayfs,
with ``synchronous=FULL`` as shipped. The note gives each side's median
Prepare/Commit/Remove latency (each client times its calls; the median of the
rounds' medians), which says where a cycle's time goes.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import IO

from bench.common import Ctx, Row, Skip, paired
from bench.peer import containerd, lamina_server, require_containerd

NAME = "serve-churn"
TARGET = 1.5

_CLIENT = r"""
import statistics, sys, time, grpc
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as spb_grpc
address, snapshotter, md = sys.argv[1], sys.argv[2], sys.argv[3:]
metadata = tuple(zip(md[::2], md[1::2]))
stub = spb_grpc.SnapshotsStub(grpc.insecure_channel("unix:" + address))
clock = time.perf_counter
def cycles(prefix, n):
    took = ([], [], [])
    for i in range(n):
        a, c = f"{prefix}-a{i}", f"{prefix}-c{i}"
        t = clock()
        stub.Prepare(spb.PrepareSnapshotRequest(snapshotter=snapshotter, key=a),
                     metadata=metadata)
        t1 = clock()
        stub.Commit(spb.CommitSnapshotRequest(snapshotter=snapshotter, name=c, key=a),
                    metadata=metadata)
        t2 = clock()
        stub.Remove(spb.RemoveSnapshotRequest(snapshotter=snapshotter, key=c),
                    metadata=metadata)
        t3 = clock()
        for ts, d in zip(took, (t1 - t, t2 - t1, t3 - t2)):
            ts.append(d)
    return [statistics.median(ts) for ts in took]
for line in sys.stdin:
    prefix, n = line.split()
    t0 = time.time()
    medians = cycles(prefix, int(n))
    print(t0, time.time(), *medians, flush=True)
"""


@contextlib.contextmanager
def _clients(n: int, address: str, snapshotter: str,
             metadata: Sequence[tuple[str, str]]) -> Iterator[list[subprocess.Popen[str]]]:
    md = [x for kv in metadata for x in kv]
    procs = [subprocess.Popen([sys.executable, "-c", _CLIENT, address, snapshotter, *md],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _round(procs: list[subprocess.Popen[str]], prefix: str, per_client: int,
           calls: list[list[float]]) -> float:
    """Every client runs ``per_client`` cycles at once; the aggregate cycles/s.
    Each client's median Prepare, Commit and Remove seconds go to ``calls``."""
    for i, p in enumerate(procs):
        stdin: IO[str] | None = p.stdin
        assert stdin is not None
        stdin.write(f"{prefix}-{i} {per_client}\n")
        stdin.flush()
    spans = []
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"a churn client died (exit {p.wait()})")
        t0, t1, *medians = (float(x) for x in line.split())
        spans.append((t0, t1))
        calls.append(medians)
    wall = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
    return len(procs) * per_client / wall


def _turn(procs: list[subprocess.Popen[str]], per_client: int, calls: list[list[float]],
          i: int) -> float:
    return _round(procs, f"r{i}", per_client, calls)


def _latencies(calls: list[list[float]]) -> str:
    """``P/C/R x/y/z ms``: the median of the clients' median latency of each call."""
    ms = (statistics.median(c[k] for c in calls) * 1e3 for k in range(3))
    return "P/C/R " + "/".join(f"{x:.2f}" for x in ms) + " ms"


def run(ctx: Ctx) -> list[Row]:
    require_containerd()
    try:
        import grpc  # noqa: F401
    except ImportError as exc:
        raise Skip(f"grpcio is missing ({exc})") from exc
    rows: list[Row] = []
    rounds = ctx.pick(6, 3)
    for clients in (1, 8):
        per_client = ctx.pick(240, 80) // clients + 10
        with lamina_server(ctx.work) as ls, containerd(ctx.work) as ctd:
            lease = ctd.lease()
            peer_md = (("containerd-namespace", ctd.namespace), ("containerd-lease", lease))
            lam_calls: list[list[float]] = []
            peer_calls: list[list[float]] = []
            with _clients(clients, ls.address, "lamina", ()) as lam, \
                    _clients(clients, ctd.address, "overlayfs", peer_md) as peer:
                _round(lam, "warm", 5, [])
                _round(peer, "warm", 5, [])
                ctx.log(f"  serve-churn: {clients} client(s), {rounds} rounds")
                p = paired(partial(_turn, lam, per_client, lam_calls),
                           partial(_turn, peer, per_client, peer_calls), rounds)
        note = (f"{rounds} rounds x {clients}x{per_client} cycles, a process per client, "
                f"containerd's scope on {ls.how} (synchronous=FULL); call latency "
                f"lamina {_latencies(lam_calls)}, overlayfs {_latencies(peer_calls)}")
        rows.append(p.row(f"prepare+commit+remove, {clients} client(s) at once",
                          "cycles/s (higher=better)",
                          "containerd 1.6 overlayfs via its gRPC socket",
                          target=f">= {TARGET}", limit=TARGET, higher_is_better=True,
                          note=note))
        time.sleep(0.5)
    return rows
