"""Exceptions of the IceCache client: one class per gRPC status code.

Every error the daemon answers arrives as an instance of the class for its
canonical gRPC code, carrying the daemon's message unchanged (see
``proto/icecache/v1/types.proto`` for which code means what). Errors the
client detects itself before sending anything (a wrong shape, a wrong dtype,
NaN in a key) use the same classes, with the code the daemon would have
answered, so callers handle both the same way.

``InvalidArgumentError`` and ``OutOfRangeError`` are also ``ValueError``;
``NotFoundError`` is also ``LookupError``; ``PermissionDeniedError`` and
``UnauthenticatedError`` are also ``PermissionError``.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

import grpc

__all__ = [
    "IceCacheError",
    "CancelledError",
    "UnknownError",
    "InvalidArgumentError",
    "DeadlineExceededError",
    "NotFoundError",
    "AlreadyExistsError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "FailedPreconditionError",
    "AbortedError",
    "OutOfRangeError",
    "UnimplementedError",
    "InternalError",
    "UnavailableError",
    "DataLossError",
    "UnauthenticatedError",
    "error_class",
    "from_rpc_error",
]


class IceCacheError(Exception):
    """Base of every error the client raises.

    Attributes:
        code: the canonical gRPC status code (``grpc.StatusCode``).
        message: the daemon's message (or the client's, for errors found
            before a call was sent).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class CancelledError(IceCacheError):
    """The call was cancelled (by the caller, or a closed stream)."""

    code = grpc.StatusCode.CANCELLED


class UnknownError(IceCacheError):
    """A status the client does not know."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(IceCacheError, ValueError):
    """Malformed input: a bad shape field, NaN/Inf, a wrong byte length."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(IceCacheError, TimeoutError):
    """The call did not finish within the client's timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(IceCacheError, LookupError):
    """Unknown (or another tenant's) session or buffer."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(IceCacheError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(IceCacheError, PermissionError):
    """An admin verb without the admin role, a refused uid, a bad token."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(IceCacheError):
    """Quota, capacity or a limit would be exceeded; nothing changed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(IceCacheError):
    """State mismatch (select on an empty session, a shrunk buffer file)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(IceCacheError):
    code = grpc.StatusCode.ABORTED


class OutOfRangeError(IceCacheError, ValueError):
    """A buffer region past the registered buffer size; nothing written."""

    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(IceCacheError, NotImplementedError):
    """The daemon does not implement the method (an older daemon)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(IceCacheError):
    """A bug in the daemon; report it with the daemon log."""

    code = grpc.StatusCode.INTERNAL


class UnavailableError(IceCacheError, ConnectionError):
    """No daemon reachable, or the daemon is draining."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(IceCacheError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(IceCacheError, PermissionError):
    """A TCP call without a valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: Dict[grpc.StatusCode, Type[IceCacheError]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status code of its number (a ring header's, a batch entry's,
    a call's); UNKNOWN for a number grpc does not know."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def error_class(code: grpc.StatusCode) -> Type[IceCacheError]:
    """The exception class of a gRPC status code (UnknownError for OK or
    a code this client does not know)."""
    return _BY_CODE.get(code, UnknownError)


def from_rpc_error(error: grpc.RpcError, context: Optional[str] = None) -> IceCacheError:
    """Converts a ``grpc.RpcError`` into the matching IceCacheError.

    The daemon's message is kept unchanged; ``context`` (for example
    "DecodeStep") is prepended only for errors the transport produced
    without a message.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else None
    message = details or (f"{context}: {code.name.lower()}" if context else code.name.lower())
    exc = error_class(code)(message)
    exc.__cause__ = error
    return exc
