"""Rootless lamina: an unprivileged user runs lamina inside a user namespace.

An unprivileged user cannot mount, chown or run containers on the host. As
RootlessKit and podman do, lamina gives that user a user namespace of its own
in which they are root, with every ID they may use mapped:

    namespace ID 0            the user's own uid/gid
    namespace IDs 1..N        the user's subordinate range from /etc/subuid
                              and /etc/subgid (newuidmap/newgidmap, Debian's
                              ``uidmap`` package, write the maps)

and a mount namespace owned by it. The two namespaces are held by a small
process (``sleep infinity`` exec'd by the child that unshared them) whose pid
is kept in ``$XDG_RUNTIME_DIR/lamina/ns.pid`` (``/tmp/lamina-<uid>/`` without
that variable). Every ``lamina`` command of that user, early in ``main``,
joins those namespaces (setns) — creating the holder first if there is none —
so a mount one command makes (``image mount``, ``snapshot mount``, a detached
task's rootfs) is there for the next one, until the holder ends (a reboot, or
``lamina rootless stop``, which refuses while other processes are in the
namespace and says which mounts go with it: :func:`stop`). Mounts live in that
namespace only: the host's other processes do not see them (``nsenter -U -m -t
$(cat .../ns.pid)`` does).

Inside, lamina works as it does as root, with these differences:

* overlayfs is mounted with ``userxattr``: opaque directories are marked
  ``user.overlay.opaque`` (the ``trusted.`` namespace is the host root's);
  whiteouts stay character devices 0/0, which the kernel lets a user
  namespace's root create;
* a layer owned by an ID outside the mapping cannot be stored (the kernel
  has no host ID for it): the unpack fails naming the member and the range;
* device nodes other than whiteouts cannot be created in a user namespace:
  they are left out, as containerd and podman do, and one line on stderr
  per layer says which (``LAMINA_ROOTLESS_DEVICES=strict`` fails the unpack
  naming the member instead);
* containers run with runc in the namespace (runc sees it and runs rootless:
  no cgroup limits unless delegated); their root is the user, other IDs the
  subordinate ones, so the rootfs shows the image's owners inside;
* CRIU checkpoint/restore needs CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN) in
  the initial user namespace and is refused with that reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import pwd
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from lamina.errors import FailedPrecondition, InvalidArgument, NotImplementedErr

if TYPE_CHECKING:
    import ctypes

__all__ = [
    "ACTIVE_ENV",
    "CRIU_ROOTLESS",
    "DEVICES_ENV",
    "Ranges",
    "Stopped",
    "active",
    "check_member",
    "enter",
    "holder_pid",
    "host_uid",
    "in_user_namespace",
    "pids_in_pid_namespace",
    "refuse",
    "report_left_out",
    "runtime_dir",
    "stop",
    "subordinate_ranges",
]

CRIU_ROOTLESS = ("CRIU needs CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN) in the initial user "
                 "namespace, which an unprivileged user does not have")

DEVICES_ENV = "LAMINA_ROOTLESS_DEVICES"
"""Rootless, what becomes of a layer's device nodes: ``skip`` (the default) leaves
them out, as containerd and podman do (a container's /dev is a tmpfs runc fills;
images made by debootstrap carry some in theirs); ``strict`` fails the unpack."""
_DEVICE_POLICIES = ("skip", "strict")

ACTIVE_ENV = "LAMINA_ROOTLESS"
"""Set, to the user's host uid, in a lamina process (and its children) running
rootless in the namespace."""

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNS = 0x00020000
_INITIAL_MAP = ((0, 4294967295),)  # the initial namespace maps every id to itself



@functools.cache
def _libc() -> ctypes.CDLL:
    """libc's unshare and setns (Python 3.11 has neither), loaded by the unprivileged
    user's commands only: every command imports this module (start-up time)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


def _namespace_id() -> str:
    """Which user namespace this process is in (``user:[inode]``; "" where /proc does
    not say): setns and unshare change it, so what is known of a namespace is
    remembered under this name, never for the process (lamina may be imported
    before :func:`enter` joins the namespace)."""
    try:
        return os.readlink("/proc/self/ns/user")
    except OSError:
        return ""


def _maps() -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]] | None:
    """This process's uid and gid maps as ranges ``(first, count)``; None when /proc
    cannot say."""

    def read(name: str) -> tuple[tuple[int, int], ...]:
        with open(f"/proc/self/{name}", encoding="ascii") as f:
            return tuple((int(r[0]), int(r[2])) for r in (line.split() for line in f) if r)

    try:
        return read("uid_map"), read("gid_map")
    except OSError:
        return None


