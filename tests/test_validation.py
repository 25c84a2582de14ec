"""Bad input, swept over every RPC of a running driver: each answer carries the spec's
code and a message that names the field or object at fault."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from csi.generated import csi_pb2 as pb
from tests.support import Driver, block_capability, mount_capability

GARBAGE = "not-a-cairn-id"
WELL_FORMED_MISSING = "1:local:vol-00000000-0000-5000-8000-000000000000"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
RWO = mount_capability()
NO_MODE = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume())
NO_TYPE = pb.VolumeCapability(access_mode=RWO.access_mode)


def create(**fields: Any) -> pb.CreateVolumeRequest:
    request = pb.CreateVolumeRequest(name="pvc-x", volume_capabilities=[RWO])
    for key, value in fields.items():
        if key == "volume_capabilities":
            del request.volume_capabilities[:]
            request.volume_capabilities.extend(value)
        elif key == "parameters":
            request.parameters.update(value)
        else:
            if isinstance(value, pb.CapacityRange):
                request.capacity_range.CopyFrom(value)
            else:
                setattr(request, key, value)
    return request


CASES: list[tuple[str, str, Any, grpc.StatusCode, str]] = [
    # CreateVolume
    ("controller", "CreateVolume", pb.CreateVolumeRequest(volume_capabilities=[RWO]), INVALID, "name is required"),
    ("controller", "CreateVolume", create(volume_capabilities=[]), INVALID, "volume_capabilities is required"),
    (
        "controller",
        "CreateVolume",
        create(volume_capabilities=[NO_MODE]),
        INVALID,
        "volume_capabilities[0].access_mode",
    ),
    (
        "controller",
        "CreateVolume",
        create(volume_capabilities=[NO_TYPE]),
        INVALID,
        "volume_capabilities[0].access_type",
    ),
    ("controller", "CreateVolume", create(capacity_range=pb.CapacityRange(required_bytes=-1)), INVALID, "negative"),
    (
        "controller",
        "CreateVolume",
        create(capacity_range=pb.CapacityRange(required_bytes=9, limit_bytes=5)),
        INVALID,
        "exceeds limit_bytes",
    ),
    ("controller", "CreateVolume", create(parameters={"colour": "blue"}), INVALID, "unknown parameter 'colour'"),
    ("controller", "CreateVolume", create(parameters={"backend": "nope"}), INVALID, "backend 'nope' is not configured"),
    (
        "controller",
        "CreateVolume",
        create(parameters={"fsType": "ntfs"}),
        INVALID,
        "filesystem 'ntfs' is not supported",
    ),
    (
        "controller",
        "CreateVolume",
        create(parameters={"mkfsOptions": "'unclosed"}),
        INVALID,
        "'mkfsOptions' does not parse",
    ),
    (
        "controller",
        "CreateVolume",
        create(volume_capabilities=[mount_capability("ntfs")]),
        INVALID,
        "filesystem 'ntfs'",
    ),
    (
        "controller",
        "CreateVolume",
        create(parameters={"preallocate": "maybe"}),
        INVALID,
        "'preallocate' must be true or false",
    ),
    (
        "controller",
        "CreateVolume",
        create(volume_capabilities=[block_capability("MULTI_NODE_MULTI_WRITER")]),
        INVALID,
        "cannot offer MULTI_NODE_MULTI_WRITER",
    ),
    (
        "controller",
        "CreateVolume",
        pb.CreateVolumeRequest(name="x", volume_capabilities=[RWO], mutable_parameters={"iops": "5"}),
        INVALID,
        "mutable_parameters",
    ),
    (
        "controller",
        "CreateVolume",
        pb.CreateVolumeRequest(
            name="x", volume_capabilities=[RWO], volume_content_source={"snapshot": {"snapshot_id": GARBAGE}}
        ),
        NOT_FOUND,
        f"snapshot '{GARBAGE}'",
    ),
    (
        "controller",
        "CreateVolume",
        pb.CreateVolumeRequest(
            name="x", volume_capabilities=[RWO], volume_content_source={"volume": {"volume_id": WELL_FORMED_MISSING}}
        ),
        NOT_FOUND,
        "source volume",
    ),
    # DeleteVolume, publish, validate
    ("controller", "DeleteVolume", pb.DeleteVolumeRequest(), INVALID, "volume_id is required"),
    ("controller", "ControllerPublishVolume", pb.ControllerPublishVolumeRequest(), INVALID, "volume_id is required"),
    (
        "controller",
        "ControllerPublishVolume",
        pb.ControllerPublishVolumeRequest(volume_id=GARBAGE),
        INVALID,
        "node_id is required",
    ),
    (
        "controller",
        "ControllerPublishVolume",
        pb.ControllerPublishVolumeRequest(volume_id=GARBAGE, node_id="n"),
        INVALID,
        "volume_capability is required",
    ),
    (
        "controller",
        "ControllerPublishVolume",
        pb.ControllerPublishVolumeRequest(volume_id=GARBAGE, node_id="n", volume_capability=RWO),
        NOT_FOUND,
        GARBAGE,
    ),
    (
        "controller",
        "ControllerPublishVolume",
        pb.ControllerPublishVolumeRequest(volume_id=WELL_FORMED_MISSING, node_id="n", volume_capability=RWO),
        NOT_FOUND,
        "vol-00000000",
    ),
    (
        "controller",
        "ControllerUnpublishVolume",
        pb.ControllerUnpublishVolumeRequest(),
        INVALID,
        "volume_id is required",
    ),
    (
        "controller",
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(),
        INVALID,
        "volume_id is required",
    ),
    (
        "controller",
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(volume_id=GARBAGE),
        INVALID,
        "volume_capabilities is required",
    ),
    (
        "controller",
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(volume_id=GARBAGE, volume_capabilities=[RWO]),
        NOT_FOUND,
        GARBAGE,
    ),
    (
        "controller",
        "ListVolumes",
        pb.ListVolumesRequest(starting_token="bogus"),
        grpc.StatusCode.ABORTED,
        "starting_token 'bogus'",
    ),
    ("controller", "ListVolumes", pb.ListVolumesRequest(max_entries=-1), INVALID, "max_entries"),
    ("controller", "GetCapacity", pb.GetCapacityRequest(parameters={"backend": "nope"}), INVALID, "backend 'nope'"),
    (
        "controller",
        "GetCapacity",
        pb.GetCapacityRequest(volume_capabilities=[NO_MODE]),
        INVALID,
        "volume_capabilities[0].access_mode",
    ),
    ("controller", "ControllerExpandVolume", pb.ControllerExpandVolumeRequest(), INVALID, "volume_id is required"),
    (
        "controller",
        "ControllerExpandVolume",
        pb.ControllerExpandVolumeRequest(volume_id=GARBAGE),
        INVALID,
        "capacity_range is required",
    ),
    (
        "controller",
        "ControllerExpandVolume",
        pb.ControllerExpandVolumeRequest(volume_id=GARBAGE, capacity_range={"required_bytes": 1}),
        NOT_FOUND,
        GARBAGE,
    ),
    ("controller", "ControllerGetVolume", pb.ControllerGetVolumeRequest(), INVALID, "volume_id is required"),
    (
        "controller",
        "ControllerGetVolume",
        pb.ControllerGetVolumeRequest(volume_id=WELL_FORMED_MISSING),
        NOT_FOUND,
        "vol-00000000",
    ),
    (
        "controller",
        "ControllerModifyVolume",
        pb.ControllerModifyVolumeRequest(volume_id=GARBAGE),
        grpc.StatusCode.UNIMPLEMENTED,
        "ControllerModifyVolume",
    ),
    # snapshots
    ("controller", "CreateSnapshot", pb.CreateSnapshotRequest(), INVALID, "name is required"),
    ("controller", "CreateSnapshot", pb.CreateSnapshotRequest(name="s"), INVALID, "source_volume_id is required"),
    ("controller", "CreateSnapshot", pb.CreateSnapshotRequest(name="s", source_volume_id=GARBAGE), NOT_FOUND, GARBAGE),
    (
        "controller",
        "CreateSnapshot",
        pb.CreateSnapshotRequest(name="s", source_volume_id=WELL_FORMED_MISSING),
        NOT_FOUND,
        "vol-00000000",
    ),
    ("controller", "DeleteSnapshot", pb.DeleteSnapshotRequest(), INVALID, "snapshot_id is required"),
    ("controller", "GetSnapshot", pb.GetSnapshotRequest(), INVALID, "snapshot_id is required"),
    ("controller", "GetSnapshot", pb.GetSnapshotRequest(snapshot_id=GARBAGE), NOT_FOUND, GARBAGE),
    (
        "controller",
        "ListSnapshots",
        pb.ListSnapshotsRequest(starting_token="bogus"),
        grpc.StatusCode.ABORTED,
        "starting_token",
    ),
    # node
    ("node", "NodeStageVolume", pb.NodeStageVolumeRequest(), INVALID, "volume_id is required"),
    (
        "node",
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(volume_id=GARBAGE),
        INVALID,
        "staging_target_path is required",
    ),
    (
        "node",
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(volume_id=GARBAGE, staging_target_path="/s"),
        INVALID,
        "volume_capability is required",
    ),
    (
        "node",
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(volume_id=GARBAGE, staging_target_path="/s", volume_capability=NO_TYPE),
        INVALID,
        "volume_capability.access_type",
    ),
    (
        "node",
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(volume_id=GARBAGE, staging_target_path="/s", volume_capability=RWO),
        NOT_FOUND,
        GARBAGE,
    ),
    ("node", "NodeUnstageVolume", pb.NodeUnstageVolumeRequest(), INVALID, "volume_id is required"),
    (
        "node",
        "NodeUnstageVolume",
        pb.NodeUnstageVolumeRequest(volume_id=GARBAGE),
        INVALID,
        "staging_target_path is required",
    ),
    ("node", "NodePublishVolume", pb.NodePublishVolumeRequest(), INVALID, "volume_id is required"),
    ("node", "NodePublishVolume", pb.NodePublishVolumeRequest(volume_id=GARBAGE), INVALID, "target_path is required"),
    (
        "node",
        "NodePublishVolume",
        pb.NodePublishVolumeRequest(volume_id=GARBAGE, target_path="/t"),
        INVALID,
        "volume_capability is required",
    ),
    (
        "node",
        "NodePublishVolume",
        pb.NodePublishVolumeRequest(volume_id=GARBAGE, target_path="/t", volume_capability=RWO),
        INVALID,
        "staging_target_path is required",
    ),
    (
        "node",
        "NodePublishVolume",
        pb.NodePublishVolumeRequest(
            volume_id=WELL_FORMED_MISSING, target_path="/t", staging_target_path="/s", volume_capability=RWO
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "is not staged at /s",
    ),
    (
        "node",
        "NodePublishVolume",
        pb.NodePublishVolumeRequest(
            volume_id=WELL_FORMED_MISSING,
            target_path="/t",
            staging_target_path="/s",
            readonly=True,
            volume_capability=pb.VolumeCapability(
                mount=pb.VolumeCapability.MountVolume(mount_flags=["x" * (1 << 20)]),
                access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
            ),
        ),
        INVALID,
        "volume_capability.mount.mount_flags hold 1048576 bytes; the kernel takes at most 4095",
    ),
    (
        "node",
        "NodeStageVolume",
        pb.NodeStageVolumeRequest(
            volume_id=WELL_FORMED_MISSING,
            staging_target_path="/s",
            volume_capability=pb.VolumeCapability(
                mount=pb.VolumeCapability.MountVolume(mount_flags=["noatime", "a\0b"]),
                access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
            ),
        ),
        INVALID,
        "volume_capability.mount.mount_flags must not hold a NUL byte",
    ),
    ("node", "NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(), INVALID, "volume_id is required"),
    (
        "node",
        "NodeUnpublishVolume",
        pb.NodeUnpublishVolumeRequest(volume_id=GARBAGE),
        INVALID,
        "target_path is required",
    ),
    ("node", "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(), INVALID, "volume_id is required"),
    ("node", "NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id=GARBAGE), INVALID, "volume_path is required"),
    (
        "node",
        "NodeGetVolumeStats",
        pb.NodeGetVolumeStatsRequest(volume_id=GARBAGE, volume_path="/"),
        NOT_FOUND,
        GARBAGE,
    ),
    (
        "node",
        "NodeGetVolumeStats",
        pb.NodeGetVolumeStatsRequest(volume_id=WELL_FORMED_MISSING, volume_path="/nonexistent/x"),
        NOT_FOUND,
        "/nonexistent/x",
    ),
    ("node", "NodeExpandVolume", pb.NodeExpandVolumeRequest(), INVALID, "volume_id is required"),
    ("node", "NodeExpandVolume", pb.NodeExpandVolumeRequest(volume_id=GARBAGE), INVALID, "volume_path is required"),
    (
        "node",
        "NodeExpandVolume",
        pb.NodeExpandVolumeRequest(volume_id=WELL_FORMED_MISSING, volume_path="/"),
        NOT_FOUND,
        "not staged",
    ),
]


@pytest.mark.parametrize(
    ("service", "rpc", "request_message", "code", "fragment"),
    CASES,
    ids=[f"{rpc}-{i}" for i, (_, rpc, *_rest) in enumerate(CASES)],
)
def test_bad_input_gets_the_spec_code_and_a_clear_message(
    shared_driver: Driver, service: str, rpc: str, request_message: Any, code: grpc.StatusCode, fragment: str
) -> None:
    stub = getattr(shared_driver, service)
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, rpc)(request_message, timeout=30)
    error: Any = caught.value
    assert error.code() == code, error.details()
    assert fragment in error.details()


def test_bad_input_creates_nothing(driver: Driver) -> None:
    for _, rpc, request, *_ in CASES:
        if rpc == "CreateVolume":
            with pytest.raises(grpc.RpcError):
                driver.controller.CreateVolume(request, timeout=30)
    assert list(driver.controller.ListVolumes(pb.ListVolumesRequest(), timeout=30).entries) == []
    images = list((driver.data / "volumes").iterdir())
    assert images == []


@pytest.mark.parametrize(
    ("rpc", "request_message"),
    [
        ("DeleteVolume", pb.DeleteVolumeRequest(volume_id=GARBAGE)),
        ("DeleteVolume", pb.DeleteVolumeRequest(volume_id=WELL_FORMED_MISSING)),
        ("DeleteVolume", pb.DeleteVolumeRequest(volume_id="1:local:../../etc")),
        ("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=GARBAGE)),
        ("ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(volume_id=WELL_FORMED_MISSING, node_id="n")),
    ],
)
def test_removing_what_does_not_exist_succeeds(shared_driver: Driver, rpc: str, request_message: Any) -> None:
    getattr(shared_driver.controller, rpc)(request_message, timeout=30)


def test_unknown_ids_list_nothing(shared_driver: Driver) -> None:
    by_id = shared_driver.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=GARBAGE), timeout=30)
    by_source = shared_driver.controller.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=GARBAGE), timeout=30)
    assert list(by_id.entries) == [] and list(by_source.entries) == []


def test_secrets_never_reach_the_log(driver: Driver) -> None:
    request = create(volume_capabilities=[NO_MODE])
    request.secrets["userKey"] = "AQD-super-secret-key=="
    with pytest.raises(grpc.RpcError):
        driver.controller.CreateVolume(request, timeout=30)
    log = driver.log.read_text()
    assert "CreateVolume" in log
    assert "AQD-super-secret-key" not in log
    assert "***stripped***" in log


def test_xfs_volumes_get_the_size_xfs_needs(shared_driver: Driver) -> None:
    small = pb.CreateVolumeRequest(
        name="small-xfs", volume_capabilities=[mount_capability("xfs")], capacity_range={"required_bytes": 64 << 20}
    )
    volume = shared_driver.controller.CreateVolume(small, timeout=30).volume
    assert volume.capacity_bytes == 300 << 20
    capped = pb.CreateVolumeRequest(
        name="capped-xfs",
        volume_capabilities=[RWO],
        parameters={"fsType": "xfs"},
        capacity_range={"required_bytes": 64 << 20, "limit_bytes": 100 << 20},
    )
    with pytest.raises(grpc.RpcError) as caught:
        shared_driver.controller.CreateVolume(capped, timeout=30)
    error: Any = caught.value
    assert error.code() is grpc.StatusCode.OUT_OF_RANGE and "XFS needs at least" in error.details()
    shared_driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=30)
