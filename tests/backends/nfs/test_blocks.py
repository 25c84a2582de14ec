"""The nfs backend's snapshot blocks (image layout) against a real NFSv4 server
(nfs-ganesha on loopback), through the user-space client and through ``LocalTree`` on
the exported directory (``exportRoot``): allocated and changed ranges checked against a
full comparison of the snapshot images as the server's filesystem holds them, reading
snapshots, volumes restored from a backup and filled (again after a failed fill), the
errors, and a backend of folders refusing all of it."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi.backends.base import SnapshotBlocks
from csi.backends.nfs import DIRECTORY_CAPABILITIES, IMAGE_CAPABILITIES, blocks, build
from csi.backends.nfs.common import NfsSettings
from csi.backends.nfs.controller import NfsVolumes
from csi.backends.nfs.fs import LocalTree, Tree
from csi.backends.nfs.libnfs import Client
from csi.config import BackendConfig
from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi.extents import BLOCK, Read, aligned, check_start, merge, to_extents, union
from csi.model import AccessMode, AccessType, Capability, Extent, MiB, Snapshot, SourceRef, Volume, VolumeSpec
from tests.nfs import EXPORT, NfsServer

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
KiB = 1024
BACKUP = SourceRef("backup", "1:vault:b-nfs")

Op = tuple[str, int, int, int]
"""(what, offset, length, seed): "write" ``length`` bytes at ``offset`` (zeros for seed
0, random bytes otherwise), "punch" a hole there, or "grow" the volume by ``length``
(through the backend). Offsets wrap around the image's size, lengths are cut at its end."""


def spec(name: str, size: int = 8 * MiB, source: SourceRef | None = None) -> VolumeSpec:
    return VolumeSpec(name=name, required_bytes=size, limit_bytes=0, capabilities=(RWO,), source=source)


# -- backends on the test server ---------------------------------------------------------


@dataclass
class Nfs:
    volumes: NfsVolumes
    name: str
    export: Path
    tree: Tree

    @property
    def control(self) -> Path:
        return self.export / ".cairn" / self.name

    def image(self, volume: Volume) -> Path:
        return self.control / "volumes" / f"{volume.local_id}.img"

    def data(self, snapshot: Snapshot) -> Path:
        return self.control / "snapshots" / f"{snapshot.local_id}.data"

    def record(self, volume: Volume) -> dict[str, object]:
        loaded: dict[str, object] = json.loads((self.control / "volumes" / f"{volume.local_id}.json").read_text())
        return loaded


@contextlib.contextmanager
def backend(server: NfsServer, through: str, layout: str = "image") -> Iterator[Nfs]:
    """A backend of its own name (and folder) on the test server, removed afterwards."""
    name = f"nfs-{uuid.uuid4().hex[:8]}"
    settings = NfsSettings(backend=name, server="127.0.0.1", share=EXPORT, port=server.port, layout=layout)
    tree: Tree = (
        Client("127.0.0.1", EXPORT, port=server.port, timeout=10)
        if through == "client"
        else LocalTree(str(server.export_dir))
    )
    nfs = Nfs(NfsVolumes(settings, tree), name, server.export_dir, tree)
    try:
        yield nfs
    finally:
        tree.close()
        shutil.rmtree(nfs.control, ignore_errors=True)
        shutil.rmtree(server.export_dir / name, ignore_errors=True)


@pytest.fixture(params=["client", "local"])
def through(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def nfs(nfs_server: NfsServer, through: str) -> Iterator[Nfs]:
    with backend(nfs_server, through) as made:
        yield made


# -- images, changed on the server's filesystem --------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x1, 0x2


def write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def punch(path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        os.fsync(fd)
    finally:
        os.close(fd)


def apply(nfs: Nfs, volume: Volume, ops: Iterable[Op]) -> None:
    """Writes and holes on the server's filesystem (their size does not change, so a
    server caching attributes cannot be told otherwise); growth through the backend."""
    image = nfs.image(volume)
    for what, offset, length, seed in ops:
        size = image.stat().st_size
        if what == "grow":
            nfs.volumes.expand_volume(volume.local_id, size + length, 0)
            continue
        offset %= size
        length = min(length, size - offset)
        if what == "punch":
            punch(image, offset, length)
        else:
            write(image, offset, random.Random(seed * offset + 1).randbytes(length) if seed else bytes(length))


def snapshots(nfs: Nfs, name: str, size: int, before: Iterable[Op], after: Iterable[Op]) -> tuple[Snapshot, Snapshot]:
    """Two snapshots of one new volume: after ``before``, and after ``after`` too."""
    volume = nfs.volumes.create_volume(spec(name, size))
    apply(nfs, volume, before)
    base = nfs.volumes.create_snapshot(f"{name}-base", volume.local_id, {})
    apply(nfs, volume, after)
    return base, nfs.volumes.create_snapshot(f"{name}-target", volume.local_id, {})


# -- what a full comparison says -------------------------------------------------------------


def first_difference(ours: bytes, theirs: bytes) -> int | None:
    if ours == theirs:
        return None
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))