@functools.lru_cache(maxsize=8)
def _maps_of(namespace: str) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """The maps of ``namespace``, read once: a namespace's maps are written once,
    before anyone joins it (an unwritten one is not remembered, see :func:`_mapped`)."""
    maps = _maps()
    if maps is None or not maps[0]:
        raise LookupError(namespace)  # not worth remembering
    return maps


def _current_maps() -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]] | None:
    namespace = _namespace_id()
    if namespace:
        try:
            return _maps_of(namespace)
        except LookupError:
            pass
    return _maps()


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the initial one, as
    it is now (asked each time: joining a namespace changes the answer)."""
    maps = _current_maps()
    if maps is None:
        return False
    return maps[0] != _INITIAL_MAP


def _mapped() -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]] | None:
    """This process's namespace's uid and gid ranges ``(first, count)``; None when it
    is the initial namespace."""
    return _current_maps() if in_user_namespace() else None


def _describe(ranges: tuple[tuple[int, int], ...]) -> str:
    merged: list[list[int]] = []
    for first, count in sorted(ranges):
        if merged and merged[-1][1] + 1 == first:
            merged[-1][1] = first + count - 1
        else:
            merged.append([first, first + count - 1])
    return ", ".join(f"{a}-{b}" for a, b in merged)


def check_member(name: str, *, uid: int, gid: int,
                 device: tuple[int, int] | None = None) -> bool:
    """Whether to store a layer member: FailedPrecondition when this user namespace
    cannot store it as it is (an owner it does not map; a device node with
    ``LAMINA_ROOTLESS_DEVICES=strict``); False for a device node otherwise (left
    out, as containerd does in a user namespace). Always True in the initial namespace.
    (``trusted.*`` xattrs of a layer are dropped here, as on a filesystem
    without them: setting one is EPERM, which apply ignores.)"""
    maps = _mapped()
    if maps is None:
        return True
    uids, gids = maps
    if not any(a <= uid < a + n for a, n in uids) or not any(a <= gid < a + n for a, n in gids):
        raise FailedPrecondition(
            f"layer member {name} is owned by {uid}:{gid}, outside the IDs this user "
            f"namespace maps (uids {_describe(uids)}, gids {_describe(gids)}: the user's "
            "/etc/subuid and /etc/subgid ranges)")
    if device is not None and device != (0, 0):
        if _device_policy() == "skip":
            return False
        raise FailedPrecondition(
            f"layer member {name} is a device node ({device[0]}:{device[1]}): a user "
            f"namespace cannot create device nodes (rootless lamina with {DEVICES_ENV}=strict; "
            "unset it to leave them out)")
    return True


def _device_policy() -> str:
    policy = os.environ.get(DEVICES_ENV, "") or "skip"
    if policy not in _DEVICE_POLICIES:
        raise InvalidArgument(f"{DEVICES_ENV}={policy!r}: expected one of "
                              f"{', '.join(_DEVICE_POLICIES)}")
    return policy


def report_left_out(names: Sequence[str]) -> None:
    """Say on stderr, in one line, which device nodes of a layer were left out."""
    if not names:
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    noun = "device node" if len(names) == 1 else "device nodes"
    print(f"lamina: rootless: left out {len(names)} {noun} of a layer ({shown}): a user "
          f"namespace cannot create them ({DEVICES_ENV}=strict refuses such layers)",
          file=sys.stderr, flush=True)


def active() -> bool:
    """Whether this lamina runs rootless (in the namespace :func:`enter` joined)."""
    return os.environ.get(ACTIVE_ENV, "").isdigit()


def host_uid() -> int:
    """The user's uid on the host (inside the namespace, :func:`os.getuid` is 0)."""
    return int(os.environ[ACTIVE_ENV]) if active() else os.getuid()


def refuse(what: str, reason: str) -> None:
    """NotImplemented naming ``what`` and ``reason`` when running rootless."""
    if active():
        raise NotImplementedErr(f"{what} is not available rootless: {reason}")


class Ranges(NamedTuple):
    """A user's subordinate IDs: ``(start, count)`` ranges of uids and gids. (Named
    tuples here: every command imports this module, and a dataclass costs ~0.4 ms.)"""

    uids: tuple[tuple[int, int], ...]
    gids: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        """How many namespace IDs are mapped (0 and the subordinate ones)."""
        return 1 + min(sum(c for _, c in self.uids), sum(c for _, c in self.gids))


