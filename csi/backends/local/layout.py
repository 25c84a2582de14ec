"""Where the local backend keeps things, and the crash-safe file operations it uses.

    <path>/volumes/vol-<uuid>.img     the volume: a sparse image file
    <path>/volumes/vol-<uuid>.json    its record: request name, source, publications, and
                                      "filling" while a volume made from a backup waits
                                      for its content
    <path>/snapshots/snap-<uuid>.img  a point-in-time copy of a volume's image
    <path>/snapshots/snap-<uuid>.json its record: name, source volume, creation time
    <path>/frozen/<hash>.json         a filesystem frozen for a copy in progress (see
                                      ``mount.frozen``); thawed and removed at start-up
                                      if the copy never ended
    <path>/journal/*.journal          the write-ahead journal of the records (``journal``)

The UUID is derived from the request name (UUIDv5), so the ID of a volume is known
before anything is written; that is what makes CreateVolume idempotent without a
database. An object exists when its record *and* its image exist.

What makes a change durable is the journal (``journal.py``): a record is written to its
file without a flush, then appended to the journal, whose flush (shared by the calls in
flight) comes before the answer. A creation renames its image into place first; an image
holding data (a copy, a preallocated image) is flushed before it is renamed, and its
folder flushed before the journal names it, while a blank image is not flushed at all:
its record holds its size, and the replay at start-up makes any blank image the journal
names whole again (there, of that size). A volume's folder is flushed again before it is
published (so data a node writes to it never depends on the replay) and before a restore
marks it filled. A deletion removes the image, then the record, and journals the
removal.

So after a crash the files may hold temporary files, a record without an image, or an
image without a record, and the journal may hold changes the files lost; ``recover``
(at start-up, when nothing is in flight) first replays the journal, then removes
temporary files and halves of objects the journal does not name, which no call ever
acknowledged. A retried creation that finds its object whole journals it again before
answering, so an object is only ever acknowledged once it is durable.

Listings page through an ordered index of each folder's record names (``Index``), kept
in memory: the files stay the store, and the journal only holds what they may not hold
durably yet.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from csi.backends.local import journal
from csi.errors import NotFound
from csi.files import TEMP_SUFFIX, DirectorySync, fsync_dir

log = logging.getLogger(__name__)

Kind = Literal["volume", "snapshot"]
_PREFIX = {"volume": "vol", "snapshot": "snap"}
_FOLDER = {"volume": "volumes", "snapshot": "snapshots"}
_FREEZE_JOURNAL = "frozen"
_JOURNAL = "journal"
_NAMESPACE = {kind: uuid.uuid5(uuid.NAMESPACE_URL, f"https://cairn.csi.io/local/{kind}") for kind in _PREFIX}
_LOCAL_ID = {
    kind: re.compile(rf"^{prefix}-[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$")
    for kind, prefix in _PREFIX.items()
}


SETTLED_NS = 2_000_000_000
"""How long after a folder's last known change its index is read again once: timestamps
are coarse (a kernel tick; a second on some filesystems), so a change made elsewhere in
the same tick as one this process knows leaves the folder's time as it was."""


def _now() -> int:
    return time.time_ns()


class Index:
    """The sorted local IDs that have a record in one folder, so a listing's page costs
    a bisection and its own records rather than a scan of the folder.

    The folder is scanned at the first use, and again whenever its modification time
    differs from the one the index last knew. This process's own changes update the index
    in place and adopt the folder's new time, so a controller (the only writer of its
    directory) does not rescan for its own work. A change made by anyone else (a record
    removed by hand, another process) shows in the folder's time and brings a rescan,
    unless it fell in the same timestamp tick as a change the index knows, or between
    this process's change and its reading of the time: so the index is read again once
    ``SETTLED_NS`` after the last time it adopted. A change made elsewhere is listed
    within that delay at worst; the files stay the store, and every listed entry is
    read from its record.
    """

    def __init__(self, folder: str, pattern: re.Pattern[str]) -> None:
        self.folder = folder
        self.pattern = pattern
        self.scans = 0
        """How many times the folder was read whole (the tests count them)."""
        self._lock = threading.Lock()
        self._ids: list[str] = []
        self._stamp: tuple[int, int, int] | None = None
        self._recheck_at: int | None = None

    def after(self, cursor: str) -> Iterator[str]:
        """IDs with a record that sort after ``cursor``, in order (the index as it is
        now: entries made or removed meanwhile may or may not show)."""
        stamp = self._stat()
        with self._lock:
            due = self._recheck_at is not None and _now() >= self._recheck_at
            if stamp != self._stamp or due:
                self._scan()
            ids = self._ids
        # The list is replaced, never changed in place, so it stays whole while iterated.
        yield from ids[bisect.bisect_right(ids, cursor) :]

    def changed(self, local_id: str, present: bool) -> None:
        """Record this process's own change to ``local_id``'s record."""
        with self._lock:
            if self._stamp is None:
                return  # not built yet: the first use scans
            position = bisect.bisect_left(self._ids, local_id)
            there = position < len(self._ids) and self._ids[position] == local_id
            if present and not there:
                self._ids = [*self._ids[:position], local_id, *self._ids[position:]]
            elif there and not present:
                self._ids = [*self._ids[:position], *self._ids[position + 1 :]]
            self._adopt(self._stat())

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.folder)
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns

    def _adopt(self, stamp: tuple[int, int, int]) -> None:
        self._stamp = stamp
        self._recheck_at = stamp[1] + SETTLED_NS

    def _scan(self) -> None:
        stamp = self._stat()
        self._ids = sorted(
            local_id
            for entry in os.listdir(self.folder)
            if entry.endswith(".json") and self.pattern.match(local_id := entry.removesuffix(".json"))
        )
        self._adopt(stamp)
        if stamp[1] + SETTLED_NS <= _now():
            self._recheck_at = None  # changed long before this scan: its time tells every later change
        self.scans += 1


