"""A raw binary stream written as its ``read()``.

The wrappers lamina puts around a byte stream (replaying a sniffed prefix,
decompressing, counting or reporting progress) each decide what ``read``
returns; :class:`RawReader` derives the rest of the raw-stream protocol from
that, so ``io.BufferedReader``, ``tarfile`` and ``shutil.copyfileobj`` can
use them.
"""

from __future__ import annotations

import io
from typing import Any

__all__ = ["RawReader"]


class RawReader(io.RawIOBase):
    """A readable raw stream: subclasses write ``read(size)``; ``readinto`` follows."""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        raise NotImplementedError

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)