def check_shape(ranges: list[Extent], start: int, size: int) -> None:
    """Sorted, apart (not touching), within [start, size)."""
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


def covered(ranges: list[Extent], offset: int, length: int) -> bool:
    return any(e.offset <= offset and offset + length <= e.end for e in ranges)


# -- range arithmetic (csi.extents) ------------------------------------------------------------


@pytest.mark.unit
def test_range_arithmetic() -> None:
    assert list(merge([(0, 4), (4, 6), (5, 9), (9, 9), (12, 13)])) == [(0, 9), (12, 13)]
    assert list(union([(0, 2), (8, 10)], [(1, 3), (10, 11)])) == [(0, 3), (8, 11)]
    assert list(union([], [(5, 6)])) == [(5, 6)]
    assert list(aligned([(10, 20), (BLOCK + 1, BLOCK + 2)], 5, 10 * BLOCK)) == [(5, 2 * BLOCK)]
    assert list(aligned([(3 * BLOCK - 1, 5 * BLOCK)], 0, 4 * BLOCK + 7)) == [(2 * BLOCK, 4 * BLOCK + 7)]
    with pytest.raises(InvalidArgument, match="negative"):
        check_start(-1)


@pytest.mark.unit
@given(
    base=st.binary(max_size=5 * BLOCK),
    target=st.binary(max_size=5 * BLOCK),
    edits=st.lists(st.tuples(st.integers(0, 5 * BLOCK), st.binary(min_size=1, max_size=3)), max_size=4),
    start=st.integers(0, 5 * BLOCK),
)
@settings(max_examples=200, deadline=None, database=None)
def test_changed_of_bytes_in_memory_matches_a_full_comparison(
    base: bytes, target: bytes, edits: list[tuple[int, bytes]], start: int
) -> None:
    """With every byte a candidate (as through the user-space client): a target that is
    the base with a few bytes changed, or another string altogether."""
    if not target:
        edited = bytearray(base)
        for offset, data in edits:
            edited[offset : offset + len(data)] = data
        target = bytes(edited)

    def reader(content: bytes) -> Read:
        return lambda offset, length: content[offset : offset + length]

    common = min(len(base), len(target))
    candidates = [(start, common)] if start < common else []
    grown = [(max(start, len(base)), len(target))] if max(start, len(base)) < len(target) else []
    found = list(blocks.changed(reader(base), reader(target), candidates, grown, start, common, len(target)))
    check_changed(found, base, target, start)


# -- what the backend offers -------------------------------------------------------------------


@pytest.mark.unit
def test_only_a_backend_of_images_offers_snapshot_blocks() -> None:
    assert IMAGE_CAPABILITIES.blocks and not DIRECTORY_CAPABILITIES.blocks
    for layout, offered in (("image", True), ("directory", False)):
        settings_ = {"server": "127.0.0.1", "share": EXPORT, "layout": layout}
        made = build(BackendConfig("shelf", "nfs", settings=settings_), "node-a", controller=False, node=False)
        assert made.capabilities.blocks is offered
    directory = build(
        BackendConfig("shelf", "nfs", settings={"server": "127.0.0.1", "share": EXPORT}), "node-a", False, False
    )
    with pytest.raises(FailedPrecondition, match="'shelf'"):
        directory.blocks  # noqa: B018 - the refusal is the property's


