"""containerd 1.6's CRI plugin on lamina (issue 19): what ``lamina config containerd
--cri`` emits, and a node set up from it (``cri_node``) answering the calls the
kubelet makes for images and pods, through CRI v1.

The pod and image flows in parallel, and lamina serve and containerd killed
under running pods, are in ``test_cri_churn.py``.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_node import NAMESPACE, POD_SUBNET, Node, build_images, cri_node, wait_for

from lamina.api import DEFAULT_ADDRESS
from lamina.api.mirror import RegistryMirror
from lamina.cli.config import DEFAULT_CNI_BIN_DIR, DEFAULT_CNI_CONF_DIR, cri_snippet
from lamina.content import write_blob
from lamina.content.local import LocalContentStore
from lamina.owners import CONTAINERD

REPO = Path(__file__).resolve().parent.parent
CRI_TOML = REPO / "contrib/containerd/cri.toml"
CRI = "io.containerd.grpc.v1.cri"
MIB = 1 << 20


def _config(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "lamina", "config", "containerd", *args],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def _may_lower_oom_score_adj() -> bool:
    """Asked as runc would meet it: a child setting the score CRI gives a sandbox."""
    return subprocess.run(["sh", "-c", "echo -998 > /proc/self/oom_score_adj"],
                          capture_output=True, check=False).returncode == 0


def test_config_cri_is_what_a_node_needs() -> None:
    text = _config("--cri", "--address", "/run/x/lamina.sock", "--sandbox-image", "reg/pause:9")
    doc = tomllib.loads(text)
    assert doc["version"] == 2
    assert doc["proxy_plugins"]["lamina"] == {"type": "snapshot",
                                              "address": "/run/x/lamina.sock"}
    cri = doc["plugins"][CRI]
    assert cri["containerd"]["snapshotter"] == "lamina"
    assert cri["sandbox_image"] == "reg/pause:9"
    assert cri["cni"] == {"bin_dir": DEFAULT_CNI_BIN_DIR, "conf_dir": DEFAULT_CNI_CONF_DIR}
    # detected on this machine, and said so beside the setting
    restricted = not _may_lower_oom_score_adj()
    assert cri["restrict_oom_score_adj"] is restricted
    found = "Found here: a process may not lower" if restricted else \
        "Found here: a process may lower"
    assert found in text
    assert "CAP_SYS_RESOURCE" in text

    forced = tomllib.loads(_config("--cri", "--restrict-oom-score-adj", "false",
                                   "--cni-bin-dir", "/b", "--cni-conf-dir", "/c",
                                   "--name", "lam", "--content"))
    cri = forced["plugins"][CRI]
    assert cri["restrict_oom_score_adj"] is False
    assert cri["containerd"]["snapshotter"] == "lam"
    assert cri["cni"] == {"bin_dir": "/b", "conf_dir": "/c"}
    assert forced["proxy_plugins"]["lam-content"]["type"] == "content"
    # without --cri: the proxy plugins only
    assert "plugins" not in tomllib.loads(_config())


def test_contrib_cri_toml_is_what_config_prints() -> None:
    """contrib/containerd/cri.toml: ``lamina config containerd --cri
    --restrict-oom-score-adj true`` with the defaults (safe either way: CRI only
    raises scores below containerd's own, -999 under Debian's containerd.service)."""
    assert CRI_TOML.read_text() == cri_snippet(DEFAULT_ADDRESS, restrict_oom_score_adj=True)
    assert CRI_TOML.read_text() == _config("--cri", "--address", DEFAULT_ADDRESS,
                                           "--restrict-oom-score-adj", "true")


# --------------------------------------------------------------------------- a node


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_images(tmp_path_factory.mktemp("cri-images"))


def _containerds(node: Node) -> dict[str, dict[str, Any]]:
    """The k8s.io snapshots on the lamina root, by key."""
    return {k: s for k, s in node.snapshots().items() if k.startswith(f"{NAMESPACE}/")}


def _image_fs(node: Node) -> tuple[int, int, str]:
    resp = node.cri.images.ImageFsInfo(node.cri.pb.ImageFsInfoRequest(), timeout=60)
    (fs,) = resp.image_filesystems
    return fs.used_bytes.value, fs.inodes_used.value, fs.fs_id.mountpoint


def _wait_image_fs_is_laminas(node: Node) -> int:
    """Wait until ImageFsInfo (CRI's sum over its snapshots, refreshed every
    stats period) adds up to lamina's own usage of them; that many bytes."""
    seen: list[object] = []

    def agree() -> bool:
        usage = node.usage(*_containerds(node))
        want = (sum(u[0] for u in usage.values()), sum(u[1] for u in usage.values()))
        got = _image_fs(node)[:2]
        seen[:] = [want, got]
        return got == want

    wait_for(f"ImageFsInfo reports lamina's usage ({seen})", agree)
    return _image_fs(node)[0]


