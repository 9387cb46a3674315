"""A layer's tree in memory: what :func:`lamina.archive.apply.apply_layer`
would leave on an empty directory, without a directory ever being made.

:class:`LayerTree` takes the members of a tar layer one at a time
(:meth:`LayerTree.add`) and keeps small records: an :class:`Inode` per file
(shared by its hard links), a dict of names per directory. File data is not
kept: the writer streams it to the image and records where it went
(:attr:`Inode.data`).

The meaning is apply_layer's, member for member, with ``overlay`` as there:
``overlay=True`` is the staged-upperdir form a lower layer of an overlay
mount needs (whiteouts as 0/0 character devices, opaque directories as
``trusted.overlay.opaque=y``, a directory replacing another entry of the
layer made opaque, and :class:`~lamina.archive.apply.NeedsLowerLayers`
where an upper directory cannot say it); ``overlay=False`` is the layer
applied on an empty directory (implicit parents made, whiteouts hiding
nothing). Paths are cleaned and symlinked parents resolved inside the root
as :mod:`lamina.archive.safepath` does, with the same limits and the same
one-line InvalidArgument messages; xattrs are kept or refused as Linux
refuses them when they are set on a real file (:mod:`lamina.erofs.xattrs`).
"""

from __future__ import annotations

import os
import stat

from lamina.archive import limits
from lamina.archive.members import (
    KINDS,
    Member,
    NeedsLowerLayers,
    bad_layer,
    classify,
    link_target,
    whited_out_parents,
)
from lamina.archive.resolve import resolve, split_target
from lamina.archive.safepath import WORK_BASE, WORK_PER_LOOKUP
from lamina.archive.tarstream import TYPE_DIR, TYPE_HARDLINK, TYPE_SYMLINK, TarEntry, show_name
from lamina.archive.whiteout import OPAQUE_MARKER, WHITEOUT_META_PREFIX, whiteout_target
from lamina.erofs.acl import acl_equivalent, acl_mode
from lamina.erofs.inode import Inode, RootMeta, new_dir
from lamina.erofs.xattrs import xattr_verdict
from lamina.errors import InvalidArgument
from lamina.fs.tree import DIR_FLAGS
from lamina.mounts.overlay import overlay_opaque_xattr, overlay_xattr_prefix

__all__ = ["LayerTree"]


