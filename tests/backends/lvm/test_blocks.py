"""The lvm backend's block access: the thin tools' reports read right, and on a real thin
pool what ``allocated`` and ``changed`` say matches what a full read of the snapshots
finds, through the pool's metadata snapshot (also one a killed process left reserved).

The reports are the tools' own, run here on a pool's metadata written to a file
(``thin_restore``); the pool itself needs the kernel's device-mapper, which this host
may lack: the vm tier runs those tests in a guest with a stock kernel."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.backends.lvm import blocks
from csi.backends.lvm.lvm import Lvm
from csi.backends.lvm.volumes import LvmVolumes
from csi.errors import FailedPrecondition, Unavailable
from csi.model import AccessMode, AccessType, Capability, MiB, SourceRef, VolumeSpec
from tests.lvm import LoopVolumeGroup, has_device_mapper, thin_pool_group
from tests.support import require_root, require_tools

KiB = 1024
CHUNK = 64 * KiB  # the pool's data block: LVM's default for a pool this small
SIZE = 16 * MiB
BACKUP = SourceRef("backup", "1:vault:b-lvm")

# Two thin devices of a pool with 64 KiB blocks (128 sectors): device 2 shares blocks 0-1
# and 10 with device 1, maps its own block 2 and 15, and lacks block 12, which 1 maps.
METADATA = """<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1000">
  <device dev_id="1" mapped_blocks="5" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="10" data_block="20" time="0"/>
    <single_mapping origin_block="12" data_block="21" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="5" transaction="0" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
    <single_mapping origin_block="2" data_block="30" time="1"/>
    <single_mapping origin_block="10" data_block="20" time="0"/>
    <single_mapping origin_block="15" data_block="31" time="1"/>
  </device>
