"""The local backend's write-ahead journal: what makes a record change durable.

A change to an object's record (made, updated, removed) is written to the record's
file without a flush, then appended to the journal, and the journal is flushed
(``fdatasync``) before the call answers. Flushes are shared by the calls in flight
(``files.GroupCommit``), so a create or a delete costs one flush, and sixteen in
flight share a few, where each file flushed on its own would cost three or four a
call.

The journal is replayed at start-up (``replay``): the last entry of each object wins,
its record file is written again where it differs, a removed object's files go, and
everything the journal names is flushed before the journal is dropped. A line is
``<crc32> <json>`` between newlines; a line whose checksum fails (a torn tail, a
short write on a full disk) is skipped, and what follows it still counts: an entry
after a torn one was either flushed after it (so the torn one was never answered) or
not flushed at all (an unanswered change, replayed like one that ended just before a
crash).

The journal stays short: past ``LIMIT`` bytes a new file takes the appends and a
background thread flushes the record files and images the old one names (each once,
however often it changed), then the folders, and only then removes the old file
(checkpoint). One checkpoint runs at a time, and files are removed in the order they
were written, so an older file never outlives a newer one's removal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from csi.files import GroupCommit, fsync_dir, fsync_file

log = logging.getLogger(__name__)

LIMIT = 1 << 20
"""A journal file's size past which the next append starts a checkpoint (about three
thousand changes)."""

SUFFIX = ".journal"

Key = tuple[str, str]
"""(kind, local ID)"""


def encode(kind: str, local_id: str, record: dict[str, Any] | None) -> bytes:
    body = json.dumps({"kind": kind, "id": local_id, "record": record}, sort_keys=True).encode()
    return b"\n%08x %s\n" % (zlib.crc32(body), body)


def decode(data: bytes) -> Iterable[tuple[Key, dict[str, Any] | None]]:
    """The entries whose checksum holds, in order."""
    for line in data.split(b"\n"):
        checksum, _, body = line.partition(b" ")
        try:
            if len(checksum) != 8 or int(checksum, 16) != zlib.crc32(body):
                continue
            entry = json.loads(body)
            key = (str(entry["kind"]), str(entry["id"]))
            record = entry["record"]
        except (ValueError, KeyError, TypeError):
            continue
        if record is None or isinstance(record, dict):
            yield key, record


def files_in(folder: str) -> list[str]:
    """The journal files in ``folder``, oldest first (their names sort by creation)."""
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(SUFFIX))


def read(folder: str) -> dict[Key, dict[str, Any] | None]:
    """Each object's last entry across every journal file, oldest file first."""
    final: dict[Key, dict[str, Any] | None] = {}
    for path in files_in(folder):
        with open(path, "rb") as handle:
            final.update(decode(handle.read()))
    return final


@dataclass(eq=False)
class _File:
    path: str
    fd: int
    flushed: GroupCommit
    size: int = 0
    users: int = 0
    touched: set[Key] = field(default_factory=set)


class Journal:
    """Appends to the journal files in ``folder``. ``settle(keys)`` makes the files of
    the objects named durable (the layout's part of a checkpoint)."""

    def __init__(self, folder: str, settle: Callable[[set[Key]], None], limit: int | None = None) -> None:
        self.folder = folder
        self.settle = settle
        self.limit = LIMIT if limit is None else limit
        self.checkpoints = 0
        """Checkpoints ended (the tests count them)."""
        self._cond = threading.Condition()
        self._current: _File | None = None
        self._checkpoint: threading.Thread | None = None
        self._stuck = False

    def append(self, kind: str, local_id: str, record: dict[str, Any] | None) -> None:
        """Write one entry and return once a flush of the journal covers it."""
        line = encode(kind, local_id, record)
        with self._cond:
            current = self._current or self._start()
            written = os.write(current.fd, line)
            current.size += written
            current.touched.add((kind, local_id))
            current.users += 1
            if current.size >= self.limit and self._checkpoint is None and not self._stuck:
                try:
                    self._rotate(current)
                except OSError:  # no new file (a full disk): this one goes on, the next append tries again
                    log.exception("cannot start a new journal file", extra={"folder": self.folder})
        try:
            if written != len(line):
                raise OSError(f"journal {current.path}: short write ({written} of {len(line)} bytes)")
            current.flushed.sync()
        finally:
            with self._cond:
                current.users -= 1
                self._cond.notify_all()

    def wait(self) -> None:
        """Return once no checkpoint runs (the tests wait for theirs)."""
        with self._cond:
            running = self._checkpoint
        if running is not None:
            running.join()

    def close(self) -> None:
        """A clean end (a stop, a folder about to be unmounted): wait for a checkpoint
        that runs, then checkpoint the current file too, so that nothing is left to
        replay. Appends after this start a new file."""
        self.wait()
        with self._cond:
            current, self._current = self._current, None
            stuck = self._stuck
        if current is None:
            return
        if stuck:  # an older file stayed: this one must outlive it
            with self._cond:
                while current.users:
                    self._cond.wait()
            os.close(current.fd)
            return
        self._checkpoint_of(current)

    def _start(self) -> _File:
        path = os.path.join(self.folder, f"{time.time_ns():020d}-{os.getpid()}{SUFFIX}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fsync_dir(self.folder)  # the file must be there for its flushes to mean anything
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._current = _File(path, fd, GroupCommit(lambda: os.fdatasync(fd)))
        return self._current

    def _rotate(self, full: _File) -> None:
        self._start()
        self._checkpoint = threading.Thread(target=self._settle, args=(full,), name="journal-checkpoint", daemon=True)
        self._checkpoint.start()

    def _settle(self, full: _File) -> None:
        try:
            self._checkpoint_of(full)
        finally:
            with self._cond:
                self._checkpoint = None

    def _checkpoint_of(self, full: _File) -> None:
        """Flush what ``full`` names once its appends have ended, then remove it."""
        try:
            with self._cond:
                while full.users:
                    self._cond.wait()
            self.settle(full.touched)
            os.close(full.fd)
            os.unlink(full.path)
            fsync_dir(self.folder)
            self.checkpoints += 1
        except Exception:
            # Its changes stay in the older file, replayed at the next start; no newer
            # file may be removed before it, so no checkpoint runs again until then.
            log.exception(
                "journal checkpoint failed; the journal grows until the next start", extra={"path": full.path}
            )
            with self._cond:
                self._stuck = True


def flush_existing(paths: Iterable[str]) -> None:
    """fsync each file that exists."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            fsync_file(path)