@pytest.mark.integration
def test_a_backend_of_folders_refuses_block_access_naming_itself(nfs_server: NfsServer, through: str) -> None:
    with backend(nfs_server, through, layout="directory") as nfs:
        offered: SnapshotBlocks = nfs.volumes  # the protocol, checked by mypy
        volume = nfs.volumes.create_volume(spec("pv-folder"))
        snap = nfs.volumes.create_snapshot("snap-folder", volume.local_id, {})
        refused = f"backend '{nfs.name}' makes directory volumes"
        with pytest.raises(FailedPrecondition, match=refused):
            offered.allocated(snap.local_id)
        with pytest.raises(FailedPrecondition, match=refused):
            offered.changed(snap.local_id, snap.local_id)
        with pytest.raises(FailedPrecondition, match=refused), offered.read_snapshot(snap.local_id):
            pass
        with pytest.raises(FailedPrecondition, match=refused), offered.fill_volume(volume.local_id):
            pass
        with pytest.raises(FailedPrecondition, match=refused):
            nfs.volumes.create_volume(spec("pv-restored", source=BACKUP))
        assert nfs.volumes.lookup_volume("pv-restored") is None
        nfs.volumes.delete_snapshot(snap.local_id)
        nfs.volumes.delete_volume(volume.local_id)


# -- allocated ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_allocated_names_the_data_of_a_sparse_image(nfs: Nfs, through: str) -> None:
    """On the exported directory the holes are found; through the client the image is
    one range (the client cannot tell holes), which says more than it must but never less."""
    volume = nfs.volumes.create_volume(spec("pv-1", 8 * MiB))
    writes = {0: b"\x01" * 4 * KiB, 3 * MiB: b"\x02" * 100 * KiB, 8 * MiB - 4 * KiB: b"\x03" * 4 * KiB}
    for offset, data in writes.items():
        write(nfs.image(volume), offset, data)
    snap = nfs.volumes.create_snapshot("snap-1", volume.local_id, {})
    content = nfs.data(snap).read_bytes()
    everything = list(nfs.volumes.allocated(snap.local_id))
    check_allocated(everything, content, 0)
    assert all(covered(everything, offset, len(data)) for offset, data in writes.items()), everything
    if through == "client":
        assert everything == [Extent(0, 8 * MiB)]
        assert list(nfs.volumes.allocated(snap.local_id, 3 * MiB + 10)) == [Extent(3 * MiB + 10, 5 * MiB - 10)]
    else:
        assert sum(e.length for e in everything) <= 3 * MiB, f"the holes between the data were not told: {everything}"
        later = list(nfs.volumes.allocated(snap.local_id, 3 * MiB + 10))
        assert later[0].offset == 3 * MiB + 10 and covered(later, 3 * MiB + 10, 100 * KiB - 10)
        check_allocated(later, content, 3 * MiB + 10)
        assert list(nfs.volumes.allocated(snap.local_id, 5 * MiB)) == [e for e in everything if e.offset >= 5 * MiB]
    assert list(nfs.volumes.allocated(snap.local_id, 8 * MiB)) == []
    assert list(nfs.volumes.allocated(snap.local_id, 9 * MiB)) == []
    nfs.volumes.delete_snapshot(snap.local_id)
    nfs.volumes.delete_volume(volume.local_id)


@pytest.mark.integration
def test_allocated_of_a_blank_snapshot(nfs: Nfs, through: str) -> None:
    volume = nfs.volumes.create_volume(spec("pv-1"))
    snap = nfs.volumes.create_snapshot("snap-1", volume.local_id, {})
    expected = [Extent(0, 8 * MiB)] if through == "client" else []
    assert list(nfs.volumes.allocated(snap.local_id)) == expected
    nfs.volumes.delete_snapshot(snap.local_id)
    nfs.volumes.delete_volume(volume.local_id)


