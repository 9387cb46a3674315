"""Pod churn through containerd 1.6's CRI: lamina (``lamina serve``) vs containerd's overlayfs.

Two of the tests' CRI nodes (``tests/cri_node.py``: containerd with CRI, CNI
bridge in a network namespace of its own, a loopback registry, ``lamina
serve``) run side by side for the whole benchmark, configured alike but for
CRI's snapshotter: ``lamina`` (the proxy plugin) on one, containerd's built-in
``overlayfs`` on the other. Same config as ``lamina config containerd --cri``
emits, same CNI, same sandbox image and app image, CRI's default 10 s usage
collection, and both containerd roots and lamina roots on one journaled ext4
made for the benchmark (a loop file, ``mkfs.ext4`` defaults), checked before
the first round.

Each round starts ``pods`` pods in parallel on each node, one container each,
as a kubelet would (RunPodSandbox, CreateContainer, StartContainer), then tears
them down in parallel (StopPodSandbox, RemovePodSandbox); the order of the two
nodes rotates per round, and before each churn the machine is synced and both
nodes are left to go quiet (lamina's background removals, containerd's
collection), so neither side pays for the other's leftovers. One warm-up round
per node is not counted.

Rows: time until every pod runs, RunPodSandbox / CreateContainer /
StartContainer p50 and p99, teardown; CPU seconds of each node's containerd
and ``lamina serve`` per round (load moves them little); and what containerd
asked of ``lamina serve`` (``--call-stats``): calls per pod and each method's
p50/p99, all rounds pooled. docs/cri-churn.md has the figures and where a
pod's start goes. Each row gives the
medians, the median of the per-round ratios and their spread; the load
average is logged per churn and noted. Targets (issue 19): all running in
<= 0.8x overlayfs's time, RunPodSandbox and CreateContainer p99 <= 1.0x,
teardown no slower.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import Ctx, Paired, Row, Skip, scratch_filesystem, tests_module

NAME = "cri-churn"
PODS = 50
SIDES = ("lamina", "overlayfs")  # CRI's snapshotter on each node
IDLE = ["sh", "-c", "while :; do sleep 0.5; done"]
#: CRI's usage collection, seconds: containerd's default, as on a kubelet's node (the
#: tests' 1 s makes containerd Stat every snapshot and Usage every container each second)
STATS_PERIOD = 10
PEER = "containerd 1.6 CRI on its built-in overlayfs (a node alike, same run)"
_TICK = os.sysconf("SC_CLK_TCK")


def _helpers() -> Any:
    return tests_module("cri_node")


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _cpu(pid: int) -> float:
    """User+system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _pids(node: Any) -> dict[str, int]:
    return {"containerd": node.containerd.pid, "serve": node.lamina.proc.pid}


@contextlib.contextmanager
def _skips() -> Iterator[None]:
    """pytest's skip outcome (a tool is missing) as the benchmark's Skip."""
    try:
        yield
    except BaseException as exc:
        if type(exc).__name__ == "Skipped":
            raise Skip(str(exc)) from exc
        raise


def _node(stack: contextlib.ExitStack, helpers: Any, work: Path, images: dict[str, str],
          snapshotter: str) -> tuple[Any, str]:
    """A node with the images pulled; its app image reference. Its ``lamina serve``
    writes its calls' figures to ``work/calls.json`` when the node stops."""
    with _skips():
        node = stack.enter_context(helpers.cri_node(
            work, snapshotter=snapshotter, stats_period=STATS_PERIOD,
            serve_options=("--call-stats", str(work / "calls.json"))))
    if node.base != work / "c":
        raise RuntimeError(f"{snapshotter}: containerd's root went to {node.base}, off the "
                           "benchmark's filesystem (path too long for its sockets)")
    node.push(images["pause"], "pause:1")
    ref: str = node.push(images["app-a"], "app-a:1")
    node.cri.pull(node.sandbox_image)
    node.cri.pull(ref)
    return node, ref


