"""One regression test per defect the hardening review found, through a running driver
on the local backend (a crash during a copy, and the rbd-only defects, are tested beside
the crash suite and the rbd backend). Each fails without its fix; the numbers are the
review's."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi import loopdev, mount
from csi.backends.local.controller import LocalVolumes
from csi.backends.local.layout import Layout
from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc
from csi.model import AccessMode, AccessType, Capability, VolumeSpec
from tests.support import (
    CAP_SYS_RESOURCE,
    NODE_ID,
    Driver,
    block_capability,
    has_capability,
    mount_capability,
    require_root,
    require_tools,
    wait_for_child,
)
from tests.test_node import Volume

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(autouse=True)
def host() -> None:
    require_root()
    require_tools("losetup", "blkid", "mkfs.ext4", "resize2fs")


def failure(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    error: Any = caught.value
    return error.code(), error.details()


def fill(vol: Volume, size: int) -> None:
    """Real data in the volume's image, so copying it takes a while."""
    with open(vol.image(), "r+b") as image:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            image.write(block)


def wait_for_cp(driver: Driver) -> None:
    """Return once the driver copies an image."""
    assert driver.process is not None
    assert wait_for_child(driver.process.pid, "cp", timeout=30) is not None, "the driver never ran cp"


class InBackground:
    """One call on a thread; ``result`` waits for its answer or its error."""

    def __init__(self, call: Any, request: Any) -> None:
        self.outcome: Any = None
        self.thread = threading.Thread(target=self._run, args=(call, request))
        self.thread.start()

    def _run(self, call: Any, request: Any) -> None:
        try:
            self.outcome = call(request, timeout=120)
        except grpc.RpcError as exc:
            self.outcome = exc

    def result(self) -> Any:
        self.thread.join(120)
        if isinstance(self.outcome, grpc.RpcError):
            raise self.outcome
        return self.outcome


@pytest.fixture
def staged(driver: Driver) -> Iterator[Volume]:
    """A volume staged as ext4 at its staging path; unstaged and deleted afterwards."""
    vol = Volume(driver, "staged", mount_capability("ext4"))
    vol.publish()
    vol.stage()
    yield vol
    vol.unstage()
    vol.delete()


# 2 --------------------------------------------------------------------------------


@pytest.mark.parametrize("copy", ["snapshot", "clone"])
def test_2_delete_while_its_volume_is_copied_is_aborted(driver: Driver, copy: str) -> None:
    vol = Volume(driver, f"source-{copy}", mount_capability(), size=384 * MiB)
    fill(vol, 384 * MiB)
    if copy == "snapshot":
        call: Any = driver.controller.CreateSnapshot
        request: Any = pb.CreateSnapshotRequest(name="copy", source_volume_id=vol.id)
    else:
        call = driver.controller.CreateVolume
        request = pb.CreateVolumeRequest(
            name="copy",
            volume_capabilities=[vol.cap],
            capacity_range={"required_bytes": 384 * MiB},
            volume_content_source=pb.VolumeContentSource(volume={"volume_id": vol.id}),
        )
    copying = InBackground(call, request)
    wait_for_cp(driver)
    code, message = failure(driver.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vol.id))
    assert code is grpc.StatusCode.ABORTED, message
    assert vol.id in message
    made = copying.result()
    if copy == "snapshot":
        driver.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=made.snapshot.snapshot_id), timeout=60)
    else:
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=made.volume.volume_id), timeout=60)
    vol.delete()
    gone = failure(driver.controller.CreateSnapshot, pb.CreateSnapshotRequest(name="late", source_volume_id=vol.id))
    assert gone[0] is grpc.StatusCode.NOT_FOUND, gone


# 3 --------------------------------------------------------------------------------


def test_3_a_volume_deleted_between_scan_and_read_is_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volumes = LocalVolumes(str(tmp_path / "local"), NODE_ID)
    rwo = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
    kept, doomed = (volumes.create_volume(VolumeSpec(n, MiB, 0, (rwo,))) for n in ("kept", "doomed"))
    scan = Layout.ids

    def scan_then_delete(layout: Layout, kind: Any, after: str = "") -> Iterator[str]:
        for local_id in scan(layout, kind, after):
            if local_id == doomed.local_id:
                volumes.delete_volume(local_id)  # by another call, after the scan saw it
            yield local_id

    monkeypatch.setattr(Layout, "ids", scan_then_delete)
    assert [v.local_id for v in volumes.list_volumes()] == [kept.local_id]


