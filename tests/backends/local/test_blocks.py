"""The local backend's snapshot blocks on real images: allocated ranges of sparse files,
changed ranges checked against a full comparison of the two snapshots (on this host's
disk, and on an XFS filesystem where successive snapshots share extents, which must not
be read), reading snapshots, and volumes restored from a backup and filled."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi.backends.base import SnapshotBlocks
from csi.backends.local import CAPABILITIES
from csi.backends.local.controller import LocalVolumes
from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi.extents import BLOCK, merge, subtract, to_extents, union
from csi.model import AccessMode, AccessType, Capability, Extent, MiB, Snapshot, SourceRef, VolumeSpec
from tests.support import leftovers, require_root, require_tools

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
KiB = 1024
BACKUP = SourceRef("backup", "cairn-backup:repo-1/backup-7")

Op = tuple[str, int, int, int]
"""(what, offset, length, seed): "write" ``length`` bytes at ``offset`` (zeros for seed
0, random bytes otherwise), "punch" a hole there, or "grow" the image by ``length``.
Offsets wrap around the image's size, lengths are cut at its end."""


def spec(name: str, size: int = 8 * MiB, source: SourceRef | None = None, **params: str) -> VolumeSpec:
    return VolumeSpec(
        name=name, required_bytes=size, limit_bytes=0, capabilities=(RWO,), parameters=params, source=source
    )


# -- filesystems ---------------------------------------------------------------------


@contextlib.contextmanager
def xfs_mounted(where: Path) -> Iterator[Path]:
    """An XFS filesystem (reflink on) on a loop device over a sparse file, mounted under
    ``where``; unmounted and detached afterwards, and checked to leave nothing behind."""
    require_root()
    require_tools("losetup", "mkfs.xfs", "mount", "umount")
    backing, target = where / "xfs.img", where / "mnt"
    with open(backing, "wb") as handle:
        handle.truncate(512 * MiB)  # XFS wants 300 MiB at least
    target.mkdir()
    device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", device], capture_output=True, check=True)
        subprocess.run(["mount", device, str(target)], capture_output=True, check=True)
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)
    assert not leftovers(where), f"left behind: {leftovers(where)}"


