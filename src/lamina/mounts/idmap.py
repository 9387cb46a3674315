"""ID-mapped mounts: an image's layers seen through a container's user namespace.

A container with a user namespace of its own (``lamina run --userns
HOSTID:SIZE``) has its IDs 0..SIZE-1 mapped to HOSTID..HOSTID+SIZE-1 on the
host. Its root filesystem must show the image's owners (root-owned ``/etc``
as root inside), yet the image's layers are shared by every container and
must not be chowned. Since Linux 5.12 a mount can carry an ID mapping of its
own (open_tree(OPEN_TREE_CLONE), mount_setattr(MOUNT_ATTR_IDMAP) with a user
namespace's fd, move_mount); since 5.19 overlayfs accepts such mounts as its
layers. So, as containerd 2.0 does:

* **overlay**: the directory all the lowerdirs live in (the snapshotter's
  ``snapshots/``) is cloned once, ID-mapped and read-only, onto a helper
  directory beside the target, the overlay is mounted with its lowerdirs
  through that clone, and the helper is detached again (overlayfs keeps
  private clones of its layers). The upperdir is *not* mapped: what the
  container writes lands on disk with host IDs (container uid n is host
  HOSTID+n), and the upperdir's root is chowned to the mapped owner of the
  image's root, once, so the container's root can write in ``/``.
* **bind** (native snapshots, a first layer): the source itself is cloned
  ID-mapped onto the target; there the disk keeps the image's own IDs, also
  for what the container writes.

Mounts ask for this the way containerd's do, with ``uidmap=C:H:S`` and
``gidmap=C:H:S`` options (container ID, host ID, count), which
:func:`lamina.mounts.mount.mount_all` hands to :func:`mount_idmapped`. What is
mounted here without a mapping goes through :func:`lamina.mounts.plain.mount_plain`
(never back through ``mount_all``).

Where the kernel or the filesystem cannot map IDs on a mount (EINVAL, EPERM,
ENOSYS from mount_setattr) — or with ``LAMINA_IDMAP=copy`` — the lowerdirs'
merged tree is copied once into ``<snapshot>/idmap-<uid>-<gid>-<size>`` with
every owner shifted into the range (IDs beyond it become the overflow ID, as
an ID-mapped mount shows them), and that copy is the overlay's lowerdir from
then on; a read-write bind mount is chowned in place (a native snapshot is the
container's private copy already). lamina says so on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from lamina.errors import FailedPrecondition, InvalidArgument
from lamina.fs.files import remove_tree
from lamina.fs.tree import DIR_FLAGS, DirStack, proc_path
from lamina.fs.walk import Entry, Walk
from lamina.mounts.overlay import overlay_mount_options
from lamina.mounts.plain import Mount, mount_plain, move_mount, syscall, unmount_all

__all__ = [
    "COPY_ENV",
    "IDMap",
    "UserNamespace",
    "chowned_copy",
    "idmap_supported",
    "mount_idmapped",
    "parse_userns",
    "reachable_from_userns",
    "userns_fd",
    "with_idmap",
]

COPY_ENV = "LAMINA_IDMAP"
"""``LAMINA_IDMAP=copy`` makes lamina use the chowned copy even where ID-mapped mounts work."""

_SYS_OPEN_TREE = 428
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 0x1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_AT_FDCWD = -100
_MNT_DETACH = 2
_CLONE_NEWUSER = 0x10000000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x100000
_MAX_ID = 0xFFFFFFFF


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


# ---------------------------------------------------------------------------- mappings


@dataclass(frozen=True)
class IDMap:
    """One range: container IDs ``container..container+size-1`` are host ``host..``."""

    container: int
    host: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or min(self.container, self.host) < 0 or \
                max(self.container, self.host) + self.size - 1 >= _MAX_ID:
            raise InvalidArgument(f"invalid ID mapping {self.text()}: out of range")

    def text(self) -> str:
        return f"{self.container}:{self.host}:{self.size}"

    @classmethod
    def parse(cls, text: str) -> IDMap:
        """``C:H:S`` (as containerd's ``uidmap=``/``gidmap=`` mount options)."""
        parts = text.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise InvalidArgument(f"invalid ID mapping {text!r}: want CONTAINER:HOST:SIZE")
        return cls(int(parts[0]), int(parts[1]), int(parts[2]))


@dataclass(frozen=True)
class UserNamespace:
    """A container's user namespace: its uid and gid mappings."""

    uids: tuple[IDMap, ...]
    gids: tuple[IDMap, ...]

    def __post_init__(self) -> None:
        if not self.uids or not self.gids:
            raise InvalidArgument("a user namespace needs uid and gid mappings")

    def to_host(self, ident: int, *, gid: bool = False) -> int | None:
        """The host ID of container ID ``ident`` (None when it is not mapped)."""
        for m in self.gids if gid else self.uids:
            if m.container <= ident < m.container + m.size:
                return m.host + ident - m.container
        return None

    def spec(self) -> dict[str, list[dict[str, int]]]:
        """The runtime spec's ``linux.uidMappings`` and ``linux.gidMappings``."""

        def rows(maps: tuple[IDMap, ...]) -> list[dict[str, int]]:
            return [{"containerID": m.container, "hostID": m.host, "size": m.size} for m in maps]

        return {"uidMappings": rows(self.uids), "gidMappings": rows(self.gids)}

    def mount_options(self) -> tuple[str, str]:
        """The ``uidmap=``/``gidmap=`` options that ask mounts to be ID-mapped."""
        return ("uidmap=" + ",".join(m.text() for m in self.uids),
                "gidmap=" + ",".join(m.text() for m in self.gids))

    def to_json(self) -> dict[str, list[str]]:
        return {"uids": [m.text() for m in self.uids], "gids": [m.text() for m in self.gids]}

    @classmethod
    def from_json(cls, obj: dict[str, list[str]]) -> UserNamespace:
        return cls(tuple(IDMap.parse(t) for t in obj["uids"]),
                   tuple(IDMap.parse(t) for t in obj["gids"]))

    def tag(self) -> str:
        """A short name for the mapping, usable in a file name."""
        u, g = self.uids[0], self.gids[0]
        if len(self.uids) == len(self.gids) == 1:
            return f"{u.host}-{g.host}-{u.size}"
        return hashlib.sha256(repr(self.to_json()).encode()).hexdigest()[:16]


def parse_userns(text: str) -> UserNamespace:
    """``HOSTID:SIZE`` (uids and gids alike) or ``HOSTUID:HOSTGID:SIZE``: container
    IDs 0..SIZE-1 are the host's HOSTID..HOSTID+SIZE-1 (``lamina run --userns``)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
        raise InvalidArgument(f"--userns {text!r}: want HOSTID:SIZE or HOSTUID:HOSTGID:SIZE")
    nums = [int(p) for p in parts]
    uid, gid, size = (nums[0], nums[0], nums[1]) if len(nums) == 2 else tuple(nums)
    if uid == 0 or gid == 0:
        raise InvalidArgument(f"--userns {text!r}: mapping onto host ID 0 gives no isolation")
    return UserNamespace((IDMap(0, uid, size),), (IDMap(0, gid, size),))


def _options_userns(options: Sequence[str]) -> tuple[UserNamespace | None, list[str]]:
    uids: list[IDMap] = []
    gids: list[IDMap] = []
    rest: list[str] = []
    for opt in options:
        key, eq, value = opt.partition("=")
        if eq and key in ("uidmap", "gidmap"):
            maps = [IDMap.parse(v) for v in value.split(",") if v]
            (uids if key == "uidmap" else gids).extend(maps)
        else:
            rest.append(opt)
    if not uids and not gids:
        return None, rest
    if not uids or not gids:
        raise InvalidArgument("an ID-mapped mount needs both uidmap= and gidmap=")
    return UserNamespace(tuple(uids), tuple(gids)), rest


def with_idmap(mounts: Sequence[Mount], userns: UserNamespace) -> list[Mount]:
    """``mounts`` with the options that make :func:`lamina.mounts.mount.mount_all` ID-map them."""
    extra = userns.mount_options()
    return [Mount(m.type, m.source, m.target,
                  (*(o for o in m.options if not o.startswith(("uidmap=", "gidmap="))), *extra))
            for m in mounts]


# ---------------------------------------------------------------------------- syscalls


_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]


@contextlib.contextmanager
def userns_fd(userns: UserNamespace) -> Iterator[int]:
    """An fd of a new user namespace with ``userns``'s mappings (for MOUNT_ATTR_IDMAP).

    A child process unshares a user namespace; the parent, which has
    CAP_SETUID/CAP_SETGID over it, writes its maps, opens
    ``/proc/<child>/ns/user`` and lets the child exit: the fd keeps the
    namespace alive.
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as little as possible, then _exit
        code = 0
        try:
            os.close(ready_r)
            os.close(go_w)
            if _libc.unshare(_CLONE_NEWUSER) != 0:
                code = 1
            os.write(ready_w, b"x" if code == 0 else b"!")
            os.read(go_r, 1)
        except BaseException:
            code = 2
        os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    fd = -1
    try:
        if os.read(ready_r, 1) != b"x":
            raise FailedPrecondition("cannot create a user namespace (unshare(CLONE_NEWUSER) "
                                     "failed; is user.max_user_namespaces 0?)")

        def write_map(name: str, maps: tuple[IDMap, ...]) -> None:
            text = "".join(f"{m.container} {m.host} {m.size}\n" for m in maps)
            with open(f"/proc/{pid}/{name}", "w", encoding="ascii") as f:
                f.write(text)

        try:
            write_map("uid_map", userns.uids)
            write_map("gid_map", userns.gids)
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot map IDs {userns.to_json()} in a user namespace: {exc.strerror}"
            ) from exc
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(go_w)  # the child's read returns: it exits
        os.waitpid(pid, 0)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_tree(path: str, *, recursive: bool) -> int:
    flags = _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | (_AT_RECURSIVE if recursive else 0)
    return syscall(_SYS_OPEN_TREE, _AT_FDCWD, path.encode(), flags, what=f"open_tree {path}")


