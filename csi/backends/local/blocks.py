"""The blocks of image files: which ranges hold data, where two images differ, and
readers and writers of their content (the local backend's ``SnapshotBlocks``).

What holds data comes from ``lseek`` (SEEK_DATA, SEEK_HOLE): a hole reads as zeros.
Where two images differ comes from two sources. A reflink copy (XFS, btrfs) shares
extents with its source until either is rewritten, so successive snapshots of one volume
share what the volume did not rewrite in between: where the FIEMAP ioctl shows the same
physical blocks behind the same offsets in both images, they are equal without a read.
Everything else either image may hold is read and compared in aligned blocks; that is
all there is on a filesystem that shares nothing (ext4).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from csi.errors import NotFound
from csi.extents import (
    Range,
    changed_blocks,
    check_read,
    check_write,
    data_ranges,
    subtract,
    to_extents,
    union,
    write_at,
)
from csi.model import Extent

Pread = Callable[[int, int, int], bytes]
"""How bytes are read for a comparison: ``os.pread(fd, length, offset)``."""

# <linux/fiemap.h> and <linux/fs.h>
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x80
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000
UNTRUSTED = (
    FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_ENCRYPTED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL
)
"""Extents whose physical address does not name the blocks that hold their data as
they read (not placed yet, compressed or encrypted, packed with other data): never
taken as shared."""

_FIEMAP = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, fe_flags, 3 reserved
_FIEMAP_BATCH = 256
_NO_FIEMAP = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EBADR, errno.ENOSYS})


class Mapped(NamedTuple):
    """One extent as FIEMAP shows it."""

    logical: int
    physical: int
    length: int
    flags: int


def open_image(path: str, what: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor of an image; NotFound naming ``what`` when it is gone."""
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{what} does not exist") from None


def mapped_extents(fd: int, start: int, end: int) -> list[Mapped]:
    """The extents FIEMAP shows for [start, end) of an open file (flushing it first, so
    nothing is still waiting for a place), in logical order; none where the filesystem
    does not answer FIEMAP."""
    found: list[Mapped] = []
    position = start
    while position < end:
        request = bytearray(_FIEMAP.size + _FIEMAP_EXTENT.size * _FIEMAP_BATCH)
        _FIEMAP.pack_into(request, 0, position, end - position, FIEMAP_FLAG_SYNC, 0, _FIEMAP_BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
        except OSError as exc:
            if exc.errno in _NO_FIEMAP:
                return []
            raise
        mapped = _FIEMAP.unpack_from(request, 0)[3]
        if not mapped:
            break
        batch = []
        for index in range(mapped):
            fields = _FIEMAP_EXTENT.unpack_from(request, _FIEMAP.size + index * _FIEMAP_EXTENT.size)
            batch.append(Mapped(fields[0], fields[1], fields[2], fields[5]))
        found.extend(batch)
        following = batch[-1].logical + batch[-1].length
        if batch[-1].flags & FIEMAP_EXTENT_LAST or following <= position:
            break
        position = following
    return found


def shared_ranges(base: int, target: int, start: int, end: int) -> list[Range]:
    """The ranges within [start, end) where two open files on one filesystem read the
    same physical blocks at the same offsets (so hold the same bytes), merged."""
    if os.fstat(base).st_dev != os.fstat(target).st_dev:
        return []  # physical addresses of two filesystems say nothing about each other
    ours = [e for e in mapped_extents(base, start, end) if not e.flags & UNTRUSTED]
    if not ours:
        return []
    theirs = [e for e in mapped_extents(target, start, end) if not e.flags & UNTRUSTED]
    found: list[Range] = []
    i = j = 0
    while i < len(ours) and j < len(theirs):
        a, b = ours[i], theirs[j]
        low = max(a.logical, b.logical, start)
        high = min(a.logical + a.length, b.logical + b.length, end)
        same_place = a.physical - a.logical == b.physical - b.logical
        # An unwritten (preallocated) extent reads as zeros whatever its blocks hold.
        same_state = a.flags & FIEMAP_EXTENT_UNWRITTEN == b.flags & FIEMAP_EXTENT_UNWRITTEN
        if low < high and same_place and same_state:
            if found and found[-1][1] >= low:
                found[-1] = (found[-1][0], max(found[-1][1], high))
            else:
                found.append((low, high))
        if a.logical + a.length <= b.logical + b.length:
            i += 1
        else:
            j += 1
    return found


def allocated(path: str, what: str, start: int) -> Iterator[Extent]:
    """The ranges of an image that may hold data, from ``start`` on."""
    fd = open_image(path, what)
    try:
        yield from to_extents(data_ranges(fd, start, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def changed(
    base_path: str, target_path: str, start: int, names: tuple[str, str], *, read: Pread = os.pread
) -> Iterator[Extent]:
    """The ranges, from ``start`` on, where image ``target_path`` may differ from image
    ``base_path`` (zeros past the base's end): whole blocks, cut at ``start`` and at the
    target's end (see ``changed_blocks``). ``names`` say what the images are, for
    NotFound; ``read`` reads what is compared."""
    base = open_image(base_path, names[0])
    try:
        target = open_image(target_path, names[1])
        try:
            base_size, target_size = os.fstat(base).st_size, os.fstat(target).st_size
            common = min(base_size, target_size)
            compared: Iterable[Range] = ()
            if start < common:
                # What neither image holds is zeros in both; what both share is equal.
                candidates = list(union(data_ranges(base, start, common), data_ranges(target, start, common)))
                if candidates:
                    compared = subtract(candidates, shared_ranges(base, target, start, common))
            grown = data_ranges(target, max(start, base_size), target_size)
            yield from changed_blocks(
                compared,
                lambda offset, length: read(base, length, offset),
                lambda offset, length: read(target, length, offset),
                grown,
                start,
                target_size,
            )
        finally:
            os.close(target)
    finally:
        os.close(base)


class ImageReader:
    """An open snapshot image (a ``BlockReader``)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        length = check_read("the snapshot", self._size, offset, length)
        parts: list[bytes] = []
        done = 0
        while done < length:
            part = os.pread(self._fd, length - done, offset + done)
            if not part:
                break  # the file is shorter than it was: the rest is not there to read
            parts.append(part)
            done += len(part)
        return b"".join(parts)


class ImageWriter:
    """An open volume image being filled (a ``BlockWriter``)."""

    def __init__(self, fd: int, size: int, what: str) -> None:
        self._fd = fd
        self._size = size
        self._what = what

    @property
    def size(self) -> int:
        return self._size

    def write(self, offset: int, data: bytes) -> None:
        check_write(self._what, self._size, offset, len(data))
        write_at(self._fd, offset, data, self._what)