def _ranges(path: str, name: str, ident: int) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) != 3 or parts[0] not in (name, str(ident)):
                    continue
                if parts[1].isdigit() and parts[2].isdigit() and int(parts[2]) > 0:
                    out.append((int(parts[1]), int(parts[2])))
    except FileNotFoundError:
        pass
    return tuple(out)


def subordinate_ranges(uid: int | None = None, *, subuid: str = "/etc/subuid",
                       subgid: str = "/etc/subgid") -> Ranges:
    """The subordinate uid and gid ranges of ``uid`` (default: the real uid)."""
    uid = os.getuid() if uid is None else uid
    try:
        entry = pwd.getpwuid(uid)
        name, gid = entry.pw_name, entry.pw_gid
    except KeyError:
        name, gid = str(uid), os.getgid()
    uids = _ranges(subuid, name, uid)
    gids = _ranges(subgid, name, uid)
    del gid
    if not uids or not gids:
        missing = " and ".join(p for p, r in ((subuid, uids), (subgid, gids)) if not r)
        raise FailedPrecondition(
            f"rootless lamina needs subordinate IDs: {name} has no range in {missing} "
            f"(as root: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name})")
    return Ranges(uids, gids)


def runtime_dir() -> Path:
    """Where this user's namespace holder is recorded (owner-only)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    d = Path(base) / "lamina" if base and os.path.isdir(base) else \
        Path(f"/tmp/lamina-{host_uid()}")
    try:
        d.mkdir(mode=0o700, parents=False, exist_ok=True)
    except FileNotFoundError:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.lstat()
    if st.st_uid != os.getuid() or not d.is_dir() or d.is_symlink() or st.st_mode & 0o077:
        raise FailedPrecondition(f"{d} is not a private directory of uid {os.getuid()}")
    return d


def _sharing(pid: int, kind: str) -> list[int]:
    """The processes in ``pid``'s namespace of ``kind`` (``pid``, ``user``) that this
    process may inspect, as its pid namespace numbers them."""
    try:
        want = os.stat(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return []
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{name}/ns/{kind}")
        except OSError:
            continue  # gone, or not ours to look at
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            pids.append(int(name))
    return sorted(pids)


def pids_in_pid_namespace(init_pid: int) -> list[int]:
    """The processes sharing ``init_pid``'s pid namespace (a container's), as this
    namespace numbers them: what ``runc ps`` would say, for a rootless task that
    has no cgroup to read them from."""
    return _sharing(init_pid, "pid")


def _start_time(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[19]


def holder_pid() -> int | None:
    """The pid of this user's live namespace holder, if there is one."""
    try:
        text = (runtime_dir() / "ns.pid").read_text().split()
    except (FileNotFoundError, FailedPrecondition):
        return None
    if len(text) != 2 or not text[0].isdigit():
        return None
    pid = int(text[0])
    if _start_time(pid) != text[1]:
        return None  # gone, or the pid was reused
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return None
    except OSError:
        return None
    return pid


def _newidmap(tool: str, pid: int, own: int, ranges: tuple[tuple[int, int], ...]) -> None:
    import shutil
    import subprocess

    binary = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/bin:/bin")
    if binary is None:
        raise FailedPrecondition(f"rootless lamina needs {tool} (apt-get install uidmap)")
    args = [binary, str(pid), "0", str(own), "1"]
    inner = 1
    for start, count in ranges:
        args += [str(inner), str(start), str(count)]
        inner += count
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FailedPrecondition(f"{tool} failed: {proc.stderr.strip() or proc.returncode}")


