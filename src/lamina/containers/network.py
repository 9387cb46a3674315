"""Containers' networks: ``none``, ``host`` or a CNI ``bridge``, and the files that go with them.

A container's options name its network (``"network"``: nerdctl's ``--net``);
:func:`network_mode` reads it, ``none`` when absent (the containers lamina
made before networks existed):

``none``
    A network namespace of its own with only ``lo`` (runc makes it), as before.
``host``
    The host's network namespace: no namespace of its own, the host's
    ``/etc/hosts`` and ``/etc/resolv.conf`` bind-mounted read-only and the host's
    hostname.
``bridge``
    A network namespace lamina makes and keeps (``ip netns``'s way: a process's
    ``/proc/<pid>/ns/net`` bind-mounted on a file), joined by the container's
    spec, wired by Debian's CNI plugins (``/usr/lib/cni``): ``loopback`` for
    ``lo``, then ``bridge`` on the host bridge ``lamina0`` with an address from
    ``host-local`` in 10.88.0.0/16 (nerdctl's default subnet), the bridge as
    gateway and outgoing traffic masqueraded. Needs root (not rootless).

Every mode but ``host`` gets a generated ``/etc/hosts`` (localhost, and the
container's hostname and id on its address) and ``/etc/resolv.conf`` (the
host's, less the nameservers in 127.0.0.0/8 and ``::1``, which a namespace of
its own cannot reach; Google's public ones when none is left, as docker
does), bind-mounted read-only.

On disk, under ``<root>/network/``::

    lamina.conflist        the CNI network list lamina runs (rewritten on use)
    ipam/                  host-local's leases (its dataDir)
    .locks/<id>.lock       serialises attaching and detaching one container
    <id>/                  one container's: netns (bridge), hosts, resolv.conf,
                           attachment.json (written last: the attachment is whole)

:meth:`Networks.attach` runs when a task starts and reuses a whole attachment
(a stopped task started again keeps its address); :meth:`Networks.detach` runs
CNI DEL (bridge), unmounts the namespace and removes the directory, and is
idempotent. The container service attaches before a start, detaches when a
start fails, when it stops a task and when a container is removed, so nothing
(namespace, veth, lease, masquerading rule) is left behind. A machine restart
takes the namespaces and the veths: a later detach then only releases the
lease. Two roots on one host share the ``lamina0`` bridge and its subnet but
not their leases: run bridge containers from one root at a time.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina import rootless
from lamina.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable
from lamina.fs.files import atomic_write, locked, remove_tree
from lamina.fs.perms import DIR_MODE
from lamina.mounts.idmap import reachable_from_userns
from lamina.mounts.mount import is_mountpoint, unmount_all

__all__ = [
    "BRIDGE", "CNI_BIN_DIR", "DEFAULT_MODE", "MODES", "SUBNET", "Attachment", "Networks",
    "apply_network", "network_dir", "network_mode", "resolv_conf", "with_network",
]

MODES = ("none", "host", "bridge")
DEFAULT_MODE = "none"
"""Not nerdctl's ``bridge``: it needs root, the CNI plugins and iptables, and a
container that never asked for a network should not get one behind its back."""

CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
NETWORK_NAME = "lamina"
BRIDGE = "lamina0"
SUBNET = "10.88.0.0/16"
CNI_VERSION = "1.0.0"
IFNAME = "eth0"
_PUBLIC_DNS = ("8.8.8.8", "8.8.4.4")
_HOST_HOSTS = "/etc/hosts"
_HOST_RESOLV = "/etc/resolv.conf"
_CNI_TIMEOUT = 60.0
_FILES = ("/etc/hosts", "/etc/resolv.conf")


def network_dir(root_path: str | os.PathLike[str]) -> Path:
    """Where a root keeps its containers' networks."""
    return Path(root_path) / "network"


