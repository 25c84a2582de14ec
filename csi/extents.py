"""Byte ranges of images and the comparison of two images block by block: what the
backends' ``SnapshotBlocks`` share.

A range is [start, end) in bytes. The ranges a backend answers are sorted, do not
overlap, are merged where they touch, and lie within the snapshot's size; a changed
range is made of whole ``BLOCK``-sized blocks, cut at the start asked for and at the
target's end. Where the data is (holes, shared extents, librbd's diff) and how an image
is read are each backend's own.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

from csi.errors import InvalidArgument, ResourceExhausted
from csi.model import Extent

BLOCK = 64 * 1024
"""The unit of comparison: a changed range is made of whole blocks of this size."""
BATCH = 4 << 20
"""How much of each image one read takes when two are compared (a multiple of BLOCK)."""

Range = tuple[int, int]
"""[start, end) in bytes."""
Read = Callable[[int, int], bytes]
"""(offset, length) -> up to ``length`` bytes of an image; fewer only where it ends."""


def check_start(start: int) -> None:
    """The start offset of ``allocated`` or ``changed``: InvalidArgument when negative."""
    if start < 0:
        raise InvalidArgument(f"a start offset cannot be negative, got {start}")


def check_read(what: str, size: int, offset: int, length: int) -> int:
    """How many of ``length`` bytes at ``offset`` a reader of ``size`` bytes has (none
    past its end); InvalidArgument for a negative offset or length."""
    if offset < 0 or length < 0:
        raise InvalidArgument(f"cannot read {length} bytes at offset {offset} of {what}")
    return max(0, min(length, size - offset))


def check_write(what: str, size: int, offset: int, length: int) -> None:
    """InvalidArgument unless [offset, offset + length) lies within a writer of ``size``
    bytes."""
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidArgument(f"{what}: cannot write {length} bytes at offset {offset}: it has {size} bytes")


def write_at(fd: int, offset: int, data: bytes, what: str) -> None:
    """All of ``data`` at ``offset`` of the open image or device ``fd``; a full
    filesystem or thin pool is ResourceExhausted naming ``what``."""
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            if written <= 0:
                raise OSError(errno.EIO, f"nothing written at {offset}")
            view, offset = view[written:], offset + written
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"no room to write {what}: {exc.strerror}") from exc
        raise


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


def union(*sorted_ranges: Iterable[Range]) -> Iterator[Range]:
    """Streams of ranges, each sorted by start, as one, merged; taken lazily."""
    return merge(heapq.merge(*sorted_ranges))


def subtract(ranges: Iterable[Range], removed: Sequence[Range]) -> Iterator[Range]:
    """Sorted, disjoint ``ranges`` without what the sorted, disjoint ``removed`` covers."""
    j = 0
    for low, high in ranges:
        position = low
        while j < len(removed) and removed[j][1] <= position:
            j += 1
        k = j
        while k < len(removed) and removed[k][0] < high:
            if removed[k][0] > position:
                yield position, removed[k][0]
            position = max(position, removed[k][1])
            k += 1
        if position < high:
            yield position, high


def aligned(ranges: Iterable[Range], low: int, high: int, block: int = BLOCK) -> Iterator[Range]:
    """Sorted ``ranges`` grown to whole blocks, cut to [low, high), merged."""
    grown = (
        (max(low, first - first % block), min(high, -(-last // block) * block))
        for first, last in ranges
        if first < last
    )
    return merge(grown)


def to_extents(ranges: Iterable[Range]) -> Iterator[Extent]:
    """Sorted ranges as extents, merged."""
    return (Extent(low, high - low) for low, high in merge(ranges))


def differing(
    ranges: Iterable[Range], read_base: Read, read_target: Read, block: int = BLOCK, batch: int = BATCH
) -> Iterator[Extent]:
    """The blocks in which two images differ within ``ranges`` (sorted, disjoint), each
    as much of it as the ranges cover, merged; lazily, in order.

    Only the bytes of ``ranges`` are read, at most ``batch`` bytes of each image at a
    time (cut at multiples of ``batch``), and none of a block already found to differ.
    A short read is the end of an image: zeros, as past the end of a volume that grew.
    """
    if block <= 0 or batch <= 0:
        raise ValueError(f"blocks of {block} bytes and reads of {batch} bytes make no comparison")
    return to_extents(_differing(ranges, read_base, read_target, block, batch))


def changed_blocks(
    compared: Iterable[Range],
    read_base: Read,
    read_target: Read,
    grown: Iterable[Range],
    start: int,
    end: int,
    *,
    block: int = BLOCK,
    batch: int = BATCH,
) -> Iterator[Extent]:
    """Where a target image may differ from its base, from ``start`` on: the blocks in
    which the bytes of ``compared`` differ (sorted, disjoint ranges from ``start`` on,
    within both images: where either may hold data), each whole but cut to [start,
    ``end``) (``end``: the target's size), then ``grown`` (sorted ranges past the base's
    end where the target may hold data), merged. What ``compared`` leaves out is not
    read: it is taken as equal."""
    found = differing(compared, read_base, read_target, block, batch)
    blocks = aligned(((e.offset, e.end) for e in found), start, end, block)
    return to_extents(itertools.chain(blocks, grown))


def _differing(ranges: Iterable[Range], read_base: Read, read_target: Read, block: int, batch: int) -> Iterator[Range]:
    current = -1  # the block whose pieces were read last
    pending: list[Range] = []  # its pieces read so far, all equal: reported if another one differs
    differs_until = 0  # the end of the last block found to differ
    for low, high in ranges:
        position = low
        while position < high:
            if position < differs_until:  # the rest of a block found to differ: not read
                stop = min(high, differs_until)
                yield position, stop
                position = stop
                continue
            stop = min(high, (position // batch + 1) * batch)
            length = stop - position
            ours = read_base(position, length).ljust(length, b"\0")
            theirs = read_target(position, length).ljust(length, b"\0")
            same = ours == theirs
            for piece, end in _blocks(position, stop, block):
                index = piece // block
                if index != current:
                    current, pending = index, []
                # Slices of bytes compare several times faster than slices of memoryviews.
                if same or ours[piece - position : end - position] == theirs[piece - position : end - position]:
                    pending.append((piece, end))
                else:
                    yield from pending
                    yield piece, end
                    pending, differs_until = [], (index + 1) * block
            position = stop


def _blocks(low: int, high: int, block: int) -> Iterator[Range]:
    """[low, high) cut where each block ends."""
    position = low
    while position < high:
        end = min(high, (position // block + 1) * block)
        yield position, end
        position = end


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
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield position, end  # no SEEK_DATA here: all of it may hold data
                return
            raise
        if data >= end:
            return
        stop = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, stop
        position = stop
