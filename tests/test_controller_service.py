"""The Controller service in process, on fake backends: placement across backends (a full
one hands over, a retry stays where it landed), GetCapacity's filters, the ``requires``
parameter, ABORTED for work in flight, and the capabilities the service advertises and
enforces from what its backends declare. The servicer methods are called directly: what
they raise is a domain error, which the server's interceptor maps with
``csi.status.to_status`` (checked here the same way)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any, NoReturn, cast

import grpc
import pytest

from csi import ids
from csi.backends.base import Backend, Capabilities, Expansion
from csi.controller import ControllerService
from csi.errors import CairnError
from csi.generated import csi_pb2 as pb
from csi.model import NO_SECRETS, TOPOLOGY_NODE_KEY, AccessMode, AccessType, GiB, MiB, Volume, VolumeSpec
from csi.registry import Registry
from csi.scheduler import Scheduler
from csi.status import to_status
from tests.fakes import FAKE_CAPABILITIES, FakeVolumes, fake_backend, fake_volumes

pytestmark = pytest.mark.unit

RPC = pb.ControllerServiceCapability.RPC
Mode = pb.VolumeCapability.AccessMode.Mode
SINGLE_NODE = frozenset(m for m in AccessMode if not m.multi_node)
SINGLE_NODE_ONLY = Capabilities(access={AccessType.MOUNT: SINGLE_NODE, AccessType.BLOCK: SINGLE_NODE})


class DummyContext:
    """The servicer context: the services read nothing from it and never abort."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def abort(self, code: Any, details: str) -> NoReturn:
        raise AssertionError(f"a service called abort({code}, {details!r}): it must raise a domain error")


CONTEXT = cast(grpc.ServicerContext, DummyContext())