def network_mode(options: Mapping[str, Any]) -> str:
    """The network a container's options ask for."""
    mode = options.get("network") or DEFAULT_MODE
    if mode not in MODES:
        raise InvalidArgument(f"unknown network {mode!r} (use {', '.join(MODES)})")
    return str(mode)


def with_network(options: Mapping[str, Any], mode: str | None) -> dict[str, Any]:
    """``options`` with the network ``mode`` (None: the default, not recorded)."""
    out = dict(options)
    if mode is not None:
        out["network"] = network_mode({"network": mode})
    return out


@dataclass(frozen=True)
class Attachment:
    """A container's network as its spec needs it."""

    mode: str
    hostname: str
    hosts: str            # the file to bind-mount on /etc/hosts
    resolv_conf: str      # ... and on /etc/resolv.conf
    netns: str | None = None  # bridge: the namespace the spec joins
    address: str | None = None  # bridge: the container's IPv4 address

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "hostname": self.hostname, "hosts": self.hosts,
                "resolv_conf": self.resolv_conf, "netns": self.netns, "address": self.address}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Attachment:
        return cls(mode=str(obj["mode"]), hostname=str(obj["hostname"]),
                   hosts=str(obj["hosts"]), resolv_conf=str(obj["resolv_conf"]),
                   netns=obj.get("netns"), address=obj.get("address"))


