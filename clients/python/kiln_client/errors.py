"""Kiln's gRPC failures as typed Python exceptions.

Every failed RPC made through `kiln_client` surfaces as a `KilnError` (or one of its
subclasses, chosen by status code). The rich details the server attaches to its status
(`google.rpc.BadRequest` field violations, `google.rpc.RetryInfo`) are parsed into plain
attributes so callers never touch `google.rpc` messages themselves.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "InvalidArgument",
    "KilnError",
    "ModelNotFound",
    "PermissionDenied",
    "QueueFull",
    "ResourceExhausted",
    "ServerUnreachable",
    "Unauthenticated",
    "Unavailable",
    "error_class_for",
    "from_rpc_error",
]

# Substrings of the status details gRPC's core library (not a server) writes when it could
# not open a connection at all: refused, unresolvable host, TLS handshake failure.
_CONNECT_FAILURE_MARKERS = (
    "failed to connect to all addresses",  # pick_first
    "connections to all backends failing",  # round_robin
    "errors resolving",
    "dns resolution failed",
    "connection refused",
    "name resolution failure",
    "handshake failed",
)


class KilnError(Exception):
    """A failed Kiln RPC: the status code, the server's message and its structured details.

    Attributes:
        code: the gRPC status code.
        message: the server's status message (or gRPC's, when the server was never reached).
        field_violations: `(field, description)` pairs from a `google.rpc.BadRequest`
            detail; empty when the server sent none.
        retry_after: seconds the server asks the caller to wait before retrying (from
            `google.rpc.RetryInfo`), or None.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.code: grpc.StatusCode = code
        self.message: str = message
        self.field_violations: list[tuple[str, str]] = list(field_violations or [])
        self.retry_after: float | None = retry_after
        super().__init__(self._describe())

    def _describe(self) -> str:
        text = f"{self.code.name}: {self.message}" if self.message else self.code.name
        if self.field_violations:
            fields = "; ".join(f"{field}: {why}" for field, why in self.field_violations)
            text = f"{text} ({fields})"
        if self.retry_after is not None:
            text = f"{text} (retry after {self.retry_after:g} s)"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, message={self.message!r}, "
            f"field_violations={self.field_violations!r}, retry_after={self.retry_after!r})"
        )


class InvalidArgument(KilnError):
    """INVALID_ARGUMENT: the request was rejected; `field_violations` names each bad field."""


class ModelNotFound(KilnError):
    """NOT_FOUND: the requested model is not served (see `list_models`)."""


class ResourceExhausted(KilnError):
    """RESOURCE_EXHAUSTED: the server's queue is full, or the token has as many requests in
    flight as the server allows it; wait `retry_after` seconds (the server's
    `google.rpc.RetryInfo`) before trying again, when set."""


QueueFull = ResourceExhausted
"""The former name of `ResourceExhausted`."""


class Unauthenticated(KilnError):
    """UNAUTHENTICATED: the call carried no bearer token, or one the server does not accept."""


class PermissionDenied(KilnError):
    """PERMISSION_DENIED: the server knows the token but it lacks the scope for this call."""


class Unavailable(KilnError):
    """UNAVAILABLE: the server is draining or could not be reached."""


class ServerUnreachable(Unavailable):
    """UNAVAILABLE raised by gRPC itself: no connection to the server could be made."""


class DeadlineExceeded(KilnError):
    """DEADLINE_EXCEEDED: the call's timeout passed before it finished."""


class Cancelled(KilnError):
    """CANCELLED: the call was cancelled (by the caller or the server)."""


_CLASS_BY_CODE: dict[grpc.StatusCode, type[KilnError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_class_for(code: grpc.StatusCode) -> type[KilnError]:
    """The most specific `KilnError` subclass for a status code (`KilnError` itself if none)."""
    return _CLASS_BY_CODE.get(code, KilnError)


def _rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The `google.rpc.Status` in the trailers, or None when absent or inconsistent."""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(err)
    except (ValueError, AttributeError, TypeError):
        # ValueError: the details disagree with the status line; the others: an RpcError
        # that is not also a grpc.Call (e.g. raised by a test double).
        return None
    return status


def _parse_details(
    status: status_pb2.Status | None,
) -> tuple[list[tuple[str, str]], float | None]:
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    if status is None:
        return violations, retry_after
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            delay = retry_info.retry_delay
            retry_after = delay.seconds + delay.nanos / 1e9
    return violations, retry_after


def _is_connect_failure(code: grpc.StatusCode, message: str) -> bool:
    lowered = message.lower()
    return code == grpc.StatusCode.UNAVAILABLE and any(
        marker in lowered for marker in _CONNECT_FAILURE_MARKERS
    )


def from_rpc_error(err: grpc.RpcError) -> KilnError:
    """Convert a gRPC error (sync or `grpc.aio`) into the matching `KilnError` subclass.

    Field violations and retry delay are read from the rich status in the trailing
    metadata (`grpc_status.rpc_status.from_call`). An UNAVAILABLE that gRPC raised because
    it could not connect becomes `ServerUnreachable`. Never raises.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = details_fn() if callable(details_fn) else None
    if not isinstance(message, str):
        message = str(err)
    violations, retry_after = _parse_details(_rich_status(err))
    cls = ServerUnreachable if _is_connect_failure(code, message) else error_class_for(code)
    return cls(code, message, field_violations=violations, retry_after=retry_after)