def _set_idmap(mfd: int, ns_fd: int, attrs: int, *, recursive: bool, what: str) -> None:
    attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP | attrs, attr_clr=0, propagation=0,
                      userns_fd=ns_fd)
    syscall(_SYS_MOUNT_SETATTR, mfd, b"", _AT_EMPTY_PATH | (_AT_RECURSIVE if recursive else 0),
            ctypes.byref(attr), ctypes.sizeof(attr), what=f"mount_setattr(MOUNT_ATTR_IDMAP) {what}")


def _idmapped_bind(source: str, target: str, ns_fd: int, attrs: int, *, recursive: bool) -> None:
    """Clone the mount at ``source``, give it ``ns_fd``'s ID mapping and ``attrs``,
    attach it on ``target``."""
    mfd = _open_tree(source, recursive=recursive)
    try:
        _set_idmap(mfd, ns_fd, attrs, recursive=recursive, what=source)
        move_mount(mfd, target)
    finally:
        os.close(mfd)


def _detach(path: str) -> None:
    _libc.umount2(path.encode(), _MNT_DETACH)


_UNSUPPORTED = (errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP)


def idmap_supported(path: str | os.PathLike[str]) -> bool:
    """Whether the filesystem holding ``path`` takes ID-mapped mounts here.

    False only when the probe syscalls themselves say the kernel or the
    filesystem cannot (``open_tree``/``mount_setattr`` failing with one of the
    errnos :func:`mount_idmapped` falls back to the copy for). Anything else —
    no user namespace to be had, a missing path, a bug — is raised, as
    :func:`mount_idmapped` would raise it."""
    probe = UserNamespace((IDMap(0, 100000, 1),), (IDMap(0, 100000, 1),))
    with userns_fd(probe) as ns:
        try:
            mfd = _open_tree(os.fspath(path), recursive=False)
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EPERM):
                return False
            raise
        try:
            _set_idmap(mfd, ns, 0, recursive=False, what=os.fspath(path))
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                return False
            raise
        finally:
            os.close(mfd)
    return True