def service(*backends: Backend) -> ControllerService:
    registry = Registry(backends)
    return ControllerService(registry, Scheduler(registry))


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status the interceptor would answer with; only domain errors are expected."""
    try:
        call()
    except CairnError as exc:
        return to_status(exc)
    raise AssertionError("the call succeeded")


def capability(mode: int = Mode.SINGLE_NODE_WRITER, block: bool = False) -> pb.VolumeCapability:
    access = pb.VolumeCapability.AccessMode(mode=cast(Any, mode))
    if block:
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=access)
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=access)


def create_request(
    name: str,
    size: int = 8 * MiB,
    source_volume: str = "",
    capabilities: tuple[pb.VolumeCapability, ...] = (),
    **parameters: str,
) -> pb.CreateVolumeRequest:
    request = pb.CreateVolumeRequest(
        name=name,
        capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=capabilities or (capability(),),
        parameters=parameters,
    )
    if source_volume:
        request.volume_content_source.volume.volume_id = source_volume
    return request


def backend_of(volume_id: str) -> str:
    return ids.decode(volume_id).backend


def volume_count(backend: Backend) -> int:
    return len(fake_volumes(backend).list_volumes())


def advertised(svc: ControllerService) -> set[int]:
    response = svc.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), CONTEXT)
    return {c.rpc.type for c in response.capabilities}


# -- placement ----------------------------------------------------------------------------


def test_create_lands_on_the_named_backend_and_a_retry_answers_the_same() -> None:
    a, b = fake_backend("a"), fake_backend("b")
    svc = service(a, b)
    created = svc.CreateVolume(create_request("pvc-1", backend="b"), CONTEXT)
    assert backend_of(created.volume.volume_id) == "b" and created.volume.capacity_bytes == 8 * MiB
    assert svc.CreateVolume(create_request("pvc-1", backend="b"), CONTEXT) == created
    assert (volume_count(a), volume_count(b)) == (0, 1)
    code, message = status_of(lambda: svc.CreateVolume(create_request("pvc-2"), CONTEXT))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "'backend' or 'group' is required" in message


def test_the_filesystem_comes_from_either_storage_class_spelling() -> None:
    """The chart's StorageClasses say ``csi.storage.k8s.io/fstype``, which the provisioner
    turns into the capability's fs_type and does not pass on; a StorageClass written by hand
    with the older ``fsType`` gets the same capability and the parameter as well. Both make
    the same XFS volume (raised to the size XFS needs)."""
    xfs = pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type="xfs"),
        access_mode=pb.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER),
    )
    svc = service(fake_backend("a"))
    current = svc.CreateVolume(create_request("pvc-1", capabilities=(xfs,), backend="a"), CONTEXT).volume
    legacy = svc.CreateVolume(create_request("pvc-2", capabilities=(xfs,), backend="a", fsType="xfs"), CONTEXT).volume
    unstripped = create_request("pvc-3", capabilities=(xfs,), backend="a")
    unstripped.parameters["csi.storage.k8s.io/fstype"] = "xfs"  # as another CO may send it
    assert svc.CreateVolume(unstripped, CONTEXT).volume.capacity_bytes == 300 * MiB
    assert current.capacity_bytes == legacy.capacity_bytes == 300 * MiB
    assert "fsType" not in current.volume_context and legacy.volume_context["fsType"] == "xfs"


def test_a_full_candidate_hands_over_to_the_next() -> None:
    # "a" says it has a terabyte free (its statistics lag), so the scheduler tries it first.
    a = fake_backend("a", "g", size_limit=64 * MiB, reports_free=1 << 40)
    b = fake_backend("b", "g", size_limit=8 * GiB)
    svc = service(a, b)
    created = svc.CreateVolume(create_request("pvc-1", size=GiB, group="g"), CONTEXT)
    assert backend_of(created.volume.volume_id) == "b"
    assert fake_volumes(a).calls == ["create_volume"], "the full backend was asked first"
    assert (volume_count(a), volume_count(b)) == (0, 1), "and kept nothing"

    c = fake_backend("c", "h", size_limit=64 * MiB, reports_free=1 << 40)
    d = fake_backend("d", "h", size_limit=64 * MiB, reports_free=1 << 40)
    code, message = status_of(lambda: service(c, d).CreateVolume(create_request("pvc-1", GiB, group="h"), CONTEXT))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "fake backend" in message
    assert fake_volumes(c).calls == fake_volumes(d).calls == ["create_volume"], "every candidate was tried"


def test_a_retried_name_never_lands_on_a_second_backend() -> None:
    a = fake_backend("a", "g", size_limit=16 * GiB)
    b = fake_backend("b", "g", size_limit=GiB)
    svc = service(a, b)
    created = svc.CreateVolume(create_request("pvc-1", group="g"), CONTEXT)
    assert backend_of(created.volume.volume_id) == "a"
    # Now "b" looks far better, and "a" full and unwell: the retry still answers from "a".
    fake_volumes(a).reports_free, fake_volumes(a).problem = 0, "pool is degraded"
    fake_volumes(b).reports_free = 1 << 50
    assert svc.CreateVolume(create_request("pvc-1", group="g"), CONTEXT) == created
    code, _ = status_of(lambda: svc.CreateVolume(create_request("pvc-1", size=GiB, group="g"), CONTEXT))
    assert code is grpc.StatusCode.ALREADY_EXISTS, "a retry that differs is compared by the backend that has it"
    assert "create_volume" not in fake_volumes(b).calls
    assert (volume_count(a), volume_count(b)) == (1, 0)


def test_one_candidate_is_asked_to_create_without_a_lookup_and_a_retry_on_it_full_still_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With one candidate, placement leads where a retry must go: the backend's create
    answers the retry, and the name is looked up only when placement fails (here the
    volume filled its backend, which now also says it is unwell)."""
    a = fake_backend("a", size_limit=8 * MiB)
    lookups: list[str] = []
    real = FakeVolumes.lookup_volume

    def counted(volumes: FakeVolumes, name: str, *, secrets: Mapping[str, str] = NO_SECRETS) -> Volume | None:
        lookups.append(name)
        return real(volumes, name, secrets=secrets)

    monkeypatch.setattr(FakeVolumes, "lookup_volume", counted)
    svc = service(a)
    created = svc.CreateVolume(create_request("pvc-1", backend="a"), CONTEXT)
    assert lookups == [], "the create went straight to the backend"
    assert fake_volumes(a).free_bytes() == 0
    assert svc.CreateVolume(create_request("pvc-1", backend="a"), CONTEXT) == created
    assert lookups == ["pvc-1"], "placement found no room, so the name was looked up"
    fake_volumes(a).problem = "pool is degraded"
    assert svc.CreateVolume(create_request("pvc-1", backend="a"), CONTEXT) == created
    code, _ = status_of(lambda: svc.CreateVolume(create_request("pvc-2", backend="a"), CONTEXT))
    assert code is grpc.StatusCode.UNAVAILABLE, "a new name on an unwell backend is refused as before"
    assert volume_count(a) == 1


