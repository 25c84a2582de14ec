"""The rbd backend's snapshot blocks against a real Ceph cluster: what holds data, what
changed between snapshots (librbd's diff between the RBD snapshots kept for them, and
the comparison that serves when those are gone), reading snapshots, and restores from
backups (a blank volume marked filling until its content is written)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import rbd

from csi.backends.base import SnapshotBlocks
from csi.backends.rbd import CAPABILITIES
from csi.backends.rbd.cluster import Clusters
from csi.backends.rbd.common import RbdSettings
from csi.backends.rbd.controller import RbdVolumes
from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi.extents import aligned, differing, merge
from csi.model import AccessMode, AccessType, Capability, Extent, MiB, Snapshot, SourceRef, VolumeSpec
from tests.ceph import POOL, CephCluster

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
OBJECT = 4 * MiB  # librbd's default object size
ceph_test = pytest.mark.usefixtures("clean_pool")
MISSING = f"{POOL}/00000000-0000-4000-8000-000000000000"


def make_backend(ceph: CephCluster, max_clone_depth: int = 8) -> RbdVolumes:
    settings = RbdSettings(monitors=tuple(ceph.monitors), pool=POOL, max_clone_depth=max_clone_depth)
    return RbdVolumes(settings, Clusters(settings.monitors))


@pytest.fixture
def volumes(ceph: CephCluster) -> Iterator[RbdVolumes]:
    backend = make_backend(ceph)
    yield backend
    backend.clusters.shutdown()


def conforms(volumes: RbdVolumes) -> SnapshotBlocks:
    """Checked by mypy: the controller half is what ``Capabilities.blocks`` promises."""
    return volumes


def spec(name: str, secrets: dict[str, str], size: int = 16 * MiB, source: SourceRef | None = None) -> VolumeSpec:
    return VolumeSpec(name, size, 0, (RWO,), {}, source, secrets)


def image_of(local_id: str, kind: str = "vol") -> str:
    return f"cairn-{kind}-{local_id.split('/')[1]}"


def write(io: Any, local_id: str, offset: int, data: bytes) -> None:
    with rbd.Image(io, image_of(local_id)) as image:
        image.write(data, offset)


def content(io: Any, local_id: str, kind: str = "snap") -> bytes:
    with rbd.Image(io, image_of(local_id, kind), read_only=True) as image:
        return bytes(image.read(0, image.size()))


def user_snapshots(io: Any, local_id: str) -> list[str]:
    with rbd.Image(io, image_of(local_id), read_only=True) as image:
        return [s["name"] for s in image.list_snaps() if s["namespace"] == rbd.RBD_SNAP_NAMESPACE_TYPE_USER]


def pattern(length: int, seed: int) -> bytes:
    """Bytes that are nowhere zero, and differ from those of another seed."""
    return bytes((seed + i) % 251 + 1 for i in range(256)) * (length // 256) + b"\x01" * (length % 256)


def well_formed(extents: list[Extent], size: int) -> None:
    """Sorted, apart (neither overlapping nor touching), non-empty and within ``size``."""
    for extent in extents:
        assert extent.length > 0 and extent.offset >= 0 and extent.end <= size, extent
    for before, after in itertools.pairwise(extents):
        assert before.end < after.offset, (before, after)


def outside(extents: Iterable[Extent], offsets: Iterable[int]) -> list[int]:
    """The offsets in no extent."""
    ranges = [(e.offset, e.end) for e in extents]
    return [o for o in offsets if not any(low <= o < high for low, high in ranges)]


def first_difference_outside(extents: list[Extent], base: bytes, target: bytes) -> int | None:
    """The first offset of ``target`` in no extent whose byte differs from ``base``'s (zeros
    past its end), or None: every byte between the extents is compared."""
    base = base[: len(target)].ljust(len(target), b"\0")
    position = 0
    for low, high in [(e.offset, e.end) for e in extents] + [(len(target), len(target))]:
        if base[position:low] != target[position:low]:
            return next(i for i in range(position, low) if base[i] != target[i])
        position = high
    return None


def check_changed(volumes: RbdVolumes, io: Any, base: Snapshot, target: Snapshot, secrets: dict[str, str]) -> int:
    """changed() covers every byte that differs between the two snapshots; the bytes it names."""
    extents = list(volumes.changed(base.local_id, target.local_id, secrets=secrets))
    well_formed(extents, target.size_bytes)
    missed = first_difference_outside(extents, content(io, base.local_id), content(io, target.local_id))
    assert missed is None, f"the byte at {missed} differs, outside the ranges"
    for start in (1, 5 * MiB + 17, target.size_bytes - 1):
        cut = list(volumes.changed(base.local_id, target.local_id, start, secrets=secrets))
        expected = [Extent(max(e.offset, start), e.end - max(e.offset, start)) for e in extents if e.end > start]
        assert cut == expected, f"from {start}"
    return sum(e.length for e in extents)


class Routes:
    """Which way changed() went: counts of the comparison by reading."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.compared = 0
        original = RbdVolumes._compared

        def counting(backend: RbdVolumes, *args: Any, **kwargs: Any) -> Iterator[Extent]:
            self.compared += 1
            return original(backend, *args, **kwargs)

        monkeypatch.setattr(RbdVolumes, "_compared", counting)


