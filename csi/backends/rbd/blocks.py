"""The blocks of RBD images: which ranges hold data, where two images differ, and
readers and writers of their content (the rbd backend's ``SnapshotBlocks``).

What holds data, and what changed between two RBD snapshots of one image, is librbd's
``diff_iterate``, in two passes: first whole objects from the object map (fast-diff: no
data object is touched), then the exact ranges within those objects only (a listing of
each one's snapshots). Where librbd cannot tell, two images are read and compared in
aligned blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import rbd

from csi.backends.rbd.cluster import ceph_call
from csi.errors import InvalidArgument
from csi.model import Extent

BLOCK = 64 * 1024
"""The unit of comparison: a range found by reading is made of whole blocks of this size
(cut at the start asked for and at the image's end)."""
CHUNK = 4 << 20
"""How much of each image one read takes when two are compared (a multiple of BLOCK)."""

Range = tuple[int, int]
"""[start, end) in bytes."""
Read = Callable[[int, int], bytes]
"""(offset, length) -> bytes."""


def check_start(start: int) -> None:
    if start < 0:
        raise InvalidArgument(f"a starting offset cannot be negative ({start})")


def diff(image: Any, start: int, end: int, from_snapshot: str | None, *, zeros: bool, what: str) -> list[Extent]:
    """The ranges in [start, end) that librbd reports for ``image`` (at the snapshot it
    is set to) since ``from_snapshot`` (None: since its creation, through its parents),
    sorted and merged: written ranges, and with ``zeros`` also the ones that became
    zeros (discarded). The object map names the objects to look at; without fast-diff
    librbd would list every object's snapshots for it, so the exact pass runs alone."""
    end = min(end, int(ceph_call(what, image.size)))
    if end <= start:
        return []
    candidates = [(start, end)]
    if ceph_call(what, image.features) & rbd.RBD_FEATURE_FAST_DIFF:
        whole = _reported(image, [(start, end)], from_snapshot, True, True, what)
        candidates = [(e.offset, e.end) for e in merged(whole)]
    return list(merged(_reported(image, candidates, from_snapshot, False, zeros, what)))


def _reported(
    image: Any, ranges: Iterable[Range], from_snapshot: str | None, whole_object: bool, zeros: bool, what: str
) -> list[Extent]:
    """What librbd reports for each of ``ranges``, sorted (librbd's order is its own)."""
    return sorted(
        extent
        for low, high in ranges
        for extent in _reported_in(image, low, high, from_snapshot, whole_object, zeros, what)
    )


def _reported_in(
    image: Any, low: int, high: int, from_snapshot: str | None, whole_object: bool, zeros: bool, what: str
) -> list[Extent]:
    """What librbd reports in [low, high), cut to it (a whole object may reach past it)."""
    found: list[Extent] = []

    def collect(offset: int, length: int, exists: bool) -> None:
        first, last = max(offset, low), min(offset + length, high)
        if (exists or zeros) and first < last:
            found.append(Extent(first, last - first))

    ceph_call(
        what,
        lambda: image.diff_iterate(
            low, high - low, from_snapshot, collect, include_parent=True, whole_object=whole_object
        ),
    )
    return found


def merged(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Sorted ``extents`` with the overlapping and touching ones joined, lazily."""
    current: Extent | None = None
    for extent in extents:
        if extent.length <= 0:
            continue
        if current is None:
            current = extent
        elif extent.offset <= current.end:
            current = Extent(current.offset, max(current.end, extent.end) - current.offset)
        else:
            yield current
            current = extent
    if current is not None:
        yield current


def aligned(extents: Iterable[Extent], start: int, end: int) -> Iterator[Range]:
    """Sorted ``extents`` grown to whole blocks, cut to [start, end), and merged."""

    def grown() -> Iterator[Extent]:
        for extent in extents:
            low, high = max(start, extent.offset // BLOCK * BLOCK), min(end, -(-extent.end // BLOCK) * BLOCK)
            if low < high:
                yield Extent(low, high - low)

    for extent in merged(grown()):
        yield extent.offset, extent.end


def differing(ranges: Iterable[Range], read_base: Read, read_target: Read) -> Iterator[Extent]:
    """The blocks of ``ranges`` where the two images' bytes differ, merged: each range is
    read from both in chunks, and the blocks of a chunk that differs are compared."""
    return merged(_differing(ranges, read_base, read_target))


def _differing(ranges: Iterable[Range], read_base: Read, read_target: Read) -> Iterator[Extent]:
    for low, high in ranges:
        position = low
        while position < high:
            stop = min(high, (position // CHUNK + 1) * CHUNK)
            base, target = read_base(position, stop - position), read_target(position, stop - position)
            if base != target:
                yield from _blocks_differing(position, stop, base, target)
            position = stop


def _blocks_differing(low: int, high: int, base: bytes, target: bytes) -> Iterator[Extent]:
    """The blocks of [low, high) where ``base`` and ``target`` (read from ``low``) differ.
    Slices of bytes compare several times faster than slices of memoryviews."""
    block = low
    while block < high:
        stop = min(high, (block // BLOCK + 1) * BLOCK)
        if base[block - low : stop - low] != target[block - low : stop - low]:
            yield Extent(block, stop - block)
        block = stop


class ImageReader:
    """An RBD image (or snapshot image), open read-only, as a ``BlockReader``."""

    def __init__(self, image: Any, size: int, what: str) -> None:
        self._image, self._size, self._what = image, size, what

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"cannot read {length} bytes at {offset} of {self._what}")
        length = min(length, self._size - offset)
        if length <= 0:
            return b""
        return bytes(ceph_call(self._what, lambda: self._image.read(offset, length)))


class ImageWriter:
    """An RBD image, open for writing, as a ``BlockWriter``."""

    def __init__(self, image: Any, size: int, what: str) -> None:
        self._image, self._size, self._what = image, size, what

    @property
    def size(self) -> int:
        return self._size

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self._size:
            raise InvalidArgument(
                f"cannot write {len(data)} bytes at {offset} of {self._what}: it has {self._size} bytes"
            )
        if data:
            ceph_call(self._what, lambda: self._image.write(data, offset))