def test_a_clone_stays_on_its_sources_backend() -> None:
    a = fake_backend("a", "g", size_limit=GiB)
    b = fake_backend("b", "g", size_limit=16 * GiB)
    svc = service(a, b)
    source = svc.CreateVolume(create_request("origin", backend="a"), CONTEXT).volume.volume_id
    clone = svc.CreateVolume(create_request("clone", source_volume=source, group="g"), CONTEXT)
    assert backend_of(clone.volume.volume_id) == "a"
    assert clone.volume.content_source.volume.volume_id == source


def test_requires_places_only_on_backends_that_offer_every_feature() -> None:
    plain = fake_backend("plain", "g", replace(FAKE_CAPABILITIES, snapshots=False), size_limit=16 * GiB)
    snappy = fake_backend("snappy", "g", size_limit=GiB)
    svc = service(plain, snappy)
    placed = svc.CreateVolume(create_request("pvc-1", group="g", requires="snapshots"), CONTEXT)
    assert backend_of(placed.volume.volume_id) == "snappy"
    unrestricted = svc.CreateVolume(create_request("pvc-2", group="g"), CONTEXT)
    assert backend_of(unrestricted.volume.volume_id) == "plain", "most free space, when nothing is required"
    code, message = status_of(
        lambda: svc.CreateVolume(create_request("pvc-3", group="g", requires="teleport"), CONTEXT)
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "unknown feature 'teleport'" in message
    code, message = status_of(
        lambda: svc.CreateVolume(create_request("pvc-4", backend="plain", requires="snapshots"), CONTEXT)
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "no backend of plain offers snapshots" in message
    assert volume_count(plain) == volume_count(snappy) == 1


# -- GetCapacity --------------------------------------------------------------------------


def capacity_of(svc: ControllerService, request: pb.GetCapacityRequest) -> tuple[int, int | None]:
    response = svc.GetCapacity(request, CONTEXT)
    largest = response.maximum_volume_size.value if response.HasField("maximum_volume_size") else None
    return response.available_capacity, largest


def test_get_capacity_filters_like_placement() -> None:
    svc = service(
        fake_backend("a", "g", size_limit=10 * GiB, volume_parameters={"tier"}),
        fake_backend("b", "g", SINGLE_NODE_ONLY, size_limit=20 * GiB),
        fake_backend(
            "c",
            capabilities=replace(SINGLE_NODE_ONLY, node_local=True),
            size_limit=30 * GiB,
            topology=({TOPOLOGY_NODE_KEY: "n1"},),
        ),
    )
    assert capacity_of(svc, pb.GetCapacityRequest()) == (30 * GiB, 30 * GiB), "any backend"
    assert capacity_of(svc, pb.GetCapacityRequest(parameters={"backend": "a"})) == (10 * GiB, 10 * GiB)
    assert capacity_of(svc, pb.GetCapacityRequest(parameters={"group": "g"})) == (20 * GiB, 20 * GiB)
    assert capacity_of(svc, pb.GetCapacityRequest(parameters={"group": "g", "tier": "gold"})) == (10 * GiB, 10 * GiB)
    shared = capability(Mode.MULTI_NODE_MULTI_WRITER, block=True)
    assert capacity_of(svc, pb.GetCapacityRequest(volume_capabilities=[shared])) == (10 * GiB, 10 * GiB)
    assert capacity_of(svc, pb.GetCapacityRequest(parameters={"backend": "b"}, volume_capabilities=[shared])) == (
        0,
        None,
    ), "nothing fits: zero, and no maximum"
    elsewhere = pb.Topology(segments={TOPOLOGY_NODE_KEY: "n2"})
    assert capacity_of(svc, pb.GetCapacityRequest(accessible_topology=elsewhere)) == (20 * GiB, 20 * GiB)
    there = pb.Topology(segments={TOPOLOGY_NODE_KEY: "n1"})
    assert capacity_of(svc, pb.GetCapacityRequest(accessible_topology=there)) == (30 * GiB, 30 * GiB)
    no_snapshots = service(
        fake_backend("plain", "g", replace(FAKE_CAPABILITIES, snapshots=False), size_limit=16 * GiB),
        fake_backend("snappy", "g", size_limit=GiB),
    )
    request = pb.GetCapacityRequest(parameters={"group": "g", "requires": "snapshots"})
    assert capacity_of(no_snapshots, request) == (GiB, GiB)


def test_get_capacity_refuses_a_parameter_no_backend_declares() -> None:
    svc = service(fake_backend("a", volume_parameters={"tier"}))
    code, message = status_of(lambda: svc.GetCapacity(pb.GetCapacityRequest(parameters={"tire": "x"}), CONTEXT))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "'tire'" in message


def test_free_space_follows_what_is_made() -> None:
    a = fake_backend("a", size_limit=GiB)
    svc = service(a)
    svc.CreateVolume(create_request("pvc-1", size=256 * MiB), CONTEXT)
    assert capacity_of(svc, pb.GetCapacityRequest()) == (768 * MiB, 768 * MiB)


# -- ABORTED ------------------------------------------------------------------------------


def test_an_operation_in_flight_makes_a_second_one_aborted() -> None:
    a = fake_backend("a")
    svc = service(a)
    with svc.inflight.hold("pvc-1", "volume name"):
        code, _ = status_of(lambda: svc.CreateVolume(create_request("pvc-1"), CONTEXT))
        assert code is grpc.StatusCode.ABORTED
    assert volume_count(a) == 0
    volume_id = svc.CreateVolume(create_request("pvc-1"), CONTEXT).volume.volume_id
    with svc.inflight.hold(volume_id):
        calls: list[Callable[[], object]] = [
            lambda: svc.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), CONTEXT),
            lambda: svc.ControllerPublishVolume(
                pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id="n1", volume_capability=capability()),
                CONTEXT,
            ),
            lambda: svc.ControllerExpandVolume(
                pb.ControllerExpandVolumeRequest(
                    volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=GiB)
                ),
                CONTEXT,
            ),
            lambda: svc.CreateSnapshot(pb.CreateSnapshotRequest(name="snap-1", source_volume_id=volume_id), CONTEXT),
            lambda: svc.CreateVolume(create_request("clone", source_volume=volume_id), CONTEXT),
        ]
        for call in calls:
            assert status_of(call)[0] is grpc.StatusCode.ABORTED
    with svc.inflight.hold("snap-1", "snapshot name"):
        request = pb.CreateSnapshotRequest(name="snap-1", source_volume_id=volume_id)
        assert status_of(lambda: svc.CreateSnapshot(request, CONTEXT))[0] is grpc.StatusCode.ABORTED
    assert fake_volumes(a).calls == ["create_volume"], "nothing reached the backend while held"
    assert [v.capacity_bytes for v in fake_volumes(a).list_volumes()] == [8 * MiB]