@pytest.mark.unit
def test_the_backend_declares_snapshot_blocks() -> None:
    assert CAPABILITIES.blocks


@pytest.mark.unit
def test_blocks_that_differ_are_found_by_reading_whole_blocks() -> None:
    base = bytearray(1 * MiB)
    target = bytearray(base)
    target[70_000] = 1  # block 1
    target[3 * 65536 + 5 : 3 * 65536 + 9] = b"abcd"  # block 3
    target[4 * 65536] = 2  # block 4: touches block 3
    ranges = list(aligned([(70_000, 70_010), (3 * 65536, 5 * 65536)], 1000, len(base)))
    assert ranges == [(65536, 2 * 65536), (3 * 65536, 5 * 65536)]
    found = list(differing(ranges, lambda o, n: bytes(base[o : o + n]), lambda o, n: bytes(target[o : o + n])))
    assert found == [Extent(65536, 65536), Extent(3 * 65536, 2 * 65536)]
    assert list(aligned([(10, 15)], 12, 20)) == [(12, 20)], "cut at the start and the end"
    # The tests' own check: what the ranges miss, with a short base read as zeros past its end.
    assert first_difference_outside([Extent(0, 2)], b"abc", b"abd") == 2
    assert first_difference_outside([Extent(1, 2)], b"", b"\0ab\0") is None
    assert first_difference_outside([], b"ab", b"a") is None
    assert list(merge([(0, 5), (5, 10), (3, 4), (20, 21)])) == [(0, 10), (20, 21)]


@pytest.mark.integration
@ceph_test
def test_allocated_names_the_data_of_a_snapshot_and_of_its_parents(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any
) -> None:
    size = 16 * MiB
    origin = volumes.create_volume(spec("alloc-origin", secrets, size))
    write(pool_io, origin.local_id, 0, pattern(4096, 1))  # at the start
    write(pool_io, origin.local_id, OBJECT - 4096, pattern(8192, 2))  # across two objects
    write(pool_io, origin.local_id, size - 4096, pattern(4096, 3))  # at the end
    snap = volumes.create_snapshot("alloc-snap", origin.local_id, {}, secrets=secrets)
    extents = list(volumes.allocated(snap.local_id, secrets=secrets))
    well_formed(extents, size)
    data = content(pool_io, snap.local_id)
    assert first_difference_outside(extents, b"", data) is None, "data outside the ranges"
    assert outside(extents, [OBJECT + 8192, 2 * OBJECT, 3 * OBJECT - 1]) == [
        OBJECT + 8192,
        2 * OBJECT,
        3 * OBJECT - 1,
    ], "holes are no data"
    assert extents[0].offset == 0 and extents[-1].end == size
    cut = list(volumes.allocated(snap.local_id, 100, secrets=secrets))
    assert cut[0] == Extent(100, extents[0].length - 100) and cut[1:] == extents[1:], "a range is cut at start"
    assert list(volumes.allocated(snap.local_id, size, secrets=secrets)) == []
    assert list(volumes.allocated(snap.local_id, size + MiB, secrets=secrets)) == []
    with pytest.raises(InvalidArgument):
        volumes.allocated(snap.local_id, -1, secrets=secrets)

    # A snapshot of a volume restored from it: its data is its parents'.
    restored = volumes.create_volume(spec("alloc-restored", secrets, 20 * MiB, SourceRef("snapshot", snap.local_id)))
    write(pool_io, restored.local_id, 18 * MiB, pattern(4096, 4))
    again = volumes.create_snapshot("alloc-again", restored.local_id, {}, secrets=secrets)
    extents = list(volumes.allocated(again.local_id, secrets=secrets))
    well_formed(extents, 20 * MiB)
    data = content(pool_io, again.local_id)
    assert first_difference_outside(extents, b"", data) is None, "data outside the ranges"
    assert outside(extents, [0, size - 1, 18 * MiB]) == [], "the parent's data and its own"
    assert outside(extents, [2 * OBJECT, 3 * OBJECT - 1]) == [2 * OBJECT, 3 * OBJECT - 1], "an object of no layer"

    for missing in (MISSING, "not-an-id"):
        with pytest.raises(NotFound, match="does not exist"):
            volumes.allocated(missing, secrets=secrets)
    volumes.delete_snapshot(again.local_id, secrets=secrets)
    volumes.delete_volume(restored.local_id, secrets=secrets)
    volumes.delete_snapshot(snap.local_id, secrets=secrets)
    volumes.delete_volume(origin.local_id, secrets=secrets)


