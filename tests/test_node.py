"""The node path for real: loop devices, mkfs, mount and bind mounts on this host,
driven through the driver's socket."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi import loopdev, mount
from csi.generated import csi_pb2 as pb
from tests.support import (
    CAP_SYS_RESOURCE,
    NODE_ID,
    Driver,
    block_capability,
    has_capability,
    mount_capability,
    require_root,
    require_tools,
)

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(autouse=True)
def host() -> None:
    require_root()
    require_tools("losetup", "blkid", "mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs")


class Volume:
    """One volume driven through the CSI calls kubelet and the sidecars would make."""

    def __init__(
        self,
        driver: Driver,
        name: str,
        cap: pb.VolumeCapability,
        size: int = 64 * MiB,
        source: pb.VolumeContentSource | None = None,
        **params: str,
    ) -> None:
        self.driver = driver
        self.cap = cap
        request = pb.CreateVolumeRequest(
            name=name,
            volume_capabilities=[cap],
            parameters=params,
            capacity_range={"required_bytes": size},
            volume_content_source=source,
        )
        self.volume = driver.controller.CreateVolume(request, timeout=60).volume
        self.id = self.volume.volume_id
        self.staging = str(driver.root / f"staging-{name}")
        self.context: dict[str, str] = {}

    def publish(self) -> None:
        request = pb.ControllerPublishVolumeRequest(volume_id=self.id, node_id=NODE_ID, volume_capability=self.cap)
        self.context = dict(self.driver.controller.ControllerPublishVolume(request, timeout=60).publish_context)

    def stage(self, cap: pb.VolumeCapability | None = None) -> None:
        request = pb.NodeStageVolumeRequest(
            volume_id=self.id,
            staging_target_path=self.staging,
            volume_capability=cap or self.cap,
            publish_context=self.context,
            volume_context=self.volume.volume_context,
        )
        self.driver.node.NodeStageVolume(request, timeout=120)

    def mount(self, target: str, readonly: bool = False) -> None:
        request = pb.NodePublishVolumeRequest(
            volume_id=self.id,
            staging_target_path=self.staging,
            target_path=target,
            volume_capability=self.cap,
            readonly=readonly,
            volume_context=self.volume.volume_context,
        )
        self.driver.node.NodePublishVolume(request, timeout=60)

    def umount(self, target: str) -> None:
        self.driver.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=self.id, target_path=target), timeout=60
        )

    def unstage(self) -> None:
        request = pb.NodeUnstageVolumeRequest(volume_id=self.id, staging_target_path=self.staging)
        self.driver.node.NodeUnstageVolume(request, timeout=60)

    def delete(self) -> None:
        unpublish = pb.ControllerUnpublishVolumeRequest(volume_id=self.id, node_id=NODE_ID)
        self.driver.controller.ControllerUnpublishVolume(unpublish, timeout=60)
        self.driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=self.id), timeout=60)

    def image(self) -> str:
        return str(self.driver.data / "volumes" / (self.id.rsplit(":", 1)[1] + ".img"))

    def stats(self, path: str) -> pb.NodeGetVolumeStatsResponse:
        request = pb.NodeGetVolumeStatsRequest(volume_id=self.id, volume_path=path)
        response: pb.NodeGetVolumeStatsResponse = self.driver.node.NodeGetVolumeStats(request, timeout=60)
        return response


def code_of(call: Any, *args: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)
    error: Any = caught.value
    code: grpc.StatusCode = error.code()
    return code


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_filesystem_lifecycle(driver: Driver, fs: str) -> None:
    vol = Volume(driver, f"life-{fs}", mount_capability(fs), size=320 * MiB)
    vol.publish()
    vol.stage()
    vol.stage()  # idempotent
    device = loopdev.find(vol.image())
    assert len(device) == 1
    entry = mount.find_mount(vol.staging)
    assert entry is not None and entry.fstype == fs and entry.source == device[0]
    target = str(driver.root / "pod" / "vol")
    vol.mount(target)
    vol.mount(target)  # idempotent
    Path(target, "data.txt").write_text("kept")
    stats = vol.stats(target)
    assert stats.usage[0].unit == pb.VolumeUsage.BYTES and stats.usage[0].total > 200 * MiB
    assert stats.usage[1].unit == pb.VolumeUsage.INODES and stats.usage[1].used > 0
    assert not stats.volume_condition.abnormal
    vol.umount(target)
    vol.umount(target)  # idempotent
    assert not os.path.exists(target)
    vol.unstage()
    vol.unstage()  # idempotent
    assert loopdev.find(vol.image()) == [] and not mount.is_mounted(vol.staging)
    # Staging again finds the filesystem and the file: only a blank volume is formatted.
    vol.stage()
    vol.mount(target)
    assert Path(target, "data.txt").read_text() == "kept"
    vol.umount(target)
    vol.unstage()
    vol.delete()
    assert not os.path.exists(vol.image())


def test_staged_volumes_survive_a_driver_restart(driver: Driver) -> None:
    vol = Volume(driver, "restart", mount_capability())
    vol.publish()
    vol.stage()
    target = str(driver.root / "pod-restart")
    vol.mount(target)
    driver.restart()
    Path(target, "after-restart").write_text("still writable")
    vol.stage()  # kubelet may repeat it after a restart; nothing changes
    assert len(loopdev.find(vol.image())) == 1
    assert not vol.stats(target).volume_condition.abnormal
    vol.umount(target)
    vol.unstage()
    assert loopdev.find(vol.image()) == []
    vol.delete()


def test_unstage_after_restart_without_records_still_detaches(driver: Driver) -> None:
    vol = Volume(driver, "no-record", mount_capability())
    vol.publish()
    vol.stage()
    driver.stop()
    for record in driver.state.iterdir():
        record.unlink()  # a node plugin that lost its state directory
    driver.start()
    vol.unstage()
    assert loopdev.find(vol.image()) == [] and not mount.is_mounted(vol.staging)
    vol.delete()


def test_readonly_publish_refuses_writes(driver: Driver) -> None:
    vol = Volume(driver, "ro", mount_capability())
    vol.publish()
    vol.stage()
    writable, readonly = str(driver.root / "rw"), str(driver.root / "ro")
    vol.mount(writable)
    vol.mount(readonly, readonly=True)
    Path(writable, "a").write_text("x")
    with pytest.raises(OSError) as caught:
        Path(readonly, "b").write_text("x")
    assert caught.value.errno == errno.EROFS
    assert Path(readonly, "a").read_text() == "x"
    assert code_of(vol.mount, readonly, False) is grpc.StatusCode.ALREADY_EXISTS
    for target in (writable, readonly):
        vol.umount(target)
    vol.unstage()
    vol.delete()


def test_block_volume_is_a_device_in_the_pod(driver: Driver) -> None:
    vol = Volume(driver, "raw", block_capability())
    vol.publish()
    vol.stage()
    first, second = str(driver.root / "dev" / "a"), str(driver.root / "dev" / "b")
    vol.mount(first)
    vol.mount(second)
    assert stat.S_ISBLK(os.stat(first).st_mode)
    with open(first, "r+b") as device:
        device.seek(5 * MiB)
        device.write(b"raw bytes")
    with open(second, "rb") as device:
        device.seek(5 * MiB)
        assert device.read(9) == b"raw bytes"
    assert vol.stats(first).usage[0].total == 64 * MiB
    vol.umount(first)
    vol.umount(second)
    assert not os.path.exists(first)
    vol.unstage()
    vol.delete()


def test_failed_stage_leaves_no_device_or_mount(driver: Driver) -> None:
    vol = Volume(driver, "bad-mkfs", mount_capability(), mkfsOptions="-O no_such_feature")
    vol.publish()
    assert code_of(vol.stage) is grpc.StatusCode.INTERNAL
    assert loopdev.find(vol.image()) == []
    assert not mount.is_mounted(vol.staging)
    assert list(driver.state.iterdir()) == []
    vol.delete()


def test_filesystem_mismatch_is_refused_without_formatting(driver: Driver) -> None:
    vol = Volume(driver, "mismatch", mount_capability("ext4"))
    vol.publish()
    vol.stage()
    assert code_of(vol.stage, mount_capability("xfs")) is grpc.StatusCode.ALREADY_EXISTS
    vol.unstage()
    assert code_of(vol.stage, mount_capability("xfs")) is grpc.StatusCode.FAILED_PRECONDITION
    assert loopdev.find(vol.image()) == []
    vol.delete()


def expand(vol: Volume, target: str, size: int) -> int:
    request = pb.ControllerExpandVolumeRequest(volume_id=vol.id, capacity_range={"required_bytes": size})
    response = vol.driver.controller.ControllerExpandVolume(request, timeout=60)
    assert response.capacity_bytes == size and response.node_expansion_required
    node_request = pb.NodeExpandVolumeRequest(
        volume_id=vol.id, volume_path=target, capacity_range={"required_bytes": size}
    )
    return int(vol.driver.node.NodeExpandVolume(node_request, timeout=120).capacity_bytes)


@pytest.mark.parametrize("fs", ["xfs", "ext4"])
def test_online_expansion_grows_the_filesystem(driver: Driver, fs: str) -> None:
    if fs == "ext4" and not has_capability(CAP_SYS_RESOURCE):
        pytest.skip("online ext4 grow needs CAP_SYS_RESOURCE, which this host's root lacks; XFS covers the path")
    vol = Volume(driver, f"grow-{fs}", mount_capability(fs), size=320 * MiB)
    vol.publish()
    vol.stage()
    target = str(driver.root / "grow")
    vol.mount(target)
    before = os.statvfs(target)
    assert expand(vol, target, 640 * MiB) == 640 * MiB
    after = os.statvfs(target)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 250 * MiB
    vol.umount(target)
    vol.unstage()
    vol.delete()


def test_online_expansion_of_a_block_volume_refreshes_the_device(driver: Driver) -> None:
    vol = Volume(driver, "grow-raw", block_capability())
    vol.publish()
    vol.stage()
    target = str(driver.root / "dev" / "grow")
    vol.mount(target)
    assert expand(vol, target, 96 * MiB) == 96 * MiB
    assert mount.device_size(target) == 96 * MiB
    vol.umount(target)
    vol.unstage()
    vol.delete()


def test_restore_and_clone_carry_the_data(driver: Driver) -> None:
    vol = Volume(driver, "origin", mount_capability("xfs"), size=320 * MiB)  # XFS needs 300 MB
    vol.publish()
    vol.stage()
    target = str(driver.root / "origin")
    vol.mount(target)
    Path(target, "note").write_text("from the origin")
    os.sync()
    snap = driver.controller.CreateSnapshot(
        pb.CreateSnapshotRequest(name="snap", source_volume_id=vol.id), timeout=60
    ).snapshot
    copies = [
        Volume(
            driver, "restored", vol.cap, 320 * MiB, pb.VolumeContentSource(snapshot={"snapshot_id": snap.snapshot_id})
        ),
        Volume(driver, "cloned", vol.cap, 320 * MiB, pb.VolumeContentSource(volume={"volume_id": vol.id})),
    ]
    for copy in copies:
        copy.publish()
        copy.stage()  # XFS clones share the origin's UUID: mounted side by side with nouuid
        copy_target = str(driver.root / f"mnt-{copy.volume.volume_id[-6:]}")
        copy.mount(copy_target)
        assert Path(copy_target, "note").read_text() == "from the origin"
        copy.umount(copy_target)
        copy.unstage()
        copy.delete()
    vol.umount(target)
    vol.unstage()
    vol.delete()
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=60)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_expansion_while_unstaged_is_finished_at_the_next_stage(driver: Driver, fs: str) -> None:
    vol = Volume(driver, f"offline-{fs}", mount_capability(fs), size=320 * MiB)
    vol.publish()
    vol.stage()
    target = str(driver.root / "offline")
    vol.mount(target)
    Path(target, "kept").write_text("yes")
    before = os.statvfs(target)
    vol.umount(target)
    vol.unstage()
    request = pb.ControllerExpandVolumeRequest(volume_id=vol.id, capacity_range={"required_bytes": 640 * MiB})
    driver.controller.ControllerExpandVolume(request, timeout=60)
    vol.stage()
    vol.mount(target)
    after = os.statvfs(target)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 250 * MiB
    assert Path(target, "kept").read_text() == "yes"
    vol.umount(target)
    vol.unstage()
    vol.delete()


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_snapshot_of_a_mounted_volume_holds_unsynced_writes(driver: Driver, fs: str) -> None:
    vol = Volume(driver, f"busy-{fs}", mount_capability(fs), size=320 * MiB)
    vol.publish()
    vol.stage()
    target = str(driver.root / "busy")
    vol.mount(target)
    Path(target, "unsynced").write_bytes(b"x" * 4 * MiB)  # still in the page cache: no sync
    request = pb.CreateSnapshotRequest(name=f"busy-snap-{fs}", source_volume_id=vol.id)
    snap = driver.controller.CreateSnapshot(request, timeout=120).snapshot
    Path(target, "after").write_text("the volume is thawed again")
    source = pb.VolumeContentSource(snapshot={"snapshot_id": snap.snapshot_id})
    restored = Volume(driver, f"busy-restored-{fs}", vol.cap, 320 * MiB, source)
    restored.publish()
    restored.stage()
    restored_target = str(driver.root / "restored")
    restored.mount(restored_target)
    assert Path(restored_target, "unsynced").stat().st_size == 4 * MiB
    assert Path(restored_target, "unsynced").read_bytes() == b"x" * 4 * MiB
    for each, path in ((restored, restored_target), (vol, target)):
        each.umount(path)
        each.unstage()
        each.delete()
    driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=60)


def test_the_driver_applies_the_pods_group_without_walking_the_files(tmp_path: Path) -> None:
    """VOLUME_MOUNT_GROUP (--volume-mount-group): a publication carrying the pod's fsGroup
    gives the volume's root to that group with setgid, so what the pod makes belongs to
    the group; files already there keep theirs (no walk). Without the flag the capability
    is not advertised and a request carrying a group is refused, naming the flag."""
    from tests.conftest import running_driver

    with running_driver(tmp_path / "grouped", ["--volume-mount-group"]) as driver:
        listed = driver.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=30).capabilities
        assert pb.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP in [c.rpc.type for c in listed]
        cap = mount_capability("ext4")
        vol = Volume(driver, "grouped", cap)
        vol.publish()
        vol.stage()
        target = str(driver.root / "pod")
        vol.mount(target)
        Path(target, "before").write_text("made before the group was given")
        vol.umount(target)
        vol.cap = pb.VolumeCapability()
        vol.cap.CopyFrom(cap)
        vol.cap.mount.volume_mount_group = "4321"
        vol.mount(target)
        root = os.stat(target)
        assert root.st_gid == 4321 and root.st_mode & stat.S_ISGID and root.st_mode & stat.S_IRWXG == stat.S_IRWXG
        Path(target, "after").write_text("made by the pod")
        assert os.stat(Path(target, "after")).st_gid == 4321, "setgid: new files belong to the group"
        assert os.stat(Path(target, "before")).st_gid == 0, "existing files are not walked"
        vol.cap.mount.volume_mount_group = "not-a-gid"
        assert code_of(vol.mount, str(driver.root / "pod2")) is grpc.StatusCode.INVALID_ARGUMENT
        vol.umount(target)
        vol.unstage()
        vol.delete()
    with running_driver(tmp_path / "plain") as driver:
        listed = driver.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=30).capabilities
        assert pb.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP not in [c.rpc.type for c in listed]
        vol = Volume(driver, "plain", mount_capability("ext4"))
        vol.publish()
        vol.stage()
        vol.cap.mount.volume_mount_group = "4321"
        with pytest.raises(grpc.RpcError) as refused:
            vol.mount(str(driver.root / "pod"))
        error: Any = refused.value
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "--volume-mount-group" in (error.details() or "")
        vol.unstage()
        vol.delete()
