"""The range arithmetic and block comparison the backends' ``SnapshotBlocks`` share:
each function on its edge cases, and ``differing`` against a plain comparison of random
images over random ranges."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csi.errors import InvalidArgument
from csi.extents import (
    BATCH,
    BLOCK,
    Range,
    aligned,
    changed_blocks,
    check_read,
    check_start,
    check_write,
    differing,
    merge,
    subtract,
    to_extents,
    union,
)
from csi.model import Extent

pytestmark = pytest.mark.unit

Reads = list[tuple[int, int]]


def reader(content: bytes, reads: Reads | None = None) -> Callable[[int, int], bytes]:
    """Reads of ``content``, short past its end, each noted in ``reads``."""

    def read(offset: int, length: int) -> bytes:
        if reads is not None:
            reads.append((offset, length))
        return content[offset : offset + length]

    return read


# -- checks --------------------------------------------------------------------------


def test_check_start_refuses_only_a_negative_start() -> None:
    check_start(0)
    check_start(10 * BLOCK + 1)
    with pytest.raises(InvalidArgument, match="negative, got -1"):
        check_start(-1)


def test_check_read_cuts_at_the_end_and_refuses_negatives() -> None:
    assert check_read("snapshot 's'", 100, 0, 100) == 100
    assert check_read("snapshot 's'", 100, 90, 20) == 10
    assert check_read("snapshot 's'", 100, 100, 5) == 0
    assert check_read("snapshot 's'", 100, 150, 5) == 0
    assert check_read("snapshot 's'", 100, 10, 0) == 0
    with pytest.raises(InvalidArgument, match="cannot read 5 bytes at offset -1 of snapshot 's'"):
        check_read("snapshot 's'", 100, -1, 5)
    with pytest.raises(InvalidArgument, match="cannot read -5 bytes"):
        check_read("snapshot 's'", 100, 0, -5)


def test_check_write_takes_only_what_fits() -> None:
    check_write("volume 'v'", 100, 0, 100)
    check_write("volume 'v'", 100, 99, 1)
    check_write("volume 'v'", 100, 100, 0)
    with pytest.raises(InvalidArgument, match="volume 'v': cannot write 2 bytes at offset 99: it has 100 bytes"):
        check_write("volume 'v'", 100, 99, 2)
    with pytest.raises(InvalidArgument, match="cannot write 1 bytes at offset -1"):
        check_write("volume 'v'", 100, -1, 1)
    with pytest.raises(InvalidArgument, match="cannot write 0 bytes at offset 101"):
        check_write("volume 'v'", 100, 101, 0)
    with pytest.raises(InvalidArgument, match="cannot write -1 bytes"):
        check_write("volume 'v'", 100, 5, -1)


# -- range arithmetic ----------------------------------------------------------------


def test_merge() -> None:
    assert list(merge([])) == []
    assert list(merge([(0, 4), (4, 6)])) == [(0, 6)], "touching"
    assert list(merge([(0, 4), (2, 6), (3, 5)])) == [(0, 6)], "overlapping, and one inside another"
    assert list(merge([(0, 4), (5, 6)])) == [(0, 4), (5, 6)], "a byte apart"
    assert list(merge([(3, 3), (0, 2), (7, 5), (2, 2)])) == [(0, 2)], "empty and reversed ones dropped"
    assert list(merge(iter([(0, 1), (1, 2)]))) == [(0, 2)], "taken from an iterator"


def test_union() -> None:
    assert list(union()) == []
    assert list(union([], [])) == []
    assert list(union([], [(5, 6)])) == [(5, 6)]
    assert list(union([(0, 2), (8, 10)], [(1, 3), (10, 11)])) == [(0, 3), (8, 11)]
    assert list(union([(20, 30)], [(0, 5)], [(5, 10), (25, 40)])) == [(0, 10), (20, 40)], "streams in any order"
    assert list(union(iter([(0, 2)]), iter([(2, 4)]))) == [(0, 4)], "touching across streams"


def test_subtract() -> None:
    assert list(subtract([], [(0, 10)])) == []
    assert list(subtract([(0, 10)], [])) == [(0, 10)]
    assert list(subtract([(5, 10)], [(0, 20)])) == [], "all of it"
    assert list(subtract([(5, 10)], [(0, 5), (10, 20)])) == [(5, 10)], "touching at both ends: nothing"
    assert list(subtract([(0, 10), (20, 30)], [(2, 4), (6, 22), (25, 30)])) == [(0, 2), (4, 6), (22, 25)]
    assert list(subtract([(0, 10), (20, 30)], [(12, 18)])) == [(0, 10), (20, 30)], "in a gap"
    assert list(subtract(iter([(0, 10), (20, 30)]), [(5, 25)])) == [(0, 5), (25, 30)], "across a gap"


def test_aligned() -> None:
    assert list(aligned([], 0, 10 * BLOCK)) == []
    assert list(aligned([(10, 20)], 0, 10 * BLOCK)) == [(0, BLOCK)]
    assert list(aligned([(BLOCK, 2 * BLOCK)], 0, 10 * BLOCK)) == [(BLOCK, 2 * BLOCK)], "aligned already"
    assert list(aligned([(BLOCK - 1, BLOCK + 1)], 0, 10 * BLOCK)) == [(0, 2 * BLOCK)], "across a block's end"
    assert list(aligned([(10, 20), (BLOCK + 1, BLOCK + 2)], 5, 10 * BLOCK)) == [(5, 2 * BLOCK)], "cut at low"
    assert list(aligned([(10, 20), (30, 40)], 0, 10 * BLOCK)) == [(0, BLOCK)], "two in one block"
    assert list(aligned([(10, 20), (2 * BLOCK, 2 * BLOCK + 1)], 0, 10 * BLOCK)) == [(0, BLOCK), (2 * BLOCK, 3 * BLOCK)]
    assert list(aligned([(3 * BLOCK - 1, 5 * BLOCK)], 0, 4 * BLOCK + 7)) == [(2 * BLOCK, 4 * BLOCK + 7)], "high"
    assert list(aligned([(10, 15)], 12, 20)) == [(12, 20)], "cut at both ends inside one block"
    assert list(aligned([(0, 10), (3 * BLOCK, 3 * BLOCK + 1)], BLOCK, 2 * BLOCK)) == [], "outside [low, high)"
    assert list(aligned([(10, 10), (BLOCK, BLOCK)], 0, 4 * BLOCK)) == [], "empty ones stay empty"
    assert list(aligned([(5, 6), (17, 18)], 0, 100, block=8)) == [(0, 8), (16, 24)]


def test_to_extents() -> None:
    assert list(to_extents([])) == []
    assert list(to_extents([(0, 5), (5, 10), (12, 13), (20, 20)])) == [Extent(0, 10), Extent(12, 1)]


# -- comparison ----------------------------------------------------------------------


def test_differing_reads_nothing_for_no_ranges_and_finds_nothing_in_equal_images() -> None:
    reads: Reads = []
    data = bytes(range(256)) * 1024
    assert list(differing([], reader(data, reads), reader(data, reads))) == []
    assert reads == []
    assert list(differing([(0, len(data))], reader(data), reader(bytes(data)))) == []


def test_differing_names_each_block_as_much_as_the_ranges_cover() -> None:
    base = bytes(4 * BLOCK)
    target = bytearray(base)
    target[BLOCK + 100] = 1
    target[3 * BLOCK] = 2
    found = differing([(BLOCK + 50, 3 * BLOCK + 10)], reader(base), reader(bytes(target)))
    assert list(found) == [Extent(BLOCK + 50, BLOCK - 50), Extent(3 * BLOCK, 10)]
    # A differing byte outside the ranges is not looked at.
    assert list(differing([(0, BLOCK + 100), (BLOCK + 101, 3 * BLOCK)], reader(base), reader(bytes(target)))) == []


def test_differing_reads_a_short_image_as_zeros() -> None:
    assert list(differing([(0, 32)], reader(b"ab"), reader(b"ab" + bytes(30)), block=8)) == []
    assert list(differing([(0, 32)], reader(b"ab"), reader(b"ab" + bytes(20) + b"x"), block=8)) == [Extent(16, 8)]
    assert list(differing([(0, 32)], reader(b""), reader(b"\0\0\x01"), block=8)) == [Extent(0, 8)]


def test_differing_names_every_piece_of_a_block_that_differs_and_reads_it_no_further() -> None:
    base = bytes(64)
    target = bytearray(base)
    target[12] = 1  # block 1 (of 8 bytes), in its second piece
    reads: Reads = []
    ranges = [(8, 10), (11, 13), (14, 15), (20, 21)]
    found = differing(ranges, reader(base, reads), reader(bytes(target), reads), block=8)
    assert list(found) == [Extent(8, 2), Extent(11, 2), Extent(14, 1)], "the equal piece before it too"
    assert (14, 1) not in reads, "read after its block was found to differ"
    assert (20, 1) in reads


def test_differing_reads_at_most_a_batch_at_a_time_cut_at_its_multiples() -> None:
    base, target = bytes(100), b"\x01" * 100
    reads: Reads = []
    found = differing([(5, 95)], reader(base, reads), reader(target, reads), block=4, batch=16)
    assert list(found) == [Extent(5, 90)]
    offsets = sorted({offset for offset, _ in reads})
    assert offsets == [5, 16, 32, 48, 64, 80]
    assert all(length <= 16 for _, length in reads)
    with pytest.raises(ValueError):
        differing([(0, 1)], reader(base), reader(target), block=0)
    with pytest.raises(ValueError):
        differing([(0, 1)], reader(base), reader(target), batch=0)


def test_the_defaults_read_whole_blocks_in_batches() -> None:
    assert BATCH % BLOCK == 0


def test_changed_blocks_are_whole_blocks_cut_at_start_and_end_then_what_grew() -> None:
    base = bytes(3 * BLOCK + 10)  # the target grew from 3 blocks and 10 bytes to 4 blocks and 20 bytes
    target = bytearray(4 * BLOCK + 20)
    target[BLOCK + 5] = 1
    target[3 * BLOCK + 1] = 2  # in the block where the base ends
    target[4 * BLOCK + 3] = 3  # past the base's end
    common = len(base)
    grown = [(4 * BLOCK, 4 * BLOCK + 20)]
    found = changed_blocks([(10, common)], reader(base), reader(bytes(target)), grown, 10, len(target))
    assert list(found) == [Extent(BLOCK, BLOCK), Extent(3 * BLOCK, BLOCK + 20)]
    found = changed_blocks([(BLOCK + 1, BLOCK + 9)], reader(base), reader(bytes(target)), [], BLOCK + 1, len(target))
    assert list(found) == [Extent(BLOCK + 1, BLOCK - 1)], "cut at the start"
    assert list(changed_blocks([], reader(base), reader(bytes(target)), grown, 0, len(target))) == [
        Extent(4 * BLOCK, 20)
    ]


# -- differing against a plain comparison --------------------------------------------


@st.composite
def ranges_in(draw: st.DrawFn, limit: int) -> list[Range]:
    """Sorted, disjoint (maybe touching) ranges, some reaching past ``limit``."""
    found: list[Range] = []
    position = draw(st.integers(0, 8))
    for gap, length in draw(st.lists(st.tuples(st.integers(0, 12), st.integers(1, 20)), max_size=8)):
        low = position + gap
        if low >= limit + 8:
            break
        found.append((low, low + length))
        position = low + length
    return found


def expected_differing(base: bytes, target: bytes, ranges: list[Range], block: int) -> list[Extent]:
    """For every block in which a byte of ``ranges`` differs (zeros past either end), the
    parts of the block the ranges cover."""
    size = max([len(base), len(target), *(high for _, high in ranges)])
    ours, theirs = base.ljust(size, b"\0"), target.ljust(size, b"\0")
    reported: list[Range] = []
    for index in range(size // block + 1):
        first, last = index * block, (index + 1) * block
        pieces = [(max(low, first), min(high, last)) for low, high in ranges if low < last and high > first]
        if any(ours[low:high] != theirs[low:high] for low, high in pieces):
            reported.extend(pieces)
    return [Extent(low, high - low) for low, high in reported_merged(reported)]


def reported_merged(ranges: list[Range]) -> Iterator[Range]:
    current: Range | None = None
    for low, high in sorted(ranges):
        if current is not None and low <= current[1]:
            current = (current[0], max(current[1], high))
        else:
            if current is not None:
                yield current
            current = (low, high)
    if current is not None:
        yield current


@st.composite
def images(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Two images, mostly alike: the target is the base with a few bytes changed, and
    either may be shorter than the other."""
    base = draw(st.binary(max_size=80))
    target = bytearray(base)
    for offset, value in draw(st.lists(st.tuples(st.integers(0, 90), st.integers(0, 3)), max_size=5)):
        if offset < len(target):
            target[offset] = value
        else:
            target.extend(bytes(offset - len(target)) + bytes([value]))
    cut = draw(st.none() | st.integers(0, 90))
    return base, bytes(target[:cut] if cut is not None else target)


@given(
    pair=images(),
    data=st.data(),
    block=st.integers(1, 16),
    batch=st.integers(1, 40),
)
@settings(max_examples=500, deadline=None, database=None)
def test_differing_reports_exactly_the_differing_blocks_within_the_ranges(
    pair: tuple[bytes, bytes], data: st.DataObject, block: int, batch: int
) -> None:
    base, target = pair
    ranges = data.draw(ranges_in(max(len(base), len(target))))
    reads: Reads = []
    found = list(differing(ranges, reader(base, reads), reader(target, reads), block, batch))
    assert found == expected_differing(base, target, ranges, block)
    covered = {offset for low, high in ranges for offset in range(low, high)}
    for extent in found:
        assert set(range(extent.offset, extent.end)) <= covered, f"{extent} is not within {ranges}"
    for offset, length in reads:
        assert 0 < length <= batch and set(range(offset, offset + length)) <= covered, (offset, length, ranges)