# ---------------------------------------------------------------------------- mounting


def _attrs(options: Sequence[str], restrict_suid: bool, restrict_dev: bool) -> int:
    attrs = MOUNT_ATTR_RDONLY if "ro" in options else 0
    attrs |= MOUNT_ATTR_NOSUID if restrict_suid or "nosuid" in options else 0
    attrs |= MOUNT_ATTR_NODEV if restrict_dev or "nodev" in options else 0
    return attrs


def _say(message: str) -> None:
    print(f"lamina: {message}", file=sys.stderr, flush=True)


def _copy_wanted() -> bool:
    return os.environ.get(COPY_ENV, "").lower() == "copy"


def mount_idmapped(
    m: Mount, target: str, *, allow_suid: bool = False, allow_dev: bool = False,
) -> None:
    """Perform ``m`` (which has ``uidmap=``/``gidmap=`` options) on ``target``, ID-mapped
    as the module docs say; the chowned copy where the kernel cannot."""
    userns, options = _options_userns(m.options)
    if userns is None:
        raise InvalidArgument("mount_idmapped needs uidmap= and gidmap= options")
    plain = Mount(m.type, m.source, "", tuple(options))
    if m.type == "overlay":
        _mount_overlay(plain, target, userns, allow_suid=allow_suid, allow_dev=allow_dev)
    elif m.type == "bind" or "bind" in options or "rbind" in options:
        _mount_bind(plain, target, userns, allow_suid=allow_suid, allow_dev=allow_dev)
    else:
        raise InvalidArgument(f"cannot ID-map a {m.type} mount (only overlay and bind)")


