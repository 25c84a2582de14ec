"""What the fake does beyond the shared contract, which the service tests rely on: a pool
of limited size, free space that lies on request, and declarations it honours."""

from __future__ import annotations

import pytest

from csi.backends.base import Capabilities, Expansion
from csi.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, ResourceExhausted, Unimplemented
from csi.model import AccessMode, AccessType, MiB, SourceRef, VolumeSpec
from tests.contract.conftest import RWO
from tests.fakes import FAKE_CAPABILITIES, FakeVolumes, fake_backend, fake_volumes

pytestmark = pytest.mark.unit


def spec(name: str, size: int = 8 * MiB, source: SourceRef | None = None, **parameters: str) -> VolumeSpec:
    return VolumeSpec(name, size, 0, (RWO,), parameters, source)


def test_free_space_shrinks_as_volumes_and_snapshots_are_made() -> None:
    volumes = FakeVolumes(size_limit=32 * MiB)
    assert volumes.free_bytes() == volumes.max_volume_bytes() == 32 * MiB
    volume = volumes.create_volume(spec("a", 8 * MiB))
    assert volumes.free_bytes() == 24 * MiB
    snapshot = volumes.create_snapshot("s", volume.local_id, {})
    assert volumes.free_bytes() == 16 * MiB
    volumes.delete_volume(volume.local_id)
    assert volumes.free_bytes() == 24 * MiB, "the snapshot keeps its space after its source is gone"
    volumes.delete_snapshot(snapshot.local_id)
    assert volumes.free_bytes() == 32 * MiB


def test_a_full_pool_is_resource_exhausted_and_keeps_nothing() -> None:
    volumes = FakeVolumes(size_limit=16 * MiB)
    volume = volumes.create_volume(spec("a", 12 * MiB))
    with pytest.raises(ResourceExhausted):
        volumes.create_volume(spec("b", 8 * MiB))
    with pytest.raises(ResourceExhausted):
        volumes.create_snapshot("s", volume.local_id, {})
    with pytest.raises(OutOfRange):
        volumes.expand_volume(volume.local_id, 24 * MiB, 0)
    assert volumes.list_volumes() == [volume] and volumes.list_snapshots() == []
    assert volumes.get_volume(volume.local_id).capacity_bytes == 12 * MiB
    assert volumes.expand_volume(volume.local_id, 16 * MiB, 0) == 16 * MiB, "growing into the last free byte"


def test_reported_free_space_can_differ_from_the_truth() -> None:
    volumes = FakeVolumes(size_limit=4 * MiB, reports_free=1 << 40)
    assert volumes.free_bytes() == 1 << 40
    with pytest.raises(ResourceExhausted):
        volumes.create_volume(spec("a", 8 * MiB))


def test_undeclared_parameters_never_reach_it() -> None:
    volumes = FakeVolumes(volume_parameters={"tier"}, snapshot_parameters={"retention"})
    volume = volumes.create_volume(spec("a", tier="gold"))
    with pytest.raises(InvalidArgument, match="'pool'"):
        volumes.create_volume(spec("b", pool="x"))
    with pytest.raises(InvalidArgument, match="'tier'"):
        volumes.create_snapshot("s", volume.local_id, {"tier": "x"})
    volumes.delete_volume(volume.local_id)


def test_nodes_that_cannot_reach_it_are_not_found() -> None:
    volumes = FakeVolumes(nodes={"n1"})
    volume = volumes.create_volume(spec("a"))
    assert volumes.publish_volume(volume.local_id, "n1", RWO, False) == {"volume": volume.local_id}
    with pytest.raises(NotFound):
        volumes.publish_volume(volume.local_id, "n2", RWO, False)
    volumes.unpublish_volume(volume.local_id, "n1")
    volumes.delete_volume(volume.local_id)


def test_it_does_only_what_it_declares() -> None:
    plain = Capabilities(
        access={AccessType.MOUNT: frozenset({AccessMode.SINGLE_NODE_WRITER})},
        snapshots=False,
        clones=False,
        expansion=Expansion.NONE,
    )
    volumes = fake_volumes(fake_backend("plain", capabilities=plain))
    volume = volumes.create_volume(spec("a"))
    with pytest.raises(Unimplemented):
        volumes.create_snapshot("s", volume.local_id, {})
    with pytest.raises(Unimplemented):
        volumes.create_volume(spec("clone", source=SourceRef("volume", volume.local_id)))
    with pytest.raises(Unimplemented):
        volumes.create_volume(spec("restored", source=SourceRef("snapshot", "snap-x")))
    with pytest.raises(Unimplemented):
        volumes.expand_volume(volume.local_id, 16 * MiB, 0)
    assert volumes.list_volumes() == [volume] and volumes.list_snapshots() == []
    volumes.delete_volume(volume.local_id)


def test_offline_expansion_refuses_a_published_volume() -> None:
    offline = Capabilities(access=FAKE_CAPABILITIES.access, expansion=Expansion.OFFLINE)
    volumes = FakeVolumes(capabilities=offline)
    volume = volumes.create_volume(spec("a"))
    volumes.publish_volume(volume.local_id, "n1", RWO, False)
    with pytest.raises(FailedPrecondition):
        volumes.expand_volume(volume.local_id, 16 * MiB, 0)
    volumes.unpublish_volume(volume.local_id, "n1")
    assert volumes.expand_volume(volume.local_id, 16 * MiB, 0) == 16 * MiB
    volumes.delete_volume(volume.local_id)
    assert volumes.calls[:2] == ["create_volume", "publish_volume"]