def _alike(nodes: dict[str, Any]) -> None:
    """The two nodes differ in CRI's snapshotter only: config, CNI, images, filesystem."""
    def config(node: Any) -> str:
        text = node.config_path.read_text().replace(str(node.base), "BASE")
        text = text.replace(node.sandbox_image, "SANDBOX")
        return text.replace(f'snapshotter = "{node.snapshotter}"', 'snapshotter = "X"')

    a, b = (nodes[s] for s in SIDES)
    if config(a) != config(b):
        raise RuntimeError("the two nodes' containerd configs differ beyond the snapshotter")
    cni = [(n.base / "net.d" / "10-lamina-test.conflist").read_text()
           .replace(str(n.base), "BASE") for n in (a, b)]
    if cni[0] != cni[1]:
        raise RuntimeError("the two nodes' CNI configs differ")
    devs = {os.stat(p).st_dev for n in (a, b) for p in (n.base / "root", n.root, n.log_dir.parent)}
    if len(devs) != 1:
        raise RuntimeError("containerd's and lamina's roots are not on one filesystem")


def _settle(nodes: dict[str, Any], *, quiet: float = 0.05, limit: float = 30.0) -> None:
    """Sync, then wait until the nodes' daemons use under ``quiet`` CPU seconds a second."""
    os.sync()
    pids = [pid for n in nodes.values() for pid in _pids(n).values()]
    end = time.monotonic() + limit
    before = sum(map(_cpu, pids))
    while time.monotonic() < end:
        time.sleep(1.0)
        now = sum(map(_cpu, pids))
        if now - before < quiet:
            return
        before = now


def _churn(node: Any, ref: str, pods: int, tag: str) -> dict[str, float]:
    """``pods`` pods started at once and torn down at once on ``node``; seconds."""
    run_pod: list[float] = []
    create: list[float] = []
    start: list[float] = []

    def one(i: int) -> Any:
        t0 = time.perf_counter()
        pod = node.cri.run_pod(f"pod-{tag}-{i}", node.log_dir / f"pod-{tag}-{i}")
        t1 = time.perf_counter()
        cid = node.cri.create(pod, "app", ref, IDLE)
        t2 = time.perf_counter()
        node.cri.start(cid)
        t3 = time.perf_counter()
        run_pod.append(t1 - t0)
        create.append(t2 - t1)
        start.append(t3 - t2)
        return pod

    pids = _pids(node)
    cpu0 = {k: _cpu(p) for k, p in pids.items()}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=pods) as pool:
        started = list(pool.map(one, range(pods)))
    up = time.perf_counter() - t0
    cpu_up = {k: _cpu(p) - cpu0[k] for k, p in pids.items()}
    held = sum(1 for k, v in node.snapshots().items()
               if k.startswith(f"{_helpers().NAMESPACE}/") and v["kind"] == "active")
    if held != (2 * pods if node.snapshotter == "lamina" else 0):
        raise RuntimeError(f"{node.snapshotter}: lamina holds {held} writable snapshots "
                           f"for {pods} pods")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=pods) as pool:
        list(pool.map(node.cri.remove_pod, started))
    down = time.perf_counter() - t0
    if node.cri.pods():
        raise RuntimeError(f"{node.snapshotter}: pods left after teardown")
    return {"up": up, "down": down,
            "run_p50": statistics.median(run_pod), "run_p99": _pct(run_pod, 0.99),
            "create_p50": statistics.median(create), "create_p99": _pct(create, 0.99),
            "start_p50": statistics.median(start), "start_p99": _pct(start, 0.99),
            "cpu_containerd": cpu_up["containerd"], "cpu_serve": cpu_up["serve"]}