def change(io: Any, local_id: str, *steps: tuple[str, Any]) -> None:
    """Apply librbd calls to a volume's image: (method, arguments) pairs."""
    with rbd.Image(io, image_of(local_id)) as image:
        for method, arguments in steps:
            getattr(image, method)(*arguments)


@pytest.mark.integration
@ceph_test
def test_changed_covers_every_byte_that_differs_and_little_more(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Successive snapshots of one volume, written in between: librbd's diff between the
    RBD snapshots kept for them names every byte that differs, and about what was written."""
    routes = Routes(monkeypatch)
    size = 16 * MiB
    origin = volumes.create_volume(spec("cbt", secrets, size))
    write(pool_io, origin.local_id, 0, pattern(6 * MiB, 1))
    write(pool_io, origin.local_id, 12 * MiB, pattern(MiB, 2))
    taken = [volumes.create_snapshot("cbt-0", origin.local_id, {}, secrets=secrets)]
    steps: list[tuple[str, int, list[tuple[str, Any]]]] = [
        ("an overwrite", 16 * 1024, [("write", (pattern(8192, 3), MiB + 100))]),
        ("new data in a hole", OBJECT, [("write", (pattern(4096, 4), 9 * MiB + 2048))]),
        ("discards", OBJECT + 128 * 1024, [("discard", (0, OBJECT)), ("discard", (12 * MiB + 4096, 65536))]),
        (
            "growth",
            OBJECT,
            [("resize", (24 * MiB,)), ("write", (pattern(4096, 5), 20 * MiB)), ("write", (pattern(100, 6), size - 50))],
        ),
        ("nothing", 0, []),
    ]
    for number, (what, bound, calls) in enumerate(steps, 1):
        change(pool_io, origin.local_id, *calls)
        taken.append(volumes.create_snapshot(f"cbt-{number}", origin.local_id, {}, secrets=secrets))
        named = check_changed(volumes, pool_io, taken[-2], taken[-1], secrets)
        assert named <= bound, f"{what}: {named} bytes named, more than {bound}"
    check_changed(volumes, pool_io, taken[0], taken[-1], secrets)
    check_changed(volumes, pool_io, taken[-1], taken[0], secrets)  # the later one as the base
    assert routes.compared == 0, "nothing was read"
    assert len(user_snapshots(pool_io, origin.local_id)) == len(taken), "an RBD snapshot kept for each"
    for snapshot in taken:
        volumes.delete_snapshot(snapshot.local_id, secrets=secrets)
    assert user_snapshots(pool_io, origin.local_id) == [], "deleting a snapshot drops its RBD snapshot"
    volumes.delete_volume(origin.local_id, secrets=secrets)


@pytest.mark.integration
@ceph_test
def test_one_small_write_is_one_small_change(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = Routes(monkeypatch)
    size = 64 * MiB
    origin = volumes.create_volume(spec("cbt-full", secrets, size))
    for offset in range(0, size, 8 * MiB):
        write(pool_io, origin.local_id, offset, pattern(8 * MiB, offset // MiB))
    before = volumes.create_snapshot("cbt-full-a", origin.local_id, {}, secrets=secrets)
    written = 37 * MiB + 8192
    write(pool_io, origin.local_id, written, pattern(4096, 99))
    after = volumes.create_snapshot("cbt-full-b", origin.local_id, {}, secrets=secrets)
    extents = list(volumes.changed(before.local_id, after.local_id, secrets=secrets))
    assert check_changed(volumes, pool_io, before, after, secrets) <= OBJECT
    home = written // OBJECT * OBJECT
    assert all(home <= e.offset and e.end <= home + OBJECT for e in extents), extents
    assert routes.compared == 0
    for snapshot in (before, after):
        volumes.delete_snapshot(snapshot.local_id, secrets=secrets)
    volumes.delete_volume(origin.local_id, secrets=secrets)


@pytest.mark.integration
@ceph_test
def test_flattened_snapshots_are_read_and_compared(
    ceph: CephCluster, secrets: dict[str, str], pool_io: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(ceph, max_clone_depth=0)  # every snapshot image is flattened
    routes = Routes(monkeypatch)
    origin = backend.create_volume(spec("flat", secrets))
    write(pool_io, origin.local_id, 0, pattern(6 * MiB, 1))
    write(pool_io, origin.local_id, 10 * MiB, pattern(4096, 2))
    first = backend.create_snapshot("flat-0", origin.local_id, {}, secrets=secrets)
    assert user_snapshots(pool_io, origin.local_id) == [], "a full copy keeps no RBD snapshot of its volume"
    change(
        pool_io,
        origin.local_id,
        ("write", (pattern(4096, 3), 2 * MiB)),
        ("write", (pattern(4096, 4), 13 * MiB)),
        ("discard", (4 * MiB, 2 * MiB)),
        ("resize", (20 * MiB,)),
        ("write", (pattern(4096, 5), 18 * MiB)),
    )
    second = backend.create_snapshot("flat-1", origin.local_id, {}, secrets=secrets)
    named = check_changed(backend, pool_io, first, second, secrets)
    assert routes.compared > 0
    # The blocks of the two writes, the discarded data, and what the grown part holds
    # (librbd's ranges there are not read: the object from its start to the write's end).
    assert named <= 2 * 64 * 1024 + 2 * MiB + (2 * MiB + 4096), "whole blocks where bytes differ, no more"
    # An RBD snapshot a flattened image no longer needs, left where dropping it failed, goes
    # with the snapshot.
    change(pool_io, origin.local_id, ("create_snap", (f"cairn-for-{image_of(second.local_id, 'snap')}",)))
    for snapshot in (first, second):
        backend.delete_snapshot(snapshot.local_id, secrets=secrets)
    assert user_snapshots(pool_io, origin.local_id) == []
    backend.delete_volume(origin.local_id, secrets=secrets)
    backend.clusters.shutdown()


@pytest.mark.integration
@ceph_test
def test_snapshots_whose_rbd_snapshots_are_in_the_trash_are_read_and_compared(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snapshots of earlier versions read through RBD snapshots in the trash, and so do
    snapshots of a deleted volume: librbd's diff cannot name those."""
    routes = Routes(monkeypatch)
    origin = volumes.create_volume(spec("trashed", secrets))
    write(pool_io, origin.local_id, MiB, pattern(3 * MiB, 1))
    old = [volumes.create_snapshot("trashed-0", origin.local_id, {}, secrets=secrets)]
    write(pool_io, origin.local_id, 2 * MiB, pattern(4096, 2))
    old.append(volumes.create_snapshot("trashed-1", origin.local_id, {}, secrets=secrets))
    change(pool_io, origin.local_id, *[("remove_snap", (name,)) for name in user_snapshots(pool_io, origin.local_id)])
    check_changed(volumes, pool_io, old[0], old[1], secrets)
    assert routes.compared > 0
    routes.compared = 0

    write(pool_io, origin.local_id, 7 * MiB, pattern(4096, 3))
    new = [volumes.create_snapshot("trashed-2", origin.local_id, {}, secrets=secrets)]
    write(pool_io, origin.local_id, 7 * MiB, pattern(4096, 4))
    new.append(volumes.create_snapshot("trashed-3", origin.local_id, {}, secrets=secrets))
    check_changed(volumes, pool_io, old[1], new[0], secrets)  # one of each kind
    compared = routes.compared
    check_changed(volumes, pool_io, new[0], new[1], secrets)
    assert routes.compared == compared, "both kept: librbd's diff"
    volumes.delete_volume(origin.local_id, secrets=secrets)  # the snapshots outlive it
    assert check_changed(volumes, pool_io, new[0], new[1], secrets) <= 64 * 1024
    assert routes.compared > compared
    for snapshot in old + new:
        volumes.delete_snapshot(snapshot.local_id, secrets=secrets)


@pytest.mark.integration
@ceph_test
def test_changed_refuses_snapshots_of_two_volumes_and_missing_ones(
    volumes: RbdVolumes, secrets: dict[str, str]
) -> None:
    one = volumes.create_volume(spec("one", secrets))
    two = volumes.create_volume(spec("two", secrets))
    of_one = volumes.create_snapshot("of-one", one.local_id, {}, secrets=secrets)
    of_two = volumes.create_snapshot("of-two", two.local_id, {}, secrets=secrets)
    with pytest.raises(InvalidArgument, match="not snapshots of one volume") as refused:
        volumes.changed(of_one.local_id, of_two.local_id, secrets=secrets)
    assert of_one.local_id in str(refused.value) and of_two.local_id in str(refused.value)
    for base, target in ((MISSING, of_one.local_id), (of_one.local_id, MISSING), (of_one.local_id, "bad")):
        with pytest.raises(NotFound, match="does not exist"):
            volumes.changed(base, target, secrets=secrets)
    assert list(volumes.changed(of_one.local_id, of_one.local_id, secrets=secrets)) == []
    for snapshot in (of_one, of_two):
        volumes.delete_snapshot(snapshot.local_id, secrets=secrets)
    for volume in (one, two):
        volumes.delete_volume(volume.local_id, secrets=secrets)


@pytest.mark.integration
@ceph_test
def test_read_snapshot_reads_what_the_volume_held(volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any) -> None:
    size = 16 * MiB
    origin = volumes.create_volume(spec("readable", secrets, size))
    write(pool_io, origin.local_id, MiB, pattern(4096, 1))
    write(pool_io, origin.local_id, size - 100, pattern(100, 2))
    snap = volumes.create_snapshot("readable-snap", origin.local_id, {}, secrets=secrets)
    write(pool_io, origin.local_id, MiB, pattern(4096, 3))  # the snapshot keeps what was
    with volumes.read_snapshot(snap.local_id, secrets=secrets) as reader:
        assert reader.size == size
        assert reader.read(MiB, 4096) == pattern(4096, 1)
        assert reader.read(0, 16) == bytes(16)
        assert reader.read(size - 100, 4096) == pattern(100, 2), "fewer bytes where it ends"
        assert reader.read(size, 10) == b""
        whole = b"".join(reader.read(offset, 3 * MiB) for offset in range(0, size, 3 * MiB))
    assert whole == content(pool_io, snap.local_id)
    with pytest.raises(NotFound, match="does not exist"), volumes.read_snapshot(MISSING, secrets=secrets):
        pass
    volumes.delete_snapshot(snap.local_id, secrets=secrets)
    volumes.delete_volume(origin.local_id, secrets=secrets)


class Broken(Exception):
    """A restore that fails half way (a damaged chunk)."""


@pytest.mark.integration
@ceph_test
def test_a_volume_restored_from_a_backup_is_filling_until_filled(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any
) -> None:
    backup = SourceRef("backup", "1:store:backup-1")  # a driver-wide ID: not an rbd object
    request = spec("from-backup", secrets, 12 * MiB, backup)
    made = volumes.create_volume(request)
    assert made.filling and made.source == backup and made.capacity_bytes == 12 * MiB
    with rbd.Image(pool_io, image_of(made.local_id), read_only=True) as image:
        assert dict(image.metadata_list())["cairn.filling"] == "new"
    assert volumes.get_volume(made.local_id, secrets=secrets) == made
    assert volumes.list_volumes(secrets=secrets) == [made]
    assert volumes.create_volume(request) == made, "a retry finds it, still filling"
    for other in (SourceRef("backup", "1:store:backup-2"), None):
        with pytest.raises(AlreadyExists, match="another content source"):
            volumes.create_volume(spec("from-backup", secrets, 12 * MiB, other))
    with pytest.raises(FailedPrecondition, match="still being restored from a backup"):
        volumes.create_snapshot("too-early", made.local_id, {}, secrets=secrets)
    with pytest.raises(FailedPrecondition, match="still being restored from a backup"):
        volumes.create_volume(spec("clone-too-early", secrets, 12 * MiB, SourceRef("volume", made.local_id)))

    with pytest.raises(Broken), volumes.fill_volume(made.local_id, secrets=secrets) as writer:
        assert writer.size == 12 * MiB
        writer.write(0, pattern(MiB, 1))
        writer.write(8 * MiB, pattern(MiB, 2))
        raise Broken
    assert volumes.get_volume(made.local_id, secrets=secrets).filling, "a failed fill leaves it filling"
    assert volumes.create_volume(request).filling, "a retry finds it, still filling"

    with volumes.fill_volume(made.local_id, secrets=secrets) as writer:
        writer.write(0, pattern(MiB, 3))
        with pytest.raises(InvalidArgument, match="has 12582912 bytes"):
            writer.write(12 * MiB - 10, bytes(20))
    filled = volumes.get_volume(made.local_id, secrets=secrets)
    assert not filled.filling and filled.source == backup
    assert volumes.create_volume(request) == filled
    data = content(pool_io, made.local_id, "vol")
    assert data[:MiB] == pattern(MiB, 3)
    assert data[MiB:] == bytes(11 * MiB), "what the failed fill wrote reads as zeros"
    with (
        pytest.raises(FailedPrecondition, match=f"volume {made.local_id} is not waiting"),
        volumes.fill_volume(made.local_id, secrets=secrets),
    ):
        pass

    plain = volumes.create_volume(spec("plain", secrets))
    assert not plain.filling
    with pytest.raises(FailedPrecondition, match="not waiting"), volumes.fill_volume(plain.local_id, secrets=secrets):
        pass
    with pytest.raises(NotFound), volumes.fill_volume(MISSING, secrets=secrets):
        pass
    snap = volumes.create_snapshot("in-time", made.local_id, {}, secrets=secrets)
    with volumes.read_snapshot(snap.local_id, secrets=secrets) as reader:
        assert reader.read(0, MiB) == pattern(MiB, 3)
    volumes.delete_snapshot(snap.local_id, secrets=secrets)
    for volume in (made, plain):
        volumes.delete_volume(volume.local_id, secrets=secrets)


@pytest.mark.integration
@ceph_test
def test_a_retried_restore_from_a_backup_makes_the_volume_it_reserved(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any
) -> None:
    """A call killed after its reservation: the retry makes the blank image, keys one by one."""
    from csi.backends.rbd.journal import Journal

    Journal(pool_io).reserve("volume", "from-backup-retried")
    volumes.sweeper._done.add(POOL)  # the same process: no sweep
    backup = SourceRef("backup", "1:store:backup-9")
    made = volumes.create_volume(spec("from-backup-retried", secrets, 8 * MiB, backup))
    assert made.filling and made.source == backup
    assert volumes.get_volume(made.local_id, secrets=secrets) == made
    with volumes.fill_volume(made.local_id, secrets=secrets) as writer:
        writer.write(4096, b"restored")
    assert not volumes.get_volume(made.local_id, secrets=secrets).filling
    assert content(pool_io, made.local_id, "vol")[4096:4104] == b"restored"
    volumes.delete_volume(made.local_id, secrets=secrets)
