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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

from csi.errors import InvalidArgument, NotFound, ResourceExhausted
from csi.model import Extent

BLOCK = 64 * 1024
"""The unit of comparison: a changed range is made of whole blocks of this size (cut at
the start asked for and at the image's end)."""

Range = tuple[int, int]
"""[start, end) in bytes."""

Read = Callable[[int, int, int], bytes]
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


def check_start(start: int) -> None:
    if start < 0:
        raise InvalidArgument(f"a start offset cannot be negative, got {start}")


def data_ranges(fd: int, start: int, end: int) -> Iterator[Range]:
    """The ranges of an open file within [start, end) that may hold data, in order; the
    whole span where the filesystem cannot tell holes from data."""
    position = max(start, 0)
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # nothing but holes from here to the end of the file
            if exc.errno == errno.EINVAL:
                yield position, end  # no SEEK_DATA here: all of it may hold data
                return
            raise
        if data >= end:
            return
        stop = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, stop
        position = stop


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


def union(first: Iterable[Range], second: Iterable[Range]) -> list[Range]:
    """Two sorted lists of ranges as one, merged where they overlap or touch."""
    return list(merge(sorted([*first, *second])))


def subtract(ranges: Sequence[Range], removed: Sequence[Range]) -> list[Range]:
    """Sorted, disjoint ``ranges`` without what the sorted, disjoint ``removed`` covers."""
    left: list[Range] = []
    j = 0
    for low, high in ranges:
        position = low
        while j < len(removed) and removed[j][1] <= position:
            j += 1
        k = j
        while k < len(removed) and removed[k][0] < high:
            if removed[k][0] > position:
                left.append((position, removed[k][0]))
            position = max(position, removed[k][1])
            k += 1
        if position < high:
            left.append((position, high))
    return left


def merge(ranges: Iterable[Range]) -> Iterator[Range]:
    """Ranges sorted by start, merged where they overlap or touch; empty ones dropped."""
    current: Range | None = None
    for low, high in ranges:
        if high <= low:
            continue
        if current is not None and low <= current[1]:
            current = (current[0], max(current[1], high))
            continue
        if current is not None:
            yield current
        current = (low, high)
    if current is not None:
        yield current


def extents(ranges: Iterable[Range]) -> Iterator[Extent]:
    return (Extent(low, high - low) for low, high in merge(ranges))


def allocated(path: str, what: str, start: int) -> Iterator[Extent]:
    """The ranges of an image that may hold data, from ``start`` on."""
    fd = open_image(path, what)
    try:
        yield from extents(data_ranges(fd, start, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def changed(
    base_path: str, target_path: str, start: int, names: tuple[str, str], *, block: int = BLOCK, read: Read = os.pread
) -> Iterator[Extent]:
    """The ranges, from ``start`` on, where image ``target_path`` may differ from image
    ``base_path`` (zeros past the base's end): whole ``block``-sized blocks, cut at
    ``start`` and at the target's end. ``names`` say what the images are, for NotFound;
    ``read`` reads what is compared."""
    base = open_image(base_path, names[0])
    try:
        target = open_image(target_path, names[1])
        try:
            base_size, target_size = os.fstat(base).st_size, os.fstat(target).st_size
            common = min(base_size, target_size)
            differing: Iterable[Range] = ()
            if start < common:
                # What neither image holds is zeros in both; what both share is equal.
                candidates = union(data_ranges(base, start, common), data_ranges(target, start, common))
                if candidates:
                    compared = subtract(candidates, shared_ranges(base, target, start, common))
                    differing = _differing_blocks(base, target, compared, block, read, start, target_size)
            grown = data_ranges(target, max(start, base_size), target_size)
            yield from extents(_chain(differing, grown))
        finally:
            os.close(target)
    finally:
        os.close(base)


def _chain(*parts: Iterable[Range]) -> Iterator[Range]:
    for part in parts:
        yield from part


def _differing_blocks(
    base: int, target: int, ranges: Sequence[Range], block: int, read: Read, floor: int, ceiling: int
) -> Iterator[Range]:
    """The blocks (cut to [floor, ceiling)) in which the bytes of ``ranges`` differ
    between two open files, in order; only the bytes of ``ranges`` are read, and a block
    found differing is not read further."""
    reported_until = 0
    for low, high in ranges:
        position = low
        while position < high:
            block_start = position - position % block
            block_end = block_start + block
            stop = min(high, block_end)
            if block_end > reported_until and _differ(base, target, position, stop - position, read):
                yield max(block_start, floor), min(block_end, ceiling)
                reported_until = block_end
            position = stop


def _differ(base: int, target: int, offset: int, length: int, read: Read) -> bool:
    ours = read(base, length, offset)
    theirs = read(target, length, offset)
    # A short read is the end of a file: zeros, as past the end of a volume that grew.
    return ours.ljust(length, b"\0") != theirs.ljust(length, b"\0")


class ImageReader:
    """An open snapshot image (a ``BlockReader``)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"cannot read {length} bytes at offset {offset}")
        length = max(0, min(length, self._size - offset))
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
        if offset < 0 or offset + len(data) > self._size:
            raise InvalidArgument(
                f"{self._what}: cannot write {len(data)} bytes at offset {offset}: it holds {self._size} bytes"
            )
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"no room to write {self._what}: {exc.strerror}") from exc
            raise
