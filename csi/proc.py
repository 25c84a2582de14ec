"""The one place that runs host commands: argv only (no shell), a timeout on every call,
stderr captured and carried in the error, and each call logged at debug level.

A command that outlives its timeout is killed with its whole process group (each
command runs in a session of its own, so a helper it started, ``mount.nfs`` under
``mount``, dies with it) and waited for briefly (KILL_WAIT), never forever: a process
stuck in the kernel on a dead network mount dies at SIGKILL only where the kernel waits
killably. A hard NFS mount does; a FUSE request its daemon has read but never answers
does not (until the connection is aborted, as ``umount --force`` does), and such a
process is left to the kernel rather than wedging the caller."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from types import TracebackType

from csi.errors import CommandFailed, CommandTimeout, command_failed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
KILL_WAIT = 2.0
"""How long to wait for a command killed at its timeout to be gone."""


def run(
    argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, ok_codes: Sequence[int] = (0,)
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and return its result; raise CommandFailed on an exit code outside
    ``ok_codes`` and CommandTimeout (after killing it and its helpers) when it runs past
    ``timeout``."""
    started = time.monotonic()
    try:
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandFailed(argv, 127, f"{argv[0]} is not installed on this host") from exc
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill(child, argv)
        raise CommandTimeout(argv, timeout) from exc
    except BaseException:
        _kill(child, argv)
        raise
    log.debug(
        "ran command",
        extra={"argv": list(argv), "rc": child.returncode, "seconds": round(time.monotonic() - started, 3)},
    )
    result = subprocess.CompletedProcess(list(argv), child.returncode, stdout, stderr)
    if result.returncode not in ok_codes:
        raise command_failed(argv, result.returncode, result.stderr or result.stdout)
    return result


def _kill(child: subprocess.Popen[str], argv: Sequence[str]) -> None:
    """SIGKILL ``child`` and its process group, and wait for it at most KILL_WAIT
    seconds. One that outlives that is left running (subprocess reaps it later); its
    pipes are closed here, so nothing of it keeps this process waiting."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)  # its own session: the group is its pid
    with contextlib.suppress(ProcessLookupError):
        child.kill()
    try:
        child.wait(timeout=KILL_WAIT)
    except subprocess.TimeoutExpired:
        log.warning(
            "a killed command is still running (stuck in the kernel); leaving it",
            extra={"argv": list(argv), "pid": child.pid},
        )
    for pipe in (child.stdout, child.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


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


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None once it has ended
    (a zombie has ended too). With the boot ID, it tells a process from a later one that
    reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


class Exits:
    """The ends of processes this one did not start (a daemon that forked away, so
    there is no child to wait for). Each is watched through a pidfd opened while it is
    known to run: a later process that reuses its pid is never taken for it, and a wait
    wakes the moment the last one ends rather than at a polling step. A zombie has
    ended. Close it (or use it as a context manager) to release the descriptors."""

    def __init__(self, pids: Iterable[int]) -> None:
        self._fds: list[int] = []
        try:
            for pid in pids:
                try:
                    self._fds.append(os.pidfd_open(pid))
                except ProcessLookupError:
                    continue  # ended already
        except BaseException:
            self.close()  # no descriptor outlives a failed start (EMFILE)
            raise

    def wait(self, timeout: float) -> bool:
        """Whether every watched process has ended, waiting at most ``timeout`` seconds."""
        poller = select.poll()
        running = set(self._fds)
        for fd in running:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while running:
            left = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            for fd, _event in poller.poll(left):
                poller.unregister(fd)
                running.discard(fd)
            if running and not left:
                return False
        return True

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Exits:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
