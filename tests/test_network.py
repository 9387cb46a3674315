"""Containers' networks (``--net none|host|bridge``) end to end, with runc and the CNI plugins.

Every ``lamina`` command runs in a network namespace of the test's own (a
``unshare --net`` on a file, entered with ``nsenter``): the ``lamina0``
bridge, the veths, the masquerading rules and the "host" interfaces a
``--net host`` container sees are the test's alone. The image holds a few host
binaries (``sh``, ``cat``, ``ip``, Python; the container gets Python's library
by a read-only bind mount).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import mounts_under, require_root_user, require_tools
from imagefactory import (
    DEFAULT_PATH_ENV,
    ImageConfig,
    build_oci_layout,
    layer_from_dir,
    minimal_rootfs,
)
from test_containers_cli import cleanup_tasks

from lamina.containers.network import (
    Attachment,
    apply_network,
    network_mode,
    resolv_conf,
    with_network,
)
from lamina.errors import InvalidArgument

CNI_BIN_DIR = "/usr/lib/cni"
IMAGE = "test/net:1"
PYLIB = f"/usr/lib/python3.{sys.version_info.minor}"
HOST_PYTHON = "/usr/bin/python3"
SERVER = ("import socket; s = socket.socket(); "
          "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 8080)); "
          "s.listen(); print('listening', flush=True)\n"
          "while True:\n c, _ = s.accept(); c.sendall(b'hello from a\\n'); c.close()")
CLIENT = ("import socket, sys; c = socket.create_connection((sys.argv[1], 8080), timeout=10); "
          "print(c.recv(100).decode().strip())")


# --------------------------------------------------------------------------- no root needed


def test_resolv_conf_drops_loopback_nameservers() -> None:
    host = "search example.org\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 10.1.2.3\n"
    assert resolv_conf(host) == "search example.org\nnameserver 10.1.2.3\n"
    # none left: docker's fallback
    assert resolv_conf("nameserver 127.0.0.1\noptions edns0\n") == (
        "options edns0\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n")


def test_network_option_is_checked_and_defaults_to_none() -> None:
    assert network_mode({}) == "none"
    assert network_mode(with_network({"args": None}, "bridge")) == "bridge"
    assert "network" not in with_network({}, None)
    with pytest.raises(InvalidArgument):
        with_network({}, "overlay")


def test_apply_network_replaces_an_earlier_attachment() -> None:
    spec = {"hostname": "old", "mounts": [
        {"destination": "/etc/hosts", "type": "bind", "source": "/old/hosts", "options": []},
        {"destination": "/data", "type": "bind", "source": "/srv", "options": []}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/old/netns"}]}}
    bridge = Attachment(mode="bridge", hostname="c1", hosts="/n/hosts",
                        resolv_conf="/n/resolv.conf", netns="/n/netns", address="10.88.0.9")
    out = apply_network(spec, bridge)
    assert {"type": "network", "path": "/n/netns"} in out["linux"]["namespaces"]
    assert len([ns for ns in out["linux"]["namespaces"] if ns["type"] == "network"]) == 1
    assert [(m["destination"], m["source"]) for m in out["mounts"]] == [
        ("/data", "/srv"), ("/etc/hosts", "/n/hosts"), ("/etc/resolv.conf", "/n/resolv.conf")]
    host = Attachment(mode="host", hostname="box", hosts="/etc/hosts",
                      resolv_conf="/etc/resolv.conf")
    out = apply_network(out, host)
    assert all(ns["type"] != "network" for ns in out["linux"]["namespaces"])
    assert out["hostname"] == "box"
    assert [(m["destination"], m["source"]) for m in out["mounts"]] == [
        ("/data", "/srv"), ("/etc/hosts", "/etc/hosts"), ("/etc/resolv.conf", "/etc/resolv.conf")]
    # a container that binds one of the files itself keeps its own
    mine = {"destination": "/etc/resolv.conf", "type": "bind", "source": "/mine", "options": []}
    out = apply_network({"mounts": [mine]}, bridge,
                        user_destinations=frozenset({"/etc/resolv.conf"}))
    assert [(m["destination"], m["source"]) for m in out["mounts"]] == [
        ("/etc/resolv.conf", "/mine"), ("/etc/hosts", "/n/hosts")]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("net-image")
    if not os.access(HOST_PYTHON, os.X_OK) or not Path(PYLIB).is_dir():
        pytest.skip(f"the host's {HOST_PYTHON} and {PYLIB} make the test image")
    rootfs = minimal_rootfs(base / "rootfs",
                            ("sh", "cat", "ip", "sleep", "hostname", "python3"))
    (rootfs / PYLIB.lstrip("/")).mkdir(parents=True)
    layer = layer_from_dir(rootfs, base / "blobs")
    build_oci_layout(base / "oci", [layer], ref_name=IMAGE,
                     config=ImageConfig(cmd=["sh"], env=[DEFAULT_PATH_ENV, "PYTHONHOME=/usr"]))
    return base / "oci"


@dataclass
class Net:
    """``lamina`` on one root, run inside the test's network namespace."""

    root: Path
    netns: Path

    def __call__(self, *args: str, check: bool = True, timeout: float = 120
                 ) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", f"--net={self.netns}", sys.executable, "-m", "lamina",
                "--root", str(self.root), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"lamina {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def sh(self, *argv: str) -> str:
        """A command in the test's namespace (the containers' "host")."""
        return subprocess.run(["nsenter", f"--net={self.netns}", *argv], capture_output=True,
                              text=True, check=True, timeout=60).stdout

    def run_d(self, name: str, *cmd: str, net: str = "bridge") -> None:
        self("container", "create", "--net", net, "--mount",
             f"type=bind,src={PYLIB},dst={PYLIB},ro", IMAGE, name, *cmd)
        self("task", "start", "-d", name)

    def address(self, name: str) -> str:
        hosts = (self.root / "network" / name / "hosts").read_text()
        return hosts.splitlines()[-1].split()[0]

    def leases(self) -> list[str]:
        ipam = self.root / "network" / "ipam" / "lamina"
        return sorted(p.name for p in ipam.iterdir()
                      if p.name[:1].isdigit() and "last_reserved" not in p.name) \
            if ipam.exists() else []

    def veths(self) -> list[str]:
        return [ln.split(":")[1].strip().split("@")[0] for ln in self.sh("ip", "-o", "link")
                .splitlines() if "veth" in ln]


