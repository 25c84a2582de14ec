"""The blocks of image files on an export: where two images differ, and readers and
writers of their content (the nfs backend's ``SnapshotBlocks``, image layout).

What may hold data is the tree's to tell (``Tree.data_ranges``): holes are found on the
exported directory itself (``exportRoot``), not through the user-space client, which
reports every image whole. Where two images differ is found by reading both through the
tree where either may hold data, a chunk at a time, and comparing them in aligned blocks.

Nothing here keeps a file open between two reads: the user-space client opens a path
once at a time (a second opener waits for the first to close it), and a caller may read
a snapshot while it iterates the ranges found in it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator

from csi.errors import InvalidArgument
from csi.model import Extent

BLOCK = 64 * 1024
"""The unit of comparison: a changed range is made of whole blocks of this size (cut at
the start asked for and at the target's end)."""
CHUNK = 4 << 20
"""How much of each image one read takes when two are compared (a multiple of BLOCK)."""

Range = tuple[int, int]
"""[start, end) in bytes."""
Read = Callable[[int, int], bytes]
"""(offset, length) -> up to ``length`` bytes; fewer only where the file ends."""
Write = Callable[[int, bytes], None]
"""(offset, data): all of ``data`` written, or an error."""


def check_start(start: int) -> None:
    if start < 0:
        raise InvalidArgument(f"a start offset cannot be negative, got {start}")


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
    """Sorted ranges as merged extents."""
    return (Extent(low, high - low) for low, high in merge(ranges))


def union(*sorted_ranges: Iterable[Range]) -> Iterator[Range]:
    """Sorted streams of ranges as one, merged, taken lazily."""
    return merge(heapq.merge(*sorted_ranges))


def aligned(ranges: Iterable[Range], low: int, high: int) -> Iterator[Range]:
    """Sorted ``ranges`` grown to whole blocks, cut to [low, high), merged."""

    def grown() -> Iterator[Range]:
        for first, last in ranges:
            yield max(low, first - first % BLOCK), min(high, -(-last // BLOCK) * BLOCK)

    return merge(grown())


def changed(
    read_base: Read,
    read_target: Read,
    candidates: Iterable[Range],
    grown: Iterable[Range],
    start: int,
    common: int,
    target_size: int,
) -> Iterator[Extent]:
    """The ranges, from ``start`` on, where the target may differ from the base: the
    blocks in which the bytes of ``candidates`` (within [start, common), where both
    images are; sorted) differ, each cut at ``start`` and ``target_size``, then
    ``grown`` (what the target may hold past the base's end), merged."""

    def differing() -> Iterator[Range]:
        for low, high in _chunks(aligned(candidates, start, common)):
            length = high - low
            # A short read is the end of a file: zeros, as past the end of a volume that grew.
            ours = read_base(low, length).ljust(length, b"\0")
            theirs = read_target(low, length).ljust(length, b"\0")
            if ours == theirs:
                continue
            for block in _blocks_differing(low, high, ours, theirs):
                block_start = block - block % BLOCK
                yield max(block_start, start), min(block_start + BLOCK, target_size)

    # Every differing block begins before ``common``, and what grew after it.
    return extents(itertools.chain(differing(), grown))


def _chunks(ranges: Iterable[Range]) -> Iterator[Range]:
    """``ranges`` cut at every multiple of CHUNK."""
    for low, high in ranges:
        position = low
        while position < high:
            stop = min(high, (position // CHUNK + 1) * CHUNK)
            yield position, stop
            position = stop


def _blocks_differing(low: int, high: int, ours: bytes, theirs: bytes) -> Iterator[int]:
    """Where each block of [low, high) that differs begins (or ``low``, for the first
    when it begins inside one); both byte strings were read from ``low``."""
    position = low
    while position < high:
        stop = min(high, (position // BLOCK + 1) * BLOCK)
        if ours[position - low : stop - low] != theirs[position - low : stop - low]:
            yield position
        position = stop


class ImageReader:
    """A snapshot image on the export (a ``BlockReader``)."""

    def __init__(self, read: Read, size: int, what: str) -> None:
        self._read = read
        self._size = size
        self._what = what

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"cannot read {length} bytes at offset {offset} of {self._what}")
        length = min(length, self._size - offset)
        if length <= 0:
            return b""
        return self._read(offset, length)


class ImageWriter:
    """A volume image on the export, being filled (a ``BlockWriter``)."""

    def __init__(self, write: Write, size: int, what: str) -> None:
        self._write = write
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
        if data:
            self._write(offset, data)
