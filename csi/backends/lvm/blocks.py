"""The blocks of thin LVs: which ranges of a thin snapshot hold data and where two thin
snapshots of one volume differ, read from the thin pool's own metadata, and readers and
writers of their content through the devices LVM activates (the lvm backend's
``SnapshotBlocks``, for a backend with a thin pool whose controller runs where the
volume group is).

The pool's metadata is read through a metadata snapshot of the live pool (the kernel's
``reserve_metadata_snap`` message), with the thin-provisioning tools: ``thin_dump`` for
the mappings of one thin device, ``thin_delta`` for the ranges two thin devices do not
share. A thin snapshot shares every block its origin had when it was taken, so what two
snapshots of one volume do not share is exactly what was written between them (a range
written with the same bytes again counts as changed: more than it must, never less).
A pool holds one metadata snapshot at a time: this process takes it under a lock per
pool, and one left reserved by a process that died is released first.
"""

from __future__ import annotations

import contextlib
import os
import threading
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from typing import IO

from csi import proc
from csi.backends.lvm.lvm import SECTOR
from csi.errors import CairnError, CommandFailed, Unavailable
from csi.extents import Range, check_read, check_write, merge, write_at

TOOL_TIMEOUT = 300.0
"""Seconds a thin_dump or thin_delta may run: they read the pool's whole metadata."""

_MAPPED = {"range_mapping": ("origin_begin", "length"), "single_mapping": ("origin_block", None)}
_CHANGED = frozenset({"different", "left_only", "right_only"})

_pool_locks: dict[str, threading.Lock] = {}
_pool_locks_guard = threading.Lock()


def _escaped(name: str) -> str:
    return name.replace("-", "--")


def pool_devices(vg: str, pool: str) -> tuple[str, str]:
    """The device-mapper nodes of an active thin pool: the pool target, to which the
    kernel's messages go, and its metadata device, which the tools read."""
    base = f"/dev/mapper/{_escaped(vg)}-{_escaped(pool)}"
    return f"{base}-tpool", f"{base}_tmeta"


def _block_bytes(root: ElementTree.Element, what: str) -> int:
    text = root.get("data_block_size", "")
    if not text.isdigit() or not int(text):
        raise Unavailable(f"{what}: the thin pool's metadata names no data block size")
    return int(text) * SECTOR


def _root(document: str, what: str) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(document)
    except ElementTree.ParseError as exc:
        raise Unavailable(f"{what}: the thin tools' output is not their XML: {exc}") from exc


def mapped(document: str, what: str) -> list[Range]:
    """The byte ranges mapped in ``thin_dump``'s XML of one thin device, merged."""
    root = _root(document, what)
    block = _block_bytes(root, what)
    found: list[Range] = []
    for element in root.iter():
        fields = _MAPPED.get(element.tag)
        if fields is None:
            continue
        begin = int(element.get(fields[0], "0"))
        length = int(element.get(fields[1], "0")) if fields[1] else 1
        found.append((begin * block, (begin + length) * block))
    return list(merge(sorted(found)))


def unshared(document: str, what: str) -> list[Range]:
    """The byte ranges two thin devices do not share, from ``thin_delta``'s XML (its
    compact form): written in one of them since the other was taken, or mapped in only
    one of them."""
    root = _root(document, what)
    block = _block_bytes(root, what)
    found: list[Range] = []
    for element in root.iter():
        if element.tag in _CHANGED:
            begin, length = int(element.get("begin", "0")), int(element.get("length", "0"))
            found.append((begin * block, (begin + length) * block))
    return list(merge(sorted(found)))


def _pool_lock(tpool: str) -> threading.Lock:
    with _pool_locks_guard:
        return _pool_locks.setdefault(tpool, threading.Lock())


def _message(tpool: str, message: str) -> None:
    proc.run(["dmsetup", "message", tpool, "0", message], timeout=TOOL_TIMEOUT)


@contextlib.contextmanager
def metadata_snapshot(vg: str, pool: str, what: str) -> Iterator[str]:
    """The active pool's metadata held still for reading: yields the metadata device
    to give the tools with ``--metadata-snap``, released on the way out."""
    tpool, tmeta = pool_devices(vg, pool)
    if not os.path.exists(tpool):
        raise Unavailable(f"{what}: thin pool {vg}/{pool} is not active on this host ({tpool} is missing)")
    with _pool_lock(tpool):
        try:
            _message(tpool, "reserve_metadata_snap")
        except CommandFailed:
            # Only one can be held: one a killed process left behind is released (the
            # kernel holds no more than the reservation; nothing else of it is lost).
            with contextlib.suppress(CommandFailed):
                _message(tpool, "release_metadata_snap")
            _message(tpool, "reserve_metadata_snap")
        try:
            yield tmeta
        finally:
            with contextlib.suppress(CairnError):
                _message(tpool, "release_metadata_snap")


def dump(tmeta: str, device_id: int) -> str:
    """``thin_dump``'s XML of thin device ``device_id`` from the reserved metadata snapshot."""
    return proc.run(["thin_dump", "--metadata-snap", "--dev-id", str(device_id), tmeta], timeout=TOOL_TIMEOUT).stdout


def delta(tmeta: str, first: int, second: int) -> str:
    """``thin_delta``'s XML of thin devices ``first`` and ``second``."""
    argv = ["thin_delta", "--metadata-snap", "--snap1", str(first), "--snap2", str(second), tmeta]
    return proc.run(argv, timeout=TOOL_TIMEOUT).stdout


class DeviceReader:
    """An active LV's device, open read-only, as a ``BlockReader``."""

    def __init__(self, device: IO[bytes], size: int, what: str) -> None:
        self._device, self._size, self._what = device, size, what

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        length = check_read(self._what, self._size, offset, length)
        return os.pread(self._device.fileno(), length, offset) if length else b""


class DeviceWriter:
    """An active LV's device, open for writing, as a ``BlockWriter``."""

    def __init__(self, device: IO[bytes], size: int, what: str) -> None:
        self._device, self._size, self._what = device, size, what

    @property
    def size(self) -> int:
        return self._size

    def write(self, offset: int, data: bytes) -> None:
        check_write(self._what, self._size, offset, len(data))
        write_at(self._device.fileno(), offset, data, self._what)
