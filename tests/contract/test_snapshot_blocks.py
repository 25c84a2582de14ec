"""The ``SnapshotBlocks`` contract, once, for every backend that declares block access:
what backups, restores and the SnapshotMetadata service rely on. A backend without it
skips, saying so. Content gets in through the contract itself: a volume made from a
backup source is filled through ``fill_volume``."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from typing import cast

import pytest

from csi.backends.base import SnapshotBlocks
from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi.model import Extent, MiB, SourceRef
from tests.contract.conftest import SIZE, Subject

BACKUP = SourceRef("backup", "1:vault:b-contract")


def blocks_of(subject: Subject) -> SnapshotBlocks:
    if not subject.capabilities.blocks:
        pytest.skip(f"{subject.kind} declares no block access (no backups or changed-block tracking on it)")
    return cast(SnapshotBlocks, subject.volumes)


def well_formed(extents: Iterable[Extent], size: int, start: int = 0) -> list[Extent]:
    """The ranges, checked: sorted, apart, within the snapshot and after ``start``."""
    found = list(extents)
    for extent in found:
        assert extent.length > 0 and extent.offset >= 0 and extent.end <= size, extent
    for before, after in itertools.pairwise(found):
        assert before.end < after.offset, f"ranges overlap or touch: {before} {after}"
    if found:
        assert found[0].end > start
    return found


def covers(extents: list[Extent], offset: int, length: int) -> bool:
    return all(any(e.offset <= byte < e.end for e in extents) for byte in range(offset, offset + length, 512))


def filled(subject: Subject, name: str, writes: dict[int, bytes]) -> str:
    """A volume made from a backup source with ``writes`` as its content."""
    blocks = blocks_of(subject)
    volume = subject.volumes.create_volume(subject.spec(name, source=BACKUP))
    assert volume.filling and volume.source == BACKUP
    with blocks.fill_volume(volume.local_id, secrets=subject.secrets) as writer:
        assert writer.size == volume.capacity_bytes
        for offset, data in writes.items():
            writer.write(offset, data)
    assert not subject.volumes.get_volume(volume.local_id, secrets=subject.secrets).filling
    return volume.local_id


def snapshot(subject: Subject, name: str, volume: str) -> str:
    made = subject.volumes.create_snapshot(name, volume, dict(subject.snapshot_parameters), secrets=subject.secrets)
    return made.local_id


def test_a_filled_volume_reads_back_through_its_snapshot(subject: Subject) -> None:
    blocks = blocks_of(subject)
    rng = random.Random(1)
    writes = {0: rng.randbytes(4096), 3 * MiB + 17: rng.randbytes(70000), SIZE - 512: rng.randbytes(512)}
    volume = filled(subject, "filled", writes)
    snap = snapshot(subject, "filled-snap", volume)
    found = well_formed(blocks.allocated(snap, secrets=subject.secrets), SIZE)
    for offset, data in writes.items():
        assert covers(found, offset, len(data)), f"{len(data)} bytes at {offset} are not in {found}"
    with blocks.read_snapshot(snap, secrets=subject.secrets) as reader:
        assert reader.size == SIZE
        for offset, data in writes.items():
            assert reader.read(offset, len(data)) == data
        assert reader.read(MiB, 4096) == bytes(4096)
        assert reader.read(SIZE - 100, 4096) == writes[SIZE - 512][-100:]
    # Cut at a start inside the data: nothing that ends before it.
    start = 3 * MiB + 20000
    later = well_formed(blocks.allocated(snap, start, secrets=subject.secrets), SIZE, start)
    assert covers(later, start, 3 * MiB + 17 + 70000 - start)
    subject.volumes.delete_snapshot(snap, secrets=subject.secrets)
    subject.volumes.delete_volume(volume, secrets=subject.secrets)


def test_changed_is_well_formed_and_refuses_snapshots_of_two_volumes(subject: Subject) -> None:
    blocks = blocks_of(subject)
    one = filled(subject, "one", {0: b"a" * 8192})
    two = filled(subject, "two", {0: b"b" * 8192})
    first, again = snapshot(subject, "one-a", one), snapshot(subject, "one-b", one)
    other = snapshot(subject, "two-a", two)
    # Nothing was written between the two: whatever is reported must still be well formed.
    well_formed(blocks.changed(first, again, secrets=subject.secrets), SIZE)
    with pytest.raises(InvalidArgument):
        list(blocks.changed(first, other, secrets=subject.secrets))
    gone = snapshot(subject, "one-gone", one)
    subject.volumes.delete_snapshot(gone, secrets=subject.secrets)
    with pytest.raises(NotFound):
        list(blocks.changed(first, gone, secrets=subject.secrets))
    with pytest.raises(NotFound):
        list(blocks.allocated(gone, secrets=subject.secrets))
    for snap in (first, again, other):
        subject.volumes.delete_snapshot(snap, secrets=subject.secrets)
    for volume in (one, two):
        subject.volumes.delete_volume(volume, secrets=subject.secrets)


def test_a_failed_fill_stays_filling_and_a_retry_starts_from_zeros(subject: Subject) -> None:
    blocks = blocks_of(subject)
    volume = subject.volumes.create_volume(subject.spec("retried", source=BACKUP))
    with pytest.raises(RuntimeError), blocks.fill_volume(volume.local_id, secrets=subject.secrets) as writer:
        writer.write(MiB, b"x" * 4096)
        raise RuntimeError("the repository went away")
    assert subject.volumes.get_volume(volume.local_id, secrets=subject.secrets).filling
    again = subject.volumes.create_volume(subject.spec("retried", source=BACKUP))
    assert again.local_id == volume.local_id and again.filling
    with pytest.raises(AlreadyExists):
        subject.volumes.create_volume(subject.spec("retried", source=SourceRef("backup", "1:vault:b-other")))
    with blocks.fill_volume(volume.local_id, secrets=subject.secrets) as writer:
        writer.write(0, b"y" * 4096)
    snap = snapshot(subject, "retried-snap", volume.local_id)
    with blocks.read_snapshot(snap, secrets=subject.secrets) as reader:
        assert reader.read(0, 4096) == b"y" * 4096
        assert reader.read(MiB, 4096) == bytes(4096), "what the failed fill wrote is still there"
    with pytest.raises(FailedPrecondition), blocks.fill_volume(volume.local_id, secrets=subject.secrets):
        pass
    subject.volumes.delete_snapshot(snap, secrets=subject.secrets)
    subject.volumes.delete_volume(volume.local_id, secrets=subject.secrets)
