"""The lvm node path through a running driver: logical volumes activated on stage,
formatted, mounted, grown online, snapshotted and restored through a thin pool, in
filesystem and raw block mode, and deactivated on unstage.

Activation needs the kernel's device-mapper, which this host may lack; the vm tier runs
these tests in a guest with a stock kernel."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from csi.generated import csi_pb2 as pb
from tests.conftest import running_driver
from tests.lvm import LoopVolumeGroup, has_device_mapper, loop_volume_group
from tests.support import Driver, block_capability, mount_capability, require_root, require_tools

pytestmark = pytest.mark.integration
MiB = 1 << 20
NODE = "test-node"


@pytest.fixture
def group(tmp_path: Path) -> Iterator[LoopVolumeGroup]:
    require_root()
    require_tools("lvm", "wipefs", "mkfs.ext4", "mkfs.xfs", "thin_check")
    if not has_device_mapper():
        # A kernel feature, not a package `make test` could install: the vm tier runs them.
        pytest.skip("this kernel has no device-mapper (the vm tier runs these tests)")
    with loop_volume_group(tmp_path, size=512 * MiB, devices=2) as made:
        pool = made.run("lvcreate", "--type", "thin-pool", "--size", "384m", "--name", "pool", made.name)
        assert pool.returncode == 0, pool.stderr
        yield made


@pytest.fixture
def driver(tmp_path: Path, group: LoopVolumeGroup) -> Iterator[Driver]:
    config = tmp_path / "cairn.yaml"
    common = {"kind": "lvm", "volumeGroup": group.name, "lvmConfig": group.config}
    # An alert at 20% of the pool (a new pool's metadata is about 11% full): one test
    # fills that much of its data.
    backends = [{"name": "thick", **common}, {"name": "thin", **common, "thinPool": "pool", "thinPoolAlert": "20"}]
    config.write_text(yaml.safe_dump({"backends": backends}))
    with running_driver(tmp_path / "driver", ["--config", str(config)]) as running:
        yield running


def create(driver: Driver, name: str, cap: pb.VolumeCapability, backend: str, size: int = 64 * MiB,
           source: pb.VolumeContentSource | None = None) -> str:  # fmt: skip
    request = pb.CreateVolumeRequest(
        name=name,
        volume_capabilities=[cap],
        capacity_range={"required_bytes": size},
        parameters={"backend": backend},
        volume_content_source=source,
    )
    volume_id: str = driver.controller.CreateVolume(request, timeout=120).volume.volume_id
    return volume_id


def attach(driver: Driver, volume_id: str, cap: pb.VolumeCapability, target: str) -> str:
    publish = pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=NODE, volume_capability=cap)
    context = driver.controller.ControllerPublishVolume(publish, timeout=60).publish_context
    staging = str(driver.root / f"staging-{volume_id.rsplit('-', 1)[1]}")
    stage = pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, volume_capability=cap, publish_context=context
    )
    driver.node.NodeStageVolume(stage, timeout=180)
    node_publish = pb.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, target_path=target, volume_capability=cap
    )
    driver.node.NodePublishVolume(node_publish, timeout=60)
    return staging


def detach(driver: Driver, volume_id: str, staging: str, target: str) -> None:
    driver.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), timeout=60)
    driver.node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging), timeout=120
    )
    unpublish = pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=NODE)
    driver.controller.ControllerUnpublishVolume(unpublish, timeout=60)


def delete(driver: Driver, *volume_ids: str) -> None:
    for volume_id in volume_ids:
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=120)


def active(group: LoopVolumeGroup) -> list[str]:
    """Names of the group's active LVs (the thin pool's own layers aside)."""
    rows = group.report("lvs", "lv_name,lv_active")
    return sorted(r["lv_name"] for r in rows if r["lv_active"] == "active" and r["lv_name"].startswith("cairn-"))


def test_a_new_thick_volume_never_shows_the_filesystem_of_the_last_one(driver: Driver, group: LoopVolumeGroup) -> None:
    cap = mount_capability("ext4")
    first = create(driver, "first", cap, "thick")
    target = str(driver.root / "pod")
    staging = attach(driver, first, cap, target)
    assert active(group), "stage activates the volume"
    Path(target, "secret").write_text("the first tenant's data")
    detach(driver, first, staging, target)
    assert active(group) == [], "unstage deactivates the volume"
    delete(driver, first)
    # The next volume gets the same extents; its first attach wipes the old signature,
    # so the node formats it instead of mounting the old filesystem.
    second = create(driver, "second", cap, "thick")
    staging = attach(driver, second, cap, target)
    assert not Path(target, "secret").exists(), "a new volume mounted the previous volume's filesystem"
    detach(driver, second, staging, target)
    delete(driver, second)


def test_thin_snapshot_restore_and_clone_keep_the_data_and_grow(driver: Driver, group: LoopVolumeGroup) -> None:
    cap = mount_capability("ext4")
    source = create(driver, "source", cap, "thin")
    target = str(driver.root / "pod")
    staging = attach(driver, source, cap, target)
    Path(target, "data").write_text("before the snapshot")
    os.sync()
    snapshot = driver.controller.CreateSnapshot(
        pb.CreateSnapshotRequest(source_volume_id=source, name="snap"), timeout=120
    ).snapshot
    Path(target, "data").write_text("after the snapshot")
    detach(driver, source, staging, target)
    restored = create(
        driver, "restored", cap, "thin", size=128 * MiB,
        source=pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)),
    )  # fmt: skip
    clone = create(
        driver, "clone", cap, "thin",
        source=pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=source)),
    )  # fmt: skip
    staging = attach(driver, restored, cap, target)
    assert Path(target, "data").read_text() == "before the snapshot"
    stat = os.statvfs(target)
    assert stat.f_blocks * stat.f_frsize > 96 * MiB, "the restore's filesystem grows to the size asked for"
    detach(driver, restored, staging, target)
    staging = attach(driver, clone, cap, target)
    assert Path(target, "data").read_text() == "after the snapshot"
    detach(driver, clone, staging, target)
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id), timeout=120)
    delete(driver, restored, clone, source)
    assert [r["lv_name"] for r in group.report("lvs", "lv_name")] == ["pool"], "delete leaves only the pool"


def test_a_staged_volume_grows_online_and_raw_block_works(driver: Driver, group: LoopVolumeGroup) -> None:
    cap = mount_capability("ext4")
    volume = create(driver, "grow", cap, "thick")
    target = str(driver.root / "pod")
    staging = attach(driver, volume, cap, target)
    expand = pb.ControllerExpandVolumeRequest(volume_id=volume, capacity_range={"required_bytes": 160 * MiB})
    assert driver.controller.ControllerExpandVolume(expand, timeout=60).node_expansion_required
    grow = pb.NodeExpandVolumeRequest(
        volume_id=volume, volume_path=target, staging_target_path=staging, capacity_range={"required_bytes": 160 * MiB}
    )
    driver.node.NodeExpandVolume(grow, timeout=120)
    stat = os.statvfs(target)
    assert stat.f_blocks * stat.f_frsize > 128 * MiB, "ext4 grows while mounted"
    detach(driver, volume, staging, target)
    raw = block_capability()
    block = create(driver, "raw", raw, "thin", size=128 * MiB)
    device = str(driver.root / "dev")
    staging = attach(driver, block, raw, device)
    with open(device, "r+b") as handle:
        handle.seek(3 * MiB)
        handle.write(b"raw bytes")
        handle.flush()
        os.fsync(handle.fileno())
    with open(device, "rb") as handle:
        handle.seek(3 * MiB)
        assert handle.read(9) == b"raw bytes"
    stats = pb.NodeGetVolumeStatsRequest(volume_id=block, volume_path=device)
    assert not driver.node.NodeGetVolumeStats(stats, timeout=60).volume_condition.abnormal
    with open(device, "r+b") as handle:  # 96 MiB of the 384 MiB pool: past the 20% alert
        for _ in range(96):
            handle.write(b"\xa5" * MiB)
        os.fsync(handle.fileno())
    condition = driver.node.NodeGetVolumeStats(stats, timeout=60).volume_condition
    assert condition.abnormal and f"thin pool {group.name}/pool is data" in condition.message, condition.message
    detach(driver, block, staging, device)
    delete(driver, volume, block)


def test_a_mirrored_volume_keeps_its_data(driver: Driver, group: LoopVolumeGroup) -> None:
    """A StorageClass asking for a mirror gets a raid1 volume over both disks."""
    cap = mount_capability("ext4")
    request = pb.CreateVolumeRequest(
        name="mirrored",
        volume_capabilities=[cap],
        capacity_range={"required_bytes": 32 * MiB},
        parameters={"backend": "thick", "mirrors": "1"},
    )
    volume = driver.controller.CreateVolume(request, timeout=120).volume.volume_id
    rows = group.report("lvs", "lv_name,segtype")
    assert "raid1" in [r["segtype"] for r in rows if r["lv_name"].startswith("cairn-vol-")], rows
    target = str(driver.root / "pod")
    staging = attach(driver, volume, cap, target)
    Path(target, "data").write_text("on both disks")
    detach(driver, volume, staging, target)
    staging = attach(driver, volume, cap, target)
    assert Path(target, "data").read_text() == "on both disks"
    detach(driver, volume, staging, target)
    delete(driver, volume)