# -- what the backends declare ------------------------------------------------------------


def test_advertised_capabilities_follow_the_backends() -> None:
    always = {
        RPC.CREATE_DELETE_VOLUME,
        RPC.PUBLISH_UNPUBLISH_VOLUME,
        RPC.LIST_VOLUMES,
        RPC.GET_CAPACITY,
        RPC.GET_VOLUME,
    }
    snapshots = {RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.GET_SNAPSHOT}
    bare = Capabilities(access=FAKE_CAPABILITIES.access, snapshots=False, clones=False, expansion=Expansion.NONE)
    only_bare = advertised(service(fake_backend("bare", capabilities=bare)))
    assert always <= only_bare
    assert not only_bare & (snapshots | {RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME})
    everything = advertised(service(fake_backend("bare", capabilities=bare), fake_backend("full")))
    assert always | snapshots | {RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME} <= everything, "what one backend offers"


@pytest.mark.parametrize("node_expansion", [True, False])
def test_expansion_says_whether_the_node_must_act(node_expansion: bool) -> None:
    svc = service(fake_backend("a", capabilities=replace(FAKE_CAPABILITIES, node_expansion=node_expansion)))
    volume_id = svc.CreateVolume(create_request("pvc-1"), CONTEXT).volume.volume_id
    request = pb.ControllerExpandVolumeRequest(volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=GiB))
    response = svc.ControllerExpandVolume(request, CONTEXT)
    assert response.capacity_bytes == GiB and response.node_expansion_required is node_expansion


