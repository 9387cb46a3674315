"""Pod churn through containerd 1.6's CRI: lamina (``lamina serve``) vs containerd's overlayfs.

The tests' CRI node (``tests/cri_node.py``: containerd with CRI, CNI bridge in
a network namespace of its own, a loopback registry, ``lamina serve``) runs
50 pods in parallel, one container each, as a kubelet would
(RunPodSandbox, CreateContainer, StartContainer), then tears them down
(StopPodSandbox, RemovePodSandbox), once with CRI's snapshotter ``lamina``
and once with containerd's built-in ``overlayfs``, the order alternating per
round. Rows: time until every pod runs, RunPodSandbox and CreateContainer
p50/p99, teardown. Targets (issue 19): all running in <= 0.8x overlayfs's
time, p99s <= 1.0x, teardown no slower.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import Ctx, Paired, Row, Skip, tests_module

NAME = "cri-churn"
PODS = 50
IDLE = ["sh", "-c", "while :; do sleep 0.5; done"]


def _helpers() -> Any:
    return tests_module("cri_node")


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _churn(helpers: Any, work: Path, images: dict[str, str], snapshotter: str,
           pods: int) -> dict[str, float]:
    """One node, ``pods`` pods started at once and torn down at once; seconds."""
    try:
        node_cm = helpers.cri_node(work, snapshotter=snapshotter)
        node = node_cm.__enter__()
    except BaseException as exc:  # pytest's skip outcome when a tool is missing
        if type(exc).__name__ == "Skipped":
            raise Skip(str(exc)) from exc
        raise
    try:
        node.push(images["pause"], "pause:1")
        ref = node.push(images["app-a"], "app-a:1")
        node.cri.pull(node.sandbox_image)
        node.cri.pull(ref)
        run_pod: list[float] = []
        create: list[float] = []

        def start(i: int) -> Any:
            t0 = time.perf_counter()
            pod = node.cri.run_pod(f"pod-{i}", node.log_dir / f"pod-{i}")
            t1 = time.perf_counter()
            cid = node.cri.create(pod, "app", ref, IDLE)
            t2 = time.perf_counter()
            node.cri.start(cid)
            run_pod.append(t1 - t0)
            create.append(t2 - t1)
            return pod

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=pods) as pool:
            started = list(pool.map(start, range(pods)))
        up = time.perf_counter() - t0
        held = sum(1 for k, v in node.snapshots().items()
                   if k.startswith(f"{helpers.NAMESPACE}/") and v["kind"] == "active")
        if held != (2 * pods if snapshotter == "lamina" else 0):
            raise RuntimeError(f"{snapshotter}: lamina holds {held} writable snapshots "
                               f"for {pods} pods")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=pods) as pool:
            list(pool.map(node.cri.remove_pod, started))
        down = time.perf_counter() - t0
    except BaseException as exc:
        node_cm.__exit__(type(exc), exc, exc.__traceback__)
        raise
    node_cm.__exit__(None, None, None)
    return {"up": up, "down": down,
            "run_p50": statistics.median(run_pod), "run_p99": _pct(run_pod, 0.99),
            "create_p50": statistics.median(create), "create_p99": _pct(create, 0.99)}


def run(ctx: Ctx) -> list[Row]:
    helpers = _helpers()
    rounds = ctx.pick(2, 1)
    pods = ctx.pick(PODS, 20)
    with ctx.tempdir("cri-") as d:
        try:
            images = helpers.build_images(d / "images")
        except BaseException as exc:
            if type(exc).__name__ == "Skipped":
                raise Skip(str(exc)) from exc
            raise
        got: dict[str, dict[str, list[float]]] = {"lamina": {}, "overlayfs": {}}
        for r in range(rounds):
            order = ("lamina", "overlayfs") if r % 2 == 0 else ("overlayfs", "lamina")
            for sn in order:
                res = _churn(helpers, d / f"{sn}-{r}", images, sn, pods)
                ctx.log(f"  cri-churn {sn}: " + ", ".join(f"{k} {v:.2f}s"
                                                        for k, v in res.items()))
                for k, v in res.items():
                    got[sn].setdefault(k, []).append(v)
    rows = []
    for key, what, limit in (("up", f"{pods} pods running (RunPodSandbox+Create+Start)", 0.8),
                             ("run_p50", "RunPodSandbox p50", None),
                             ("run_p99", "RunPodSandbox p99", 1.0),
                             ("create_p50", "CreateContainer p50", None),
                             ("create_p99", "CreateContainer p99", 1.0),
                             ("down", f"{pods} pods torn down (Stop+RemovePodSandbox)", 1.0)):
        p = Paired(got["lamina"][key], got["overlayfs"][key])
        rows.append(p.row(f"CRI, {what}", "s", "containerd 1.6 CRI on its built-in overlayfs",
                          target=f"<= {limit}" if limit else "", limit=limit,
                          note=f"{rounds} round(s), one node per run, order alternating; "
                               "lamina serve as CRI's snapshotter (proxy plugin)"))
    return rows
