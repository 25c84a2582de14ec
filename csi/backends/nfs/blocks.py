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

from collections.abc import Callable, Iterable, Iterator

from csi.extents import Range, Read, aligned, changed_blocks, check_read, check_write
from csi.model import Extent

Write = Callable[[int, bytes], None]
"""(offset, data): all of ``data`` written, or an error."""


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
    ``grown`` (what the target may hold past the base's end), merged. Candidates are
    read grown to whole blocks: fewer, longer reads, each of which opens the file."""
    return changed_blocks(aligned(candidates, start, common), read_base, read_target, grown, start, target_size)


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
        length = check_read(self._what, self._size, offset, length)
        return self._read(offset, length) if length else b""


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
        check_write(self._what, self._size, offset, len(data))
        if data:
            self._write(offset, data)
