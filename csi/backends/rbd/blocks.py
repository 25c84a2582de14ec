"""The blocks of RBD images: which ranges hold data, where two images differ, and
readers and writers of their content (the rbd backend's ``SnapshotBlocks``).

What holds data, and what changed between two RBD snapshots of one image, is librbd's
``diff_iterate``, in two passes: first whole objects from the object map (fast-diff: no
data object is touched), then the exact ranges within those objects only (a listing of
each one's snapshots). Where librbd cannot tell, two images are read and compared in
aligned blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import rbd

from csi.backends.rbd.cluster import ceph_call
from csi.extents import Range, check_read, check_write, merge, to_extents
from csi.model import Extent


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
        candidates = list(merge(_reported(image, [(start, end)], from_snapshot, True, True, what)))
    return list(to_extents(_reported(image, candidates, from_snapshot, False, zeros, what)))


def _reported(
    image: Any, ranges: Iterable[Range], from_snapshot: str | None, whole_object: bool, zeros: bool, what: str
) -> list[Range]:
    """What librbd reports for each of ``ranges``, sorted (librbd's order is its own)."""
    return sorted(
        reported
        for low, high in ranges
        for reported in _reported_in(image, low, high, from_snapshot, whole_object, zeros, what)
    )


def _reported_in(
    image: Any, low: int, high: int, from_snapshot: str | None, whole_object: bool, zeros: bool, what: str
) -> list[Range]:
    """What librbd reports in [low, high), cut to it (a whole object may reach past it)."""
    found: list[Range] = []

    def collect(offset: int, length: int, exists: bool) -> None:
        first, last = max(offset, low), min(offset + length, high)
        if (exists or zeros) and first < last:
            found.append((first, last))

    ceph_call(
        what,
        lambda: image.diff_iterate(
            low, high - low, from_snapshot, collect, include_parent=True, whole_object=whole_object
        ),
    )
    return found


class ImageReader:
    """An RBD image (or snapshot image), open read-only, as a ``BlockReader``."""

    def __init__(self, image: Any, size: int, what: str) -> None:
        self._image, self._size, self._what = image, size, what

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        length = check_read(self._what, self._size, offset, length)
        return bytes(ceph_call(self._what, lambda: self._image.read(offset, length))) if length else b""


class ImageWriter:
    """An RBD image, open for writing, as a ``BlockWriter``."""

    def __init__(self, image: Any, size: int, what: str) -> None:
        self._image, self._size, self._what = image, size, what

    @property
    def size(self) -> int:
        return self._size

    def write(self, offset: int, data: bytes) -> None:
        check_write(self._what, self._size, offset, len(data))
        if data:
            ceph_call(self._what, lambda: self._image.write(data, offset))