# 4 --------------------------------------------------------------------------------


def with_mode(cap: pb.VolumeCapability, number: int) -> pb.VolumeCapability:
    bad = pb.VolumeCapability()
    bad.CopyFrom(cap)
    bad.access_mode.mode = number  # type: ignore[assignment]
    return bad


@pytest.mark.parametrize("number", [99, -1, 8])
def test_4_an_out_of_range_access_mode_is_invalid_in_every_rpc(driver: Driver, tmp_path: Path, number: int) -> None:
    vol = Volume(driver, "enum", mount_capability())
    bad = with_mode(mount_capability(), number)
    path = str(tmp_path / "p")
    calls: list[tuple[Any, Any]] = [
        (driver.controller.CreateVolume, pb.CreateVolumeRequest(name="e", volume_capabilities=[bad])),
        (
            driver.controller.ControllerPublishVolume,
            pb.ControllerPublishVolumeRequest(volume_id=vol.id, node_id=NODE_ID, volume_capability=bad),
        ),
        (
            driver.controller.ValidateVolumeCapabilities,
            pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.id, volume_capabilities=[bad]),
        ),
        (driver.controller.GetCapacity, pb.GetCapacityRequest(volume_capabilities=[bad])),
        (
            driver.controller.ControllerExpandVolume,
            pb.ControllerExpandVolumeRequest(
                volume_id=vol.id, capacity_range={"required_bytes": 128 * MiB}, volume_capability=bad
            ),
        ),
        (
            driver.node.NodeStageVolume,
            pb.NodeStageVolumeRequest(volume_id=vol.id, staging_target_path=path, volume_capability=bad),
        ),
        (
            driver.node.NodePublishVolume,
            pb.NodePublishVolumeRequest(
                volume_id=vol.id, staging_target_path=path, target_path=path + "t", volume_capability=bad
            ),
        ),
        (
            driver.node.NodeExpandVolume,
            pb.NodeExpandVolumeRequest(volume_id=vol.id, volume_path=path, volume_capability=bad),
        ),
    ]
    for call, request in calls:
        code, message = failure(call, request)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (type(request).__name__, message)
        assert f"access_mode.mode {number}" in message
    assert (
        driver.controller.ControllerGetVolume(
            pb.ControllerGetVolumeRequest(volume_id=vol.id), timeout=30
        ).volume.capacity_bytes
        == 64 * MiB
    ), "nothing was expanded"
    vol.delete()


# 5 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        mount_capability("ext4", "SINGLE_NODE_READER_ONLY"),
        pb.VolumeCapability(
            mount={"fs_type": "ext4", "mount_flags": ["noatime"]}, access_mode={"mode": "SINGLE_NODE_WRITER"}
        ),
    ],
    ids=["read-only", "mount-flag"],
)
def test_5_restaging_with_another_capability_is_already_exists(staged: Volume, other: pb.VolumeCapability) -> None:
    staged.stage()  # the same capability again is fine
    request = pb.NodeStageVolumeRequest(
        volume_id=staged.id, staging_target_path=staged.staging, volume_capability=other, publish_context=staged.context
    )
    code, message = failure(staged.driver.node.NodeStageVolume, request)
    assert code is grpc.StatusCode.ALREADY_EXISTS, message
    entry = mount.find_mount(staged.staging)
    assert entry is not None and "rw" in entry.options and "noatime" not in entry.options


# 6 and 8 --------------------------------------------------------------------------


HOSTILE_PATHS = {
    "relative": "relative/staging",
    "dot-dot": "/var/lib/../../etc/cairn",
    "too-long": "/" + "x" * 5000,
    "too-deep": "/d" * 2000,
    "long-name": "/" + "n" * 300,
    "nul": "/tmp/with\0nul",
}


