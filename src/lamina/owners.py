"""Who owns what on a root that containerd (through ``lamina serve``) and the
lamina CLI share.

Every snapshot has one owner and every blob one reference per owner that
holds it. What containerd creates through ``serve`` is containerd's
(:data:`CONTAINERD`); what the CLI creates — locally, or through ``serve``
with lamina's own gRPC client, which says so in the :data:`METADATA_KEY`
call metadata — is the CLI's (:data:`CLI`).

A store is used through a :class:`Scope`:

* the CLI's own scope (:data:`CLI_VIEW`) sees everything and changes only
  the CLI's objects: removing, committing, labelling or building on
  containerd's is FailedPrecondition naming the owner;
* an owner's scope (:func:`only`) sees that owner's objects alone — what
  ``serve`` shows containerd, and what each side's collection walks, so a
  garbage collector can only ever remove what its side owns.

Snapshots are never shared across owners (a parent and its children have
the same owner). Blobs are shared by digest: writing a blob another owner
holds adds the writer's reference without a second copy, deleting drops the
deleter's reference, and the file goes with the last reference.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, Self, runtime_checkable

from lamina.errors import InvalidArgument

__all__ = [
    "CLI",
    "CLI_VIEW",
    "CONTAINERD",
    "DEFAULT_NAMESPACE",
    "METADATA_KEY",
    "OWNERS",
    "Scope",
    "Scoped",
    "ScopedViews",
    "check_namespace",
    "describe",
    "describe_all",
    "looks_like_containerd_key",
    "only",
    "short",
]

CLI = "lamina"
CONTAINERD = "containerd"
OWNERS = (CLI, CONTAINERD)

#: gRPC call metadata lamina's own client sends: ``lamina-owner: lamina``.
METADATA_KEY = "lamina-owner"

# containerd's metadata snapshotter names backend keys <namespace>/<id>/<key>
_CONTAINERD_KEY = re.compile(r"[^/]+/[0-9]+/.+", re.DOTALL)

#: The namespace of lamina's own images, containers, leases and snapshots; another
#: one is containerd's (:mod:`lamina.snapshots.namespace` shows its snapshots).
DEFAULT_NAMESPACE = "default"

# containerd's namespace names (its identifiers package): labels joined by . _ -
_NAMESPACE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")


def check_namespace(name: str) -> str:
    """``name`` when containerd would accept it as a namespace; InvalidArgument if not."""
    if len(name) > 76 or not _NAMESPACE.fullmatch(name):
        raise InvalidArgument(f"invalid namespace {name!r}: letters, digits and . _ - "
                              "between them, at most 76 characters")
    return name


@dataclass(frozen=True)
class Scope:
    """Who acts (``actor``: the owner of what is created) and whose objects it sees."""

    actor: str
    sees: frozenset[str]

    def sql(self, column: str = "owner") -> tuple[str, tuple[str, ...]]:
        """A WHERE fragment limiting ``column`` to the owners seen, and its parameters."""
        names = sorted(self.sees)
        return f"{column} IN ({','.join('?' * len(names))})", tuple(names)

    def visible(self, owner: str) -> bool:
        return owner in self.sees


CLI_VIEW = Scope(CLI, frozenset(OWNERS))


def only(owner: str) -> Scope:
    """The scope of ``owner`` alone: sees and changes only its objects."""
    if owner not in OWNERS:
        raise ValueError(f"unknown owner {owner!r}")
    return Scope(owner, frozenset({owner}))


def looks_like_containerd_key(key: str) -> bool:
    """Whether a snapshot key has the shape containerd gives its backend keys."""
    return _CONTAINERD_KEY.fullmatch(key) is not None


def describe(owner: str, key: str = "") -> str:
    """``containerd (namespace default)`` / ``the lamina CLI``, for messages."""
    if owner == CONTAINERD:
        if key and looks_like_containerd_key(key):
            return f"containerd (namespace {key.split('/', 1)[0]})"
        return "containerd"
    return "the lamina CLI"


def short(owner: str, key: str = "") -> str:
    """One word for tables: ``lamina``, ``containerd`` or ``containerd:<namespace>``."""
    if owner == CONTAINERD and key and looks_like_containerd_key(key):
        return f"{CONTAINERD}:{key.split('/', 1)[0]}"
    return owner


def describe_all(owners: Iterable[str]) -> str:
    return " and ".join(describe(o) for o in sorted(owners)) or "nobody"


@runtime_checkable
class Scoped(Protocol):
    """A store that can be used in another :class:`Scope` (same data, other view)."""

    def scoped(self, owner: str) -> Any:
        """This store as ``owner`` alone sees and changes it (see :func:`only`)."""


class ScopedViews:
    """What a store needs to hand out owner-scoped views of itself (:class:`Scoped`):
    each view is a shallow copy sharing the store's database and files, made once per
    owner. A store calls :meth:`_init_views` in its constructor; a view tells itself
    apart by ``_view_of`` (the store it was made from, None for the store itself)."""

    _scope: Scope
    _view_of: Self | None
    _views: dict[str, Self]
    _views_lock: threading.Lock

    def _init_views(self) -> None:
        self._scope = CLI_VIEW
        self._view_of = None
        self._views = {}
        self._views_lock = threading.Lock()

    def scoped(self, owner: str) -> Self:
        """This store as ``owner`` alone sees and changes it (see :func:`only`); the
        same database and files (closing the view closes nothing)."""
        base = self._view_of or self
        view = base._views.get(owner)
        if view is not None:
            return view
        with base._views_lock:
            view = base._views.get(owner)
            if view is None:
                view = copy.copy(base)
                view._scope = only(owner)
                view._view_of = base
                view._views = {}
                base._views[owner] = view
            return view
