"""Objects that hold something to release and are used in ``with`` blocks."""

from __future__ import annotations

from typing import Self

__all__ = ["Closing"]


class Closing:
    """A base for objects with a ``close()``: in a ``with`` block the object is
    itself, and it is closed when the block ends, however it ends."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