#: key, metric, target ratio (None: reported only)
_ROWS: tuple[tuple[str, str, float | None], ...] = (
    ("up", "{pods} pods running (RunPodSandbox+Create+Start)", 0.8),
    ("run_p50", "RunPodSandbox p50", None),
    ("run_p99", "RunPodSandbox p99", 1.0),
    ("create_p50", "CreateContainer p50", None),
    ("create_p99", "CreateContainer p99", 1.0),
    ("start_p50", "StartContainer p50", None),
    ("start_p99", "StartContainer p99", None),
    ("down", "{pods} pods torn down (Stop+RemovePodSandbox)", 1.0),
    ("cpu_containerd", "containerd CPU while starting {pods} pods", None),
)


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}"


def run(ctx: Ctx) -> list[Row]:
    helpers = _helpers()
    rounds = ctx.pick(6, 2)
    pods = ctx.pick(PODS, 20)
    got: dict[str, dict[str, list[float]]] = {s: {} for s in SIDES}
    before = os.getloadavg()[0]  # the machine's own: during the rounds the pods count too
    loads: list[float] = []
    with scratch_filesystem(ctx, "ext4") as fs:
        with contextlib.ExitStack() as stack:
            with _skips():
                images = helpers.build_images(fs / "images")
            nodes: dict[str, Any] = {}
            refs: dict[str, str] = {}
            for sn in SIDES:
                nodes[sn], refs[sn] = _node(stack, helpers, fs / sn[:3], images, sn)
            _alike(nodes)
            for sn in SIDES:  # warm-up: binaries, libraries and the image's files cached
                _settle(nodes)
                _churn(nodes[sn], refs[sn], pods, "warm")
            for r in range(rounds):
                for sn in SIDES[r % 2:] + SIDES[:r % 2]:
                    _settle(nodes)
                    load = os.getloadavg()[0]
                    loads.append(load)
                    res = _churn(nodes[sn], refs[sn], pods, str(r))
                    ctx.log(f"  cri-churn round {r} {sn} (load {load:.1f}): "
                            + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
                    for k, v in res.items():
                        got[sn].setdefault(k, []).append(v)
        # written by the lamina node's serve as it stopped
        calls = json.loads((fs / SIDES[0][:3] / "calls.json").read_text())
    note = (f"{rounds} rounds, order rotated, both nodes up throughout; load (1 min) "
            f"{before:.1f} before the run, {_spread(loads)} before each churn (the "
            f"previous churn's pods count)")
    rows = []
    for key, what, limit in _ROWS:
        p = Paired(got["lamina"][key], got["overlayfs"][key])
        rows.append(p.row(f"CRI, {what.format(pods=pods)}", "s", "" if rows else PEER,
                          target=f"<= {limit}" if limit else "", limit=limit,
                          note=f"per-round ratios {_spread(p.ratios)}; lamina "
                               f"{_spread(p.lamina)}, overlayfs {_spread(p.peer)}"
                               + ("" if rows else f"; {note}")))
    serve = got["lamina"]["cpu_serve"]
    rows.append(Row(metric=f"CRI, lamina serve CPU while starting {pods} pods", unit="s",
                    lamina=statistics.median(serve), note=f"rounds {_spread(serve)}",
                    samples={"lamina": serve}))
    return rows + _call_rows(calls, pods * (rounds + 1))


def _call_rows(calls: dict[str, dict[str, float]], pods: int) -> list[Row]:
    """What containerd asked of ``lamina serve`` (``--call-stats``), all rounds and the
    warm-up pooled: calls per pod, and each method's p50 and p99 in ms."""
    rows = []
    for method, c in sorted(calls.items(), key=lambda kv: -kv[1]["count"]):
        rows.append(Row(metric=f"CRI, lamina serve {method}: calls per pod, p50", unit="ms",
                        lamina=c["p50_ms"],
                        note=f"{c['count'] / pods:.2f} calls a pod ({c['count']:.0f} for "
                             f"{pods} pods), p99 {c['p99_ms']:.1f} ms, max "
                             f"{c['max_ms']:.1f} ms"))
    return rows
