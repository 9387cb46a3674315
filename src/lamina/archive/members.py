"""What a layer member asks of the tree it lands in, decided once.

Two trees take a layer's members: :func:`lamina.archive.apply.apply_layer`
on disk and :class:`lamina.erofs.tree.LayerTree` in memory. They must
agree member for member, so the rules that do not depend on where the tree
lives are here: :func:`classify` says what a member is (the root's own
entry, a whiteout, a socket to pass over, or an entry to place) and refuses
what no layer may say, with the same one-line messages;
:func:`link_target` cleans a hard link's target;
:class:`whited_out_parents` turns a parent that cannot be resolved because
this layer whited it out into :class:`NeedsLowerLayers` (overlay form).
"""

from __future__ import annotations

import enum
import stat
from collections.abc import Callable
from types import TracebackType

from lamina.archive.safepath import clean_path
from lamina.archive.tarstream import (
    TYPE_BLOCK,
    TYPE_CHAR,
    TYPE_DIR,
    TYPE_FIFO,
    TYPE_REGULAR,
    TYPE_SYMLINK,
    TarEntry,
)
from lamina.archive.whiteout import WHITEOUT_PREFIX
from lamina.errors import InvalidArgument

__all__ = [
    "KINDS", "Member", "NeedsLowerLayers", "bad_layer", "classify", "link_target",
    "whited_out_parents",
]

KINDS = {TYPE_REGULAR: stat.S_IFREG, TYPE_CHAR: stat.S_IFCHR, TYPE_BLOCK: stat.S_IFBLK,
         TYPE_FIFO: stat.S_IFIFO, TYPE_SYMLINK: stat.S_IFLNK, TYPE_DIR: stat.S_IFDIR}
"""The file type (``stat.S_IF*``) each member type other than a hard link makes."""


class NeedsLowerLayers(InvalidArgument):
    """In overlay (upperdir-only) mode: the layer depends on lower layers' content.

    A parent directory the layer does not list (its metadata lives below), a
    hard link to a file of a lower layer or an opaque root cannot be
    reproduced from the upperdir alone. Callers apply such a layer on a
    mounted snapshot instead.
    """


def bad_layer(msg: str) -> InvalidArgument:
    """The error of a layer that says something no layer may say."""
    return InvalidArgument(f"invalid tar layer: {msg}")


class Member(enum.Enum):
    """What :func:`classify` found."""

    ROOT = "root"  # the root directory's own entry
    WHITEOUT = "whiteout"  # .wh.<name> or the opaque marker
    SKIP = "skip"  # a socket: nothing a layer can carry
    ENTRY = "entry"  # anything else: placed at its path


def classify(e: TarEntry) -> tuple[Member, list[str]]:
    """What member ``e`` is, and its clean path components ([] for the root).

    InvalidArgument for a path out of the root, a root entry that is no
    directory, a path through a whiteout, or a 0/0 character device (which is
    overlayfs's whiteout, not something a layer can store)."""
    parts = clean_path(e.name)
    if not parts:
        if e.type != TYPE_DIR:
            raise bad_layer(f"{e.name!r}: only a directory can name the root")
        return Member.ROOT, parts
    if WHITEOUT_PREFIX in e.name:  # else no component can start with it
        parents = "/" + "/".join(parts[:-1])
        if "/" + WHITEOUT_PREFIX in parents:  # one search, not one per component
            comp = next(c for c in parts[:-1] if c.startswith(WHITEOUT_PREFIX))
            raise bad_layer(f"{e.name!r}: path goes through whiteout {comp!r}")
        if parts[-1].startswith(WHITEOUT_PREFIX):
            return Member.WHITEOUT, parts
    if e.is_socket:
        return Member.SKIP, parts
    if e.type == TYPE_CHAR and e.devmajor == 0 and e.devminor == 0:
        raise bad_layer(f"{e.name!r}: character device 0/0 is overlayfs's whiteout, "
                        "not storable in a layer")
    return Member.ENTRY, parts


def link_target(e: TarEntry) -> list[str]:
    """The clean path of hard link ``e``'s target; InvalidArgument where it has
    none, leaves the root, or is the root."""
    if not e.linkname:
        raise bad_layer(f"{e.name!r}: hard link without a target")
    try:
        target = clean_path(e.linkname)
    except InvalidArgument:
        raise bad_layer(
            f"{e.name!r}: hard link target {e.linkname!r} is outside the root") from None
    if not target:
        raise bad_layer(f"{e.name!r}: hard link to the root directory")
    return target


class whited_out_parents:
    """Resolving the directory ``dparts`` inside: an InvalidArgument becomes
    NeedsLowerLayers (saying ``message``, by default that the directory was
    whited out) where ``through_whiteout(dparts)`` says a component is a
    whiteout this layer made (overlay form; None: never). The native form
    makes a fresh implicit directory there (lower entries gone), which needs
    the lowers' view.

    A class rather than a generator context manager: it wraps the parent
    lookup of every member, and costs a tenth of one."""

    __slots__ = ("_dparts", "_message", "_through")

    def __init__(self, dparts: list[str],
                 through_whiteout: Callable[[list[str]], bool] | None,
                 *, message: str | None = None) -> None:
        self._dparts = dparts
        self._through = through_whiteout
        self._message = message

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if (kind is not None and issubclass(kind, InvalidArgument)
                and self._through is not None and self._through(self._dparts)):
            raise NeedsLowerLayers(
                self._message or f"directory {'/'.join(self._dparts)!r} was whited out by "
                "this layer and is not in it") from None
