"""A Kubernetes node for tests, without the kubelet: ``lamina serve`` and a private
containerd 1.6 whose CRI plugin uses lamina as its snapshotter, configured by
``lamina config containerd --cri``, talked to through CRI v1 (``cri_client``).

containerd runs in a network namespace of the test's own (joined to this one by
a veth pair, ``registry_peer.second_host``): CNI's bridge, its pods' veths and
the host-local addresses are the test's alone. The registry listens on this
side of the pair and containerd reaches it over plain HTTP (a ``hosts.toml``).
containerd's root, state, sockets, CNI config and pod network namespaces are in
the test's directory. ``lamina serve`` and containerd can be killed and started
again; everything started is stopped by PID at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from conftest import require_root_user, require_tools, unmount_all_under
from containerd_peer import Lamina, lamina_serve, short_dir
from containerd_peer import _stop as stop_process
from cri_client import Cri
from registry_peer import Registry, running_registry, second_host, skopeo_push

__all__ = ["CNI_BIN_DIR", "DEADLINE", "NAMESPACE", "POD_SUBNET", "Node", "build_images", "cri_node",
           "require_node_tools", "wait_for"]

NAMESPACE = "k8s.io"  # CRI's containerd namespace
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
DEADLINE = 120.0
"""How long an event may take on a loaded 2-core machine before a test fails."""
POD_SUBNET = "10.88.0.0/24"  # inside the test's own network namespace
CRI = '[plugins."io.containerd.grpc.v1.cri"]'
_LAMINA = [sys.executable, "-m", "lamina"]


def require_node_tools() -> None:
    """Skip unless root and every tool a node needs (CNI plugins included) are here."""
    require_root_user()
    require_tools("containerd", "ctr", "runc", "containerd-shim-runc-v2", "nsenter", "ip",
                  "docker-registry", "skopeo")
    missing = [p for p in ("bridge", "host-local", "loopback")
               if not os.access(f"{CNI_BIN_DIR}/{p}", os.X_OK)]
    if missing:
        import pytest

        pytest.skip(f"CNI plugins not installed in {CNI_BIN_DIR} "
                    f"(Debian's containernetworking-plugins): {', '.join(missing)}")


def wait_for(what: str, done: Callable[[], bool], *, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not done():
        assert time.monotonic() < end, f"timed out ({deadline:.0f}s) waiting until {what}"
        time.sleep(0.2)


class Node:
    """One node: its lamina root and server, its containerd, its CRI client."""

    def __init__(self, workdir: Path, base: Path, netns: str, registry: Registry, *,
                 snapshotter: str = "lamina", stats_period: int = 1,
                 serve_options: tuple[str, ...] = (), content: bool = False) -> None:
        self.workdir = workdir
        self.content = content  # containerd's content store is lamina's too
        self.snapshotter = snapshotter  # CRI's; "overlayfs" for containerd's own (bench)
        self.stats_period = stats_period
        self.serve_options = serve_options  # ``lamina serve``'s own flags
        self.base = base  # short: containerd's sockets live here
        self.netns = netns
        self.registry = registry
        self.root = workdir / "lamina-root"
        self.sock = base / "lamina.sock"
        self.address = str(base / "containerd.sock")
        self.sandbox_image = f"{registry.host}/lamina/pause:1"
        self.config_path = base / "config.toml"
        self.log_dir = workdir / "pods"
        self._serve: contextlib.AbstractContextManager[Lamina] | None = None
        self.lamina: Lamina | None = None
        self.containerd: subprocess.Popen[bytes] | None = None
        self.cri = Cri(self.address)

    # ------------------------------------------------------------------ setup

    def push(self, oci_ref: str, name: str) -> str:
        """Copy an image (``oci:<dir>:<ref>``) to the node's registry; its reference."""
        ref = f"{self.registry.host}/lamina/{name}"
        skopeo_push(oci_ref, ref)
        return ref

    def cri_config(self) -> str:
        """What ``lamina config containerd --cri`` prints for this node."""
        out = self.cli("config", "containerd", "--cri", "--address", str(self.sock),
                       "--sandbox-image", self.sandbox_image,
                       *(["--content"] if self.content else []),
                       "--cni-bin-dir", CNI_BIN_DIR, "--cni-conf-dir", str(self.base / "net.d"))
        return out.stdout

    def write_config(self) -> None:
        """containerd's config: the node's part as lamina emits it; this test's
        private paths, an ephemeral streaming port and the stats period (1 s: the
        tests see usage change soon) around it."""
        b = self.base
        cri = self.cri_config()
        assert CRI in cri, cri
        cri = cri.replace('snapshotter = "lamina"', f'snapshotter = "{self.snapshotter}"')
        cri = cri.replace(CRI + "\n", CRI + "\n" + "\n".join([
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            f"  stats_collect_period = {self.stats_period}",
            "  netns_mounts_under_state_dir = true", ""]))
        self.config_path.write_text("\n".join([
            # as the --content snippet's comment says: containerd uses one content store
            *(['disabled_plugins = ["io.containerd.content.v1.content"]'] if self.content
              else []),
            f'root = "{b / "root"}"',
            f'state = "{b / "state"}"',
            cri,
            "[grpc]", f'  address = "{self.address}"',
            "[ttrpc]", f'  address = "{self.address}.ttrpc"',
            '[plugins."io.containerd.internal.v1.opt"]', f'  path = "{b / "opt"}"',
            '[plugins."io.containerd.grpc.v1.cri".registry]',
            f'  config_path = "{b / "certs.d"}"', ""]))
        host = self.registry.host
        hosts = b / "certs.d" / host / "hosts.toml"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f'server = "http://{host}"\n[host."http://{host}"]\n'
                         '  capabilities = ["pull", "resolve"]\n')
        conf = b / "net.d"
        conf.mkdir(exist_ok=True)
        (conf / "10-lamina-test.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "lamina-test",
            "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": True,
                         "ipMasq": False,
                         "ipam": {"type": "host-local", "dataDir": str(b / "ipam"),
                                  "ranges": [[{"subnet": POD_SUBNET}]]}}]}))

    # ------------------------------------------------------------------ lamina serve

    def start_serve(self) -> None:
        self._serve = lamina_serve(self.root, self.sock, serve_options=self.serve_options)
        self.lamina = self._serve.__enter__()

    def stop_serve(self) -> None:
        serve, self._serve = self._serve, None
        if serve is not None:
            serve.__exit__(None, None, None)  # asserts a clean exit

    def wait_reconnected(self) -> None:
        """Wait until containerd reaches ``lamina serve`` again: after the server
        went away its gRPC connection backs off, and calls fail (UNAVAILABLE, as a
        kubelet would retry them) until it reconnects."""
        def listed() -> bool:
            return subprocess.run(["ctr", "--address", self.address, "--namespace", NAMESPACE,
                                   "snapshots", "--snapshotter", "lamina", "ls"],
                                  capture_output=True, timeout=60, check=False).returncode == 0

        wait_for("containerd reaches lamina serve again", listed)

    def kill_serve(self) -> None:
        """SIGKILL ``lamina serve`` (by PID); its socket stays behind, stale."""
        assert self.lamina is not None and self._serve is not None
        self.lamina.proc.kill()
        self.lamina.proc.wait()
        # an exception thrown into lamina_serve skips its clean-exit checks;
        # its finally only reaps the process
        killed = ProcessLookupError("lamina serve killed by the test")
        self._serve.__exit__(type(killed), killed, None)
        self._serve = None

    # ------------------------------------------------------------------ containerd

    def start_containerd(self) -> None:
        """Start containerd in the node's network namespace; back when CRI says
        the runtime and the network are ready."""
        log = open(self.base / "containerd.log", "ab")  # noqa: SIM115 - closed below
        try:
            self.containerd = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}",
                 "containerd", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        wait_for("CRI reports the runtime and the network ready", self._ready)

    def _ready(self) -> bool:
        assert self.containerd is not None
        assert self.containerd.poll() is None, f"containerd exited:\n{self.log_tail()}"
        try:
            status = self.cri.runtime.Status(self.cri.pb.StatusRequest(), timeout=5)
        except grpc.RpcError:
            return False
        ready = {c.type: c.status for c in status.status.conditions}
        return ready.get("RuntimeReady", False) and ready.get("NetworkReady", False)

    def kill_containerd(self) -> None:
        """SIGKILL containerd (by PID): its shims and their containers go on."""
        assert self.containerd is not None
        self.containerd.kill()
        self.containerd.wait()
        self.containerd = None

    def stop_containerd(self) -> None:
        proc, self.containerd = self.containerd, None
        if proc is not None:
            stop_process(proc)  # SIGTERM, SIGKILL after 30 s

    def log_tail(self) -> str:
        return (self.base / "containerd.log").read_text(errors="replace")[-4000:]

    # ------------------------------------------------------------------ looking at it

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``lamina --root ROOT ARGS``, on the root directly."""
        done = subprocess.run([*_LAMINA, "--root", str(self.root), *args],
                              capture_output=True, text=True, timeout=300, check=False)
        if check:
            assert done.returncode == 0, f"lamina {' '.join(args)}: {done.stderr}"
        return done

    def ctr(self, *args: str) -> str:
        done = subprocess.run(["ctr", "--address", self.address, "--namespace", NAMESPACE,
                               *args], capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == 0, f"ctr {' '.join(args)}: {done.stderr}\n{self.log_tail()}"
        return done.stdout

    def collect_garbage(self) -> None:
        """One containerd garbage collection now, waited for (a lease removed with --sync)."""
        lease = self.ctr("leases", "create").split()[0]
        self.ctr("leases", "rm", "--sync", lease)

    def snapshots(self) -> dict[str, dict[str, Any]]:
        """Every snapshot on the lamina root, by key, as ``lamina snapshot ls`` lists it."""
        listed = json.loads(self.cli("snapshot", "ls", "--json").stdout)
        return {s["name"]: s for s in listed}

    def snapshot_of(self, container_id: str) -> str:
        """The lamina key of a container's (or sandbox's) writable snapshot: containerd
        keys it by the container's id, below its namespace."""
        keys = [k for k in self.snapshots() if k.startswith(f"{NAMESPACE}/")
                and k.endswith(f"/{container_id}")]
        assert len(keys) == 1, (container_id, keys)
        return keys[0]

    def usage(self, *keys: str) -> dict[str, tuple[int, int]]:
        """(bytes, inodes) of snapshots (all with no keys), as ``lamina snapshot usage``."""
        listed = json.loads(self.cli("snapshot", "usage", "--json", *keys).stdout)
        return {u["key"]: (u["size"], u["inodes"]) for u in listed}

    def check(self) -> None:
        done = self.cli("check", check=False)
        assert done.returncode == 0, done.stdout + done.stderr

    # ------------------------------------------------------------------ teardown

    def remove_all_pods(self) -> None:
        """What is left of the test's pods goes, through CRI (their containers with them)."""
        for pod_id in self.cri.pods():
            with contextlib.suppress(grpc.RpcError):
                self.cri.runtime.StopPodSandbox(
                    self.cri.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
                self.cri.runtime.RemovePodSandbox(
                    self.cri.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)

    def kill_shims(self) -> None:
        """Shims of this containerd that outlived it (a failed test), by PID."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if (argv[0].endswith(b"containerd-shim-runc-v2")
                        and os.fsencode(self.address) in argv):
                    os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def cri_node(workdir: Path, *, snapshotter: str = "lamina", stats_period: int = 1,
             serve_options: tuple[str, ...] = (), content: bool = False) -> Iterator[Node]:
    """A node on ``workdir``, with ``lamina serve`` and containerd running, CRI's
    snapshotter ``snapshotter`` (the benchmark compares containerd's ``overlayfs``),
    CRI collecting snapshot usage every ``stats_period`` seconds (containerd's
    default is 10; the benchmark uses it, the tests want fresh figures), ``lamina
    serve`` given ``serve_options``, and with ``content`` containerd's content
    store lamina's too (``--content``).

    A clean exit removes the pods left, stops containerd and then ``lamina
    serve``, which must exit cleanly; anything else is stopped by PID.
    """
    require_node_tools()
    base, in_tmp = short_dir(workdir / "c")
    try:
        with second_host() as (netns, host_ip, _), \
                running_registry(workdir / "registry", addr=host_ip) as registry:
            node = Node(workdir, base, netns, registry, snapshotter=snapshotter,
                        stats_period=stats_period, serve_options=serve_options,
                        content=content)
            try:
                node.write_config()
                node.start_serve()
                node.start_containerd()
                yield node
                node.remove_all_pods()
                node.stop_containerd()
                node.stop_serve()
            finally:
                if node.containerd is not None:
                    with contextlib.suppress(grpc.RpcError, AssertionError):
                        node.remove_all_pods()
                node.stop_containerd()
                node.kill_shims()
                node.cri.close()
                if node._serve is not None:
                    with contextlib.suppress(AssertionError):
                        node.stop_serve()
                unmount_all_under(base)
                unmount_all_under(workdir)
    finally:
        if in_tmp:
            shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- images


def build_images(workdir: Path) -> dict[str, str]:
    """The images a node's tests use, as OCI layouts (``oci:<dir>:<ref>`` by name):

    ``pause``: the sandbox image, ``sleep`` and its libraries, nothing else;
    ``app-a`` / ``app-b``: a small shell userland (one layer they share) and a
    layer of their own with ``/etc/app`` (``a`` or ``b``) and a 1 MiB ``/payload``.
    """
    import imagefactory as f

    workdir.mkdir(parents=True, exist_ok=True)
    rootfs = f.minimal_rootfs(workdir / "pause-rootfs", ("sleep",))
    pause = f.layer_from_dir(rootfs, workdir, comment="pause")
    shutil.rmtree(rootfs)
    refs = {"pause": f.build_oci_layout(
        workdir / "layout", [pause], ref_name="pause",
        config=f.ImageConfig(cmd=None, entrypoint=["/bin/sleep", "infinity"])).oci_ref}
    base = f.minimal_layer(workdir)
    for name in ("a", "b"):
        own = f.layer_from_entries([f.Dir("etc"), f.File("etc/app", f"{name}\n".encode()),
                                    f.File("payload", os.urandom(1 << 20))], workdir)
        refs[f"app-{name}"] = f.build_oci_layout(workdir / "layout", [base, own],
                                                 ref_name=f"app-{name}").oci_ref
    return refs
