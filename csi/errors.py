"""The domain exception tree.

Backends and helpers raise these; ``status.py`` maps each class to one gRPC code, so no
layer below the services needs to know about gRPC. Tool failures are converted at the
edge where they happen and chained with ``raise ... from exc``.

    CairnError
    ├── InvalidArgument      the request is malformed or asks for something unsupported
    ├── NotFound             the volume, snapshot or node does not exist
    ├── AlreadyExists        the name is taken by an incompatible object
    ├── OutOfRange           the size is outside what the backend can provide
    ├── ResourceExhausted    no backend has the space or topology asked for
    ├── FailedPrecondition   the object is in a state that forbids the operation
    ├── Aborted              another operation on the same object is in flight
    ├── Unavailable          the backend cannot be reached now; retry later
    ├── DeadlineExceeded     a backend tool did not answer in time; retry later
    ├── Unimplemented        the backend does not offer this operation
    └── CommandFailed        a host tool failed in a way no caller classified (INTERNAL)

ConfigError is separate: it stops the driver at start-up and never reaches a client.
"""

from __future__ import annotations

from collections.abc import Sequence


class CairnError(Exception):
    """Base class of every error that may reach a client; the message names the object."""


class InvalidArgument(CairnError):
    pass


class NotFound(CairnError):
    pass


class AlreadyExists(CairnError):
    pass


class OutOfRange(CairnError):
    pass


class ResourceExhausted(CairnError):
    pass


class FailedPrecondition(CairnError):
    pass


class Aborted(CairnError):
    pass


class Unavailable(CairnError):
    pass


class DeadlineExceeded(CairnError):
    pass


class Unimplemented(CairnError):
    pass


class CommandFailed(CairnError):
    """A host command exited non-zero; callers that understand the failure convert it."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{self.argv[0]} exited with {returncode}: {self.stderr or '(no output)'}")


class CommandTimeout(DeadlineExceeded):
    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = tuple(argv)
        super().__init__(f"{argv[0]} did not finish within {timeout:g}s")


class ConfigError(Exception):
    """The driver configuration is invalid; raised at start-up only."""
