"""The reservation journal: how CreateVolume and CreateSnapshot survive a crash.

RBD image names cannot hold a CSI request name (up to 128 arbitrary characters), and a
driver that creates an image and then records which request it was for can crash in
between, leaving an image nobody will ever delete. So, as in ceph-csi, the name is
*reserved* before anything is created:

    object "cairn.journal" in the pool, omap:
        volume.name.<request name>  -> <uuid>
        volume.uuid.<uuid>          -> {"name": <request name>}
        snapshot.name.<name>        -> <uuid>
        snapshot.uuid.<uuid>        -> {"name": <name>, "source": <source volume local ID>}

    1. reserve: draw a UUID and write both keys in one compound RADOS operation that
       first asserts the name key is absent (omap_cmp), so the check and the write are
       atomic: of two callers reserving one name, exactly one wins, and the other reads
       the winner's UUID. The image will be cairn-vol-<uuid> (or cairn-snap-<uuid>).
    2. create the image, clone it, resize it.
    3. mark it complete: the image metadata key cairn.name is written last.

A retry after a crash at any step finds the reservation, so it reuses the same UUID: it
adopts an image that step 2 left (finishing steps 2 and 3) or creates it. A reservation
the call has just made is new (``Reservation.new``): nothing can exist under a UUID drawn
a moment ago, so that call looks for no earlier work. Deleting a volume removes the image
first and the reservation last: one read of the record, then one compound operation that
removes the record and, only if it still maps to this UUID (omap_cmp), the name key. A
reservation whose image never appeared is abandoned work: the controller removes such
reservations the first time it opens a pool after starting, before it serves any request
on that pool (with leader election only one controller is active, so no other creation
can be in flight).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import rados

from csi.backends.rbd.cluster import ceph_call
from csi.backends.rbd.common import Kind, image_name
from csi.errors import Unavailable

log = logging.getLogger(__name__)

JOURNAL = "cairn.journal"
RESERVE_ATTEMPTS = 5
"""How often reserve tries again when the name it lost to is released before it reads it."""


class Reservation(NamedTuple):
    uuid: str
    record: dict[str, str]
    new: bool
    """Made by this call: nothing exists under the UUID yet."""


def _refused(exc: BaseException) -> bool:
    """Whether a compound write failed because one of its omap_cmp assertions did not hold
    (the whole operation then changed nothing)."""
    return isinstance(exc, rados.Error) and getattr(exc, "errno", None) == errno.ECANCELED


class Journal:
    def __init__(self, io: Any) -> None:
        self.io = io

    def _get(self, *keys: str) -> dict[str, bytes]:
        def read() -> dict[str, bytes]:
            with rados.ReadOpCtx() as op:
                values, _ = self.io.get_omap_vals_by_keys(op, keys)
                try:
                    self.io.operate_read_op(op, JOURNAL)
                except rados.ObjectNotFound:
                    return {}
                return dict(values)

        return ceph_call("the journal", read)

    def _write(self, build: Callable[[Any], None]) -> bool:
        """Run one compound write on the journal; False when an omap_cmp assertion in it
        did not hold (nothing was written), or when the journal does not exist."""

        def write() -> bool:
            with rados.WriteOpCtx() as op:
                build(op)
                try:
                    self.io.operate_write_op(op, JOURNAL)
                except rados.ObjectNotFound:
                    return False
                except rados.Error as exc:
                    if _refused(exc):
                        return False
                    raise
                return True

        return ceph_call("the journal", write)

    def lookup(self, kind: Kind, name: str) -> str | None:
        found = self._get(f"{kind}.name.{name}").get(f"{kind}.name.{name}")
        return found.decode() if found else None

    def record(self, kind: Kind, image_uuid: str) -> dict[str, str] | None:
        found = self._get(f"{kind}.uuid.{image_uuid}").get(f"{kind}.uuid.{image_uuid}")
        return json.loads(found) if found else None

    def reserve(self, kind: Kind, name: str, **details: str) -> Reservation:
        """The UUID reserved for ``name`` and its record, reserving one if needed."""
        name_key = f"{kind}.name.{name}"
        for _attempt in range(RESERVE_ATTEMPTS):
            image_uuid = str(uuid.uuid4())
            record = {"name": name, **details}
            keys = (name_key, f"{kind}.uuid.{image_uuid}")
            values = (image_uuid.encode(), json.dumps(record).encode())

            def build(op: Any, keys: tuple[str, str] = keys, values: tuple[bytes, bytes] = values) -> None:
                op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)  # the first reservation makes the journal
                op.omap_cmp(name_key, "", rados.LIBRADOS_CMPXATTR_OP_EQ)  # an absent key compares as empty
                self.io.set_omap(op, keys, values)

            if self._write(build):
                return Reservation(image_uuid, record, True)
            existing = self.lookup(kind, name)
            if existing:
                return Reservation(existing, self.record(kind, existing) or {"name": name}, False)
            # Released between the refused write and the read: reserve it afresh.
        raise Unavailable(f"the journal's reservation of {kind} name {name!r} keeps changing; try again")

    def release(self, kind: Kind, image_uuid: str, name: str = "") -> None:
        """Remove the reservation of ``image_uuid``: its record, and its name key if that
        still maps to this UUID (checked by the same compound operation that removes it).
        ``name``, when the caller knows it (the image's own metadata), saves reading the
        record first; a name that does not map to this UUID is read from the record."""
        uuid_key = f"{kind}.uuid.{image_uuid}"

        def both(name_key: str) -> Callable[[Any], None]:
            def build(op: Any) -> None:
                op.omap_cmp(name_key, image_uuid, rados.LIBRADOS_CMPXATTR_OP_EQ)
                self.io.remove_omap_keys(op, (uuid_key, name_key))

            return build

        if name and self._write(both(f"{kind}.name.{name}")):
            return
        record = self.record(kind, image_uuid)
        if record is None:
            return  # nothing is reserved under this UUID
        if not self._write(both(f"{kind}.name.{record['name']}")):
            self._write(lambda op: self.io.remove_omap_keys(op, (uuid_key,)))

    def reserved(self, kind: Kind, after: str = "", page_size: int = 0) -> Iterator[str]:
        """The UUIDs reserved for ``kind`` that sort after ``after``, in order, read from
        the journal ``page_size`` keys at a time: a listing's page reads about its own
        entries, not the whole journal."""
        prefix = f"{kind}.uuid."
        start = prefix + after if after else ""
        for key in omap_keys(self.io, JOURNAL, after=start, prefix=prefix, page_size=page_size or OMAP_PAGE):
            yield key.removeprefix(prefix)

    def sweep(self, image_gone: Callable[[str], bool]) -> int:
        """Remove reservations whose image is gone (``image_gone`` removes the remains of
        one a killed call left half made); returns how many. The journal is read a page at
        a time, however many reservations it holds."""
        removed = 0
        for key in list(omap_keys(self.io, JOURNAL)):
            kind, field, value = key.split(".", 2)
            if field == "uuid" and kind in ("volume", "snapshot") and image_gone(image_name(kind, value)):  # type: ignore[arg-type]
                log.warning("removing an abandoned reservation", extra={"kind": kind, "uuid": value})
                self.release(kind, value)  # type: ignore[arg-type]
                removed += 1
        return removed


OMAP_PAGE = 1000
POOLS = "cairn.pools"
"""An object in the backend's own pool whose omap keys name the other pools a
StorageClass's ``pool`` parameter put volumes in, so listings find them."""


def omap_keys(io: Any, obj: str, *, after: str = "", prefix: str = "", page_size: int = OMAP_PAGE) -> Iterator[str]:
    """The omap keys of ``obj`` that start with ``prefix`` and sort after ``after``, in
    order, read ``page_size`` at a time (a reader that stops early reads no more); none
    when the object does not exist."""

    def page(after: str) -> list[str]:
        with rados.ReadOpCtx() as op:
            values, _ = io.get_omap_vals(op, after, prefix, page_size)
            try:
                io.operate_read_op(op, obj)
            except rados.ObjectNotFound:
                return []
            return [key for key, _value in values]

    while True:
        keys = ceph_call(f"object {obj}", lambda: page(after))  # noqa: B023 (called at once)
        yield from keys
        if len(keys) < page_size:
            return
        after = keys[-1]


def remember_pool(io: Any, pool: str) -> None:
    def write() -> None:
        with rados.WriteOpCtx() as op:
            io.set_omap(op, (pool,), (b"",))
            io.operate_write_op(op, POOLS)

    ceph_call(f"the list of pools ({POOLS})", write)


def forget_pool(io: Any, pool: str) -> None:
    def write() -> None:
        with rados.WriteOpCtx() as op:
            io.remove_omap_keys(op, (pool,))
            with contextlib.suppress(rados.ObjectNotFound):
                io.operate_write_op(op, POOLS)

    ceph_call(f"the list of pools ({POOLS})", write)


def remembered_pools(io: Any) -> list[str]:
    return list(omap_keys(io, POOLS))


class Sweeper:
    """Sweeps each pool's journal once per process, before the pool is first used."""

    def __init__(self) -> None:
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def ensure(self, pool: str, journal: Journal, image_gone: Callable[[str], bool]) -> None:
        with self._lock:
            if pool not in self._done:
                journal.sweep(image_gone)
                self._done.add(pool)
