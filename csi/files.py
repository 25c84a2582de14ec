"""Crash-safe small-file writes: write a temporary file, fsync it, rename it into place,
fsync the directory. A reader sees the old content or the new, never a torn file. And the
unix sockets the driver listens on: one a killed process left behind is replaced."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable

from csi.errors import ConfigError

TEMP_SUFFIX = ".tmp"


def write_atomically(path: str, data: bytes) -> None:
    temp = path + TEMP_SUFFIX
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_dir(os.path.dirname(path))


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupCommit:
    """Makes changes durable for concurrent callers with as few flushes as will do
    (group commit): a caller is covered by any flush that *starts* after its change, so
    while one flush runs the callers that arrive wait, and the next flush covers them
    all. Sixteen calls in flight cost about two flushes, not sixteen; a lone call costs
    one."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self.flush = flush
        self.syncs = 0
        """flushes made (the tests count them)."""
        self._cond = threading.Condition()
        self._requested = 0  # tickets handed out, one per call
        self._covered = 0  # the highest ticket a finished flush covers
        self._running = False

    def sync(self) -> None:
        """Return once a flush that began after this call did."""
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._covered < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covers = self._requested  # every caller so far made its change before now
                self._cond.release()
                done = False
                try:
                    self.flush()
                    done = True
                finally:
                    self._cond.acquire()
                    self._running = False
                    if done:  # a failed flush covers nothing: each waiter tries for itself
                        self._covered, self.syncs = covers, self.syncs + 1
                    self._cond.notify_all()


class DirectorySync(GroupCommit):
    """Group commit of one directory's entries (its fsync)."""

    def __init__(self, directory: str) -> None:
        super().__init__(lambda: fsync_dir(directory))
        self.directory = directory


def remove_stale_socket(path: str) -> None:
    """Remove the socket at ``path``, left by a process that was killed (or by this one
    stopping). Nothing there is fine; anything but a socket is refused, never removed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to remove it")
    os.unlink(path)
