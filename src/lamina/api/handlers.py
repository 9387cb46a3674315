"""Server interceptors that wrap a method's handler, and grpc's four handler kinds.

grpc hands an interceptor a method's handler, whose behaviour sits under one of
four names (``unary_unary`` … ``stream_stream``) by whether requests and
responses stream. :class:`HandlerInterceptor` finds the handler and asks its
subclass for a replacement; :func:`behaviour` and :func:`rebuild` take the
behaviour out and put a new one into a handler of the same kind, with the same
(de)serializers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import grpc

__all__ = ["Handler", "HandlerInterceptor", "behaviour", "rebuild"]

if TYPE_CHECKING:  # generic in grpc-stubs only
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.ServerInterceptor

#: (request streaming, response streaming) -> the handler maker and the behaviour's name
_KINDS: dict[tuple[bool, bool], tuple[Callable[..., Any], str]] = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def behaviour(handler: Handler) -> Callable[..., Any]:
    """The function that answers ``handler``'s calls, whatever its kind."""
    _, name = _KINDS[handler.request_streaming, handler.response_streaming]
    return cast("Callable[..., Any]", getattr(handler, name))


def rebuild(handler: Handler, answer: Callable[..., Any]) -> Handler:
    """A handler of ``handler``'s kind and serializers whose calls ``answer`` takes."""
    make, _ = _KINDS[handler.request_streaming, handler.response_streaming]
    made: Handler = make(answer, request_deserializer=handler.request_deserializer,
                         response_serializer=handler.response_serializer)
    return made


class HandlerInterceptor(_Interceptor):
    """An interceptor that replaces each method's handler by what :meth:`wrap` makes of it."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self.wrap(handler, handler_call_details.method)

    def wrap(self, handler: Handler, method: str) -> Handler:
        """The handler to use for ``method`` (its full name) instead of ``handler``."""
        raise NotImplementedError