@pytest.mark.parametrize("kind", HOSTILE_PATHS)
def test_6_8_paths_the_host_cannot_take_are_invalid(driver: Driver, kind: str) -> None:
    hostile = HOSTILE_PATHS[kind]
    vol = Volume(driver, "paths", mount_capability())
    vol.publish()
    before = set(os.listdir(os.getcwd()))
    stage = pb.NodeStageVolumeRequest(volume_id=vol.id, staging_target_path=hostile, volume_capability=vol.cap)
    assert failure(driver.node.NodeStageVolume, stage)[0] is grpc.StatusCode.INVALID_ARGUMENT
    unstage = pb.NodeUnstageVolumeRequest(volume_id=vol.id, staging_target_path=hostile)
    assert failure(driver.node.NodeUnstageVolume, unstage)[0] is grpc.StatusCode.INVALID_ARGUMENT
    vol.stage()
    publish = pb.NodePublishVolumeRequest(
        volume_id=vol.id, staging_target_path=vol.staging, target_path=hostile, volume_capability=vol.cap
    )
    assert failure(driver.node.NodePublishVolume, publish)[0] is grpc.StatusCode.INVALID_ARGUMENT
    unpublish = pb.NodeUnpublishVolumeRequest(volume_id=vol.id, target_path=hostile)
    if kind in ("relative", "dot-dot"):
        assert failure(driver.node.NodeUnpublishVolume, unpublish)[0] is grpc.StatusCode.INVALID_ARGUMENT
    else:  # a path that cannot exist has nothing published at it
        driver.node.NodeUnpublishVolume(unpublish, timeout=30)
    stats = pb.NodeGetVolumeStatsRequest(volume_id=vol.id, volume_path=hostile)
    assert failure(driver.node.NodeGetVolumeStats, stats)[0] is grpc.StatusCode.NOT_FOUND  # nothing is there
    assert set(os.listdir(os.getcwd())) == before, "a relative path reached the driver's working directory"
    vol.unstage()
    vol.delete()


def test_8_unparseable_mkfs_options_of_a_static_volume_are_invalid(driver: Driver) -> None:
    vol = Volume(driver, "static", mount_capability())
    vol.publish()
    request = pb.NodeStageVolumeRequest(
        volume_id=vol.id,
        staging_target_path=vol.staging,
        volume_capability=vol.cap,
        volume_context={"mkfsOptions": "-E 'unclosed"},
    )
    code, message = failure(driver.node.NodeStageVolume, request)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "mkfsOptions" in message
    assert loopdev.find(vol.image()) == [] and not os.path.exists(vol.staging)
    vol.delete()


def test_mkfs_options_the_tool_refuses_are_invalid(driver: Driver) -> None:
    vol = Volume(driver, "refused", mount_capability())
    vol.publish()
    request = pb.NodeStageVolumeRequest(
        volume_id=vol.id,
        staging_target_path=vol.staging,
        volume_capability=vol.cap,
        publish_context=vol.context,
        volume_context={"mkfsOptions": "--nonsense"},
    )
    try:
        code, message = failure(driver.node.NodeStageVolume, request)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {message}"
        assert loopdev.find(vol.image()) == [] and not os.path.exists(vol.staging)
    finally:
        vol.delete()


# 7 --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1 << 45, 1 << 62, (1 << 63) - 1])
def test_7_expanding_beyond_what_the_backend_has_is_out_of_range(driver: Driver, size: int) -> None:
    vol = Volume(driver, "huge", mount_capability())
    request = pb.ControllerExpandVolumeRequest(volume_id=vol.id, capacity_range={"required_bytes": size})
    code, message = failure(driver.controller.ControllerExpandVolume, request)
    assert code is grpc.StatusCode.OUT_OF_RANGE, message
    assert vol.id in message
    assert os.stat(vol.image()).st_size == 64 * MiB
    vol.delete()


# 9 --------------------------------------------------------------------------------


def test_9_unstaging_another_path_changes_nothing(staged: Volume, tmp_path: Path) -> None:
    device = loopdev.find(staged.image())
    staged.driver.node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=staged.id, staging_target_path=str(tmp_path / "elsewhere")), timeout=60
    )
    assert loopdev.find(staged.image()) == device and mount.is_mounted(staged.staging)
    target = str(tmp_path / "pod")
    staged.mount(target)  # the record survived: publishing from the real path works
    staged.umount(target)


# 10 -------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["file", "directory"])
def test_10_unpublishing_a_never_published_volume_keeps_what_was_there(
    driver: Driver, tmp_path: Path, what: str
) -> None:
    vol = Volume(driver, "never", block_capability())
    target = tmp_path / "target"
    if what == "file":
        target.write_text("someone else's")
    else:
        target.mkdir()
    driver.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=vol.id, target_path=str(target)), timeout=30
    )
    assert target.exists()
    vol.delete()