# -- changed -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_changed_matches_a_full_comparison(nfs: Nfs) -> None:
    """Overwrites, new data in holes, zeros over holes, punched holes and growth."""
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
        ("grow", 0, 3 * MiB + 5, 0),  # to 12 MiB
        ("write", 8 * MiB, 100, 7),  # data just past the base's end
        ("write", 9 * MiB, 4 * KiB, 8),  # and further on
    ]
    base, target = snapshots(nfs, "pv-1", 8 * MiB, before, after)
    ours, theirs = nfs.data(base).read_bytes(), nfs.data(target).read_bytes()
    assert len(theirs) == 12 * MiB  # sizes are whole MiB
    ranges = list(nfs.volumes.changed(base.local_id, target.local_id))
    check_changed(ranges, ours, theirs, 0)
    below = [e for e in ranges if e.offset < 8 * MiB]
    assert below == [
        Extent(64 * KiB, 64 * KiB),
        Extent(2 * MiB + 448 * KiB, 128 * KiB),
        Extent(3 * MiB, 64 * KiB),
        Extent(5 * MiB, 128 * KiB),
    ]
    past = [e for e in ranges if e.offset >= 8 * MiB]
    assert covered(past, 8 * MiB, 100) and covered(past, 9 * MiB, 4 * KiB)
    # A start inside a block cuts it; what differs only before the start is not reported.
    later = list(nfs.volumes.changed(base.local_id, target.local_id, 2 * MiB + 500 * KiB))
    check_changed(later, ours, theirs, 2 * MiB + 500 * KiB)
    assert later[:3] == [Extent(2 * MiB + 500 * KiB, 76 * KiB), Extent(3 * MiB, 64 * KiB), Extent(5 * MiB, 128 * KiB)]
    assert later[3:] == past
    last = list(nfs.volumes.changed(base.local_id, target.local_id, 9 * MiB + 1))
    check_changed(last, ours, theirs, 9 * MiB + 1)
    assert covered(last, 9 * MiB + 1, 4 * KiB - 1)
    # The other way round, the volume shrank: past the target's end there is nothing.
    check_changed(list(nfs.volumes.changed(target.local_id, base.local_id)), theirs, ours, 0)
    assert list(nfs.volumes.changed(base.local_id, base.local_id)) == []
    for snap in (base, target):
        nfs.volumes.delete_snapshot(snap.local_id)
    nfs.volumes.delete_volume(base.source_volume_local_id)


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "write", "punch", "grow"]),
        st.integers(0, 4 * MiB),
        st.integers(1, 300 * KiB),
        st.integers(0, 3),
    ),
    max_size=6,
)


@pytest.mark.integration
@given(before=ops, after=ops, start=st.integers(0, 3 * MiB))
@settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_changed_and_allocated_match_a_full_comparison_after_random_writes(
    nfs_server: NfsServer, through: str, before: list[Op], after: list[Op], start: int
) -> None:
    with backend(nfs_server, through) as nfs:
        base, target = snapshots(nfs, "pv-1", 1 * MiB, before, after)
        ours, theirs = nfs.data(base).read_bytes(), nfs.data(target).read_bytes()
        check_changed(list(nfs.volumes.changed(base.local_id, target.local_id, start)), ours, theirs, start)
        check_changed(list(nfs.volumes.changed(base.local_id, target.local_id)), ours, theirs, 0)
        everything = list(nfs.volumes.allocated(target.local_id))
        check_allocated(everything, theirs, 0)
        cut = [Extent(max(e.offset, start), e.end - max(e.offset, start)) for e in everything if e.end > start]
        assert list(nfs.volumes.allocated(target.local_id, start)) == cut


# -- reading and filling -----------------------------------------------------------------------