def _mount_bind(m: Mount, target: str, userns: UserNamespace, *,
                allow_suid: bool, allow_dev: bool) -> None:
    attrs = _attrs(m.options, not allow_suid, not allow_dev)
    if not _copy_wanted():
        try:
            with userns_fd(userns) as ns:
                _idmapped_bind(m.source, target, ns, attrs, recursive="rbind" in m.options)
            return
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            _say(f"ID-mapped mounts unavailable for {m.source} ({exc.strerror}); "
                 "chowning the container's files instead")
    else:
        _say(f"{COPY_ENV}=copy: chowning the container's files instead")
    if "ro" in m.options:
        raise FailedPrecondition(
            f"cannot ID-map the read-only {m.source} and will not chown a shared layer")
    _shift_in_place(m.source, userns)
    mount_plain([m], target, allow_suid=allow_suid, allow_dev=allow_dev)


def _lowerdirs(options: Sequence[str]) -> tuple[int, list[str]]:
    for i, opt in enumerate(options):
        if opt.startswith("lowerdir="):
            return i, opt[len("lowerdir="):].split(":")
    raise InvalidArgument("overlay mount without lowerdir")


def _option(options: Sequence[str], key: str) -> str | None:
    for opt in options:
        if opt.startswith(key + "="):
            return opt[len(key) + 1:]
    return None


def _chown_upper_root(upper: str, top_lower: str, userns: UserNamespace) -> None:
    """The upperdir's root takes the mapped owner of the image's root (once)."""
    st = os.stat(top_lower)
    want = _owner(st, userns)
    up = os.lstat(upper)
    if (up.st_uid, up.st_gid) != want:
        os.chown(upper, *want)
        os.chmod(upper, stat.S_IMODE(up.st_mode))  # chown dropped set-id bits


def _mount_overlay(m: Mount, target: str, userns: UserNamespace, *,
                   allow_suid: bool, allow_dev: bool) -> None:
    index, lowers = _lowerdirs(m.options)
    upper = _option(m.options, "upperdir")
    if upper is not None:
        _chown_upper_root(upper, lowers[0], userns)
    if not _copy_wanted():
        try:
            _mount_overlay_mapped(m, target, userns, index, lowers,
                                  allow_suid=allow_suid, allow_dev=allow_dev)
            return
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            _say(f"ID-mapped lower layers unavailable ({exc.strerror}); "
                 "using a chowned copy of the image's layers")
    else:
        _say(f"{COPY_ENV}=copy: using a chowned copy of the image's layers")
    copy = _cached_copy(lowers, upper, userns)
    options = list(m.options)
    options[index] = f"lowerdir={copy}"
    mount_plain([Mount(m.type, m.source, "", tuple(options))], target,
              allow_suid=allow_suid, allow_dev=allow_dev)