def apply_network(spec: Mapping[str, Any], attachment: Attachment, *,
                  user_destinations: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``spec`` joined to ``attachment``: its network namespace, hostname and the
    read-only ``/etc/hosts`` and ``/etc/resolv.conf`` (unless the container binds
    those itself: ``user_destinations``). A spec that had another attachment
    applied (a checkpoint's) loses that one's."""
    out = copy.deepcopy(dict(spec))
    linux = out.setdefault("linux", {})
    namespaces = [ns for ns in linux.get("namespaces") or [] if ns.get("type") != "network"]
    if attachment.mode == "bridge":
        namespaces.append({"type": "network", "path": attachment.netns})
    elif attachment.mode == "none":
        namespaces.append({"type": "network"})
    linux["namespaces"] = namespaces
    out["hostname"] = attachment.hostname
    theirs = [m for m in out.get("mounts") or []
              if m.get("destination") not in _FILES or m.get("destination") in user_destinations]
    ours = [{"destination": dest, "type": "bind", "source": source,
             "options": ["rbind", "rprivate", "ro"]}
            for dest, source in (("/etc/hosts", attachment.hosts),
                                 ("/etc/resolv.conf", attachment.resolv_conf))
            if dest not in user_destinations]
    out["mounts"] = theirs + ours
    return out


def resolv_conf(host: str) -> str:
    """A namespace's resolv.conf from the host's: loopback nameservers dropped."""
    kept: list[str] = []
    servers = 0
    for line in host.splitlines():
        words = line.split()
        if words[:1] == ["nameserver"] and len(words) > 1:
            try:
                if ipaddress.ip_address(words[1].split("%")[0]).is_loopback:
                    continue
            except ValueError:
                continue
            servers += 1
        kept.append(line)
    if not servers:
        kept += [f"nameserver {ip}" for ip in _PUBLIC_DNS]
    return "\n".join(kept) + "\n"


def _hosts(hostname: str, cid: str, address: str | None) -> str:
    names = " ".join(dict.fromkeys((hostname, cid)))
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines.append(f"{address}\t{names}" if address else f"127.0.1.1\t{names}")
    return "\n".join(lines) + "\n"


def _host_resolv_conf() -> str:
    """The host's resolv.conf; systemd-resolved's upstream one when the host's names
    only its local stub (127.0.0.53), as docker reads it."""
    text = Path(_HOST_RESOLV).read_text(encoding="utf-8", errors="replace")
    upstream = Path("/run/systemd/resolve/resolv.conf")
    if "nameserver 127.0.0.53" in text and upstream.is_file():
        return upstream.read_text(encoding="utf-8", errors="replace")
    return text


class Networks:
    """The networks of the containers of one root."""

    def __init__(self, root_path: str | os.PathLike[str], *,
                 cni_bin_dir: str = CNI_BIN_DIR) -> None:
        self.base = network_dir(root_path)
        self.cni_bin_dir = cni_bin_dir
        self._tag = hashlib.sha256(str(Path(root_path).absolute()).encode()).hexdigest()

    def _dir(self, cid: str) -> Path:
        return self.base / cid

    def _lock(self, cid: str) -> contextlib.AbstractContextManager[None]:
        (self.base / ".locks").mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        return locked(self.base / ".locks" / f"{cid}.lock", transient=True)

    def attachment(self, cid: str) -> Attachment | None:
        """``cid``'s whole attachment, if it has one."""
        try:
            obj = json.loads((self._dir(cid) / "attachment.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        return Attachment.from_json(obj)

    def attach(self, cid: str, mode: str, *, hostname: str,
               userns: bool = False) -> Attachment:
        """``cid``'s network in ``mode``: the one it has if whole and of that mode
        (its namespace still mounted), else a new one; a failure leaves nothing."""
        if mode not in MODES:
            raise InvalidArgument(f"unknown network {mode!r} (use {', '.join(MODES)})")
        with self._lock(cid):
            have = self.attachment(cid)
            if have is not None and have.mode == mode and (
                    have.netns is None or is_mountpoint(have.netns)):
                return have
            self._detach(cid)
            try:
                return self._attach(cid, mode, hostname=hostname, userns=userns)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._detach(cid)
                raise

    def detach(self, cid: str) -> None:
        """Undo ``cid``'s network, whatever of it there is (none: nothing to do)."""
        if not self._dir(cid).exists():
            return
        with self._lock(cid):
            self._detach(cid)

    # -- attaching ---------------------------------------------------------------------

    def _attach(self, cid: str, mode: str, *, hostname: str, userns: bool) -> Attachment:
        d = self._dir(cid)
        self.base.mkdir(mode=DIR_MODE, exist_ok=True)
        d.mkdir(mode=DIR_MODE)
        if userns:
            reachable_from_userns(d)  # runc mounts the files from inside the namespace
        if mode == "host":
            attachment = Attachment(mode=mode, hostname=socket.gethostname(),
                                    hosts=_HOST_HOSTS, resolv_conf=_HOST_RESOLV)
        else:
            netns = address = None
            if mode == "bridge":
                netns = str(d / "netns")
                address = self._bridge(cid, netns)
            hosts, resolv = d / "hosts", d / "resolv.conf"
            # 0644: the container's processes read them whoever they run as
            atomic_write(hosts, _hosts(hostname, cid, address).encode(), mode=0o644)
            atomic_write(resolv, resolv_conf(_host_resolv_conf()).encode(), mode=0o644)
            attachment = Attachment(mode=mode, hostname=hostname, hosts=str(hosts),
                                    resolv_conf=str(resolv), netns=netns, address=address)
        atomic_write(d / "attachment.json", json.dumps(attachment.to_json()).encode())
        return attachment

    def _bridge(self, cid: str, netns: str) -> str:
        """Make ``cid``'s namespace on ``netns`` and wire it; its address."""
        if rootless.active():
            raise FailedPrecondition("--net bridge needs root: a rootless lamina cannot "
                                     "make a host bridge (use --net none or host)")
        missing = [p for p in ("bridge", "host-local", "loopback")
                   if not os.access(os.path.join(self.cni_bin_dir, p), os.X_OK)]
        if missing:
            raise FailedPrecondition(
                f"--net bridge needs the CNI plugins {', '.join(missing)} in "
                f"{self.cni_bin_dir} (Debian: apt install containernetworking-plugins)")
        Path(netns).touch(mode=0o600)
        _run(["unshare", f"--net={netns}", "true"], f"make the network namespace of {cid}")
        record = {"cni_id": self._cni_id(cid), "netns": netns}
        atomic_write(self._dir(cid) / "cni.json", json.dumps(record).encode())
        self._cni("ADD", record, self._loopback(), ifname="lo")
        result = self._cni("ADD", record, self._conflist()["plugins"][0])
        atomic_write(self._dir(cid) / "cni.json",
                     json.dumps({**record, "result": result}).encode())
        for ip in result.get("ips") or []:
            iface = ipaddress.ip_interface(str(ip.get("address", "")))
            if iface.version == 4:
                return str(iface.ip)
        raise Internal(f"CNI gave {cid} no IPv4 address: {result}")

    # -- detaching ---------------------------------------------------------------------

    def _detach(self, cid: str) -> None:
        d = self._dir(cid)
        try:
            record = json.loads((d / "cni.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            record = None
        if record is not None:
            netns = str(record.get("netns") or "")
            if netns and not is_mountpoint(netns):
                record["netns"] = ""  # gone with a restart: only the lease is left
            prev = record.get("result")
            self._cni("DEL", record, self._conflist()["plugins"][0], prev=prev)
            if record["netns"]:
                self._cni("DEL", record, self._loopback(), ifname="lo")
        netns_file = d / "netns"
        if netns_file.exists():
            unmount_all(netns_file)
        remove_tree(d)

    # -- CNI ---------------------------------------------------------------------------

    def _cni_id(self, cid: str) -> str:
        # CNI ids allow fewer characters than container ids (no '+'), and two roots
        # may each have a container of one name: the same iptables chain otherwise
        return "lamina-" + hashlib.sha256(f"{self._tag}\0{cid}".encode()).hexdigest()[:24]

    def _conflist(self) -> dict[str, Any]:
        """The network list, written where a reader looks for what lamina runs."""
        conf = {
            "cniVersion": CNI_VERSION, "name": NETWORK_NAME,
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.base / "ipam")},
            }],
        }
        atomic_write(self.base / "lamina.conflist",
                     json.dumps(conf, indent=2).encode() + b"\n")
        return conf

    @staticmethod
    def _loopback() -> dict[str, Any]:
        return {"type": "loopback"}

    def _cni(self, command: str, record: Mapping[str, Any], plugin: Mapping[str, Any], *,
             ifname: str = IFNAME, prev: Any = None) -> dict[str, Any]:
        """Run one CNI plugin; its result (ADD) or {} (DEL)."""
        conf: dict[str, Any] = {"cniVersion": CNI_VERSION, "name": NETWORK_NAME, **plugin}
        if prev:
            conf["prevResult"] = prev
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": str(record["cni_id"]),
               "CNI_NETNS": str(record["netns"]), "CNI_IFNAME": ifname,
               "CNI_PATH": self.cni_bin_dir, "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin")}
        binary = os.path.join(self.cni_bin_dir, str(plugin["type"]))
        what = f"CNI {command} {plugin['type']}"
        try:
            proc = subprocess.run([binary], input=json.dumps(conf).encode(), env=env,
                                  capture_output=True, timeout=_CNI_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"{what}: no answer in {_CNI_TIMEOUT:.0f}s") from exc
        except OSError as exc:
            raise FailedPrecondition(f"{what}: {exc}") from exc
        out = proc.stdout.decode(errors="replace").strip()
        if proc.returncode != 0:
            try:
                err = json.loads(out)
                message = f"{err.get('msg', '')} {err.get('details', '')}".strip()
            except ValueError:
                message = out or proc.stderr.decode(errors="replace").strip()
            raise Internal(f"{what}: {message or f'exit {proc.returncode}'}")
        if command != "ADD" or not out:
            return {}
        result = json.loads(out)
        return result if isinstance(result, dict) else {}


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=_CNI_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FailedPrecondition(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        raise Internal(f"{what}: {proc.stderr.decode(errors='replace').strip()}")
