"""Exceptions of the icecache package: one class per absl status code.

Every failed call of the C++ client library returns an ``absl::Status``; the binding raises
the class of its code here, with the code and the daemon's or library's message as
attributes. Each class also derives from the closest built-in exception, so ``except
ValueError`` catches ``InvalidArgumentError`` and ``except TimeoutError`` catches
``DeadlineExceededError``.
"""

from __future__ import annotations

import enum


class StatusCode(enum.IntEnum):
    """absl::StatusCode (the same numbers as google.rpc.Code and grpc.StatusCode)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class IceCacheError(Exception):
    """A non-OK status of the client library or the daemon.

    Attributes:
        code: the StatusCode.
        message: the status message (the daemon's names the offending field).
    """

    code: StatusCode = StatusCode.UNKNOWN

    def __init__(self, message: str, code: StatusCode | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = StatusCode(code)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class CancelledError(IceCacheError):
    code = StatusCode.CANCELLED


class UnknownError(IceCacheError):
    code = StatusCode.UNKNOWN


class InvalidArgumentError(IceCacheError, ValueError):
    code = StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(IceCacheError, TimeoutError):
    code = StatusCode.DEADLINE_EXCEEDED


class NotFoundError(IceCacheError, LookupError):
    code = StatusCode.NOT_FOUND


class AlreadyExistsError(IceCacheError):
    code = StatusCode.ALREADY_EXISTS


class PermissionDeniedError(IceCacheError, PermissionError):
    code = StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(IceCacheError):
    code = StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(IceCacheError):
    code = StatusCode.FAILED_PRECONDITION


class AbortedError(IceCacheError):
    code = StatusCode.ABORTED


class OutOfRangeError(IceCacheError, IndexError):
    code = StatusCode.OUT_OF_RANGE


class UnimplementedError(IceCacheError, NotImplementedError):
    code = StatusCode.UNIMPLEMENTED


class InternalError(IceCacheError):
    code = StatusCode.INTERNAL


class UnavailableError(IceCacheError, ConnectionError):
    code = StatusCode.UNAVAILABLE


class DataLossError(IceCacheError):
    code = StatusCode.DATA_LOSS


class UnauthenticatedError(IceCacheError):
    code = StatusCode.UNAUTHENTICATED


_BY_CODE: dict[int, type[IceCacheError]] = {
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


def error_from_status(code: int, message: str) -> IceCacheError:
    """The exception for a non-OK status code (used by the binding and icecache.operator)."""
    cls = _BY_CODE.get(int(code), UnknownError)
    return cls(message, code if int(code) in _BY_CODE else StatusCode.UNKNOWN)
