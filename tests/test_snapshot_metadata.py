"""The SnapshotMetadata service through a running driver on the local backend: the
allocated ranges of a snapshot and the ranges changed between two, split as the caller
asks, resumable from an offset, and the spec's codes for bad requests."""

from __future__ import annotations

import os
from collections.abc import Iterable

import grpc
import pytest

from csi.generated import csi_pb2 as pb
from tests.support import NODE_ID, Driver, mount_capability

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 16 * MiB
BLOCK = 64 * 1024


def create(driver: Driver, name: str) -> tuple[str, str]:
    """A volume's ID and the path of its image (from its publish context)."""
    volume = driver.controller.CreateVolume(
        pb.CreateVolumeRequest(
            name=name, capacity_range=pb.CapacityRange(required_bytes=SIZE), volume_capabilities=[mount_capability()]
        )
    ).volume
    context = driver.controller.ControllerPublishVolume(
        pb.ControllerPublishVolumeRequest(
            volume_id=volume.volume_id, node_id=NODE_ID, volume_capability=mount_capability()
        )
    ).publish_context
    return volume.volume_id, context["image"]


def write(image: str, offset: int, data: bytes) -> None:
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot(driver: Driver, name: str, volume_id: str) -> str:
    request = pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id)
    made: pb.Snapshot = driver.controller.CreateSnapshot(request).snapshot
    return made.snapshot_id


def ranges(responses: Iterable[pb.GetMetadataAllocatedResponse | pb.GetMetadataDeltaResponse]) -> list[tuple[int, int]]:
    found = []
    for response in responses:
        assert response.block_metadata_type == pb.VARIABLE_LENGTH
        assert response.volume_capacity_bytes == SIZE
        found += [(b.byte_offset, b.size_bytes) for b in response.block_metadata]
    ends = [offset + size for offset, size in found]
    assert all(end <= start for end, (start, _) in zip(ends, found[1:], strict=False)), "ranges overlap or go back"
    return found


def covers(found: list[tuple[int, int]], offset: int, length: int) -> bool:
    return all(any(o <= byte < o + s for o, s in found) for byte in range(offset, offset + length, 512))


def code_of(call: Iterable[object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    code: grpc.StatusCode = caught.value.code()
    return code


def test_the_plugin_advertises_the_service(driver: Driver) -> None:
    capabilities = driver.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in capabilities if c.HasField("service")}
    assert pb.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE in services


def test_allocated_ranges_cover_the_data_and_little_else(driver: Driver) -> None:
    volume_id, image = create(driver, "allocated")
    write(image, 0, b"a" * 4096)
    write(image, 5 * MiB + 100, b"b" * (3 * BLOCK))
    write(image, SIZE - 4096, b"c" * 4096)
    snap = snapshot(driver, "allocated-1", volume_id)

    found = ranges(driver.snapshot_metadata.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=snap)))
    assert covers(found, 0, 4096) and covers(found, 5 * MiB + 100, 3 * BLOCK) and covers(found, SIZE - 4096, 4096)
    assert sum(size for _, size in found) <= 2 * MiB, f"holes reported as data: {found}"

    one_each = list(
        driver.snapshot_metadata.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=snap, max_results=1))
    )
    assert all(len(m.block_metadata) == 1 for m in one_each)
    assert ranges(one_each) == found

    # Resuming after the first range gives the rest, and nothing that ends before it.
    resume = found[0][0] + found[0][1]
    rest = ranges(
        driver.snapshot_metadata.GetMetadataAllocated(
            pb.GetMetadataAllocatedRequest(snapshot_id=snap, starting_offset=resume)
        )
    )
    assert rest == found[1:]
    middle = found[1][0] + 10
    cut = ranges(
        driver.snapshot_metadata.GetMetadataAllocated(
            pb.GetMetadataAllocatedRequest(snapshot_id=snap, starting_offset=middle)
        )
    )
    assert cut[0][0] + cut[0][1] > middle and cut[0][0] <= middle


def test_delta_ranges_cover_what_changed_between_two_snapshots(driver: Driver) -> None:
    volume_id, image = create(driver, "delta")
    write(image, 0, os.urandom(4 * MiB))
    base = snapshot(driver, "delta-1", volume_id)
    write(image, MiB + 7, b"changed")
    write(image, 10 * MiB, b"new data in a hole")
    target = snapshot(driver, "delta-2", volume_id)

    found = ranges(
        driver.snapshot_metadata.GetMetadataDelta(
            pb.GetMetadataDeltaRequest(base_snapshot_id=base, target_snapshot_id=target)
        )
    )
    assert covers(found, MiB + 7, 7) and covers(found, 10 * MiB, 18)
    assert sum(size for _, size in found) <= 4 * BLOCK, f"unchanged data reported as changed: {found}"


def test_bad_requests_get_the_codes_of_the_spec(driver: Driver) -> None:
    volume_id, image = create(driver, "errors")
    write(image, 0, b"x")
    snap = snapshot(driver, "errors-1", volume_id)
    other_volume, _ = create(driver, "errors-other")
    other = snapshot(driver, "errors-2", other_volume)
    service = driver.snapshot_metadata
    request = pb.GetMetadataAllocatedRequest
    assert code_of(service.GetMetadataAllocated(request())) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(service.GetMetadataAllocated(request(snapshot_id="1:local:nope"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(service.GetMetadataAllocated(request(snapshot_id="garbage"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(service.GetMetadataAllocated(request(snapshot_id=snap, starting_offset=-1))) == (
        grpc.StatusCode.OUT_OF_RANGE
    )
    assert code_of(service.GetMetadataAllocated(request(snapshot_id=snap, starting_offset=SIZE + 1))) == (
        grpc.StatusCode.OUT_OF_RANGE
    )
    assert code_of(service.GetMetadataAllocated(request(snapshot_id=snap, max_results=-1))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    delta = pb.GetMetadataDeltaRequest
    assert code_of(service.GetMetadataDelta(delta(base_snapshot_id=snap))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(service.GetMetadataDelta(delta(base_snapshot_id=snap, target_snapshot_id=other))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    # At the end of the snapshot: a valid offset with nothing after it.
    assert list(service.GetMetadataAllocated(request(snapshot_id=snap, starting_offset=SIZE))) == []