class LayerTree:
    """The tree a layer leaves (see the module docs). ``root`` is its root
    directory; ``root_listed`` whether the layer had an entry for it."""

    def __init__(self, *, overlay: bool, root: RootMeta | None = None,
                 lower_dirs: bool = False) -> None:
        self.overlay = overlay
        #: overlay form with the lowers to ask at the end: a parent directory the
        #: layer does not list is made, and takes its metadata in settle_implicit
        self.lower_dirs = lower_dirs
        self.implicit: list[Inode] = []
        meta = root or RootMeta()
        self.root = new_dir(meta.mode & 0o7777, meta.uid, meta.gid, meta.mtime_ns)
        self.root.xattrs = dict(meta.xattrs)
        self.root_listed = False
        self.dir_times: dict[str, int] = {}
        self.epoch = 0  # bumped whenever a directory or symlink leaves the tree
        self.lookups = 0
        self.work = 0
        self.last = self.root  # the directory the last lookup returned
        #: directories found (their clean paths), valid while ``epoch`` is _memo_epoch
        self._memo: dict[tuple[str, ...], Inode] = {}
        self._memo_epoch = 0
        self.whiteouts: list[tuple[Inode, str]] = []  # whiteout devices made

    # -- path resolution (lamina.archive.safepath's rules, in memory) ------
    def _spend(self, n: int, parts: list[str]) -> None:
        self.work += n
        if self.work > WORK_BASE + WORK_PER_LOOKUP * self.lookups:
            raise bad_layer(f"too many symlink resolutions at {show_name('/'.join(parts))}"
                            f" (over {WORK_BASE} + {WORK_PER_LOOKUP} per path of resolution steps)")

    @staticmethod
    def _rel(node: Inode) -> str:
        return node.rel

    @property
    def path(self) -> list[str]:
        """The resolved path of the directory :meth:`lookup` last returned."""
        node = self.last
        return node.rel.split("/") if node.depth else []

    def _below(self, base: str) -> str:
        """The path of ``base`` in the directory :meth:`lookup` last returned."""
        return f"{self.last.rel}/{base}" if self.last.depth else base

    def lookup(self, parts: list[str], *, create: bool) -> Inode | None:
        """The directory ``parts``, symlinked components resolved inside the
        root; missing ones made when ``create`` (None otherwise). Sets
        :attr:`last` to it."""
        key = tuple(parts)
        hit = self._recall(key)
        if hit is not None:
            return hit
        self.lookups += 1
        found = self._lookup(parts, create)
        if found is not None:
            self.last = found
            self._memo[key] = found  # (resolving never bumps the epoch)
        return found

    def _recall(self, key: tuple[str, ...]) -> Inode | None:
        """The directory a lookup of ``key`` found, if nothing left the tree since
        (counted as a lookup, made :attr:`last`); else None. Resolving it again
        would find it at no cost: its symlinks' targets are remembered for the
        same epoch."""
        if self._memo_epoch != self.epoch:
            self._memo.clear()
            self._memo_epoch = self.epoch
            return None
        hit = self._memo.get(key)
        if hit is not None:
            self.lookups += 1
            self.last = hit
        return hit

    def _remember(self, parts: list[str], node: Inode) -> None:
        """``node`` is the directory at ``parts`` (just placed there)."""
        if self._memo_epoch != self.epoch:
            self._memo.clear()
            self._memo_epoch = self.epoch
        self._memo[tuple(parts)] = node

    def _lookup(self, parts: list[str], create: bool) -> Inode | None:
        return resolve(_InMemory(self), parts, create)

    def _implicit(self, node: Inode, comp: str, parts: list[str]) -> Inode:
        if node.depth >= limits.MAX_DEPTH:
            raise bad_layer(f"{show_name('/'.join(parts))} leads more than "
                            f"{limits.MAX_DEPTH} directories deep")
        size = node.plen + bool(node.depth) + len(comp.encode("utf-8", "surrogateescape"))
        if size >= limits.MAX_PATH:
            raise bad_layer(f"{show_name('/'.join(parts))} leads to a directory path "
                            f"of {size} bytes once symlinks are resolved (limit "
                            f"{limits.MAX_PATH - 1}, PATH_MAX)")
        if self.overlay and not self.lower_dirs:
            rel = f"{self._rel(node)}/{comp}" if node.depth else comp
            raise NeedsLowerLayers(
                f"directory {rel!r} is not in the layer; its metadata is in lower layers")
        # mkdir 0755 as root: a setgid parent lends its group
        gid = node.gid if node.mode & stat.S_ISGID else 0
        child = new_dir(0o755, 0, gid, None)
        self._attach(node, comp, child)
        if self.overlay:
            self.implicit.append(child)
        return child

    @staticmethod
    def _attach(parent: Inode, name: str, child: Inode) -> None:
        assert parent.children is not None
        parent.children[name] = child
        if child.kind == stat.S_IFDIR:
            child.parent = parent
            child.name = name
            child.depth = parent.depth + 1
            child.rel = f"{parent.rel}/{name}" if parent.depth else name
            child.plen = (parent.plen + bool(parent.depth)
                          + len(name.encode("utf-8", "surrogateescape")))

    def _detach(self, parent: Inode, name: str) -> Inode | None:
        assert parent.children is not None
        old = parent.children.pop(name, None)
        if old is not None and old.kind in (stat.S_IFDIR, stat.S_IFLNK):
            self.epoch += 1
            old.parent = None
        return old

    def _through_whiteout(self, parts: list[str]) -> bool:
        node = self.root
        for comp in parts:
            assert node.children is not None
            child = node.children.get(comp)
            if child is None:
                return False
            if child.kind == stat.S_IFCHR and child.rdev == 0:
                return True
            if child.kind != stat.S_IFDIR:
                return False
            node = child
        return False

    def _dir(self, dparts: list[str]) -> Inode:
        node = self._recall(tuple(dparts))  # most members are in the last one's directory
        if node is None:
            with whited_out_parents(dparts, self._through_whiteout if self.overlay else None):
                node = self.lookup(dparts, create=True)
        assert node is not None
        return node

    # -- members -----------------------------------------------------------
    def add(self, e: TarEntry) -> Inode | None:
        """Apply one member; the new regular file's inode (the caller streams
        its data), or None."""
        what, parts = classify(e)
        if what is Member.ROOT:
            self._dir_meta(self.root, e, existed=True)
            self.dir_times[""] = e.mtime_ns
            self.root_listed = True
            return None
        if what is Member.WHITEOUT:
            self._whiteout(e, parts)
            return None
        if what is Member.SKIP:
            return None
        base = parts[-1]
        pdir = self._dir(parts[:-1])
        if pdir.depth + 1 > limits.MAX_DEPTH:
            raise bad_layer(f"{show_name(e.name)} is {pdir.depth + 1} directories deep "
                            f"(limit {limits.MAX_DEPTH})")
        t = e.type
        if t == TYPE_DIR:
            epoch = self.epoch
            node = self._directory(pdir, base, e)
            if self.epoch == epoch:  # pdir is still what its path leads to
                self._remember(parts, node)
            self.dir_times[self._below(base)] = e.mtime_ns
            return None
        if t == TYPE_HARDLINK:
            self._hardlink(pdir, base, e, self._below(base))
            return None
        if t == TYPE_SYMLINK and not e.linkname:
            raise bad_layer(f"{e.name!r}: symlink with an empty target")
        kind = KINDS.get(t)
        if kind is None:  # pragma: no cover - the reader yields only these types
            raise bad_layer(f"{e.name!r}: unsupported member type {t!r}")
        mode = 0o777 if kind == stat.S_IFLNK else e.mode
        node = Inode(kind, mode, e.uid, e.gid, e.mtime_ns)
        if kind == stat.S_IFLNK:
            node.target = e.linkname.encode("utf-8", "surrogateescape")
            node.size = len(node.target)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = ((e.devminor & 0xFF) | (e.devmajor << 8)  # the kernel's new_encode_dev
                         | ((e.devminor & ~0xFF) << 12))
        if e.xattrs:
            self._set_xattrs(node, e)
        children = pdir.children
        assert children is not None
        if base in children:
            self._detach(pdir, base)
        children[base] = node  # (what _attach does for all but a directory)
        return node if kind == stat.S_IFREG else None

    def _set_xattrs(self, node: Inode, e: TarEntry) -> None:
        if not e.xattrs:
            return
        who = repr(e.name)
        for key, value in e.xattrs.items():
            kept = xattr_verdict(node.kind, key, value, who)
            if kept is None:
                continue
            if key == "system.posix_acl_access":
                node.mode = acl_mode(node.mode, kept)
                if acl_equivalent(kept):
                    node.xattrs.pop(key, None)
                    continue
            node.xattrs[key] = kept

    def _dir_meta(self, node: Inode, e: TarEntry, *, existed: bool) -> None:
        node.uid, node.gid, node.mode = e.uid, e.gid, e.mode
        node.mtime_ns = e.mtime_ns
        if existed:
            node.xattrs = {k: v for k, v in node.xattrs.items()
                           if k.startswith(overlay_xattr_prefix()) or k in e.xattrs}
        self._set_xattrs(node, e)

    def _directory(self, pdir: Inode, name: str, e: TarEntry) -> Inode:
        """Make or update the directory ``name`` of ``pdir``; it."""
        assert pdir.children is not None
        old = pdir.children.get(name)
        if old is not None and old.kind == stat.S_IFDIR:
            self._dir_meta(old, e, existed=True)
            return old
        node = new_dir(e.mode, e.uid, e.gid, e.mtime_ns)
        if old is not None:
            self._detach(pdir, name)
            if self.overlay:
                # what was here hid the lower directory: keep it hidden
                node.xattrs[overlay_opaque_xattr()] = b"y"
        self._attach(pdir, name, node)
        self._dir_meta(node, e, existed=False)
        return node

    def _hardlink(self, pdir: Inode, name: str, e: TarEntry, rel: str) -> None:
        target = link_target(e)
        if "/".join(target) == rel:
            return
        missing = NeedsLowerLayers if self.overlay else InvalidArgument
        with whited_out_parents(target[:-1], self._through_whiteout if self.overlay else None,
                                message=f"hard link target {e.linkname!r} was whited out"):
            tdir = self.lookup(target[:-1], create=False)
        gone = missing(f"invalid tar layer: {e.name!r}: hard link target "
                       f"{e.linkname!r} does not exist")
        if tdir is None:
            raise gone
        tname = target[-1]
        if self._below(tname) == rel:
            return
        assert tdir.children is not None
        node = tdir.children.get(tname)
        if node is None:
            raise gone
        if self.overlay and node.kind == stat.S_IFCHR and node.rdev == 0:
            raise NeedsLowerLayers(f"hard link target {e.linkname!r} was whited out")
        if node.kind == stat.S_IFDIR:
            raise bad_layer(f"{e.name!r}: hard link target {e.linkname!r} is a directory")
        assert pdir.children is not None
        old = pdir.children.get(name)
        if old is not None:
            self._detach(pdir, name)
            if old.kind == stat.S_IFDIR and self._inside(tdir, old):
                raise bad_layer(f"{e.name!r}: hard link target {e.linkname!r} is inside "
                                f"the directory the link replaces")
        self._attach(pdir, name, node)
        # like containerd: the link's own header sets the shared inode's metadata
        node.uid, node.gid = e.uid, e.gid
        if node.kind == stat.S_IFLNK:
            return
        node.mode = e.mode
        self._set_xattrs(node, e)
        node.mtime_ns = e.mtime_ns

    @staticmethod
    def _inside(node: Inode, top: Inode) -> bool:
        cur: Inode | None = node
        while cur is not None:
            if cur is top:
                return True
            cur = cur.parent
        return False

    def _whiteout(self, e: TarEntry, parts: list[str]) -> None:
        base = parts[-1]
        if e.type == TYPE_DIR:
            raise bad_layer(f"{e.name!r}: a whiteout cannot be a directory")
        if base == OPAQUE_MARKER:
            if self.overlay:
                node = self._dir(parts[:-1])
                if not self.path:
                    raise NeedsLowerLayers(
                        "opaque root directory: overlayfs ignores an opaque upper root")
                node.xattrs[overlay_opaque_xattr()] = b"y"
            else:
                self.lookup(parts[:-1], create=False)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return
        target = whiteout_target(base)
        if not self.overlay:
            self.lookup(parts[:-1], create=False)
            return
        pdir = self._dir(parts[:-1])
        assert pdir.children is not None
        old = pdir.children.get(target)
        if old is None:
            gid = pdir.gid if pdir.mode & stat.S_ISGID else 0
            self._attach(pdir, target, Inode(stat.S_IFCHR, 0o600, 0, gid, None))
        elif old.kind == stat.S_IFDIR:
            old.xattrs[overlay_opaque_xattr()] = b"y"
            if self.implicit:  # the lowers' directory is gone: this one is new
                self.implicit = [n for n in self.implicit if n is not old]
        if old is None:
            self.whiteouts.append((pdir, target))

    def drop_needless_whiteouts(self, lower: str | None) -> int:
        """Leave out the whiteout devices that hide nothing in ``lower`` (the
        lowers' merged tree; None: no lowers), as
        :func:`lamina.archive.whiteout.drop_needless_whiteouts` does for an
        upper directory: overlayfs lists a whiteout where its directory is
        not merged with a lower one. Returns how many went."""
        dropped = 0
        for pdir, name in self.whiteouts:
            assert pdir.children is not None
            node = pdir.children.get(name)
            if node is None or node.kind != stat.S_IFCHR or node.rdev != 0:
                continue
            if pdir is not self.root and (pdir.parent is None
                                          or not self._inside(pdir, self.root)):
                continue  # its directory left the tree
            if lower is not None and self._hides(pdir, name, lower):
                continue
            del pdir.children[name]
            dropped += 1
        self.whiteouts = []
        return dropped

    def _chain(self, node: Inode) -> list[Inode]:
        """The directories from ``node`` up to the root (the root left out)."""
        chain: list[Inode] = []
        cur: Inode | None = node
        while cur is not None and cur is not self.root:
            chain.append(cur)
            cur = cur.parent
        return chain

    def _hides(self, pdir: Inode, name: str, lower: str) -> bool:
        chain = self._chain(pdir)
        fd = os.open(lower, DIR_FLAGS)
        try:
            for node in reversed(chain):
                if node.xattrs.get(overlay_opaque_xattr()) == b"y":
                    return False
                try:
                    nfd = os.open(node.name, DIR_FLAGS, dir_fd=fd)
                except OSError:
                    return False  # not a directory below: nothing merged, nothing hidden
                os.close(fd)
                fd = nfd
            try:
                os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                return False
            return True
        finally:
            os.close(fd)

    def settle_root(self, meta: RootMeta | None) -> None:
        """Give the root ``meta`` (None: the default) unless the layer listed it:
        for a layer read before its parent was there to say it."""
        if self.root_listed or meta is None:
            return
        node = self.root
        node.mode, node.uid, node.gid = meta.mode & 0o7777, meta.uid, meta.gid
        node.mtime_ns = meta.mtime_ns
        node.xattrs = dict(meta.xattrs)

    def settle_implicit(self, lower: str | None) -> None:
        """Give each parent directory the layer implied but did not list the
        metadata its directory has in ``lower`` (the lowers' merged tree; None:
        no lowers), as overlayfs copies a directory up when something is made in
        it; one the lowers lack is made as apply_layer makes it. Raises
        NeedsLowerLayers where only a mount can tell: the lowers have something
        else than a directory there, or the layer listed it after implying it."""
        for node in self.implicit:
            if node.parent is None or not self._inside(node, self.root):
                continue  # it left the tree
            if node.rel in self.dir_times:
                raise NeedsLowerLayers(f"directory {node.rel!r} is listed after it was implied")
            found = self._lower_dir(node, lower) if lower is not None else None
            if found is None:
                parent = node.parent
                node.mode, node.uid = 0o755, 0
                node.gid = parent.gid if parent.mode & stat.S_ISGID else 0
                continue
            st, xattrs = found
            node.mode, node.uid, node.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            node.xattrs = {**xattrs, **node.xattrs}

    def prune_implicit(self) -> None:
        """Leave out the implied directories that hold nothing once needless
        whiteouts went (a whiteout of something the lowers lack changes nothing,
        nor makes its parents), innermost first; an opaque one stays."""
        for node in reversed(self.implicit):
            parent = node.parent
            if (parent is None or node.children or overlay_opaque_xattr() in node.xattrs
                    or not self._inside(node, self.root)):
                continue
            assert parent.children is not None
            if parent.children.get(node.name) is node:
                self._detach(parent, node.name)
        self.implicit = []

    def _lower_dir(self, node: Inode, lower: str) -> tuple[os.stat_result,
                                                            dict[str, bytes]] | None:
        """The stat and xattrs of ``node``'s directory in ``lower``; None where the
        merged tree has none (absent, or below an upper directory that hides it)."""
        chain = self._chain(node)
        fd = os.open(lower, DIR_FLAGS)
        try:
            for i, step in enumerate(reversed(chain)):
                last = i == len(chain) - 1
                if not last and step.xattrs.get(overlay_opaque_xattr()) == b"y":
                    return None
                try:
                    nfd = os.open(step.name, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    return None
                except OSError:  # not a directory (a symlink, a file)
                    if last:
                        raise NeedsLowerLayers(f"directory {node.rel!r} is not in the layer "
                                               "and not a directory in the lower layers") from None
                    return None
                os.close(fd)
                fd = nfd
            xattrs = {k: os.getxattr(fd, k) for k in os.listxattr(fd)
                      if not k.startswith(overlay_xattr_prefix())}
            return os.fstat(fd), xattrs
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Directory times last, as apply_layer sets them."""
        for rel in sorted(self.dir_times):
            mtime = self.dir_times[rel]
            if not rel:
                self.root.mtime_ns = mtime
                continue
            parts = rel.split("/")
            try:
                pdir = self.lookup(parts[:-1], create=False)
            except InvalidArgument:
                continue
            if pdir is None:
                continue
            assert pdir.children is not None
            node = pdir.children.get(parts[-1])
            if node is not None and node.kind == stat.S_IFDIR:
                node.mtime_ns = mtime


class _InMemory:
    """The :class:`lamina.archive.resolve.Tree` of a :class:`LayerTree`: missing
    parents made implicitly (or NeedsLowerLayers, overlay form). One is made per
    resolve, so it holds the root and the epoch that resolve starts from."""

    def __init__(self, tree: LayerTree) -> None:
        self._tree = tree
        self.root = tree.root
        self.epoch = tree.epoch

    def child(self, node: Inode, comp: str, create: bool, parts: list[str]) -> Inode | None:
        assert node.children is not None
        child = node.children.get(comp)
        if child is None:
            if not create:
                self._tree._spend(1, parts)
                return None
            child = self._tree._implicit(node, comp, parts)
        if child.kind not in (stat.S_IFDIR, stat.S_IFLNK):
            where = f"{node.rel}/{comp}" if node.depth else comp
            raise bad_layer(f"parent {where!r} is not a directory")
        return child

    def link(self, child: Inode) -> Inode | None:
        return child if child.kind == stat.S_IFLNK else None

    def route(self, link: Inode) -> tuple[str, bool, int, list[str]]:
        target = link.target.decode("utf-8", "surrogateescape")
        return (target, *split_target(target))

    def rel(self, node: Inode) -> str:
        return node.rel

    def spend(self, steps: int, parts: list[str]) -> None:
        self._tree._spend(steps, parts)