def test_expansion_is_refused_where_it_is_not_offered_or_there_is_no_room() -> None:
    fixed = fake_backend("fixed", capabilities=replace(FAKE_CAPABILITIES, expansion=Expansion.NONE))
    small = fake_backend("small", size_limit=GiB)
    svc = service(fixed, small)
    for name, required, code in (
        ("fixed", GiB, grpc.StatusCode.INVALID_ARGUMENT),
        ("small", 2 * GiB, grpc.StatusCode.OUT_OF_RANGE),
    ):
        volume_id = svc.CreateVolume(create_request("pvc-1", backend=name), CONTEXT).volume.volume_id
        request = pb.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=required)
        )
        assert status_of(partial(svc.ControllerExpandVolume, request, CONTEXT))[0] is code
    assert "expand_volume" not in fake_volumes(fixed).calls + fake_volumes(small).calls


def test_create_snapshot_on_a_backend_without_snapshots_is_invalid_argument() -> None:
    plain = fake_backend("plain", capabilities=replace(FAKE_CAPABILITIES, snapshots=False))
    svc = service(plain)
    volume_id = svc.CreateVolume(create_request("pvc-1"), CONTEXT).volume.volume_id
    request = pb.CreateSnapshotRequest(name="snap-1", source_volume_id=volume_id)
    code, message = status_of(lambda: svc.CreateSnapshot(request, CONTEXT))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "takes no snapshots" in message
    assert "create_snapshot" not in fake_volumes(plain).calls


def test_snapshot_class_parameters_must_be_declared() -> None:
    a = fake_backend("a", snapshot_parameters={"retention"})
    svc = service(a)
    volume_id = svc.CreateVolume(create_request("pvc-1"), CONTEXT).volume.volume_id
    unknown = pb.CreateSnapshotRequest(name="snap-1", source_volume_id=volume_id, parameters={"retentoin": "7d"})
    code, message = status_of(lambda: svc.CreateSnapshot(unknown, CONTEXT))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "unknown snapshot parameter 'retentoin'" in message
    assert "create_snapshot" not in fake_volumes(a).calls
    known = pb.CreateSnapshotRequest(
        name="snap-1",
        source_volume_id=volume_id,
        parameters={"retention": "7d", "csi.storage.k8s.io/volumesnapshot/name": "s"},
    )
    snapshot = svc.CreateSnapshot(known, CONTEXT).snapshot
    assert snapshot.source_volume_id == volume_id and snapshot.ready_to_use