@pytest.mark.integration
def test_a_volume_filled_from_a_backup_reads_back_through_its_snapshot(nfs: Nfs) -> None:
    rng = random.Random(3)
    writes = {0: rng.randbytes(4 * KiB), 3 * MiB + 17: rng.randbytes(300 * KiB), 8 * MiB - 512: rng.randbytes(512)}
    volume = nfs.volumes.create_volume(spec("pv-restored", source=BACKUP))
    assert volume.filling and volume.source == BACKUP and volume.capacity_bytes == 8 * MiB
    assert nfs.record(volume)["filling"] is True
    assert nfs.image(volume).stat().st_size == 8 * MiB and nfs.image(volume).stat().st_blocks == 0
    with nfs.volumes.fill_volume(volume.local_id) as writer:
        assert writer.size == 8 * MiB
        for offset, data in writes.items():
            writer.write(offset, data)
        with pytest.raises(InvalidArgument, match="cannot write"):
            writer.write(8 * MiB - 1, b"ab")
        with pytest.raises(InvalidArgument, match="cannot write"):
            writer.write(-1, b"a")
        assert nfs.volumes.get_volume(volume.local_id).filling, "filled before the block ended"
    assert not nfs.volumes.get_volume(volume.local_id).filling
    assert "filling" not in nfs.record(volume)
    expected = bytearray(8 * MiB)
    for offset, data in writes.items():
        expected[offset : offset + len(data)] = data
    assert nfs.image(volume).read_bytes() == expected
    assert nfs.image(volume).stat().st_blocks * 512 < 2 * MiB, "what was not written should stay holes"
    snap = nfs.volumes.create_snapshot("snap-restored", volume.local_id, {})
    with nfs.volumes.read_snapshot(snap.local_id) as reader:
        assert reader.size == 8 * MiB
        for offset, data in writes.items():
            assert reader.read(offset, len(data)) == data
        assert reader.read(0, 8 * MiB) == expected
        assert reader.read(MiB, 4 * KiB) == bytes(4 * KiB)
        assert reader.read(8 * MiB - 100, 4 * KiB) == writes[8 * MiB - 512][-100:]
        assert reader.read(8 * MiB, 10) == b""
        with pytest.raises(InvalidArgument):
            reader.read(-1, 10)
    # A retried creation answers from the record, filled now.
    again = nfs.volumes.create_volume(spec("pv-restored", source=BACKUP))
    assert again.local_id == volume.local_id and not again.filling
    nfs.volumes.delete_snapshot(snap.local_id)
    nfs.volumes.delete_volume(volume.local_id)


@pytest.mark.integration
def test_a_failed_fill_stays_filling_and_a_retry_starts_from_zeros(nfs: Nfs) -> None:
    volume = nfs.volumes.create_volume(spec("pv-retried", source=BACKUP))
    with pytest.raises(RuntimeError), nfs.volumes.fill_volume(volume.local_id) as writer:
        writer.write(MiB, b"x" * 64 * KiB)
        writer.write(5 * MiB, b"z" * 4 * KiB)
        raise RuntimeError("the repository went away")
    assert nfs.volumes.get_volume(volume.local_id).filling
    assert nfs.record(volume)["filling"] is True
    # Neither a snapshot nor a clone of a volume that holds a part of a backup.
    with pytest.raises(FailedPrecondition, match="still being restored"):
        nfs.volumes.create_snapshot("snap-half", volume.local_id, {})
    with pytest.raises(FailedPrecondition, match="still being restored"):
        nfs.volumes.create_volume(spec("pv-clone", source=SourceRef("volume", volume.local_id)))
    again = nfs.volumes.create_volume(spec("pv-retried", source=BACKUP))
    assert again.local_id == volume.local_id and again.filling
    with pytest.raises(AlreadyExists):
        nfs.volumes.create_volume(spec("pv-retried", source=SourceRef("backup", "1:vault:b-other")))
    with nfs.volumes.fill_volume(volume.local_id) as writer:
        writer.write(0, b"y" * 4 * KiB)
    content = nfs.image(volume).read_bytes()
    assert content[: 4 * KiB] == b"y" * 4 * KiB
    assert content[4 * KiB :] == bytes(8 * MiB - 4 * KiB), "what the failed fill wrote is still there"
    with pytest.raises(FailedPrecondition, match="not waiting for content"), nfs.volumes.fill_volume(volume.local_id):
        pass
    plain = nfs.volumes.create_volume(spec("pv-plain"))
    with pytest.raises(FailedPrecondition, match="not waiting for content"), nfs.volumes.fill_volume(plain.local_id):
        pass
    nfs.volumes.delete_volume(plain.local_id)
    nfs.volumes.delete_volume(volume.local_id)