@pytest.fixture
def net(tmp_root: Path, layout: Path) -> Iterator[Net]:
    require_root_user()
    require_tools("runc", "unshare", "nsenter", "ip", "iptables")
    netns = tmp_root / "test-netns"
    netns.touch()
    subprocess.run(["unshare", f"--net={netns}", "true"], check=True)
    n = Net(tmp_root / "root", netns)
    try:
        n.sh("ip", "link", "set", "lo", "up")
        # a "host" interface the --net host container must see
        n.sh("ip", "link", "add", "lamtest0", "type", "veth", "peer", "name", "lamtest1")
        n("image", "import", str(layout))
        yield n
    finally:
        problems = cleanup_tasks(n.root)
        subprocess.run(["umount", "-l", str(netns)], check=False)
        assert not problems, problems


def _require_cni() -> None:
    missing = [p for p in ("bridge", "host-local", "loopback")
               if not os.access(f"{CNI_BIN_DIR}/{p}", os.X_OK)]
    if missing:
        pytest.skip(f"CNI plugins not installed in {CNI_BIN_DIR} (Debian's "
                    f"containernetworking-plugins): {', '.join(missing)}")


def _wait_for(what: str, done: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def test_bridge_containers_reach_each_other_and_leave_nothing(net: Net) -> None:
    _require_cni()
    net.run_d("a", "python3", "-c", SERVER)
    net.run_d("b", "sleep", "600")
    a, b = net.address("a"), net.address("b")
    assert a != b and a.startswith("10.88.") and b.startswith("10.88.")
    _wait_for("a listens", lambda: "listening" in net("logs", "a").stdout)

    # b reaches a by address; b's own view: eth0 with its address, lo up, a default route
    got = net("task", "exec", "b", "python3", "-c", CLIENT, a).stdout
    assert got.strip() == "hello from a"
    inside = net("task", "exec", "b", "ip", "-o", "addr").stdout
    assert f"inet {b}/16" in inside and "lo" in inside
    assert "default via 10.88.0.1" in net("task", "exec", "b", "ip", "route").stdout
    hosts = net("task", "exec", "b", "cat", "/etc/hosts").stdout
    assert f"{b}\tb" in hosts and "127.0.0.1\tlocalhost" in hosts
    resolv = net("task", "exec", "b", "cat", "/etc/resolv.conf").stdout
    assert "nameserver" in resolv and "nameserver 127." not in resolv
    assert len(net.leases()) == 2 and len(net.veths()) == 2
    assert "10.88.0.0/16" in net.sh("iptables", "-t", "nat", "-S")

    # a task deleted and started again keeps its address (the attachment is reused)
    net("task", "kill", "-s", "KILL", "a")
    net("task", "wait", "--timeout", "30", "a", check=False)
    net("task", "delete", "a")
    net("task", "start", "-d", "a")
    assert net.address("a") == a and len(net.leases()) == 2

    net("container", "rm", "-f", "a", "b")
    assert net.leases() == [] and net.veths() == []
    assert not (net.root / "network" / "a").exists()
    assert not [m for m in mounts_under(net.root) if "network" in m]
    assert "10.88.0.0/16" not in net.sh("iptables", "-t", "nat", "-S")
    conflist = json.loads((net.root / "network" / "lamina.conflist").read_text())
    assert conflist["plugins"][0]["ipam"]["dataDir"] == str(net.root / "network" / "ipam")
    # the root stays consistent
    assert net("check").returncode == 0


def test_a_failed_start_leaves_no_network(net: Net) -> None:
    _require_cni()
    net("container", "create", "--net", "bridge", IMAGE, "broken", "sleep", "600")
    # runc fails after the network is attached (as a bad mount or a missing binary
    # would make it): the start is undone, its network with it
    failing = ("import sys\n"
               "from lamina.containers.runtime import TaskManager\n"
               "from lamina.errors import Internal\n"
               "def start(self, *args, **kwargs):\n"
               "    assert (self.state_dir.parent / 'network' / 'broken' / 'netns').exists()\n"
               "    raise Internal('runc failed (injected)')\n"
               "TaskManager.start = start\n"
               "from lamina.cli import main\n"
               "sys.exit(main())\n")
    proc = subprocess.run(["nsenter", f"--net={net.netns}", sys.executable, "-c", failing,
                           "--root", str(net.root), "task", "start", "-d", "broken"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "runc failed (injected)" in proc.stderr, proc.stderr
    assert net.leases() == [] and net.veths() == []
    assert not (net.root / "network" / "broken").exists()
    assert not [m for m in mounts_under(net.root) if "network" in m]
    # and it starts for real afterwards
    net("task", "start", "-d", "broken")
    assert len(net.leases()) == 1
    net("container", "rm", "-f", "broken")
    assert net.leases() == [] and net.veths() == []


def test_host_network_sees_the_hosts_interfaces_and_files(net: Net) -> None:
    net.run_d("h", "sleep", "600", net="host")
    links = net("task", "exec", "h", "ip", "-o", "link").stdout
    assert "lamtest0" in links
    assert net("task", "exec", "h", "cat", "/etc/resolv.conf").stdout == \
        Path("/etc/resolv.conf").read_text()
    assert net("task", "exec", "h", "cat", "/etc/hosts").stdout == Path("/etc/hosts").read_text()
    assert net("task", "exec", "h", "hostname").stdout.strip() == os.uname().nodename
    # read-only
    assert net("task", "exec", "h", "sh", "-c", "echo x >> /etc/hosts", check=False
               ).returncode != 0
    net("container", "rm", "-f", "h")
    assert not (net.root / "network" / "h").exists()


def test_none_network_has_loopback_and_the_files(net: Net) -> None:
    net.run_d("n", "sleep", "600", net="none")
    links = net("task", "exec", "n", "ip", "-o", "link").stdout
    assert "lamtest0" not in links and "lo" in links and "eth0" not in links
    hosts = net("task", "exec", "n", "cat", "/etc/hosts").stdout
    assert "127.0.0.1\tlocalhost" in hosts and "\tn" in hosts
    assert "nameserver" in net("task", "exec", "n", "cat", "/etc/resolv.conf").stdout
    net("container", "rm", "-f", "n")
    assert not (net.root / "network" / "n").exists()


def test_a_restored_bridge_container_gets_a_network_of_its_own(net: Net) -> None:
    _require_cni()
    from lamina.containers.runtime.criu import find_criu

    if find_criu() is None:
        pytest.skip("criu is not installed (or not in $PATH)")
    net.run_d("a", "sh", "-c", "while true; do sleep 0.2; done")
    net("container", "checkpoint", "a", "ckpt/a:1")
    net("container", "restore", "ckpt/a:1", "a2")
    a, a2 = net.address("a"), net.address("a2")
    assert a != a2
    assert f"inet {a2}/16" in net("task", "exec", "a2", "ip", "-o", "addr").stdout
    # the restored processes keep their hostname (CRIU restores it); both names resolve
    assert f"{a2}\ta a2" in net("task", "exec", "a2", "cat", "/etc/hosts").stdout
    net("container", "rm", "-f", "a", "a2")
    assert net.leases() == [] and net.veths() == []
