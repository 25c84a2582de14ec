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
    └── CommandFailed        a host tool failed in a way nothing classified (INTERNAL);
                             ``command_failed`` classifies what the tool printed: no space
                             (RESOURCE_EXHAUSTED), busy or refused (FAILED_PRECONDITION),
                             missing (NOT_FOUND)

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


class DataLoss(CairnError):
    """Stored data is gone or damaged (a backup chunk missing or failing its hash)."""


class CommandFailed(CairnError):
    """A host command exited non-zero; callers that understand the failure convert it."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{self.argv[0]} exited with {returncode}: {self.stderr or '(no output)'}")


class CommandNoSpace(ResourceExhausted, CommandFailed):
    """A host command ran out of space: the backend is full (the scheduler tries the next)."""


class CommandNotFound(NotFound, CommandFailed):
    """A host command found no such file, device or mount."""


class CommandBusy(FailedPrecondition, CommandFailed):
    """A host command found its device or mount in use; the message names the holder."""


class CommandRefused(FailedPrecondition, CommandFailed):
    """The host refused a command (permissions, a missing capability)."""


# Tool messages (and the errno text they print) -> the class that says what they mean.
# Checked in order; the first match wins.
_CLASSES: tuple[tuple[type[CommandFailed], tuple[str, ...]], ...] = (
    (CommandNoSpace, ("No space left on device", "Disk quota exceeded")),
    (CommandBusy, ("Device or resource busy", "target is busy", "is in use")),
    (CommandRefused, ("Operation not permitted", "Permission denied", "Read-only file system")),
    (CommandNotFound, ("No such file or directory", "No such device", "does not exist", "not mounted")),
)


def command_failed(argv: Sequence[str], returncode: int, stderr: str) -> CommandFailed:
    """The error for a failed host command: classified by what it printed, so a full
    disk is RESOURCE_EXHAUSTED, a busy device FAILED_PRECONDITION and a missing one
    NOT_FOUND, everywhere; CommandFailed (INTERNAL) when nothing says what went wrong.
    Every class is still a CommandFailed, for callers that classify further."""
    text = stderr.lower()
    for cls, phrases in _CLASSES:
        if any(phrase.lower() in text for phrase in phrases):
            return cls(argv, returncode, stderr)
    return CommandFailed(argv, returncode, stderr)


def refused(what: str, error: OSError) -> CommandFailed:
    """The error for a request the kernel refused with ``error`` where the driver asks the
    kernel itself rather than run a tool (loop ioctls, mount(2)): classified as
    ``command_failed`` classifies a tool's message, from the errno's text, so callers see
    the classes the tool's failure had. ``what`` names the request and its objects; it
    is the error's argv and the start of its message, and the errno its returncode."""
    reason = error.strerror or str(error)
    failure = command_failed([what], error.errno or 0, reason)
    failure.args = (f"{what}: {reason}",)
    return failure


class CommandTimeout(DeadlineExceeded):
    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = tuple(argv)
        super().__init__(f"{argv[0]} did not finish within {timeout:g}s")


class ConfigError(Exception):
    """The driver configuration is invalid; raised at start-up only."""