def _mount_overlay_mapped(m: Mount, target: str, userns: UserNamespace, index: int,
                          lowers: list[str], *, allow_suid: bool, allow_dev: bool) -> None:
    common = os.path.commonpath(lowers)
    if not os.path.isdir(common) or common == "/":
        raise InvalidArgument(f"overlay lowerdirs share no directory to ID-map: {lowers}")
    helper = tempfile.mkdtemp(prefix=".idmap-lowers-", dir=os.path.dirname(target) or ".")
    try:
        with userns_fd(userns) as ns:  # with the mounts below (erofs layers)
            _idmapped_bind(common, helper, ns, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
                           | MOUNT_ATTR_NODEV, recursive=True)
        try:
            options = list(m.options)
            options[index] = "lowerdir=" + ":".join(
                helper + lower[len(common):] for lower in lowers)
            mount_plain([Mount(m.type, m.source, "", tuple(options))], target,
                      allow_suid=allow_suid, allow_dev=allow_dev)
        finally:
            _detach(helper)  # overlayfs holds its own clones of the layers
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(helper)


def reachable_from_userns(path: str | os.PathLike[str], *, ours: int = 3) -> None:
    """Let a user namespace's root reach ``path`` (a bundle): runc mounts the rootfs
    from inside the container's namespace, where host root's 0700 directories
    are closed. ``path`` and the ``ours - 1`` directories above it (the tasks
    directory and the lamina root) become searchable by others (0711, as
    containerd keeps its root and state directories: names inside stay
    unlistable, files keep their modes); every directory further up must be
    searchable already (FailedPrecondition naming the one that is not)."""
    p = os.path.abspath(path)
    level = 0
    while True:
        st = os.stat(p)
        if not st.st_mode & 0o001:
            if level >= ours or st.st_uid != os.geteuid():
                raise FailedPrecondition(
                    f"{p} is not searchable by others: a container with a user namespace "
                    "cannot reach its root filesystem through it")
            os.chmod(p, stat.S_IMODE(st.st_mode) | 0o011)
        parent = os.path.dirname(p)
        if parent == p:
            return
        p, level = parent, level + 1


# ---------------------------------------------------------------------------- the copy


def _overflow(gid: bool) -> int:
    name = "overflowgid" if gid else "overflowuid"
    try:
        with open(f"/proc/sys/kernel/{name}", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


def _shift(ident: int, userns: UserNamespace, *, gid: bool) -> int:
    host = userns.to_host(ident, gid=gid)
    return _overflow(gid) if host is None else host


def _cached_copy(lowers: list[str], upper: str | None, userns: UserNamespace) -> str:
    """The lowerdirs' merged tree with shifted owners, made once per snapshot and mapping."""
    home = os.path.dirname(upper) if upper else tempfile.gettempdir()
    final = os.path.join(home, f"idmap-{userns.tag()}")
    if os.path.isdir(final):
        return final
    work = f"{final}.tmp-{secrets.token_hex(4)}"
    os.mkdir(work, 0o700)
    try:
        tree = os.path.join(work, "tree")
        view = os.path.join(work, "view")
        os.mkdir(view, 0o700)
        if len(lowers) == 1:
            source = lowers[0]
        else:
            joined = "lowerdir=" + ":".join(lowers)
            options = ("ro", *overlay_mount_options(), joined)  # userxattr in a user namespace
            mount_plain([Mount("overlay", "overlay", options=options)], view)
            source = view
        try:
            chowned_copy(source, tree, userns)
        finally:
            if source == view:
                unmount_all(view)
        try:
            os.rename(tree, final)
        except OSError as exc:  # a concurrent start made it first: use theirs
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        remove_tree(work)
    return final


def _copy_xattrs(src: int | str, dst: int | str) -> None:
    """Copy the xattrs of ``src`` to ``dst`` (open descriptors, or paths whose last
    component is not followed), overlayfs's own left out."""
    follow = not isinstance(src, str)
    for key in os.listxattr(src, follow_symlinks=follow):
        if key.startswith(("trusted.overlay.", "user.overlay.")):
            continue
        with contextlib.suppress(OSError):
            os.setxattr(dst, key, os.getxattr(src, key, follow_symlinks=follow),
                        follow_symlinks=follow)


def _copy_data(fi: BinaryIO, fo: BinaryIO, size: int) -> None:
    """Copy ``size`` bytes: copy_file_range (reflinks where the filesystem can), else
    plain reads and writes (across filesystems, an overlay's merged view say)."""
    try:
        while size > 0:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), size)
            if n == 0:
                return
            size -= n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        shutil.copyfileobj(fi, fo, 1 << 20)


