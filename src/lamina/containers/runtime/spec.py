"""OCI runtime specs generated from an image config.

:func:`generate_spec` turns the ``config`` of an OCI image config (Entrypoint,
Cmd, Env, WorkingDir, User) into a runtime spec (``config.json``) that runc
accepts, with defaults close to what container engines use: fresh pid, ipc,
uts, mount and network namespaces, the usual pseudo filesystems, the default
capability set of docker, masked and read-only kernel paths.

User names are resolved against the image's own ``/etc/passwd`` and
``/etc/group`` (given the rootfs path), never the host's; symbolic links in
the rootfs are followed as if the rootfs were ``/``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina.errors import InvalidArgument, NotFound
from lamina.fs.files import read_regular_file

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_PATH",
    "OCI_VERSION",
    "BindMount",
    "User",
    "generate_spec",
    "image_process_config",
    "parse_mount_flag",
    "parse_volume_flag",
    "resolve_in_root",
    "resolve_user",
]

OCI_VERSION = "1.0.2"

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: the most of an image's /etc/passwd or /etc/group that is read (real ones are KiB)
MAX_USER_DB = 16 << 20

#: docker's default capability set
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

#: The kernel filesystems every container gets, as containerd's default spec has them:
#: (destination, type, source, options).
_DEFAULT_MOUNT_TABLE: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
    ("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
    ("/dev/pts", "devpts", "devpts",
     ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5")),
    ("/dev/shm", "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),
    ("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    ("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
)
_DEFAULT_MOUNTS: tuple[dict[str, Any], ...] = tuple(
    {"destination": dest, "type": kind, "source": source, "options": list(options)}
    for dest, kind, source, options in _DEFAULT_MOUNT_TABLE
)

_NAMESPACES = ("pid", "ipc", "uts", "mount", "network")


@dataclass(frozen=True)
class BindMount:
    """A host directory or file bind-mounted into the container."""

    source: str
    destination: str
    readonly: bool = False

    def __post_init__(self) -> None:
        if not os.path.isabs(self.source):
            raise InvalidArgument(f"bind mount source must be absolute: {self.source!r}")
        if not os.path.isabs(self.destination):
            raise InvalidArgument(f"bind mount destination must be absolute: {self.destination!r}")

    def to_spec(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "type": "bind",
            "source": self.source,
            "options": ["rbind", "rprivate", "ro" if self.readonly else "rw"],
        }


def parse_mount_flag(value: str) -> BindMount:
    """Parse ``type=bind,src=/a,dst=/b[,ro|readonly[=true|false]]`` (``--mount``).

    ``source``/``src`` and ``destination``/``dst``/``target`` are synonyms;
    ``type`` may be left out and must be ``bind`` when given. A relative source
    is made absolute against the current directory.
    """
    fields: dict[str, str] = {}
    readonly = False
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, val = part.partition("=")
        key = key.strip().lower()
        if key in ("ro", "readonly"):
            if not eq or val.lower() in ("1", "true", "yes"):
                readonly = True
            elif val.lower() in ("0", "false", "no"):
                readonly = False
            else:
                raise InvalidArgument(f"--mount {value!r}: bad value for {key}: {val!r}")
            continue
        if key == "rw" and not eq:
            readonly = False
            continue
        if not eq:
            raise InvalidArgument(f"--mount {value!r}: expected key=value, got {part!r}")
        key = {"src": "source", "dst": "destination", "target": "destination"}.get(key, key)
        if key not in ("type", "source", "destination"):
            raise InvalidArgument(f"--mount {value!r}: unknown field {key!r}")
        fields[key] = val
    kind = fields.get("type", "bind")
    if kind != "bind":
        raise InvalidArgument(f"--mount {value!r}: only type=bind is supported")
    if not fields.get("source") or not fields.get("destination"):
        raise InvalidArgument(f"--mount {value!r}: source and destination are required")
    return BindMount(
        source=os.path.abspath(fields["source"]),
        destination=fields["destination"],
        readonly=readonly,
    )


def parse_volume_flag(value: str) -> BindMount:
    """Parse docker's ``/host:/ctr[:ro|rw]`` (``-v``/``--volume``) as a bind mount.

    Only host paths are supported: a named or anonymous volume is refused.
    """
    parts = value.split(":")
    if len(parts) == 1:
        raise InvalidArgument(f"-v {value!r}: anonymous volumes are not supported "
                              "(want /host/path:/container/path[:ro])")
    if len(parts) > 3:
        raise InvalidArgument(f"-v {value!r}: want /host/path:/container/path[:ro]")
    source, destination = parts[0], parts[1]
    if not source.startswith("/"):
        raise InvalidArgument(f"-v {value!r}: named volumes are not supported "
                              "(the host path must be absolute)")
    mode = parts[2] if len(parts) == 3 else "rw"
    flags = {f.strip() for f in mode.split(",") if f.strip()} or {"rw"}
    if not flags <= {"ro", "rw"} or flags == {"ro", "rw"}:
        raise InvalidArgument(f"-v {value!r}: unsupported mode {mode!r} (want ro or rw)")
    return BindMount(source=os.path.normpath(source), destination=destination,
                     readonly="ro" in flags)


# --------------------------------------------------------------------------
# users


@dataclass(frozen=True)
class User:
    """A resolved process user: what the spec's ``process.user`` holds."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str | None = None

    def to_spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uid": self.uid, "gid": self.gid}
        if self.additional_gids:
            out["additionalGids"] = list(self.additional_gids)
        return out