@pytest.mark.integration
def test_reading_while_the_ranges_are_taken_waits_for_nothing(nfs: Nfs) -> None:
    """A backup asks for a snapshot's ranges while it has the snapshot open for reading,
    and may read between two ranges: the user-space client opens a path once at a time,
    so nothing may stay open across these calls."""
    volume = nfs.volumes.create_volume(spec("pv-1", 4 * MiB))
    write(nfs.image(volume), 0, b"a" * 256 * KiB)
    base = nfs.volumes.create_snapshot("snap-1", volume.local_id, {})
    write(nfs.image(volume), 0, b"b" * 64 * KiB)
    write(nfs.image(volume), 2 * MiB, b"c" * 64 * KiB)
    target = nfs.volumes.create_snapshot("snap-2", volume.local_id, {})
    content = nfs.data(target).read_bytes()
    began = time.monotonic()
    with nfs.volumes.read_snapshot(target.local_id) as reader:
        for extent in nfs.volumes.changed(base.local_id, target.local_id):
            assert reader.read(extent.offset, extent.length) == content[extent.offset : extent.end]
        for extent in nfs.volumes.allocated(target.local_id):
            assert len(reader.read(extent.offset, extent.length)) == extent.length
        with nfs.volumes.read_snapshot(target.local_id) as second:
            assert second.read(0, 10) == reader.read(0, 10) == b"b" * 10
    assert time.monotonic() - began < 5, "a call waited for a file another held open"
    assert list(nfs.volumes.changed(base.local_id, target.local_id)) == [Extent(0, 64 * KiB), Extent(2 * MiB, 64 * KiB)]
    for snap in (base, target):
        nfs.volumes.delete_snapshot(snap.local_id)
    nfs.volumes.delete_volume(volume.local_id)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_missing_snapshots_are_not_found_and_wrong_pairs_refused(nfs: Nfs) -> None:
    one = nfs.volumes.create_volume(spec("pv-1"))
    two = nfs.volumes.create_volume(spec("pv-2"))
    snap = nfs.volumes.create_snapshot("snap-1", one.local_id, {})
    other = nfs.volumes.create_snapshot("snap-2", two.local_id, {})
    gone = f"snap-{uuid.uuid4()}"
    with pytest.raises(NotFound, match=gone):
        nfs.volumes.allocated(gone)
    with pytest.raises(NotFound, match=gone):
        nfs.volumes.changed(gone, snap.local_id)
    with pytest.raises(NotFound, match=gone):
        nfs.volumes.changed(snap.local_id, gone)
    with pytest.raises(NotFound, match=gone), nfs.volumes.read_snapshot(gone):
        pass
    with pytest.raises(NotFound, match="not-an-id"):
        nfs.volumes.allocated("not-an-id")
    with pytest.raises(NotFound):
        nfs.volumes.allocated(one.local_id)  # a volume's ID is no snapshot's
    with pytest.raises(NotFound), nfs.volumes.fill_volume(f"vol-{uuid.uuid4()}"):
        pass
    with pytest.raises(InvalidArgument, match="negative"):
        nfs.volumes.allocated(snap.local_id, -1)
    with pytest.raises(InvalidArgument, match="negative"):
        nfs.volumes.changed(snap.local_id, snap.local_id, -1)
    with pytest.raises(InvalidArgument, match=f"{snap.local_id}.*{other.local_id}.*not snapshots of one volume"):
        nfs.volumes.changed(snap.local_id, other.local_id)
    for made in (snap, other):
        nfs.volumes.delete_snapshot(made.local_id)
    for volume in (one, two):
        nfs.volumes.delete_volume(volume.local_id)


@pytest.mark.integration
def test_a_snapshot_deleted_after_the_check_is_not_found_when_read(nfs: Nfs) -> None:
    volume = nfs.volumes.create_volume(spec("pv-1"))
    write(nfs.image(volume), 0, b"d" * 4 * KiB)
    base = nfs.volumes.create_snapshot("snap-1", volume.local_id, {})
    target = nfs.volumes.create_snapshot("snap-2", volume.local_id, {})
    ranges = nfs.volumes.allocated(target.local_id)
    changes = nfs.volumes.changed(base.local_id, target.local_id)
    with nfs.volumes.read_snapshot(target.local_id) as reader:
        nfs.volumes.delete_snapshot(target.local_id)
        with pytest.raises(NotFound, match=target.local_id):
            reader.read(0, 4 * KiB)
    with pytest.raises(NotFound, match=target.local_id):
        list(ranges)
    with pytest.raises(NotFound, match=target.local_id):
        list(changes)
    nfs.volumes.delete_snapshot(base.local_id)
    nfs.volumes.delete_volume(volume.local_id)