def chowned_copy(src: str, dst: str, userns: UserNamespace) -> None:
    """Copy the tree at ``src`` to new ``dst`` with every owner shifted through
    ``userns`` (hard links kept, modes, times and xattrs copied); any depth."""
    src_fd = os.open(src, DIR_FLAGS)
    try:
        os.mkdir(dst, 0o700)
        dst_fd = os.open(dst, DIR_FLAGS)
        try:
            _copy_xattrs(src_fd, dst_fd)
            _ChownedCopy(userns, dst_fd).run(src_fd)
            _settle(None, dst, os.fstat(src_fd), userns)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def _owner(st: os.stat_result, userns: UserNamespace) -> tuple[int, int]:
    return _shift(st.st_uid, userns, gid=False), _shift(st.st_gid, userns, gid=True)


def _settle(dir_fd: int | None, name: str, st: os.stat_result, userns: UserNamespace) -> None:
    """Give the copied directory ``name`` (in ``dir_fd``; None: a path) its owner,
    mode and times, after its contents (which changed its times)."""
    os.chown(name, *_owner(st, userns), dir_fd=dir_fd, follow_symlinks=False)
    os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


class _ChownedCopy:
    """The walk of :func:`chowned_copy`: the destination's directories follow the
    source's (a second stack), each settled as the walk leaves it."""

    def __init__(self, userns: UserNamespace, dst_fd: int) -> None:
        self.userns = userns
        self.dst_fd = dst_fd
        self.dsts = DirStack(dst_fd)
        self.entered: list[os.stat_result] = []  # the source directories entered
        self.links: dict[tuple[int, int], str] = {}  # inode -> first copy, from dst's root

    def run(self, src_fd: int) -> None:
        walk = Walk(src_fd, sort=False)
        try:
            for e in walk:
                if stat.S_ISDIR(e.stat.st_mode):
                    os.mkdir(e.name, 0o700, dir_fd=self.dsts.fd)
                    src_dir = walk.enter(on_leave=self._leave)
                    self.dsts.push(e.name)
                    self.entered.append(e.stat)
                    _copy_xattrs(src_dir, self.dsts.fd)
                else:
                    self._leaf(e)
        finally:
            self.dsts.close()

    def _leave(self, _src_parent: int, name: str) -> bool:
        self.dsts.pop()
        _settle(self.dsts.fd, name, self.entered.pop(), self.userns)
        return False

    def _leaf(self, e: Entry) -> None:
        st, name, dfd = e.stat, e.name, self.dsts.fd
        mode = st.st_mode
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:
            os.link(self.links[key], name, src_dir_fd=self.dst_fd, dst_dir_fd=dfd,
                    follow_symlinks=False)
            return
        if stat.S_ISREG(mode):
            fi = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=e.parent)
            with open(fi, "rb") as fin, open(os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                    dir_fd=dfd), "wb") as fout:
                _copy_data(fin, fout, st.st_size)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=e.parent), name, dir_fd=dfd)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            os.mknod(name, mode, st.st_rdev, dir_fd=dfd)
        else:  # a socket means nothing in an image
            return
        if st.st_nlink > 1:
            self.links[key] = e.path
        os.chown(name, *_owner(st, self.userns), dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISLNK(mode):
            _copy_xattrs(proc_path(e.parent, name), proc_path(dfd, name))
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dfd)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)


def _shift_in_place(root: str, userns: UserNamespace) -> None:
    """Chown every file under ``root`` through ``userns`` (IDs already in its
    host range are left alone, so a second start changes nothing)."""
    ranges = [(m.host, m.host + m.size) for m in userns.uids]

    def shift(dir_fd: int | None, name: str, st: os.stat_result) -> None:
        if any(lo <= st.st_uid < hi for lo, hi in ranges):
            return
        os.chown(name, *_owner(st, userns), dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)

    root_fd = os.open(root, DIR_FLAGS)
    try:
        shift(None, root, os.fstat(root_fd))
        walk = Walk(root_fd, sort=False)
        for e in walk:
            shift(e.parent, e.name, e.stat)
            if stat.S_ISDIR(e.stat.st_mode):
                walk.enter()
    finally:
        os.close(root_fd)