def test_publication_is_refused_for_a_mode_the_backend_does_not_offer() -> None:
    a = fake_backend("a", capabilities=SINGLE_NODE_ONLY)
    svc = service(a)
    volume_id = svc.CreateVolume(create_request("pvc-1"), CONTEXT).volume.volume_id
    request = pb.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id="n1", volume_capability=capability(Mode.MULTI_NODE_MULTI_WRITER, block=True)
    )
    assert status_of(lambda: svc.ControllerPublishVolume(request, CONTEXT))[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert "publish_volume" not in fake_volumes(a).calls


# -- routing ------------------------------------------------------------------------------


def test_ids_of_other_backends_and_garbage_route_nowhere() -> None:
    svc = service(fake_backend("a"))
    for volume_id in ("1:gone:vol-1", "garbage", "1:a:vol-never-made"):
        svc.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), CONTEXT)
        svc.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id="n1"), CONTEXT)
        request = pb.ControllerGetVolumeRequest(volume_id=volume_id)
        assert status_of(partial(svc.ControllerGetVolume, request, CONTEXT))[0] is grpc.StatusCode.NOT_FOUND


def test_list_volumes_spans_every_backend_in_id_order() -> None:
    svc = service(fake_backend("a"), fake_backend("b"))
    made = sorted(
        svc.CreateVolume(create_request(f"pvc-{i}", backend=name), CONTEXT).volume.volume_id
        for i, name in enumerate("babab")
    )
    first = svc.ListVolumes(pb.ListVolumesRequest(max_entries=3), CONTEXT)
    rest = svc.ListVolumes(pb.ListVolumesRequest(starting_token=first.next_token), CONTEXT)
    assert [e.volume.volume_id for e in [*first.entries, *rest.entries]] == made and not rest.next_token