</superblock>
"""


@pytest.fixture
def metadata(tmp_path: Path) -> Path:
    require_tools("thin_restore", "thin_dump", "thin_delta")
    source, target = tmp_path / "metadata.xml", tmp_path / "metadata.bin"
    source.write_text(METADATA)
    with target.open("wb") as image:
        image.truncate(8 * MiB)
    made = subprocess.run(["thin_restore", "-i", str(source), "-o", str(target)], capture_output=True, text=True)
    assert made.returncode == 0, f"thin_restore: {made.stderr or made.stdout}"
    return target


def tool(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


@pytest.mark.unit
def test_the_mappings_of_one_device_are_read_from_thin_dump(metadata: Path) -> None:
    assert blocks.mapped(tool("thin_dump", "--dev-id", "1", str(metadata)), "one") == [
        (0, 3 * CHUNK),
        (10 * CHUNK, 11 * CHUNK),
        (12 * CHUNK, 13 * CHUNK),
    ]
    assert blocks.mapped(tool("thin_dump", "--dev-id", "2", str(metadata)), "two") == [
        (0, 3 * CHUNK),
        (10 * CHUNK, 11 * CHUNK),
        (15 * CHUNK, 16 * CHUNK),
    ], "a range and a single block that touch are one range"


@pytest.mark.unit
def test_what_two_devices_do_not_share_is_read_from_thin_delta(metadata: Path) -> None:
    found = blocks.unshared(tool("thin_delta", "--snap1", "1", "--snap2", "2", str(metadata)), "1 and 2")
    # Block 2 mapped differently, 12 only in the first, 15 only in the second; 0-1 and 10 shared.
    assert found == [(2 * CHUNK, 3 * CHUNK), (12 * CHUNK, 13 * CHUNK), (15 * CHUNK, 16 * CHUNK)]
    assert blocks.unshared(tool("thin_delta", "--snap1", "2", "--snap2", "2", str(metadata)), "2 and 2") == []


@pytest.mark.unit
def test_output_that_is_not_the_tools_xml_is_unavailable_naming_the_object() -> None:
    with pytest.raises(Unavailable, match="snapshot x: the thin tools' output is not their XML"):
        blocks.mapped("thin_dump: bad checksum", "snapshot x")
    with pytest.raises(Unavailable, match=r"snapshot x: .*no data block size"):
        blocks.unshared('<superblock uuid=""><diff left="1" right="2"/></superblock>', "snapshot x")


@pytest.mark.unit
def test_the_pool_devices_escape_hyphens_as_device_mapper_does() -> None:
    assert blocks.pool_devices("my-vg", "thin-pool") == (
        "/dev/mapper/my--vg-thin--pool-tpool",
        "/dev/mapper/my--vg-thin--pool_tmeta",
    )


@pytest.mark.unit
def test_a_thick_backend_offers_no_block_access() -> None:
    thick = LvmVolumes("thick", Lvm(), "vg", "", "test-node")
    with pytest.raises(FailedPrecondition, match="'thick' has no thin pool"):
        list(thick.allocated("test-node@snap-00000000-0000-0000-0000-000000000000"))


# -- on a real thin pool (device-mapper) ----------------------------------------------


@pytest.fixture
def group(tmp_path: Path) -> Iterator[LoopVolumeGroup]:
    require_root()
    require_tools("lvm", "dmsetup", "thin_dump", "thin_delta")
    if not has_device_mapper():
        pytest.skip("this kernel has no device-mapper (the vm tier runs these tests)")
    with thin_pool_group(tmp_path) as made:
        yield made


@pytest.fixture
def backend(group: LoopVolumeGroup) -> LvmVolumes:
    return LvmVolumes("thin", Lvm(group.config), group.name, "pool", "test-node")


def spec(name: str, source: SourceRef | None = None) -> VolumeSpec:
    return VolumeSpec(name, SIZE, 0, (Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER),), source=source)


def contents(backend: LvmVolumes, snapshot: str) -> bytes:
    with backend.read_snapshot(snapshot) as reader:
        return reader.read(0, reader.size)


def covered(ranges: list[tuple[int, int]], low: int, high: int) -> bool:
    return any(first <= low and high <= last for first, last in ranges)


@pytest.mark.integration
def test_on_a_thin_pool_allocated_and_changed_match_a_full_read_of_the_snapshots(backend: LvmVolumes) -> None:
    rng = random.Random(7)
    volume = backend.create_volume(spec("tracked", BACKUP))
    writes = [(rng.randrange(0, SIZE - 8 * KiB), rng.randbytes(rng.randrange(1, 8 * KiB))) for _ in range(12)]
    with backend.fill_volume(volume.local_id) as writer:
        for offset, data in writes:
            writer.write(offset, data)
    first = backend.create_snapshot("tracked-1", volume.local_id, {}).local_id

    # Between the snapshots: overwrites, new data, and a block discarded to zeros.
    device = backend.lvm.volume(backend.vg, f"cairn-{volume.local_id.split('@')[-1]}")
    assert device is not None
    later = [(rng.randrange(0, SIZE - 4 * KiB), rng.randbytes(4 * KiB)) for _ in range(5)]
    with backend._active(device) as path, open(path, "r+b", buffering=0) as opened:
        for offset, data in later:
            opened.seek(offset)
            opened.write(data)
        discarded = writes[0][0] - writes[0][0] % CHUNK
        subprocess.run(["blkdiscard", "--offset", str(discarded), "--length", str(CHUNK), path], check=True)
    second = backend.create_snapshot("tracked-2", volume.local_id, {}).local_id

    old, new = contents(backend, first), contents(backend, second)
    allocated = [(e.offset, e.end) for e in backend.allocated(first)]
    for offset in range(0, SIZE, 512):
        if old[offset : offset + 512] != bytes(512):
            assert covered(allocated, offset, offset + 512), f"data at {offset} is outside {allocated}"
    assert sum(high - low for low, high in allocated) <= len(writes) * 2 * CHUNK, "no more than the blocks written"

    changed = [(e.offset, e.end) for e in backend.changed(first, second)]
    for offset in range(0, SIZE, 512):
        if old[offset : offset + 512] != new[offset : offset + 512]:
            assert covered(changed, offset, offset + 512), f"a change at {offset} is outside {changed}"
    touched = {offset // CHUNK for offset, _ in later} | {(offset + 4 * KiB - 1) // CHUNK for offset, _ in later}
    assert sum(high - low for low, high in changed) <= (len(touched) + 1) * CHUNK, "only the blocks touched"
    assert covered(changed, discarded, discarded + CHUNK), "a block discarded since is a change"

    start = changed[-1][0] + 512
    assert next((e.offset, e.end) for e in backend.changed(first, second, start)) == (start, changed[-1][1])
    assert list(backend.changed(second, second)) == []
    for snapshot in (first, second):
        backend.delete_snapshot(snapshot)
    backend.delete_volume(volume.local_id)


@pytest.mark.integration
def test_on_a_thin_pool_a_metadata_snapshot_a_killed_process_left_is_released_first(
    backend: LvmVolumes, group: LoopVolumeGroup
) -> None:
    volume = backend.create_volume(spec("kept", BACKUP))
    with backend.fill_volume(volume.local_id) as writer:
        writer.write(0, b"k" * 4096)
    snapshot = backend.create_snapshot("kept-1", volume.local_id, {}).local_id
    pool = backend.lvm.volume(group.name, "pool")
    assert pool is not None
    found = backend.lvm.volume(group.name, f"cairn-{snapshot.split('@')[-1]}")
    assert found is not None
    with backend._active(found):
        tpool, _ = blocks.pool_devices(group.name, "pool")
        subprocess.run(["dmsetup", "message", tpool, "0", "reserve_metadata_snap"], check=True)
        assert [(e.offset, e.end) for e in backend.allocated(snapshot)] == [(0, CHUNK)]
        # Released on the way out: a second reservation is the kernel's to grant again.
        subprocess.run(["dmsetup", "message", tpool, "0", "reserve_metadata_snap"], check=True)
        subprocess.run(["dmsetup", "message", tpool, "0", "release_metadata_snap"], check=True)
    assert not backend.lvm.volume(group.name, found.name).active  # type: ignore[union-attr]
    backend.delete_snapshot(snapshot)
    backend.delete_volume(volume.local_id)