def test_a_node_serves_its_peers_what_cri_pulled(tmp_root: Path,
                                                 images: dict[str, str]) -> None:
    """With containerd's content store lamina's (``--content``), what CRI pulls lands in
    the lamina root, held by containerd and with no labels there (containerd keeps
    them in its own metadata); the node's registry mirror serves every such blob to
    peers by digest, and still not the CLI's own content."""
    with cri_node(tmp_root, content=True) as node:
        node.cri.pull(node.push(images["app-a"], "app-a:1"))
        with LocalContentStore(node.root / "content") as store:
            pulled = {i.digest: i.labels for i in store.scoped(CONTAINERD).walk()}
            assert len(pulled) == 4, pulled  # manifest, config, two layers
            assert not any(pulled.values()), pulled  # served though nothing says "pulled"
            own = b"made by the CLI on this node"
            own_digest = "sha256:" + hashlib.sha256(own).hexdigest()
            write_blob(store, "own", own, expected=own_digest)
            with RegistryMirror(store, "127.0.0.1", 0) as mirror:
                conn = http.client.HTTPConnection(*mirror.address, timeout=30)
                try:
                    for digest in [*pulled, own_digest]:
                        conn.request("GET", f"/v2/lamina/app-a/blobs/{digest}")
                        resp = conn.getresponse()
                        body = resp.read()
                        if digest == own_digest:
                            assert resp.status == 404
                        else:
                            assert resp.status == 200, (digest, resp.status, body[:200])
                            assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
                finally:
                    conn.close()


def test_images(tmp_root: Path, images: dict[str, str]) -> None:
    with cri_node(tmp_root) as node:
        a = node.push(images["app-a"], "app-a:1")
        b = node.push(images["app-b"], "app-b:1")
        assert _image_fs(node)[:2] == (0, 0)
        assert _image_fs(node)[2].endswith("/io.containerd.snapshotter.v1.lamina")

        image_a = node.cri.pull(a)
        assert image_a.startswith("sha256:")
        listed = {i.id: i for i in node.cri.images.ListImages(
            node.cri.pb.ListImagesRequest(), timeout=60).images}
        assert list(listed) == [image_a]
        assert list(listed[image_a].repo_tags) == [a]
        (digest,) = listed[image_a].repo_digests
        assert digest.startswith(f"{a.rsplit(':', 1)[0]}@sha256:")
        assert listed[image_a].size > MIB
        status = node.cri.image(a)
        assert status.id == image_a and list(status.repo_tags) == [a]
        assert node.cri.image(image_a).id == image_a  # by id as well
        assert not node.cri.image(f"{node.registry.host}/lamina/none:1").id

        # unpacked into lamina, as containerd's: its two layers, committed
        layers = _containerds(node)
        assert len(layers) == 2, layers
        assert {s["owner"] for s in layers.values()} == {f"containerd:{NAMESPACE}"}
        assert {s["kind"] for s in layers.values()} == {"committed"}
        used_a = _wait_image_fs_is_laminas(node)
        assert used_a > MIB

        # app-b shares app-a's first layer: one more snapshot
        node.cri.pull(b)
        assert len(_containerds(node)) == 3
        assert _wait_image_fs_is_laminas(node) > used_a

        # the lamina CLI on the same root does not remove containerd's
        key = sorted(layers)[0]
        rm = node.cli("snapshot", "rm", key, check=False)
        assert rm.returncode == 5, rm.stderr
        assert f"belongs to containerd (namespace {NAMESPACE})" in rm.stderr
        assert key in node.snapshots()

        node.cri.remove_image(a)
        assert not node.cri.image(a).id
        node.cri.remove_image(a)  # idempotent, as CRI wants
        wait_for("app-a's own layer is gone", lambda: len(_containerds(node)) == 2)
        node.cri.remove_image(b)
        wait_for("every layer is gone", lambda: not _containerds(node))
        assert node.cri.images.ListImages(node.cri.pb.ListImagesRequest(),
                                          timeout=60).images == []
        assert _wait_image_fs_is_laminas(node) == 0
        node.check()


def _log_lines(path: Path) -> list[tuple[str, str]]:
    """(stream, text) of each line of a CRI container log (``<time> <stream> <F|P> <text>``)."""
    out = []
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"\S+ (stdout|stderr) [FP] (.*)", line)
        assert m, line
        out.append((m[1], m[2]))
    return out


# a container that says what it found and stops, gracefully, on SIGTERM
SERVE = ["sh", "-c", 'echo "started $(cat /etc/app)"; trap "echo stopping; exit 0" TERM; '
         "while :; do sleep 0.2; done"]