def test_creates_of_different_names_without_a_source_run_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the name (and a content source) is locked: blank volumes of other names are
    created while one is in flight, a second call for the same name is ABORTED."""
    backend = fake_backend("a")
    volumes = fake_volumes(backend)
    entered, release = threading.Event(), threading.Event()
    real = volumes.create_volume

    def slow(spec: VolumeSpec) -> Volume:
        if spec.name == "pvc-slow":
            entered.set()
            release.wait(30)
        return real(spec)

    monkeypatch.setattr(volumes, "create_volume", slow)
    svc = service(backend)
    first = threading.Thread(target=lambda: svc.CreateVolume(create_request("pvc-slow"), CONTEXT))
    first.start()
    try:
        assert entered.wait(30)
        assert svc.CreateVolume(create_request("pvc-other"), CONTEXT).volume.volume_id
        again = partial(svc.CreateVolume, create_request("pvc-slow"), CONTEXT)
        assert status_of(again)[0] is grpc.StatusCode.ABORTED
    finally:
        release.set()
        first.join()


def test_pages_follow_id_order_across_backends_whose_names_share_a_prefix() -> None:
    """IDs of backend "a" sort after those of "a-b" ("-" before ":"): the pages follow
    the IDs, whatever the page size."""
    svc = service(fake_backend("a"), fake_backend("a-b"), fake_backend("b"))
    made = sorted(
        svc.CreateVolume(create_request(f"pvc-{i}", backend=name), CONTEXT).volume.volume_id
        for i, name in enumerate(["a", "a-b", "b", "a", "a-b", "a", "b"])
    )
    for size in (1, 2, 3, 7, 8, 0):
        seen, token = [], ""
        while True:
            answer = svc.ListVolumes(pb.ListVolumesRequest(max_entries=size, starting_token=token), CONTEXT)
            assert not size or len(answer.entries) <= size
            seen += [e.volume.volume_id for e in answer.entries]
            token = answer.next_token
            if not token:
                break
        assert seen == made, f"pages of {size}"
    assert not svc.ListVolumes(pb.ListVolumesRequest(max_entries=7), CONTEXT).next_token, "no page after the last"


def test_a_token_survives_the_deletion_of_its_entry_and_those_before_it() -> None:
    svc = service(fake_backend("a"), fake_backend("b"))
    made = sorted(
        svc.CreateVolume(create_request(f"pvc-{i}", backend="ab"[i % 2]), CONTEXT).volume.volume_id for i in range(6)
    )
    first = svc.ListVolumes(pb.ListVolumesRequest(max_entries=3), CONTEXT)
    for volume_id in made[:3]:
        svc.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), CONTEXT)
    rest = svc.ListVolumes(pb.ListVolumesRequest(starting_token=first.next_token), CONTEXT)
    assert [e.volume.volume_id for e in rest.entries] == made[3:]
    forged = pb.ListVolumesRequest(starting_token="made-up")
    assert status_of(partial(svc.ListVolumes, forged, CONTEXT))[0] is grpc.StatusCode.ABORTED


def test_snapshot_listings_page_by_source_and_by_id() -> None:
    svc = service(fake_backend("a"), fake_backend("b"))
    sources = [svc.CreateVolume(create_request(f"pvc-{n}", backend=n), CONTEXT).volume.volume_id for n in "ab"]
    taken: dict[str, list[str]] = {source: [] for source in sources}
    for i in range(5):
        source = sources[i % 2]
        request = pb.CreateSnapshotRequest(name=f"snap-{i}", source_volume_id=source)
        taken[source].append(svc.CreateSnapshot(request, CONTEXT).snapshot.snapshot_id)

    def walk(snapshot_id: str = "", source_volume_id: str = "") -> list[str]:
        seen: list[str] = []
        token = ""
        while True:
            request = pb.ListSnapshotsRequest(
                max_entries=2, starting_token=token, snapshot_id=snapshot_id, source_volume_id=source_volume_id
            )
            answer = svc.ListSnapshots(request, CONTEXT)
            seen += [e.snapshot.snapshot_id for e in answer.entries]
            if not (token := answer.next_token):
                return seen

    assert walk() == sorted(taken[sources[0]] + taken[sources[1]])
    for source in sources:
        assert walk(source_volume_id=source) == sorted(taken[source])
    one = taken[sources[1]][0]
    assert walk(snapshot_id=one) == [one]
    assert walk(snapshot_id=one, source_volume_id=sources[0]) == []
    assert walk(snapshot_id="1:a:snap-never-made") == [] and walk(source_volume_id="1:a:gone") == []


def test_get_capacity_of_a_group_leaves_out_an_unwell_member() -> None:
    sick = fake_backend("sick", "g", problem="monitors do not answer", reports_free=64 * GiB)
    svc = service(sick, fake_backend("well", "g"))
    available, _maximum = capacity_of(svc, pb.GetCapacityRequest(parameters={"group": "g"}))
    assert available == fake_volumes(svc.registry.route("well", "volume", "x")).free_bytes()
    only_sick = service(fake_backend("sick", problem="monitors do not answer"))
    assert capacity_of(only_sick, pb.GetCapacityRequest())[0] == 0


def test_topology_reaches_the_backend_as_data() -> None:
    node = {TOPOLOGY_NODE_KEY: "n1"}
    local = fake_backend("near", topology=(node,))
    svc = service(local)
    request = create_request("placed")
    request.accessibility_requirements.requisite.add(segments=node)
    request.accessibility_requirements.preferred.add(segments=node)
    svc.CreateVolume(request, CONTEXT)
    spec = fake_volumes(local).specs[-1]
    assert spec.requisite == (node,) and spec.preferred == (node,)
    elsewhere = pb.GetCapacityRequest(accessible_topology=pb.Topology(segments={TOPOLOGY_NODE_KEY: "n2"}))
    assert capacity_of(svc, elsewhere)[0] == 0
    here = pb.GetCapacityRequest(accessible_topology=pb.Topology(segments=node))
    assert capacity_of(svc, here)[0] == fake_volumes(local).free_bytes(node) > 0
    assert fake_volumes(local).free_bytes({TOPOLOGY_NODE_KEY: "n2"}) == 0
