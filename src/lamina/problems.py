"""What ``lamina check`` reports: one inconsistency between metadata and disk.

The content store, every snapshotter and the root's own check find problems of
their own kinds; they share this one shape, so ``check`` gathers them without
translating, and ``--json`` prints ``kind`` as the value below.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Problem", "ProblemType"]


class ProblemType(enum.StrEnum):
    """What a :class:`Problem` is about (its value is what ``check --json`` prints)."""

    #: a blob's bytes no longer hash to its digest (or size)
    CONTENT_CORRUPT = "content.corrupt"
    #: the metadata names a blob whose bytes are gone
    CONTENT_MISSING = "content.missing"
    #: a blob's metadata row no store wrote (its labels, size or times); not repaired
    CONTENT_DAMAGED = "content.damaged"
    #: a file where blobs live that no metadata names (left by a crash)
    CONTENT_ORPHAN = "content.orphan"
    #: a blob no owner holds a reference to
    CONTENT_UNHELD = "content.unheld"
    #: the metadata names a snapshot whose directory is missing
    SNAPSHOT_MISSING_DIRECTORY = "snapshot.missing-directory"
    #: a directory that no snapshot owns (left by a crash); a snapshotter's cleanup removes it
    SNAPSHOT_ORPHAN_DIRECTORY = "snapshot.orphan-directory"
    #: a snapshot's metadata row no snapshotter wrote: an unknown kind, a parent that
    #: is not there or not committed, parents in a loop (not repaired)
    SNAPSHOT_DAMAGED = "snapshot.damaged"
    #: a committed layer's files differ from what was recorded when it was made
    LAYER_CHANGED = "snapshot.layer-changed"
    #: an image record names content or snapshots that are not there
    IMAGE = "image"
    #: an image or container record no lamina wrote (not repaired: remove it)
    RECORD_DAMAGED = "record.damaged"
    #: a container record names a snapshot or image that is not there
    CONTAINER = "container"
    #: a checkpoint was interrupted and left its work directory behind
    CHECKPOINT_INTERRUPTED = "checkpoint.interrupted"


@dataclass(frozen=True)
class Problem:
    """One inconsistency: its type, what it is about, and a sentence for people."""

    kind: ProblemType
    #: the digest, snapshot or path the problem is about
    subject: str
    #: a whole sentence, naming the subject
    message: str

    @property
    def repairable(self) -> bool:
        """Whether the store's own cleanup removes the cause."""
        return self.kind is ProblemType.SNAPSHOT_ORPHAN_DIRECTORY

    def to_json(self) -> dict[str, str]:
        return {"kind": str(self.kind), "subject": self.subject, "message": self.message}

    def __str__(self) -> str:
        return self.message
