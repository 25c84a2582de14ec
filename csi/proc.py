"""The one place that runs host commands: argv only (no shell), a timeout on every call,
stderr captured and carried in the error, and each call logged at debug level."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Sequence

from csi.errors import CommandFailed, CommandTimeout, command_failed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0


def run(
    argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, ok_codes: Sequence[int] = (0,)
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and return its result; raise CommandFailed on an exit code outside
    ``ok_codes`` and CommandTimeout (after killing it) when it runs past ``timeout``."""
    started = time.monotonic()
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(argv, timeout) from exc
    except FileNotFoundError as exc:
        raise CommandFailed(argv, 127, f"{argv[0]} is not installed on this host") from exc
    log.debug(
        "ran command",
        extra={"argv": list(argv), "rc": result.returncode, "seconds": round(time.monotonic() - started, 3)},
    )
    if result.returncode not in ok_codes:
        raise command_failed(argv, result.returncode, result.stderr or result.stdout)
    return result


def spawn(argv: Sequence[str]) -> subprocess.Popen[str]:
    """Start ``argv`` (argv only, no shell) as a long-lived helper and return at once.

    Its stdin and stdout are pipes to this process (text, line-buffered) and its stderr
    is captured; the pipes are never inherited by any other child. Closing stdin is how
    the caller tells the helper it is done, and the kernel does the same when this
    process dies in any way, SIGKILL included: a helper that acts on end of input cleans
    up after a crash too. The caller ends it with ``communicate(timeout=...)``."""
    try:
        helper = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            close_fds=True,
        )
    except FileNotFoundError as exc:
        raise CommandFailed(argv, 127, f"{argv[0]} is not installed on this host") from exc
    log.debug("spawned helper", extra={"argv": list(argv), "pid": helper.pid})
    return helper
