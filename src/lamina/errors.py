"""One error model for every face of lamina.

Every failure lamina reports is a :class:`LaminaError`. The subclasses are
containerd's error classes; each one knows the gRPC status code it travels as
(by name, so this module does not import grpc) and the exit code the CLI
returns. The gRPC server maps a class to its status, the gRPC client maps the
status back, so a remote store raises exactly what a local one raises.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

_T = TypeVar("_T")

__all__ = [
    "AlreadyExists",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LaminaError",
    "NotFound",
    "NotImplementedErr",
    "ResourceExhausted",
    "Unavailable",
    "describe_os_error",
    "from_grpc_code",
    "from_os_error",
    "printable",
    "shortened",
]


_BY_CODE: dict[str, type[LaminaError]] = {}

#: The longest message an error keeps, in characters. One that echoes a huge
#: input (a snapshot key, a reference, a path) keeps its start and its end and
#: says how much it left out: a line a person can read, and a gRPC status that
#: fits the header clients accept (8 KiB in grpcio and grpc-go).
MAX_MESSAGE = 4096


def shortened(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` if it has at most ``limit`` characters, else its first three
    quarters and its last part with what was left out named between them."""
    if len(text) <= limit:
        return text
    tail = max(limit // 4 - 40, 0)
    head = limit - tail - 40
    left_out = len(text) - head - tail
    return f"{text[:head]}…[{left_out} characters left out]…{text[len(text) - tail:]}"


def printable(text: str) -> str:
    """``text`` with each character a terminal would act on rather than show
    (control characters such as ESC and BEL, format characters such as a bidi
    override) written as its escape (``\\x1b``), the rest as it is: a message
    quoting what an image, a layer or a registry sent cannot drive the terminal
    it is shown on."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class LaminaError(Exception):
    """Root of every error lamina raises on purpose.

    A class that stands for one of containerd's errors names its gRPC code and
    CLI exit code in its header (``class NotFound(LaminaError,
    grpc_code="NOT_FOUND", exit_code=3)``), which also makes it the class a
    status with that code comes back as; its subclasses inherit both.
    """

    grpc_code: ClassVar[str] = "UNKNOWN"
    exit_code: ClassVar[int] = 1

    #: The class the CLI names in its line. A subclass that only tells how its
    #: base class's failure came about (``class TransportError(Unavailable,
    #: shown_as_base=True)``: the network failed) is shown as the base, the name
    #: the README's error table gives; one that is a kind of its own (Unauthorized)
    #: is shown by its own name.
    shown_as: ClassVar[type[LaminaError] | None] = None

    def __init_subclass__(
        cls, *, grpc_code: str | None = None, exit_code: int | None = None,
        shown_as_base: bool = False, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if shown_as_base:
            base = next(c for c in cls.__mro__[1:] if issubclass(c, LaminaError))
            cls.shown_as = base.shown_as or base
        else:
            cls.shown_as = None
        if grpc_code is not None:
            cls.grpc_code = grpc_code
            _BY_CODE[grpc_code] = cls
        if exit_code is not None:
            cls.exit_code = exit_code

    def __init__(self, message: str) -> None:
        message = shortened(message)  # bounded, however large what it echoes
        super().__init__(message)
        self.message = message

    def one_line(self) -> str:
        """``Class: message``, as the CLI prints it (``NotImplementedErr`` is
        ``NotImplemented``: the suffix only keeps clear of Python's builtin)."""
        shown = type(self).shown_as or type(self)
        return f"{shown.__name__.removesuffix('Err')}: {printable(self.message)}"


class Internal(LaminaError, grpc_code="INTERNAL", exit_code=1):
    """Something lamina did not expect; a bug or an environment failure."""


class Damaged(Internal, shown_as_base=True):
    """Metadata no lamina wrote: a row edited or corrupted by hand. ``check``
    reports it; nothing acts as if it were not there (what it holds cannot be
    told). Shown as ``Internal``."""

    @staticmethod
    def among(rows: Iterable[Sequence[Any]],
              parse: Callable[[Any], object]) -> list[tuple[str, str]]:
        """(key, message) of the ``rows`` that ``parse`` finds damaged, keyed by
        their first column (the first message of a key)."""
        found: dict[str, str] = {}
        for row in rows:
            try:
                parse(row)
            except Damaged as exc:
                found.setdefault(str(row[0]), exc.message)
        return sorted(found.items())

    @staticmethod
    def sort_out(rows: Iterable[Sequence[Any]],
                 parse: Callable[[Any], _T]) -> tuple[list[_T], list[Damaged]]:
        """What ``parse`` makes of each of ``rows``, in their order, and the error of
        each row it finds damaged: what a listing shows, and tells, rather than stop
        at the first damaged row."""
        good: list[_T] = []
        bad: list[Damaged] = []
        for row in rows:
            try:
                good.append(parse(row))
            except Damaged as exc:
                bad.append(exc)
        return good, bad


class NotFound(LaminaError, grpc_code="NOT_FOUND", exit_code=3):
    """The named object (snapshot, blob, image, container...) does not exist."""


class AlreadyExists(LaminaError, grpc_code="ALREADY_EXISTS", exit_code=4):
    """An object with that key, name or digest exists already."""


class FailedPrecondition(LaminaError, grpc_code="FAILED_PRECONDITION", exit_code=5):
    """The object is not in a state that allows the operation."""


class InvalidArgument(LaminaError, grpc_code="INVALID_ARGUMENT", exit_code=6):
    """The request itself is malformed: a bad field, filter, layer or label."""


class Unavailable(LaminaError, grpc_code="UNAVAILABLE", exit_code=7):
    """A resource is busy or a service cannot be reached; retrying may help."""


class NotImplementedErr(LaminaError, grpc_code="UNIMPLEMENTED", exit_code=8):
    """The operation is not supported by this implementation."""


class ResourceExhausted(LaminaError, grpc_code="RESOURCE_EXHAUSTED", exit_code=9):
    """A limit was reached: a layer grew past its size cap, the disk is (nearly) full."""


def from_grpc_code(code_name: str, message: str) -> LaminaError:
    """Rebuild the lamina error that a gRPC status code name stands for."""
    return _BY_CODE.get(code_name, Internal)(message)


_BY_ERRNO: dict[int, type[LaminaError]] = {
    errno.ENOENT: NotFound,
    errno.EEXIST: AlreadyExists,
    **dict.fromkeys((errno.EACCES, errno.EPERM, errno.EROFS, errno.EBUSY), FailedPrecondition),
    **dict.fromkeys((errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.ENAMETOOLONG,
                     errno.ELOOP), InvalidArgument),
    # the process's descriptors, the system's, the disk, a quota, memory
    **dict.fromkeys((errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EDQUOT, errno.ENOMEM),
                    ResourceExhausted),
}


def reasons_of(cls: type[LaminaError]) -> tuple[str, ...]:
    """The reasons (strerror, as tools print them in the C locale) of the errnos
    that stand for ``cls``: how to read a tool's complaint that has no errno."""
    return tuple(os.strerror(err) for err, c in _BY_ERRNO.items() if c is cls)


def describe_os_error(exc: OSError) -> str:
    """``FileExistsError: /etc/passwd: File exists``: the class, the path(s), the reason."""
    reason = exc.strerror or str(exc)
    paths = [os.fsdecode(p) for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(paths)
    return f"{type(exc).__name__}: {where + ': ' if where else ''}{reason}"


def while_doing(what: str, exc: OSError) -> LaminaError:
    """The error an OS error met while doing ``what`` stands for: ResourceExhausted
    when the process or the system ran out (descriptors, memory, disk), which is
    no fault of lamina's; else Internal."""
    cls = ResourceExhausted if _BY_ERRNO.get(exc.errno or 0) is ResourceExhausted \
        else Internal
    return cls(f"{what}: {exc}")


def from_os_error(exc: OSError) -> LaminaError | None:
    """The lamina error an operating-system error that escaped stands for (its
    message :func:`describe_os_error`'s), or None when its errno stands for none."""
    cls = _BY_ERRNO.get(exc.errno or 0)
    return None if cls is None else cls(describe_os_error(exc))
