"""The C allocator's thresholds, set for a short process that streams layers.

A layer moves through a command in blocks of about 1 MiB: read from a file or
a socket, inflated, hashed, written (new ``bytes`` each time, several threads
at once). glibc's malloc serves a block that large with a fresh ``mmap`` until
it has freed one, and gives the top of a heap back to the kernel whenever more
than a little is free there; either way the next block is new memory, and
every 4 KiB page of it is faulted in and zeroed by the kernel. An import of the
4-layer debootstrap image took 26,000 such faults, about 60 ms of CPU
(:mod:`bench` ``erofs-import``).

:func:`keep_freed_blocks` has malloc serve blocks up to :data:`MMAP_FROM` from
its heaps and keep up to :data:`TRIM_FROM` of freed memory: a block freed is the
next one's memory, with no fault. The cost is memory a process keeps while it
lives (at most :data:`TRIM_FROM` beyond what it uses), which a command that
streams layers and ends with its work can spend (the CLI's ``image``,
``content`` and ``diff``), and a process that may live for hours (``lamina
serve``, an attached ``lamina run``) does not ask for. Where the C library has
no ``mallopt`` (not glibc) it does nothing.
"""

from __future__ import annotations

from lamina.fs.files import libc

__all__ = ["MMAP_FROM", "TRIM_FROM", "keep_freed_blocks"]

#: blocks smaller than this come from malloc's heaps, not from mmap
MMAP_FROM = 4 << 20
#: free memory at the top of a heap is given back to the kernel beyond this
TRIM_FROM = 64 << 20
# mallopt(3)'s parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_blocks() -> bool:
    """Set malloc's thresholds (module docs); whether the C library took them."""
    import ctypes

    try:
        mallopt = libc().mallopt
    except (OSError, AttributeError):  # no C library handle, or no mallopt in it
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_FROM)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_FROM))
