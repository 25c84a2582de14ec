from __future__ import annotations

import grpc
import pytest

from csi import errors, status

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.OutOfRange("x"), grpc.StatusCode.OUT_OF_RANGE),
        (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Aborted("x"), grpc.StatusCode.ABORTED),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.CommandTimeout(["mkfs.ext4"], 5), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Unimplemented("x"), grpc.StatusCode.UNIMPLEMENTED),
        (errors.CommandFailed(["mount"], 32, "bad"), grpc.StatusCode.INTERNAL),
        (KeyError("surprise"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_error_has_one_code(error: BaseException, code: grpc.StatusCode) -> None:
    assert status.to_status(error)[0] is code


def test_every_domain_error_is_in_the_table() -> None:
    def leaves(cls: type[errors.CairnError]) -> list[type[errors.CairnError]]:
        return [cls, *(c for sub in cls.__subclasses__() for c in leaves(sub))]

    for cls in leaves(errors.CairnError):
        if cls is errors.CairnError:
            continue
        assert any(base in status.CODES for base in cls.__mro__), f"{cls.__name__} has no code"


def test_internal_message_names_the_error() -> None:
    code, message = status.to_status(ValueError("bad thing"))
    assert code is grpc.StatusCode.INTERNAL
    assert "ValueError" in message and "bad thing" in message