def resolve_in_root(root: str | os.PathLike[str], path: str) -> Path:
    """``path`` inside ``root``, following symlinks as if ``root`` were ``/``.

    The result never leaves ``root``: an absolute link target restarts at
    ``root`` and ``..`` stops at it. The final component need not exist.
    """
    root_s = os.path.abspath(os.fspath(root))
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root_s, *resolved, name)
        if os.path.islink(candidate):
            hops += 1
            if hops > 40:
                raise InvalidArgument(f"too many levels of symbolic links resolving {path!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(name)
    return Path(root_s, *resolved)


def _read_db(rootfs: str | os.PathLike[str] | None, name: str) -> list[list[str]]:
    if rootfs is None:
        return []
    path = resolve_in_root(rootfs, name)
    if path.is_dir():
        return []  # as if absent: a numeric user needs no entry
    data = read_regular_file(path, limit=MAX_USER_DB, what=f"the image's {name}")
    if data is None:
        return []
    text = data.decode("utf-8", errors="replace")
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rows.append(line.split(":"))
    return rows


def _int_or_none(value: str) -> int | None:
    try:
        n = int(value)
    except ValueError:
        return None
    if n < 0 or n > 0xFFFFFFFF:
        raise InvalidArgument(f"id out of range: {value!r}")
    return n


def resolve_user(user: str, rootfs: str | os.PathLike[str] | None = None) -> User:
    """Resolve an image ``User`` (``uid``, ``name``, ``x:y``) to numeric ids.

    Names need ``rootfs`` (its ``/etc/passwd`` and ``/etc/group``). A user
    given without a group gets its primary group from passwd (0 when it is
    not listed) and its supplementary groups from the group file.
    """
    user = user.strip()
    if not user:
        user = "0"
    name, colon, group = user.partition(":")
    if colon and not group:
        raise InvalidArgument(f"invalid user {user!r}")
    passwd = _read_db(rootfs, "/etc/passwd")
    groups = _read_db(rootfs, "/etc/group")

    uid = _int_or_none(name)
    entry: list[str] | None = None
    for row in passwd:
        if len(row) < 4:
            continue
        if (uid is None and row[0] == name) or (uid is not None and row[2] == str(uid)):
            entry = row
            break
    if uid is None:
        if entry is None:
            where = "no rootfs to look it up in" if rootfs is None else "not in /etc/passwd"
            raise NotFound(f"unable to find user {name!r}: {where}")
        parsed = _int_or_none(entry[2])
        if parsed is None:
            raise InvalidArgument(f"bad uid for user {name!r} in /etc/passwd: {entry[2]!r}")
        uid = parsed
    username = entry[0] if entry else None
    home = entry[5] if entry and len(entry) > 5 and entry[5] else None

    additional: list[int] = []
    if group:
        gid = _int_or_none(group)
        if gid is None:
            for row in groups:
                if len(row) >= 3 and row[0] == group:
                    gid = _int_or_none(row[2])
                    break
            if gid is None:
                where = "no rootfs to look it up in" if rootfs is None else "not in /etc/group"
                raise NotFound(f"unable to find group {group!r}: {where}")
    else:
        gid = _int_or_none(entry[3]) if entry else 0
        if gid is None:
            gid = 0
        if username is not None:
            for row in groups:
                if len(row) < 4:
                    continue
                members = [m.strip() for m in row[3].split(",") if m.strip()]
                g = _int_or_none(row[2])
                if username in members and g is not None and g != gid and g not in additional:
                    additional.append(g)
    if home is None and uid == 0:
        home = "/root"
    return User(uid=uid, gid=gid, additional_gids=tuple(additional), home=home)


# --------------------------------------------------------------------------
# spec


def image_process_config(image_config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``config`` object of an OCI image config (or the mapping itself if it is one)."""
    inner = image_config.get("config")
    if isinstance(inner, Mapping):
        return inner
    if inner is None and (
        "rootfs" in image_config or "architecture" in image_config or "os" in image_config
    ):
        return {}
    return image_config


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidArgument(f"image config {what} must be a list of strings")
    out = list(value)
    if not all(isinstance(v, str) for v in out):
        raise InvalidArgument(f"image config {what} must be a list of strings")
    return out


def _merge_env(base: Iterable[str], extra: Iterable[str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in [*base, *extra]:
        key, eq, _ = item.partition("=")
        if not key:
            raise InvalidArgument(f"invalid environment entry {item!r}")
        merged[key] = item if eq else f"{key}="
    return list(merged.values())


def generate_spec(
    image_config: Mapping[str, Any],
    *,
    args: Sequence[str] | None = None,
    entrypoint: Sequence[str] | None = None,
    env_extra: Iterable[str] = (),
    mounts: Sequence[BindMount] = (),
    terminal: bool = False,
    hostname: str = "lamina",
    cwd: str | None = None,
    user: str | None = None,
    rootfs: str | os.PathLike[str] | None = None,
    readonly_rootfs: bool = False,
    cgroups_path: str | None = None,
) -> dict[str, Any]:
    """An OCI runtime spec that runs ``image_config``'s process.

    ``args`` replaces the image's Cmd, ``entrypoint`` its Entrypoint; the
    process is Entrypoint + Cmd. ``env_extra`` entries (``KEY=value``)
    override the image's Env. ``user`` and ``cwd`` override User and
    WorkingDir. ``rootfs`` is where the container's root filesystem is
    mounted, needed to resolve user and group names. ``root.path`` is
    always ``rootfs`` (relative to the bundle).
    """
    cfg = image_process_config(image_config)
    ep = (
        list(entrypoint)
        if entrypoint is not None
        else _str_list(cfg.get("Entrypoint"), "Entrypoint")
    )
    cmd = list(args) if args is not None else _str_list(cfg.get("Cmd"), "Cmd")
    process_args = ep + cmd
    if not process_args:
        raise InvalidArgument("no command specified: the image has no Entrypoint or Cmd")

    env = _merge_env(_str_list(cfg.get("Env"), "Env"), env_extra)
    keys = {e.partition("=")[0] for e in env}
    if "PATH" not in keys:
        env.insert(0, f"PATH={DEFAULT_PATH}")

    workdir = cwd if cwd is not None else (cfg.get("WorkingDir") or "/")
    if not isinstance(workdir, str) or not workdir.startswith("/"):
        raise InvalidArgument(f"working directory must be an absolute path: {workdir!r}")

    user_s = user if user is not None else cfg.get("User") or ""
    if not isinstance(user_s, str):
        raise InvalidArgument("image config User must be a string")
    resolved = resolve_user(user_s, rootfs)
    if "HOME" not in keys:
        env.append(f"HOME={resolved.home or '/'}")
    if terminal and "TERM" not in keys:
        env.append("TERM=xterm")

    caps = list(DEFAULT_CAPABILITIES)
    spec_mounts = [copy.deepcopy(m) for m in _DEFAULT_MOUNTS]
    for bm in mounts:
        spec_mounts.append(bm.to_spec())

    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": terminal,
            "user": resolved.to_spec(),
            "args": process_args,
            "env": env,
            "cwd": workdir,
            "capabilities": {
                "bounding": list(caps),
                "effective": list(caps),
                "permitted": list(caps),
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": False,
        },
        "root": {"path": "rootfs", "readonly": readonly_rootfs},
        "hostname": hostname,
        "mounts": spec_mounts,
        "linux": {
            "namespaces": [{"type": t} for t in _NAMESPACES],
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    if cgroups_path is not None:
        spec["linux"]["cgroupsPath"] = cgroups_path
    return spec
