"""containerd 1.6's CRI on lamina under churn and crashes (issue 19): twenty pods
made and torn down in parallel while their images are removed, and ``lamina
serve`` and containerd each killed with SIGKILL under running pods.

What must hold: nothing a running pod uses is removed, nothing unreferenced is
left once containerd has collected, CRI's view and lamina's agree, and ``lamina
check`` finds the root consistent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from cri_client import Pod
from cri_node import NAMESPACE, Node, build_images, cri_node, wait_for

T = TypeVar("T")
PODS = 20
# a container that keeps running, and one that counts in its writable layer
IDLE = ["sh", "-c", "while :; do sleep 0.5; done"]
TICK = ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /tick; sleep 0.2; done"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_images(tmp_path_factory.mktemp("cri-images"))


def _parallel(fn: Callable[[int], T], n: int) -> list[T]:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, range(n)))


def _containerds(node: Node) -> set[str]:
    return {k for k in node.snapshots() if k.startswith(f"{NAMESPACE}/")}


def _writables(node: Node) -> set[str]:
    """The ids of the sandboxes and containers lamina holds a writable snapshot for."""
    return {k.rsplit("/", 1)[1] for k, s in node.snapshots().items()
            if k.startswith(f"{NAMESPACE}/") and s["kind"] == "active"}


def _cri_ids(node: Node) -> set[str]:
    """The sandboxes and containers CRI knows."""
    return set(node.cri.pods()) | set(node.cri.containers())


def test_twenty_pods_in_parallel_with_image_removal(tmp_root: Path,
                                                     images: dict[str, str]) -> None:
    with cri_node(tmp_root) as node:
        node.push(images["pause"], "pause:1")
        refs = {n: node.push(images[f"app-{n}"], f"app-{n}:1") for n in "ab"}
        node.cri.pull(node.sandbox_image)
        baseline = _containerds(node)  # the sandbox image's layer
        for ref in refs.values():
            node.cri.pull(ref)
        pulled = _containerds(node)
        assert len(pulled) == len(baseline) + 3  # a shared layer and one of each

        def start(i: int) -> tuple[Pod, str]:
            pod = node.cri.run_pod(f"pod-{i}", node.log_dir / f"pod-{i}")
            return pod, node.cri.run(pod, "app", refs["ab"[i % 2]], IDLE)

        running = _parallel(start, PODS)
        assert len(_writables(node)) == 2 * PODS
        assert _writables(node) == _cri_ids(node)

        # app-a goes, and containerd collects, while ten pods run on its layers
        node.cri.remove_image(refs["a"])
        node.collect_garbage()
        assert not node.cri.image(refs["a"]).id
        assert _containerds(node) >= pulled  # every layer in use is kept
        for i, (_, cid) in enumerate(running):
            assert node.cri.exec(cid, "cat", "/etc/app") == (0, f"{'ab'[i % 2]}\n".encode())

        # torn down in parallel, app-b removed (and collected) in the middle of it
        removed = threading.Event()

        def stop(i: int) -> None:
            if i == PODS // 2:
                node.cri.remove_image(refs["b"])
                node.collect_garbage()
                removed.set()
            pod, cid = running[i]
            node.cri.stop(cid, grace=0)
            node.cri.remove(cid)
            node.cri.remove_pod(pod)

        _parallel(stop, PODS)
        assert removed.is_set()
        assert node.cri.pods() == {} and node.cri.containers() == {}
        node.collect_garbage()
        # nothing unreferenced is left: back to the sandbox image's layer
        wait_for("the root is back to its baseline", lambda: _containerds(node) == baseline)
        node.check()


def test_lamina_serve_and_containerd_killed_under_running_pods(
        tmp_root: Path, images: dict[str, str]) -> None:
    with cri_node(tmp_root) as node:
        node.push(images["pause"], "pause:1")
        ref = node.push(images["app-a"], "app-a:1")
        node.cri.pull(ref)
        pods = [node.cri.run_pod(f"tick-{i}", node.log_dir / f"tick-{i}") for i in range(2)]
        ticking = [node.cri.run(pod, "tick", ref, TICK) for pod in pods]

        def tick(cid: str) -> int:
            code, out = node.cri.exec(cid, "cat", "/tick")
            return int(out) if code == 0 and out.strip() else 0

        def ticks_on() -> None:
            before = [tick(c) for c in ticking]
            wait_for("every container counts on", lambda: all(
                tick(c) > b for c, b in zip(ticking, before, strict=True)))

        ticks_on()
        node.kill_serve()
        ticks_on()  # containers do not need lamina serve to run
        node.start_serve()  # on the same root and socket (stale now)
        node.wait_reconnected()
        # a pod starts on the new server
        pods.append(node.cri.run_pod("after-serve", node.log_dir / "after-serve"))
        ticking.append(node.cri.run(pods[-1], "tick", ref, TICK))
        ticks_on()

        rootfs = [node.base / "state" / "io.containerd.runtime.v2.task" / NAMESPACE / c /
                  "rootfs" / "tick" for c in ticking]
        node.kill_containerd()
        # the shims keep the containers running: their counters move on disk
        def count(path: Path) -> int:
            text = path.read_text().strip()  # empty while `echo` rewrites it
            return int(text) if text else 0

        before = [count(p) for p in rootfs]
        wait_for("every container counts on without containerd", lambda: all(
            count(p) > b for p, b in zip(rootfs, before, strict=True)))
        node.start_containerd()
        running = {cid for cid, c in node.cri.containers().items()
                   if c.state == node.cri.pb.CONTAINER_RUNNING}
        assert running == set(ticking)
        ticks_on()

        # CRI's view and lamina's agree, and the root is consistent
        assert _writables(node) == _cri_ids(node)
        node.check()

        pods.append(node.cri.run_pod("after-containerd", node.log_dir / "after-containerd"))
        node.cri.run(pods[-1], "tick", ref, TICK)
        for pod in pods:
            node.cri.remove_pod(pod)
        for cid in list(node.cri.containers()):
            node.cri.remove(cid)
        node.cri.remove_image(ref)
        node.collect_garbage()
        assert _writables(node) == _cri_ids(node) == set()
        node.check()
