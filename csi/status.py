"""Domain errors to gRPC status codes: the one table.

Every error a client sees passes through ``to_status``. Anything that is not a domain
error is a bug or an unclassified tool failure: it becomes INTERNAL, and the caller logs
the traceback. A client never sees UNKNOWN.
"""

from __future__ import annotations

import grpc

from csi import errors

CODES: dict[type[errors.CairnError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.CommandFailed: grpc.StatusCode.INTERNAL,
}


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and message for ``exc``; the most specific class in the table wins."""
    for cls in type(exc).__mro__:
        code = CODES.get(cls)
        if code is not None:
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
