"""An overlayfs upper directory turned into an EROFS layer image.

The upper directory is walked as the layer it stands for
(:func:`lamina.archive.changes.write_overlay_diff`: whiteout devices become
``.wh.`` members, opaque directories ``.wh..wh..opq``), and that tar stream is
read, through a pipe, by the image writer in overlay form, which turns them
back into whiteout devices and opaque xattrs. So a committed image says what
the upper directory said, by the same code that writes pulled layers. The
root is not a member of the walk: its metadata is the upper directory's own.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from lamina.archive.changes import write_overlay_diff
from lamina.erofs.writer import WrittenImage, write_image
from lamina.snapshots.erofs.rootmeta import root_meta

__all__ = ["image_from_upper"]


class _PipeOut:
    """The write end of a pipe as the file the diff writer writes to."""

    def __init__(self, fd: int) -> None:
        self._f = os.fdopen(fd, "wb", buffering=1 << 20)

    def write(self, data: bytes, /) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def image_from_upper(upper: Path, dest: Path) -> WrittenImage:
    """Write the layer of upper directory ``upper`` as image ``dest`` (atomically)."""
    rfd, wfd = os.pipe()
    out = _PipeOut(wfd)
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            write_overlay_diff(upper, out, compression="none")
        except BaseException as exc:  # handed to the reader's thread
            failure.append(exc)
        finally:
            try:
                out.close()
            except OSError as exc:  # the reader stopped early: its error says why
                failure.append(exc)

    thread = threading.Thread(target=produce, name=f"erofs commit {upper}", daemon=True)
    thread.start()
    try:
        with os.fdopen(rfd, "rb", buffering=1 << 20) as stream:
            written = write_image(stream, dest, overlay=True, max_size=None,
                                  root=root_meta(upper))
    except BaseException:
        thread.join()
        if failure and not isinstance(failure[0], BrokenPipeError):
            raise failure[0] from None  # the walk failed first: the reader saw a cut stream
        raise
    thread.join()
    if failure:
        raise failure[0]
    return written
