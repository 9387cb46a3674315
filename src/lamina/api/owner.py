"""Whose call is it: containerd's, or lamina's own client's (:mod:`lamina.owners`).

lamina's gRPC clients send ``lamina-owner: lamina`` with every call; a call
without it comes from containerd (or any other client of containerd's API)
and works in containerd's scope: it sees and changes containerd's snapshots
and blobs only.
"""

from __future__ import annotations

from typing import TypeVar, cast

import grpc

from lamina.owners import CLI, CONTAINERD, METADATA_KEY, Scoped

__all__ = ["CALL_METADATA", "caller_owner", "for_caller"]

#: What lamina's own clients send with each call.
CALL_METADATA: tuple[tuple[str, str], ...] = ((METADATA_KEY, CLI),)

T = TypeVar("T")


def caller_owner(context: grpc.ServicerContext) -> str:
    """:data:`~lamina.owners.CLI` for lamina's own client, else containerd."""
    for key, value in context.invocation_metadata() or ():
        if key == METADATA_KEY and value == CLI:
            return CLI
    return CONTAINERD


def for_caller(store: T, context: grpc.ServicerContext) -> T:
    """``store`` as the caller may use it: the CLI's view (everything, changes to
    the CLI's own) for lamina's client, containerd's scope for anyone else."""
    if caller_owner(context) == CLI or not _scoped_type(type(store)):
        return store
    scoped: T = cast(Scoped, store).scoped(CONTAINERD)
    return scoped


_SCOPED_TYPES: dict[type, bool] = {}


def _scoped_type(cls: type) -> bool:
    """Whether instances of ``cls`` are :class:`Scoped`, asked once per class: the
    protocol check inspects every member each time, and every call asks."""
    known = _SCOPED_TYPES.get(cls)
    if known is None:
        known = _SCOPED_TYPES[cls] = issubclass(cls, Scoped)
    return known
