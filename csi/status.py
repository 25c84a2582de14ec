"""Domain errors to gRPC status codes: the one table.

Every error a client sees passes through ``to_status``. Anything that is not a domain
error is a bug or an unclassified tool failure: it becomes INTERNAL, and the caller logs
the traceback. A client never sees UNKNOWN.
"""

from __future__ import annotations

import re

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
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.CommandFailed: grpc.StatusCode.INTERNAL,
}


# A status message travels in a gRPC trailer, and clients refuse trailers over their
# metadata limit (16 KiB in some), which would hide the real code behind
# RESOURCE_EXHAUSTED. Messages echo request fields, so long words are shortened and the
# whole message is capped.
LONGEST_WORD = 200
LONGEST_MESSAGE = 2048
_LONG_WORD = re.compile(rf"\S{{{LONGEST_WORD + 1},}}")


def shorten(message: str) -> str:
    """``message`` with every run of over LONGEST_WORD non-blank characters cut to its
    start and its length, and the whole capped at LONGEST_MESSAGE characters."""
    message = _LONG_WORD.sub(lambda m: f"{m.group()[:64]}...({len(m.group())} characters)", message)
    if len(message) > LONGEST_MESSAGE:
        message = message[: LONGEST_MESSAGE - 30] + f"...({len(message)} characters)"
    return message


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and message for ``exc``; the most specific class in the table wins."""
    for cls in type(exc).__mro__:
        code = CODES.get(cls)
        if code is not None:
            return code, shorten(str(exc))
    return grpc.StatusCode.INTERNAL, shorten(f"internal error: {type(exc).__name__}: {exc}")