def test_10_unstaging_a_never_staged_volume_keeps_a_foreign_mount(driver: Driver, tmp_path: Path) -> None:
    vol = Volume(driver, "never-staged", mount_capability())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(foreign)], check=True)
    try:
        driver.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=vol.id, staging_target_path=str(foreign)), timeout=30
        )
        assert mount.is_mounted(str(foreign))
    finally:
        mount.unmount(str(foreign))
    vol.delete()


# 11 -------------------------------------------------------------------------------


def test_11_huge_fields_are_not_echoed_whole(shared_driver: Driver) -> None:
    huge = "v" * (1 << 20)
    options = [("grpc.max_metadata_size", 16 << 10)]
    with grpc.insecure_channel(f"unix://{shared_driver.socket}", options=options) as channel:
        stub = pb_grpc.ControllerStub(channel)
        for call, request, code in [
            (stub.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=huge), grpc.StatusCode.NOT_FOUND),
            (stub.CreateSnapshot, pb.CreateSnapshotRequest(name="s", source_volume_id=huge), grpc.StatusCode.NOT_FOUND),
            (
                stub.CreateVolume,
                pb.CreateVolumeRequest(name="n", volume_capabilities=[mount_capability()], parameters={huge: "x"}),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]:
            got, message = failure(call, request)
            assert got is code, message[:300]
            assert len(message) < 4096 and "vvvv" in message


# 12 -------------------------------------------------------------------------------


def test_12_online_ext4_growth_the_kernel_refuses_is_failed_precondition(staged: Volume, tmp_path: Path) -> None:
    if has_capability(CAP_SYS_RESOURCE):
        pytest.skip("this host grows ext4 online; the refusal happens only without CAP_SYS_RESOURCE")
    driver = staged.driver
    driver.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(volume_id=staged.id, capacity_range={"required_bytes": 128 * MiB}), timeout=60
    )
    request = pb.NodeExpandVolumeRequest(volume_id=staged.id, volume_path=staged.staging)
    code, message = failure(driver.node.NodeExpandVolume, request)
    assert code is grpc.StatusCode.FAILED_PRECONDITION, message
    assert "cannot grow while mounted" in message
    staged.unstage()
    staged.stage()  # grown offline at the next stage
    assert os.statvfs(staged.staging).f_blocks * os.statvfs(staged.staging).f_frsize > 100 * MiB


# found by the fuzzer ----------------------------------------------------------------


def test_a_file_in_the_way_of_a_path_is_invalid(staged: Volume, tmp_path: Path) -> None:
    driver = staged.driver
    a_file = tmp_path / "a-file"
    a_file.write_text("someone else's")
    for target in (a_file, a_file / "below"):
        publish = pb.NodePublishVolumeRequest(
            volume_id=staged.id,
            staging_target_path=staged.staging,
            target_path=str(target),
            volume_capability=staged.cap,
        )
        code, message = failure(driver.node.NodePublishVolume, publish)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "target_path" in message, message
    other = Volume(driver, "other", mount_capability())
    other.publish()
    stage = pb.NodeStageVolumeRequest(
        volume_id=other.id, staging_target_path=str(a_file), volume_capability=other.cap, publish_context=other.context
    )
    code, message = failure(driver.node.NodeStageVolume, stage)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "staging_target_path" in message, message
    assert a_file.read_text() == "someone else's" and loopdev.find(other.image()) == []
    other.delete()


def test_control_characters_in_names_and_contexts_are_invalid(driver: Driver, tmp_path: Path) -> None:
    for name in ("a\0c", "tab\there"):
        create = pb.CreateVolumeRequest(name=name, volume_capabilities=[mount_capability()])
        assert failure(driver.controller.CreateVolume, create)[0] is grpc.StatusCode.INVALID_ARGUMENT
    vol = Volume(driver, "context", mount_capability())
    stage = pb.NodeStageVolumeRequest(
        volume_id=vol.id,
        staging_target_path=str(tmp_path / "s"),
        volume_capability=vol.cap,
        publish_context={"monitors": "\0"},
    )
    code, message = failure(driver.node.NodeStageVolume, stage)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "publish_context" in message
    stats = pb.NodeGetVolumeStatsRequest(volume_id=vol.id, volume_path="/", staging_target_path="relative")
    assert failure(driver.node.NodeGetVolumeStats, stats)[0] is grpc.StatusCode.INVALID_ARGUMENT
    vol.delete()