def test_a_pod_through_its_life(tmp_root: Path, images: dict[str, str]) -> None:
    with cri_node(tmp_root) as node:
        node.push(images["pause"], "pause:1")
        a = node.push(images["app-a"], "app-a:1")
        node.cri.pull(a)
        layers = set(_containerds(node))
        pb = node.cri.pb

        pod = node.cri.run_pod("web", node.log_dir / "web")
        status = node.cri.pod_status(pod)
        assert status.state == pb.SANDBOX_READY
        assert ipaddress.ip_address(status.network.ip) in ipaddress.ip_network(POD_SUBNET)
        # the sandbox image was pulled by RunPodSandbox and runs on lamina too
        assert node.cri.image(node.sandbox_image).id
        sandbox = node.snapshots()[node.snapshot_of(pod.id)]
        pause_layers = {k for k, s in _containerds(node).items()
                        if s["kind"] == "committed"} - layers
        assert len(pause_layers) == 1
        assert sandbox["kind"] == "active" and sandbox["owner"] == f"containerd:{NAMESPACE}"

        cid = node.cri.create(pod, "app", a, SERVE)
        assert node.cri.status(cid).state == pb.CONTAINER_CREATED
        node.cri.start(cid)
        assert node.cri.status(cid).state == pb.CONTAINER_RUNNING
        assert node.cri.exec(cid, "cat", "/etc/app") == (0, b"a\n")
        assert node.cri.exec(cid, "sh", "-c", "exit 3")[0] == 3
        log = node.log_dir / "web" / "app" / "0.log"
        wait_for("the container's first line is logged",
                 lambda: log.exists() and ("stdout", "started a") in _log_lines(log))

        # ContainerStats: the writable layer's bytes are lamina's usage of it
        assert node.cri.exec(cid, "sh", "-c", "cat /payload > /copy")[0] == 0
        key = node.snapshot_of(cid)
        seen: list[object] = []

        def stats_agree() -> bool:
            stats = node.cri.runtime.ContainerStats(
                pb.ContainerStatsRequest(container_id=cid), timeout=60).stats
            seen[:] = [stats.writable_layer.used_bytes.value, node.usage(key)[key]]
            return seen[0] == seen[1][0]  # type: ignore[index]

        wait_for(f"ContainerStats reports lamina's usage ({seen})", stats_agree)
        assert seen[0] >= MIB  # type: ignore[operator]

        # containerd's, while it runs: the CLI refuses to remove it
        rm = node.cli("snapshot", "rm", key, check=False)
        assert rm.returncode == 5 and "belongs to containerd" in rm.stderr, rm.stderr

        node.cri.stop(cid, grace=30)
        status = node.cri.status(cid)
        assert status.state == pb.CONTAINER_EXITED and status.exit_code == 0
        assert status.log_path == str(log)
        wait_for("the last line is logged", lambda: _log_lines(log)[-1] == ("stdout", "stopping"))

        # restarted the kubelet's way: removed, created again (attempt 1) on a
        # fresh writable layer from the same image
        node.cri.remove(cid)
        assert cid not in node.cri.containers()
        # containerd removes a snapshot from its records at once, from lamina at
        # its next garbage collection, which the removal schedules
        wait_for("the writable layer is gone", lambda: key not in node.snapshots())
        again = node.cri.run(pod, "app", a, SERVE, attempt=1)
        assert node.cri.status(again).metadata.attempt == 1
        assert node.cri.exec(again, "cat", "/etc/app") == (0, b"a\n")
        assert node.cri.exec(again, "cat", "/copy")[0] != 0
        wait_for("the new attempt logs to its own file", lambda: (
            node.log_dir / "web" / "app" / "1.log").exists())

        node.cri.stop(again, grace=30)
        node.cri.remove(again)
        node.cri.remove_pod(pod)
        assert node.cri.pods() == {} and node.cri.containers() == {}
        # the images' layers stay (the images do); nothing else
        wait_for("only the images' layers are left",
                 lambda: set(_containerds(node)) == layers | pause_layers)
        node.check()


def test_restrict_oom_score_adj_is_what_sandboxes_need(tmp_root: Path,
                                                        images: dict[str, str]) -> None:
    """The node starts pods as configured; with the setting turned the other way
    it starts none where a process may not lower its oom_score_adj."""
    with cri_node(tmp_root) as node:
        node.push(images["pause"], "pause:1")
        node.cri.remove_pod(node.cri.run_pod("as-emitted", node.log_dir / "p1"))
        if _may_lower_oom_score_adj():
            return  # both settings start pods here
        node.stop_containerd()
        text = node.config_path.read_text()
        node.config_path.write_text(text.replace("restrict_oom_score_adj = true",
                                                 "restrict_oom_score_adj = false"))
        node.start_containerd()
        with pytest.raises(grpc.RpcError) as err:
            node.cri.run_pod("unrestricted", node.log_dir / "p2")
        assert "OCI runtime create failed" in str(err.value.details())  # type: ignore[attr-defined]