@pytest.fixture(
    scope="module",
    params=["disk", pytest.param("xfs", marks=pytest.mark.integration)],
)
def where(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for backends: on this host's temporary disk (whatever it is: ext4 shares
    no extents), or on a fresh XFS filesystem, where snapshots are reflink copies."""
    base = tmp_path_factory.mktemp(str(request.param))
    if request.param == "disk":
        yield base
        return
    with xfs_mounted(base) as mounted:
        yield mounted


@contextlib.contextmanager
def opened(root: Path) -> Iterator[LocalVolumes]:
    """A backend in ``root``, its journal closed afterwards (the folder is unmounted next)."""
    volumes = LocalVolumes(str(root), "node-a")
    try:
        yield volumes
    finally:
        volumes.settle()


@contextlib.contextmanager
def backend(where: Path) -> Iterator[LocalVolumes]:
    """A backend in a fresh folder under ``where``, removed afterwards (many per module)."""
    folder = tempfile.mkdtemp(dir=where)
    volumes = LocalVolumes(os.path.join(folder, "local"), "node-a")
    try:
        yield volumes
    finally:
        volumes.settle()
        shutil.rmtree(folder)


@pytest.fixture
def volumes(tmp_path: Path) -> LocalVolumes:
    return LocalVolumes(str(tmp_path / "local"), "node-a")


# -- images --------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2


def write(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def punch(path: str, offset: int, length: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        os.fsync(fd)
    finally:
        os.close(fd)


def apply(path: str, ops: Iterable[Op]) -> None:
    for what, offset, length, seed in ops:
        size = os.stat(path).st_size
        if what == "grow":
            os.truncate(path, size + length)
            continue
        offset %= size
        length = min(length, size - offset)
        if what == "punch":
            punch(path, offset, length)
        else:
            write(path, offset, random.Random(seed * offset + 1).randbytes(length) if seed else bytes(length))


def content(volumes: LocalVolumes, snapshot: Snapshot) -> bytes:
    return Path(volumes.layout.image("snapshot", snapshot.local_id)).read_bytes()


def snapshots(
    volumes: LocalVolumes, name: str, size: int, before: Iterable[Op], after: Iterable[Op]
) -> tuple[Snapshot, Snapshot]:
    """Two snapshots of one new volume: after ``before``, and after ``after`` too."""
    volume = volumes.create_volume(spec(name, size))
    image = volumes.layout.image("volume", volume.local_id)
    apply(image, before)
    base = volumes.create_snapshot(f"{name}-base", volume.local_id, {})
    apply(image, after)
    return base, volumes.create_snapshot(f"{name}-target", volume.local_id, {})


# -- what a full comparison says -----------------------------------------------------


def first_difference(ours: bytes, theirs: bytes) -> int | None:
    if ours == theirs:
        return None
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))


def check_shape(ranges: list[Extent], start: int, size: int) -> None:
    """Sorted, disjoint, not touching, within [start, size)."""
    for extent in ranges:
        assert extent.length > 0 and start <= extent.offset and extent.end <= size, (extent, start, size)
    for before, after in itertools.pairwise(ranges):
        assert before.end < after.offset, (before, after)


def gaps(ranges: list[Extent], start: int, size: int) -> Iterator[tuple[int, int]]:
    position = start
    for extent in [*ranges, Extent(size, 0)]:
        if position < extent.offset:
            yield position, extent.offset
        position = max(position, extent.end)


def check_changed(ranges: list[Extent], base: bytes, target: bytes, start: int) -> None:
    """What ``changed`` answered against a full comparison: every differing byte is in a
    range (past the base's end, the base reads as zeros), and below the last whole block
    both have, the ranges are exactly the 64 KiB blocks that differ (cut at ``start``)."""
    size = len(target)
    check_shape(ranges, start, size)
    padded = base[:size].ljust(size, b"\0")
    for low, high in gaps(ranges, start, size):
        where = first_difference(padded[low:high], target[low:high])
        assert where is None, f"byte {low + where} differs but is in no range: {ranges}"
    limit = min(len(base), size) // BLOCK * BLOCK
    differing = [
        (max(block, start), block + BLOCK)
        for block in range(0, limit, BLOCK)
        if block + BLOCK > start
        and base[max(block, start) : block + BLOCK] != target[max(block, start) : block + BLOCK]
    ]
    expected = list(to_extents(differing))
    reported = list(to_extents((max(e.offset, start), min(e.end, limit)) for e in ranges))
    assert reported == expected


def check_allocated(ranges: list[Extent], image: bytes, start: int) -> None:
    """Every byte outside the ranges is zero."""
    check_shape(ranges, start, len(image))
    for low, high in gaps(ranges, start, len(image)):
        assert image[low:high].count(0) == high - low, f"data in [{low}, {high}) outside {ranges}"


# -- range arithmetic (csi.extents) --------------------------------------------------


@pytest.mark.unit
def test_range_arithmetic() -> None:
    assert list(merge([(0, 4), (4, 6), (5, 9), (9, 9), (12, 13)])) == [(0, 9), (12, 13)]
    assert list(union([(0, 2), (8, 10)], [(1, 3), (10, 11)])) == [(0, 3), (8, 11)]
    assert list(subtract([(0, 10), (20, 30)], [(2, 4), (6, 22), (25, 30)])) == [(0, 2), (4, 6), (22, 25)]
    assert list(subtract([(0, 10)], [])) == [(0, 10)]
    assert list(subtract([(5, 10)], [(0, 20)])) == []


def test_the_backend_offers_snapshot_blocks(volumes: LocalVolumes) -> None:
    offered: SnapshotBlocks = volumes  # the protocol, checked by mypy
    assert CAPABILITIES.blocks and offered is volumes


# -- allocated -----------------------------------------------------------------------


def test_allocated_names_the_data_of_a_sparse_image(volumes: LocalVolumes) -> None:
    volume = volumes.create_volume(spec("pvc-1", 8 * MiB))
    image = volumes.layout.image("volume", volume.local_id)
    write(image, 0, b"\x01" * 4 * KiB)
    write(image, 3 * MiB, b"\x02" * 100 * KiB)
    write(image, 8 * MiB - 4 * KiB, b"\x03" * 4 * KiB)
    snap = volumes.create_snapshot("snap-1", volume.local_id, {})
    data = content(volumes, snap)
    everything = list(volumes.allocated(snap.local_id))
    assert everything == [Extent(0, 4 * KiB), Extent(3 * MiB, 100 * KiB), Extent(8 * MiB - 4 * KiB, 4 * KiB)]
    check_allocated(everything, data, 0)
    # A start inside a range cuts it; one in a hole skips to the next range.
    assert list(volumes.allocated(snap.local_id, 3 * MiB + 10)) == [
        Extent(3 * MiB + 10, 100 * KiB - 10),
        Extent(8 * MiB - 4 * KiB, 4 * KiB),
    ]
    assert list(volumes.allocated(snap.local_id, 4 * MiB)) == [Extent(8 * MiB - 4 * KiB, 4 * KiB)]
    assert list(volumes.allocated(snap.local_id, 8 * MiB)) == []
    assert list(volumes.allocated(snap.local_id, 9 * MiB)) == []


def test_allocated_of_a_blank_snapshot_is_empty(volumes: LocalVolumes) -> None:
    volume = volumes.create_volume(spec("pvc-1"))
    snap = volumes.create_snapshot("snap-1", volume.local_id, {})
    assert list(volumes.allocated(snap.local_id)) == []


def test_missing_snapshots_are_not_found_and_negative_starts_invalid(volumes: LocalVolumes) -> None:
    volume = volumes.create_volume(spec("pvc-1"))
    snap = volumes.create_snapshot("snap-1", volume.local_id, {})
    gone = volumes.layout.local_id("snapshot", "never-made")
    with pytest.raises(NotFound, match=gone):
        volumes.allocated(gone)
    with pytest.raises(NotFound, match=gone):
        volumes.changed(gone, snap.local_id)
    with pytest.raises(NotFound, match=gone):
        volumes.changed(snap.local_id, gone)
    with pytest.raises(NotFound, match=gone), volumes.read_snapshot(gone):
        pass
    with pytest.raises(NotFound, match="not-an-id"):
        volumes.allocated("not-an-id")
    with pytest.raises(InvalidArgument, match="negative"):
        volumes.allocated(snap.local_id, -1)
    with pytest.raises(InvalidArgument, match="negative"):
        volumes.changed(snap.local_id, snap.local_id, -1)


def test_a_snapshot_deleted_after_the_check_is_not_found_when_read(volumes: LocalVolumes) -> None:
    volume = volumes.create_volume(spec("pvc-1"))
    snap = volumes.create_snapshot("snap-1", volume.local_id, {})
    ranges = volumes.allocated(snap.local_id)
    volumes.delete_snapshot(snap.local_id)
    with pytest.raises(NotFound, match=snap.local_id):
        list(ranges)


# -- changed -------------------------------------------------------------------------


def test_changed_refuses_snapshots_of_two_volumes(volumes: LocalVolumes) -> None:
    one = volumes.create_snapshot("snap-1", volumes.create_volume(spec("pvc-1")).local_id, {})
    two = volumes.create_snapshot("snap-2", volumes.create_volume(spec("pvc-2")).local_id, {})
    with pytest.raises(InvalidArgument, match=f"{one.local_id}.*{two.local_id}.*not snapshots of one volume"):
        volumes.changed(one.local_id, two.local_id)


def test_changed_of_a_snapshot_with_itself_is_empty(volumes: LocalVolumes) -> None:
    base, _ = snapshots(volumes, "pvc-1", 1 * MiB, [("write", 0, 300 * KiB, 1)], [])
    assert list(volumes.changed(base.local_id, base.local_id)) == []


def test_changed_matches_a_full_comparison(where: Path) -> None:
    """Overwrites, new data in holes, zeros over holes, punched holes and growth."""
    with backend(where) as volumes:
        before: list[Op] = [
            ("write", 0, 1 * MiB, 1),
            ("write", 2 * MiB, 512 * KiB, 2),
            ("write", 5 * MiB, 1 * MiB, 3),
        ]
        after: list[Op] = [
            ("write", 100 * KiB, 10, 4),  # a few bytes inside data
            ("write", 2 * MiB + 512 * KiB - 1, 2, 5),  # across the end of a data range
            ("write", 3 * MiB + 7, 5000, 6),  # data in a hole
            ("write", 4 * MiB, 256 * KiB, 0),  # zeros in a hole: not a change
            ("punch", 5 * MiB, 128 * KiB, 0),  # data gone
            ("punch", 7 * MiB, 64 * KiB, 0),  # a hole punched in a hole: nothing
            ("grow", 0, 3 * MiB + 5, 0),
            ("write", 8 * MiB, 100, 7),  # data just past the base's end
            ("write", 9 * MiB, 4 * KiB, 8),  # and further on
        ]
        base, target = snapshots(volumes, "pvc-1", 8 * MiB, before, after)
        ours, theirs = content(volumes, base), content(volumes, target)
        ranges = list(volumes.changed(base.local_id, target.local_id))
        check_changed(ranges, ours, theirs, 0)
        assert ranges == [
            Extent(64 * KiB, 64 * KiB),
            Extent(2 * MiB + 448 * KiB, 128 * KiB),
            Extent(3 * MiB, 64 * KiB),
            Extent(5 * MiB, 128 * KiB),
            Extent(8 * MiB, 4 * KiB),
            Extent(9 * MiB, 4 * KiB),
        ]
        # A start inside a block cuts it; what differs only before the start is not reported.
        assert list(volumes.changed(base.local_id, target.local_id, 2 * MiB + 500 * KiB)) == [
            Extent(2 * MiB + 500 * KiB, 76 * KiB),
            Extent(3 * MiB, 64 * KiB),
            Extent(5 * MiB, 128 * KiB),
            Extent(8 * MiB, 4 * KiB),
            Extent(9 * MiB, 4 * KiB),
        ]
        assert list(volumes.changed(base.local_id, target.local_id, 2 * MiB + 512 * KiB + 1)) == [
            Extent(3 * MiB, 64 * KiB),
            Extent(5 * MiB, 128 * KiB),
            Extent(8 * MiB, 4 * KiB),
            Extent(9 * MiB, 4 * KiB),
        ]
        assert list(volumes.changed(base.local_id, target.local_id, 9 * MiB + 1)) == [Extent(9 * MiB + 1, 4 * KiB - 1)]
        # The other way round, the volume shrank: past the target's end there is nothing.
        backwards = list(volumes.changed(target.local_id, base.local_id))
        check_changed(backwards, theirs, ours, 0)


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "write", "punch", "grow"]),
        st.integers(0, 4 * MiB),
        st.integers(1, 300 * KiB),
        st.integers(0, 3),
    ),
    max_size=8,
)


@given(before=ops, after=ops, start=st.integers(0, 3 * MiB))
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_changed_and_allocated_match_a_full_comparison_after_random_writes(
    where: Path, before: list[Op], after: list[Op], start: int
) -> None:
    with backend(where) as volumes:
        base, target = snapshots(volumes, "pvc-1", 1 * MiB, before, after)
        ours, theirs = content(volumes, base), content(volumes, target)
        check_changed(list(volumes.changed(base.local_id, target.local_id, start)), ours, theirs, start)
        check_changed(list(volumes.changed(base.local_id, target.local_id)), ours, theirs, 0)
        everything = list(volumes.allocated(target.local_id))
        check_allocated(everything, theirs, 0)
        cut = [Extent(max(e.offset, start), e.end - max(e.offset, start)) for e in everything if e.end > start]
        assert list(volumes.allocated(target.local_id, start)) == cut


@pytest.mark.integration
def test_changed_reads_nothing_successive_reflink_snapshots_share(tmp_path: Path) -> None:
    """On XFS, a snapshot is a reflink copy: after one block of a 64 MiB volume full of
    data changed, the next snapshot shares the rest with the previous one, and that is
    found without reading it."""
    with xfs_mounted(tmp_path) as mounted, opened(mounted / "local") as volumes:
        volume = volumes.create_volume(spec("pvc-1", 64 * MiB))
        image = volumes.layout.image("volume", volume.local_id)
        for offset in range(0, 64 * MiB, 4 * MiB):
            write(image, offset, random.Random(offset).randbytes(4 * MiB))
        base = volumes.create_snapshot("snap-1", volume.local_id, {})
        write(image, 40 * MiB + 12 * KiB, b"changed!" * 512)  # one 4 KiB block
        target = volumes.create_snapshot("snap-2", volume.local_id, {})

        read: list[int] = []

        def counted(fd: int, length: int, offset: int) -> bytes:
            data = os.pread(fd, length, offset)
            read.append(len(data))
            return data

        volumes.read_compared = counted
        ranges = list(volumes.changed(base.local_id, target.local_id))
        assert ranges == [Extent(40 * MiB, 64 * KiB)]
        check_changed(ranges, content(volumes, base), content(volumes, target), 0)
        assert 0 < sum(read) <= 1 * MiB, f"read {sum(read)} bytes to compare two 64 MiB snapshots"
        volumes.delete_snapshot(base.local_id)
        volumes.delete_snapshot(target.local_id)
        volumes.delete_volume(volume.local_id)


@pytest.mark.integration
def test_preallocated_snapshots_share_their_unwritten_extents(tmp_path: Path) -> None:
    """A preallocated volume's untouched space is unwritten extents, which read as zeros
    and which reflink copies share: none of it is read, and none of it changed."""
    with xfs_mounted(tmp_path) as mounted, opened(mounted / "local") as volumes:
        volume = volumes.create_volume(spec("thick", 32 * MiB, preallocate="true"))
        image = volumes.layout.image("volume", volume.local_id)
        write(image, 1 * MiB, b"\x07" * 8 * KiB)
        base = volumes.create_snapshot("snap-1", volume.local_id, {})
        write(image, 20 * MiB, b"\x08" * 8 * KiB)
        target = volumes.create_snapshot("snap-2", volume.local_id, {})
        read: list[int] = []

        def counted(fd: int, length: int, offset: int) -> bytes:
            read.append(length)
            return os.pread(fd, length, offset)

        volumes.read_compared = counted
        ranges = list(volumes.changed(base.local_id, target.local_id))
        check_changed(ranges, content(volumes, base), content(volumes, target), 0)
        assert ranges == [Extent(20 * MiB, 64 * KiB)]
        assert sum(read) <= 1 * MiB
        volumes.delete_snapshot(base.local_id)
        volumes.delete_snapshot(target.local_id)
        volumes.delete_volume(volume.local_id)


# -- reading ---------------------------------------------------------------------------


def test_read_snapshot_reads_the_image_and_stops_at_its_end(volumes: LocalVolumes) -> None:
    volume = volumes.create_volume(spec("pvc-1", 1 * MiB))
    image = volumes.layout.image("volume", volume.local_id)
    write(image, 1 * MiB - 3, b"end")
    write(image, 10, b"start")
    snap = volumes.create_snapshot("snap-1", volume.local_id, {})
    write(image, 10, b"later")  # the snapshot does not follow its volume
    with volumes.read_snapshot(snap.local_id) as reader:
        assert reader.size == 1 * MiB
        assert reader.read(8, 9) == b"\0\0start\0\0"
        assert reader.read(1 * MiB - 5, 100) == b"\0\0end"
        assert reader.read(1 * MiB, 10) == b""
        assert reader.read(0, 1 * MiB) == content(volumes, snap)
        with pytest.raises(InvalidArgument):
            reader.read(-1, 10)


# -- restores from backups ---------------------------------------------------------------


def test_a_volume_from_a_backup_is_blank_and_filling_until_filled(volumes: LocalVolumes) -> None:
    volume = volumes.create_volume(spec("restored", 4 * MiB, source=BACKUP))
    assert volume.filling and volume.source == BACKUP and volume.capacity_bytes == 4 * MiB
    image = volumes.layout.image("volume", volume.local_id)
    assert os.stat(image).st_blocks == 0
    # Every way of reading the volume says so, and a retry returns it as it is.
    assert volumes.get_volume(volume.local_id).filling
    assert volumes.lookup_volume("restored") == volume
    assert [v.filling for v in volumes.list_volumes()] == [True]
    assert volumes.create_volume(spec("restored", 4 * MiB, source=BACKUP)) == volume
    with pytest.raises(AlreadyExists, match="another content source"):
        volumes.create_volume(spec("restored", 4 * MiB, source=SourceRef("backup", "cairn-backup:repo-1/other")))
    with pytest.raises(AlreadyExists, match="another content source"):
        volumes.create_volume(spec("restored", 4 * MiB))

    with volumes.fill_volume(volume.local_id) as writer:
        assert writer.size == 4 * MiB
        writer.write(0, b"restored")
        writer.write(4 * MiB - 4, b"tail")
        with pytest.raises(InvalidArgument, match="cannot write"):
            writer.write(4 * MiB - 3, b"tail")
        assert volumes.get_volume(volume.local_id).filling
    filled = volumes.get_volume(volume.local_id)
    assert not filled.filling and filled.source == BACKUP
    assert "filling" not in Path(volumes.layout.record_path("volume", volume.local_id)).read_text()
    data = Path(image).read_bytes()
    assert data[:8] == b"restored" and data[-4:] == b"tail" and data[8:-4].count(0) == len(data) - 12
    # A retry of the creation now returns the filled volume; a second fill is refused.
    assert volumes.create_volume(spec("restored", 4 * MiB, source=BACKUP)) == filled
    with pytest.raises(FailedPrecondition, match=volume.local_id), volumes.fill_volume(volume.local_id):
        pass


def test_a_failed_fill_leaves_the_volume_filling_and_a_retry_starts_afresh(volumes: LocalVolumes) -> None:
    volume = volumes.create_volume(spec("restored", 2 * MiB, source=BACKUP))
    with pytest.raises(RuntimeError, match="repository unreachable"), volumes.fill_volume(volume.local_id) as writer:
        writer.write(1 * MiB, b"half of it")
        raise RuntimeError("repository unreachable")
    assert volumes.get_volume(volume.local_id).filling
    # So it stays across a restart: the record says it.
    again = LocalVolumes(volumes.layout.root, "node-a")
    assert again.get_volume(volume.local_id).filling
    with again.fill_volume(volume.local_id) as writer:
        writer.write(0, b"all of it")
    assert not again.get_volume(volume.local_id).filling
    data = Path(again.layout.image("volume", volume.local_id)).read_bytes()
    assert data[:9] == b"all of it" and data[9:].count(0) == len(data) - 9, "what the failed fill wrote must go"


def test_filling_a_volume_that_waits_for_no_backup_is_refused(volumes: LocalVolumes) -> None:
    plain = volumes.create_volume(spec("plain"))
    assert not plain.filling
    with pytest.raises(FailedPrecondition, match=plain.local_id), volumes.fill_volume(plain.local_id):
        pass
    gone = volumes.layout.local_id("volume", "never-made")
    with pytest.raises(NotFound, match=gone), volumes.fill_volume(gone):
        pass


def test_a_volume_deleted_while_filled_is_not_found_and_not_recreated(volumes: LocalVolumes) -> None:
    volume = volumes.create_volume(spec("restored", 1 * MiB, source=BACKUP))
    with pytest.raises(NotFound, match="deleted while it was filled"), volumes.fill_volume(volume.local_id) as writer:
        writer.write(0, b"x")
        volumes.delete_volume(volume.local_id)
    assert volumes.lookup_volume("restored") is None
    assert os.listdir(os.path.join(volumes.layout.root, "volumes")) == []


def test_a_preallocated_volume_from_a_backup_is_preallocated_when_filled(volumes: LocalVolumes) -> None:
    volume = volumes.create_volume(spec("thick", 4 * MiB, source=BACKUP, preallocate="true"))
    with volumes.fill_volume(volume.local_id) as writer:
        writer.write(0, b"x")
    assert os.stat(volumes.layout.image("volume", volume.local_id)).st_blocks * 512 >= 4 * MiB