def _replace(path: str, data: bytes) -> None:
    """Write ``path`` whole under a temporary name and rename it into place, unflushed
    (the journal makes it durable): a reader sees the old content or the new."""
    with open(path + TEMP_SUFFIX, "wb") as handle:
        handle.write(data)
    os.rename(path + TEMP_SUFFIX, path)


def _known(key: journal.Key) -> tuple[Kind, str] | None:
    """A journal entry's kind and ID, when they are ones this backend issues."""
    kind, local_id = key
    for known in ("volume", "snapshot"):
        if kind == known and _LOCAL_ID[known].match(local_id):
            return known, local_id
    return None


class Layout:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.index = {kind: Index(os.path.join(self.root, _FOLDER[kind]), _LOCAL_ID[kind]) for kind in _FOLDER}
        self.durable = {kind: DirectorySync(os.path.join(self.root, _FOLDER[kind])) for kind in _FOLDER}
        self.journal = journal.Journal(os.path.join(self.root, _JOURNAL), self.settle)

    @classmethod
    def containing(cls, image: str) -> Layout:
        """The layout an image (or its temporary copy) belongs to."""
        return cls(os.path.dirname(os.path.dirname(os.path.abspath(image))))

    @property
    def freeze_journal(self) -> str:
        return os.path.join(self.root, _FREEZE_JOURNAL)

    def ensure(self) -> None:
        for folder in (*_FOLDER.values(), _FREEZE_JOURNAL, _JOURNAL):
            os.makedirs(os.path.join(self.root, folder), exist_ok=True)

    @staticmethod
    def local_id(kind: Kind, name: str) -> str:
        return f"{_PREFIX[kind]}-{uuid.uuid5(_NAMESPACE[kind], name)}"

    @staticmethod
    def check_id(kind: Kind, local_id: str) -> None:
        """Refuse anything that is not an ID this backend issues (and so never builds a
        path from a string a client made up)."""
        if not _LOCAL_ID[kind].match(local_id):
            raise NotFound(f"{kind} {local_id!r} does not exist")

    def image(self, kind: Kind, local_id: str) -> str:
        self.check_id(kind, local_id)
        return os.path.join(self.root, _FOLDER[kind], f"{local_id}.img")

    def record_path(self, kind: Kind, local_id: str) -> str:
        self.check_id(kind, local_id)
        return os.path.join(self.root, _FOLDER[kind], f"{local_id}.json")

    def exists(self, kind: Kind, local_id: str) -> bool:
        return os.path.exists(self.image(kind, local_id)) and os.path.exists(self.record_path(kind, local_id))

    def read_record(self, kind: Kind, local_id: str) -> dict[str, Any] | None:
        """The record of a complete object, or None."""
        if not self.exists(kind, local_id):
            return None
        try:
            with open(self.record_path(kind, local_id), encoding="utf-8") as handle:
                record: dict[str, Any] = json.load(handle)
        except FileNotFoundError:
            return None  # deleted since the check
        return record

    def require_record(self, kind: Kind, local_id: str) -> dict[str, Any]:
        """The record of a complete object, or NotFound naming it."""
        record = self.read_record(kind, local_id)
        if record is None:
            raise NotFound(f"{kind} {local_id!r} does not exist")
        return record

    def write_record(self, kind: Kind, local_id: str, record: dict[str, Any]) -> None:
        """Write an object's record and return once the journal holds it."""
        path = self.record_path(kind, local_id)
        _replace(path, json.dumps(record, sort_keys=True).encode())
        self.index[kind].changed(local_id, present=True)
        self.journal.append(kind, local_id, record)

    def commit(self, kind: Kind, local_id: str, record: dict[str, Any], temp_image: str, holds_data: bool) -> None:
        """Make a new object whole: its image (written under ``temp_image``, and flushed
        there when it ``holds_data``) renamed into place, then its record."""
        os.rename(temp_image, self.image(kind, local_id))
        if holds_data:
            self.durable[kind].sync()  # the image is there before the journal says so
        self.write_record(kind, local_id, record)

    def confirm(self, kind: Kind, local_id: str, record: dict[str, Any]) -> None:
        """Make an object found whole durable before a retry answers with it: the call
        that made it may have died before its journal entry (or its folder's flush)."""
        self.durable[kind].sync()
        self.journal.append(kind, local_id, record)

    def ids(self, kind: Kind, after: str = "") -> Iterator[str]:
        """Local IDs that have a record and sort after ``after``, in order: candidates
        for a listing, which reads each one's record and skips what is incomplete."""
        return self.index[kind].after(after)

    def remove(self, kind: Kind, local_id: str) -> None:
        """Remove image, temporary image and record, and return once the journal holds
        the removal; what is missing is fine. The record goes last so an interrupted
        removal is finished by the next call or recovery."""
        image, record = self.image(kind, local_id), self.record_path(kind, local_id)
        for path in (image, image + TEMP_SUFFIX, record + TEMP_SUFFIX, record):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.index[kind].changed(local_id, present=False)
        self.journal.append(kind, local_id, None)

    def settle(self, keys: set[journal.Key]) -> None:
        """Flush the record files and images of the objects named, then the folders: a
        checkpoint's work, after which the journal entries naming them may go."""
        paths = []
        for key in sorted(keys):
            if (known := _known(key)) is not None:
                paths += [self.record_path(*known), self.image(*known)]
        journal.flush_existing(paths)
        for sync in self.durable.values():
            sync.sync()

    def recover(self) -> None:
        """Replay the journal, then remove what crashed creations and deletions left:
        temporary files, records without an image and images without a record. Only
        safe when no operation is in flight (start-up)."""
        self._replay()
        for kind, folder in _FOLDER.items():
            directory = os.path.join(self.root, folder)
            entries = set(os.listdir(directory))
            for entry in sorted(entries):
                path = os.path.join(directory, entry)
                stem, suffix = os.path.splitext(entry)
                orphan_record = suffix == ".json" and f"{stem}.img" not in entries
                orphan_image = suffix == ".img" and f"{stem}.json" not in entries
                if entry.endswith(TEMP_SUFFIX) or orphan_record or orphan_image:
                    log.warning("removing what an interrupted %s creation left", kind, extra={"path": path})
                    os.unlink(path)

    def _replay(self) -> None:
        """Bring the files to what the journal says (each object's last entry), flush
        them, and drop the journal."""
        folder = os.path.join(self.root, _JOURNAL)
        final = journal.read(folder)
        for key, record in final.items():
            if (known := _known(key)) is None:
                log.warning("the journal names an object this backend does not issue", extra={"id": key[1]})
                continue
            typed, local_id = known
            if record is None:
                image, path = self.image(typed, local_id), self.record_path(typed, local_id)
                for leftover in (image, image + TEMP_SUFFIX, path + TEMP_SUFFIX, path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
                continue
            self._restore(typed, local_id, record)
        self.settle(set(final))
        for path in journal.files_in(folder):
            os.unlink(path)
        fsync_dir(folder)

    def _restore(self, kind: Kind, local_id: str, record: dict[str, Any]) -> None:
        """One object as its last journal entry has it: the record's file, and a blank
        volume's image (never flushed) at least as large as the record says."""
        path = self.record_path(kind, local_id)
        data = json.dumps(record, sort_keys=True).encode()
        try:
            with open(path, "rb") as handle:
                same = handle.read() == data
        except FileNotFoundError:
            same = False
        if not same:
            _replace(path, data)
        size = record.get("size")
        if kind != "volume" or not isinstance(size, int):
            return  # a snapshot's image is a copy, flushed before its record was journaled
        image = self.image(kind, local_id)
        try:
            short = os.stat(image).st_size < size
        except FileNotFoundError:
            if record.get("source") is not None and not record.get("filling"):
                return  # a copy, flushed before it was journaled: gone by hand (recovery drops the record)
            log.warning("making a blank volume's image again from the journal", extra={"id": local_id})
            with open(image, "wb"):
                pass
            short = True
        if short:
            os.truncate(image, size)