def _spawn_holder(ranges: Ranges) -> int:
    """Fork the holder: it unshares a user and a mount namespace, waits for its maps,
    then becomes ``sleep infinity`` in a session of its own."""
    import shutil

    libc = _libc()  # loaded before the fork: the child only calls it
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    sleep = shutil.which("sleep") or "/bin/sleep"
    pid = os.fork()
    if pid == 0:  # the holder
        try:
            os.close(ready_r)
            os.close(go_w)
            os.setsid()
            ok = libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) == 0
            os.write(ready_w, b"x" if ok else b"!")
            os.close(ready_w)
            if not ok or os.read(go_r, 1) != b"g":
                os._exit(1)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 1 << 16)
            os.chdir("/")
            os.execv(sleep, [sleep, "infinity"])
        finally:
            os._exit(1)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"x":
            raise FailedPrecondition(
                "cannot create a user namespace (unshare(CLONE_NEWUSER) failed: "
                "user.max_user_namespaces or kernel.unprivileged_userns_clone may forbid it)")
        _newidmap("newuidmap", pid, os.getuid(), ranges.uids)
        _newidmap("newgidmap", pid, os.getgid(), ranges.gids)
        os.write(go_w, b"g")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(ready_r)
        os.close(go_w)
    return pid


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    fd = os.open(runtime_dir() / "ns.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _join(pid: int) -> None:
    fds = [os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in ("user", "mnt")]
    try:
        for fd, kind in zip(fds, (_CLONE_NEWUSER, _CLONE_NEWNS), strict=True):
            if _libc().setns(fd, kind) != 0:
                err = _errno()
                raise FailedPrecondition(
                    f"cannot join lamina's namespaces (holder pid {pid}): {os.strerror(err)}")
    finally:
        for fd in fds:
            os.close(fd)


def enter() -> bool:
    """Join (or first create) this user's lamina namespaces; whether it did.

    Does nothing for root, in a user namespace already (a rootless lamina's
    children, a container), or for a user without subordinate ID ranges
    (lamina then runs unprivileged, as a plain process, and cannot mount).
    Must run before any thread starts (setns of a user namespace needs a
    single-threaded process).
    """
    if os.geteuid() == 0 or in_user_namespace():
        return False
    try:
        ranges = subordinate_ranges()
    except FailedPrecondition:
        return False  # rootless is not set up for this user: run unprivileged
    cwd = os.getcwd()
    uid = os.getuid()
    with _lock():
        pid = holder_pid()
        if pid is None:
            pid = _spawn_holder(ranges)
            start = None
            for _ in range(1000):  # the child is ours: its stat is there at once
                start = _start_time(pid)
                if start:
                    break
            from lamina.fs.files import atomic_write

            atomic_write(runtime_dir() / "ns.pid", f"{pid} {start}\n".encode())
    _join(pid)
    os.environ[ACTIVE_ENV] = str(uid)
    with contextlib.suppress(OSError):
        os.chdir(cwd)  # setns(CLONE_NEWNS) moved us to the namespace's root
    return True


class Stopped(NamedTuple):
    """What :func:`stop` ended: the holder's pid, and the mount points its namespace
    had and the host has not (those made in it, and copies of host mounts since
    gone from the host), which went with it."""

    pid: int
    mounts: tuple[str, ...]


def _mount_points() -> list[str]:
    """This process's mount points, as mountinfo writes them (octal escapes kept)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [line.split()[4] for line in f if line.strip()]


def _describe_process(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        words = " ".join(os.fsdecode(a) for a in argv if a)[:60]
    except OSError:
        words = ""
    return f"{pid} ({words})" if words else str(pid)


def stop() -> Stopped | None:
    """End this user's namespace holder: its user and mount namespaces, and every
    mount made in them, go once no process is left in them. None when there is no
    holder (or for root, who has none). FailedPrecondition while other processes
    (containers, their monitors, ``lamina serve``, another command) are in the
    namespace: the next command would make a new namespace they are not in.

    Run from the initial namespace by a process with one thread: it joins the
    namespace (where it may look at every process, whatever ID it runs as) to
    find its members and mounts, so it leaves that namespace no longer usable
    by lamina.
    """
    if os.geteuid() == 0 and not in_user_namespace():
        return None
    if in_user_namespace():
        raise FailedPrecondition("stopping lamina's namespace is done from outside it "
                                 "(this process runs in a user namespace)")
    with _lock():
        pid = holder_pid()
        if pid is None:
            return None
        host = set(_mount_points())
        pid_file = runtime_dir() / "ns.pid"  # named before joining makes us uid 0
        _join(pid)
        others = [p for p in _sharing(pid, "user") if p not in (pid, os.getpid())]
        if others:
            shown = ", ".join(_describe_process(p) for p in others[:4])
            more = f" and {len(others) - 4} more" if len(others) > 4 else ""
            raise FailedPrecondition(
                f"{len(others)} other process(es) run in lamina's namespace (holder pid "
                f"{pid}): {shown}{more}; stop them first (lamina task kill, or end "
                "lamina serve)")
        made = tuple(m for m in dict.fromkeys(_mount_points()) if m not in host)
        os.kill(pid, 15)
        for _ in range(200):  # not our child: wait for it to go, up to 2 s
            if _start_time(pid) is None:
                break
            time.sleep(0.01)
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
    return Stopped(pid, made)


def _main() -> int:  # pragma: no cover - `python -m lamina.rootless`: print the holder's pid
    pid = holder_pid()
    print(pid if pid is not None else "no namespace holder", file=sys.stdout)
    return 0 if pid is not None else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
