"""LaminaError <-> gRPC status.

The server aborts an RPC with the status code its error class names
(:attr:`LaminaError.grpc_code`); the client rebuilds the same class from the
code with :func:`lamina.errors.from_grpc_code`. containerd's ``errdefs`` uses
the same codes, so containerd sees NotFound, AlreadyExists and so on too.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar, cast

import grpc

from lamina.errors import (
    Internal,
    LaminaError,
    Unavailable,
    from_grpc_code,
    from_os_error,
    shortened,
)

__all__ = ["MAX_DETAILS", "abort", "fitting", "from_rpc_error", "rpc_errors",
           "servicer_method", "status_code"]

log = logging.getLogger("lamina.api")

F = TypeVar("F", bound=Callable[..., Any])

ERROR_METADATA = "lamina-error"
"""Trailing metadata key naming the LaminaError class a server raised."""

MAX_DETAILS = 6144
"""The most bytes a status message may take in its header, ``grpc-message``,
where every byte outside printable ASCII (and ``%``) is sent as three: clients
refuse a header past 8 KiB (then report RESOURCE_EXHAUSTED, not the error)."""


def _header_size(text: str) -> int:
    return sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in text.encode())


def fitting(details: str) -> str:
    """``details`` shortened (:func:`lamina.errors.shortened`) until its
    ``grpc-message`` header takes at most :data:`MAX_DETAILS` bytes."""
    limit = len(details)
    while limit > 64 and _header_size(details) > MAX_DETAILS:
        limit = limit * 2 // 3
        details = shortened(details, limit)
    return details


def status_code(exc: LaminaError) -> grpc.StatusCode:
    """The gRPC status code an error travels as."""
    try:
        return grpc.StatusCode[exc.grpc_code]
    except KeyError:
        return grpc.StatusCode.UNKNOWN


def abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End the RPC with the status for ``exc`` (INTERNAL for anything not lamina's).

    An operating-system error whose errno stands for a class (too many open files,
    a full disk: ResourceExhausted) travels as that class, logged in one line: the
    machine's state, not a bug."""
    if isinstance(exc, OSError) and (known := from_os_error(exc)) is not None:
        log.warning("RPC failed: %s", known.one_line())
        exc = known
    if isinstance(exc, LaminaError):
        context.set_trailing_metadata(((ERROR_METADATA, type(exc).__name__),))
        context.abort(status_code(exc), fitting(exc.message))
    log.error("internal error in RPC", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, fitting(f"{type(exc).__name__}: {exc}"))


def servicer_method(fn: F) -> F:
    """Decorate a servicer method ``(self, request, context)``: errors become statuses.

    Works for unary methods and for generator (server-streaming) methods alike.
    Bodies must raise rather than call ``context.abort`` themselves (abort raises
    a bare ``Exception``, which this wrapper would report a second time). A call
    cancelled under the body (a request stream's client went away) ends quietly:
    no status to send, nothing logged; the body's ``finally`` blocks clean up.
    """
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from fn(self, request, context)
            except Exception as exc:
                if _cancelled(context, exc):
                    raise  # grpcio raised it for the cancellation and ends the call quietly
                abort(context, exc)

        return cast(F, gen_wrapper)

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:
            if _cancelled(context, exc):
                raise
            abort(context, exc)

    return cast(F, wrapper)


def _cancelled(context: grpc.ServicerContext, exc: Exception) -> bool:
    """Whether ``exc`` is grpcio telling a servicer its call was cancelled (by the
    client, or by the server's idle timeout): nothing failed, nothing to report."""
    if not isinstance(exc, grpc.RpcError) or context.is_active():
        return False
    log.debug("call cancelled")
    return True


def from_rpc_error(err: grpc.RpcError, what: str = "") -> LaminaError:
    """The lamina error a failed RPC stands for."""
    code = err.code() if isinstance(err, grpc.Call) else None
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    if code is None:
        return Internal(f"{what}: {details}" if what else details)
    if code is grpc.StatusCode.UNAVAILABLE and what and not _from_lamina(err):
        # the transport failed (no server, connection lost): say what was tried
        return Unavailable(f"{what}: {details}")
    return from_grpc_code(code.name, details)


def _from_lamina(err: grpc.RpcError) -> bool:
    if not isinstance(err, grpc.Call):
        return False
    return any(key == ERROR_METADATA for key, _ in err.trailing_metadata() or ())


@contextlib.contextmanager
def rpc_errors(what: str = "") -> Iterator[None]:
    """Turn a ``grpc.RpcError`` raised inside the block into its LaminaError."""
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err, what) from None
