"""One error model for every face of lamina.

Every failure lamina reports is a :class:`LaminaError`. The subclasses are
containerd's error classes; each one knows the gRPC status code it travels as
(by name, so this module does not import grpc) and the exit code the CLI
returns. The gRPC server maps a class to its status, the gRPC client maps the
status back, so a remote store raises exactly what a local one raises.
"""

from __future__ import annotations

from typing import ClassVar

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
    "from_grpc_code",
]


class LaminaError(Exception):
    """Root of every error lamina raises on purpose."""

    grpc_code: ClassVar[str] = "UNKNOWN"
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def one_line(self) -> str:
        """``Class: message``, as the CLI prints it (``NotImplementedErr`` is
        ``NotImplemented``: the suffix only keeps clear of Python's builtin)."""
        return f"{type(self).__name__.removesuffix('Err')}: {self.message}"


class Internal(LaminaError):
    """Something lamina did not expect; a bug or an environment failure."""

    grpc_code = "INTERNAL"
    exit_code = 1


class NotFound(LaminaError):
    """The named object (snapshot, blob, image, container...) does not exist."""

    grpc_code = "NOT_FOUND"
    exit_code = 3


class AlreadyExists(LaminaError):
    """An object with that key, name or digest exists already."""

    grpc_code = "ALREADY_EXISTS"
    exit_code = 4


class FailedPrecondition(LaminaError):
    """The object is not in a state that allows the operation."""

    grpc_code = "FAILED_PRECONDITION"
    exit_code = 5


class InvalidArgument(LaminaError):
    """The request itself is malformed: a bad field, filter, layer or label."""

    grpc_code = "INVALID_ARGUMENT"
    exit_code = 6


class Unavailable(LaminaError):
    """A resource is busy or a service cannot be reached; retrying may help."""

    grpc_code = "UNAVAILABLE"
    exit_code = 7


class NotImplementedErr(LaminaError):
    """The operation is not supported by this implementation."""

    grpc_code = "UNIMPLEMENTED"
    exit_code = 8


class ResourceExhausted(LaminaError):
    """A limit was reached: a layer grew past its size cap, the disk is (nearly) full."""

    grpc_code = "RESOURCE_EXHAUSTED"
    exit_code = 9


_BY_CODE: dict[str, type[LaminaError]] = {
    cls.grpc_code: cls
    for cls in (
        Internal,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        InvalidArgument,
        Unavailable,
        NotImplementedErr,
        ResourceExhausted,
    )
}


def from_grpc_code(code_name: str, message: str) -> LaminaError:
    """Rebuild the lamina error that a gRPC status code name stands for."""
    return _BY_CODE.get(code_name, Internal)(message)
